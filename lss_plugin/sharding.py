"""Which tokens a sequence-parallel rank holds, in the contiguous and the balanced layout.

contiguous: rank s holds tokens [s*L/N, (s+1)*L/N) (the LSS paper's layout).
balanced:   the sequence is cut into 2N chunks; rank s holds chunk s then chunk 2N-1-s, so under a
            causal mask every rank does the same work (Megatron-CP's and Llama-3's layout).

Hybrid LSS x Ulysses (``ulysses_size`` U > 1, N = U x R): the layout applies to the R Ulysses
groups (group g holds what rank g of R would), and the group's tokens are split into U
consecutive equal pieces, one per member (as USP lays out its sequence). After the all-to-all
each rank of an LSS group holds exactly its group's tokens, laid out over R ranks, so balanced
keeps its causal balance. Contiguous is then the plain contiguous layout over N.

Everything here is pure index arithmetic except ``unshard_sequence``, which all-gathers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lss_plugin.documents import check_cu_seqlens, positions_in_documents
from lss_plugin.options import DEFAULT_LAYOUT, LAYOUTS, check_layout, check_ulysses_size  # noqa: F401 - LAYOUTS re-exported
from lss_plugin.topology import resolve_sequence_groups


def chunks_per_rank(layout: str) -> int:
    check_layout(layout)
    return 1 if layout == "contiguous" else 2


def check_seq_len(seq_len: int, sp_size: int, layout: str, ulysses_size: int = 1) -> None:
    """A global length the layout can split evenly: divisible by N (contiguous) or 2N (balanced);
    for the hybrid, by N and by 2 * (N / U) (balanced over the R = N / U Ulysses groups)."""
    lss_size = check_ulysses_size(ulysses_size, sp_size)
    parts = math.lcm(sp_size, lss_size * chunks_per_rank(layout))
    if seq_len <= 0 or seq_len % parts != 0:
        if ulysses_size > 1:
            what = f"lcm(sp_size, {chunks_per_rank(layout)} * sp_size / ulysses_size) = {parts}"
        else:
            what = f"2 * sp_size = {parts}" if layout == "balanced" else f"sp_size = {parts}"
        raise ValueError(
            f"sequence length {seq_len} is not divisible by {what} for layout {layout!r}"
        )


@dataclass(frozen=True)
class Chunk:
    """A run of consecutive global positions held by one rank."""

    local_start: int  # offset in the rank's local sequence
    global_start: int  # position of its first token in the whole sequence
    length: int


def rank_chunks(local_len: int, sp_rank: int, sp_size: int, layout: str, ulysses_size: int = 1) -> list[Chunk]:
    """The chunks of global positions a rank holds, in its local order.

    ``ulysses_size`` U > 1: SP rank ``sp_rank`` holds piece ``sp_rank % U`` of its Ulysses group's
    tokens, which follow the layout over the R = N / U groups (see the module docstring)."""
    if ulysses_size > 1:
        lss_size = check_ulysses_size(ulysses_size, sp_size)
        lo = (sp_rank % ulysses_size) * local_len  # my piece of the group's local tokens
        hi = lo + local_len
        pieces = []
        for c in rank_chunks(ulysses_size * local_len, sp_rank // ulysses_size, lss_size, layout):
            start, end = max(c.local_start, lo), min(c.local_start + c.length, hi)
            if start < end:
                pieces.append(Chunk(start - lo, c.global_start + start - c.local_start, end - start))
        return pieces
    cpr = chunks_per_rank(layout)
    if local_len % cpr != 0:
        raise ValueError(
            f"local sequence length {local_len} cannot come from layout {layout!r}: "
            f"it must be divisible by {cpr} (global length divisible by 2 * sp_size = {2 * sp_size})"
        )
    size = local_len // cpr
    global_chunk_ids = [sp_rank] if cpr == 1 else [sp_rank, 2 * sp_size - 1 - sp_rank]
    return [Chunk(i * size, g * size, size) for i, g in enumerate(global_chunk_ids)]


def local_token_indices(seq_len: int, sp_rank: int, sp_size: int, layout: str = DEFAULT_LAYOUT,
                        ulysses_size: int = 1) -> torch.Tensor:
    """Global positions of rank ``sp_rank``'s tokens, in its local order. LongTensor[seq_len / N]."""
    check_seq_len(seq_len, sp_size, layout, ulysses_size)
    chunks = rank_chunks(seq_len // sp_size, sp_rank, sp_size, layout, ulysses_size)
    return torch.cat([torch.arange(c.global_start, c.global_start + c.length) for c in chunks])


def _group_coords(group) -> tuple[int, int, int]:
    """(sp_rank, sp_size, ulysses_size) of a ProcessGroup, SequenceGroups, LSSTopology or None."""
    groups = resolve_sequence_groups(group)
    return groups.sp_rank, groups.sp_size, groups.ulysses_size


def local_positions(seq_len: int, group=None, layout: str = DEFAULT_LAYOUT, device=None,
                    cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids of this rank's tokens (for RoPE or learned position tables).

    With ``cu_seqlens`` (packed documents, global boundaries) each token's position inside its own
    document, as one device computes it for restarting ``position_ids``."""
    sp_rank, sp_size, ulysses_size = _group_coords(group)
    positions = local_token_indices(seq_len, sp_rank, sp_size, layout, ulysses_size)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, seq_len)
        positions = positions_in_documents(positions, cu_seqlens)
    return positions.to(device)


def shard_sequence(x: torch.Tensor, dim: int, group=None, layout: str = DEFAULT_LAYOUT) -> torch.Tensor:
    """This rank's part of ``x`` along the sequence dimension ``dim`` (no communication)."""
    sp_rank, sp_size, ulysses_size = _group_coords(group)
    seq_len = x.size(dim)
    check_seq_len(seq_len, sp_size, layout, ulysses_size)
    chunks = rank_chunks(seq_len // sp_size, sp_rank, sp_size, layout, ulysses_size)
    parts = [x.narrow(dim, c.global_start, c.length) for c in chunks]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def unshard_sequence(x: torch.Tensor, dim: int, group=None, layout: str = DEFAULT_LAYOUT) -> torch.Tensor:
    """Inverse of ``shard_sequence``: all-gather the local parts and restore the global order."""
    groups = resolve_sequence_groups(group)
    sp_size = groups.sp_size
    local_len = x.size(dim)
    pieces = [torch.empty_like(x) for _ in range(sp_size)]
    dist.all_gather(pieces, x.contiguous(), group=groups.sp_group)
    ordered: dict[int, torch.Tensor] = {}
    for rank, piece in enumerate(pieces):
        for c in rank_chunks(local_len, rank, sp_size, layout, groups.ulysses_size):
            ordered[c.global_start] = piece.narrow(dim, c.local_start, c.length)
    return torch.cat([ordered[start] for start in sorted(ordered)], dim)
