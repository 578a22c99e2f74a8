"""Packed documents: boundaries (``cu_seqlens``), the query segments they cut, and where they come from.

A packed sequence of length L holds documents ``[cu[i], cu[i+1])`` with ``0 = cu[0] < ... < cu[-1] = L``
in **global** positions (the whole sequence, before sharding), the same on every SP rank and shared by
the batch rows, as flash-attn's ``cu_seqlens`` and Megatron's THD ``PackedSeqParams`` give them. No token
attends to another document; inside a document the mask is causal (or full).

A rank's query chunk (``sharding.Chunk``) is cut at the boundaries into ``Segment``s, each inside one
document; a segment only ever reads keys of its own document, so key blocks of other documents are never
computed (``visible_pairs`` counts what is left). Everything here is host-side index arithmetic.
"""
from __future__ import annotations

import bisect
import hashlib
import weakref
from dataclasses import dataclass

import torch

from lss_plugin.masks import MaskSpec, mask_pairs


@dataclass(frozen=True)
class Segment:
    """Consecutive local queries inside one document: a ``Chunk`` plus its document's global range."""

    local_start: int
    global_start: int
    length: int
    doc_start: int
    doc_end: int


# Host copies of boundary tensors: every layer of one forward passes the same tensor, which is read
# (one device sync on a GPU) once. Keyed by the tensor object and its version counter, so an in-place
# change, or a new tensor that reuses a freed one's id, is read again.
_HOST_COPIES: dict[int, tuple] = {}  # id -> (weakref, _version, bounds)
_HOST_COPIES_MAX = 8


def host_bounds(cu_seqlens: torch.Tensor) -> tuple[int, ...]:
    """``cu_seqlens.tolist()`` as ints, read from the device once per tensor version."""
    hit = _HOST_COPIES.get(id(cu_seqlens))
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version:
        return hit[2]
    bounds = tuple(int(x) for x in cu_seqlens.tolist())
    if len(_HOST_COPIES) >= _HOST_COPIES_MAX:
        _HOST_COPIES.pop(next(iter(_HOST_COPIES)))  # the oldest entry
    _HOST_COPIES[id(cu_seqlens)] = (weakref.ref(cu_seqlens), cu_seqlens._version, bounds)
    return bounds


def check_cu_seqlens(cu_seqlens, seq_len: int) -> tuple[int, ...]:
    """Validated boundaries as a tuple of ints (``host_bounds``: one device read per tensor version)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex \
            or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor, got shape {tuple(cu_seqlens.shape)} "
                         f"dtype {cu_seqlens.dtype}")
    bounds = host_bounds(cu_seqlens)
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != seq_len:
        head = list(bounds[:3]) + (["..."] if len(bounds) > 4 else []) + list(bounds[-1:] if len(bounds) > 3 else [])
        raise ValueError(f"cu_seqlens must start at 0 and end at the global sequence length {seq_len} "
                         f"(= s_local x sp_size), got {head} ({len(bounds)} entries)")
    for i in range(1, len(bounds)):
        if bounds[i] <= bounds[i - 1]:
            raise ValueError(f"cu_seqlens must be strictly increasing: cu_seqlens[{i - 1}] = {bounds[i - 1]}, "
                             f"cu_seqlens[{i}] = {bounds[i]}")
    return bounds


def digest(bounds: tuple[int, ...]) -> int:
    """64-bit digest of the boundaries for the call signature; 0 for one document (= no packing)."""
    if len(bounds) == 2:
        return 0
    raw = b"".join(int(x).to_bytes(8, "little") for x in bounds)
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") or 1


def query_segments(chunks, bounds: tuple[int, ...]) -> tuple[Segment, ...]:
    """Cut each chunk at the document boundaries, in local order."""
    segments = []
    for c in chunks:
        pos, end = c.global_start, c.global_start + c.length
        while pos < end:
            doc = bisect.bisect_right(bounds, pos) - 1  # bounds[doc] <= pos < bounds[doc + 1]
            doc_start, doc_end = bounds[doc], bounds[doc + 1]
            stop = min(end, doc_end)
            segments.append(Segment(c.local_start + pos - c.global_start, pos, stop - pos, doc_start, doc_end))
            pos = stop
    return tuple(segments)


def positions_in_documents(global_positions: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Each global position minus the start of its document (RoPE positions of packed tokens)."""
    cu = cu_seqlens.to(global_positions.device, torch.long)
    doc = torch.searchsorted(cu, global_positions, right=True) - 1
    return global_positions - cu[doc]


def visible_pairs(bounds: tuple[int, ...], causal: bool, window: tuple[int, int] | None = None,
                  chunk: int | None = None) -> int:
    """(query, key) pairs attention computes with these documents: sum of n(n+1)/2 (causal) or n^2;
    with a window or chunks (``lss_plugin.masks``), the pairs that mask keeps (``masks.mask_pairs``)."""
    return mask_pairs(tuple(bounds), MaskSpec(bool(causal), window, chunk))


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Boundaries of a packed batch whose ``position_ids`` restart at 0 for each document.

    ``position_ids``: [L] or [b, L] with identical rows (packing shares boundaries across the batch;
    ``DataCollatorWithFlattening`` makes [1, L]). Inside a document positions must count up by one;
    anything else (left padding, offsets) is refused, since it would not mean documents."""
    pos = position_ids
    if pos.dim() == 2:
        if pos.shape[0] > 1 and not bool((pos == pos[:1]).all()):
            raise ValueError("packed position_ids differ between batch rows; documents must share boundaries "
                             f"(use batch 1, as DataCollatorWithFlattening does), got shape {tuple(pos.shape)}")
        pos = pos[0]
    if pos.dim() != 1 or pos.numel() == 0:
        raise ValueError(f"position_ids must be [L] or [b, L], got shape {tuple(position_ids.shape)}")
    pos = pos.long()
    if int(pos[0]) != 0:
        raise ValueError(f"packed position_ids must start at 0, got {int(pos[0])}")
    step = pos[1:] - pos[:-1]
    bad = ((pos[1:] != 0) & (step != 1)).nonzero()
    if bad.numel():
        i = int(bad[0, 0]) + 1
        raise ValueError(f"position_ids[{i}] = {int(pos[i])} after {int(pos[i - 1])}: packed positions either "
                         f"restart at 0 (a new document) or count up by 1")
    starts = (pos == 0).nonzero().flatten()
    return torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)


def cu_seqlens_from_eod(tokens: torch.Tensor, eod_token: int) -> torch.Tensor:
    """Boundaries of a token stream in which ``eod_token`` ends each document (Megatron's convention:
    the EOD token is the last token of its document). ``tokens``: [L] or [1, L]."""
    t = tokens[0] if tokens.dim() == 2 and tokens.shape[0] == 1 else tokens
    if t.dim() != 1:
        raise ValueError(f"tokens must be [L] or [1, L] (packing shares boundaries), got {tuple(tokens.shape)}")
    ends = (t == eod_token).nonzero().flatten() + 1
    ends = ends[ends < t.numel()]  # an EOD as the last token closes the last document anyway
    return torch.cat([ends.new_zeros(1), ends, ends.new_tensor([t.numel()])]).to(torch.int32)


__all__ = ["Segment", "check_cu_seqlens", "host_bounds", "cu_seqlens_from_eod", "cu_seqlens_from_position_ids", "digest",
           "positions_in_documents", "query_segments", "visible_pairs"]
