"""The two fused collectives of LSS, over the sequence-parallel group, and their counters.

Forward: local ``k, v`` ([b, s_local, hkv, d] each) are packed into one buffer and gathered with
ONE ``all_gather_into_tensor``. Backward: the key/value gradients for all L positions are packed
and handed back to their owners with ONE ``reduce_scatter_tensor`` (sum). KV heads travel
un-repeated (GQA/MQA); the caller expands them locally, after communication.

Payload bytes recorded per call = bytes of the assembled buffer (N x the packed local k, v):
``2 * b * L * hkv * d * itemsize`` for both collectives, plus, for the all-gather, N x the
40-byte call signature each rank appends (``lss_plugin.signature``). The reduce-scatter's itemsize
is that of the dtype it sends (float32 for half inputs by default: ``kv_grad_dtype``). With
sp_size 1 nothing is sent and nothing is recorded.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lss_plugin.sharding import rank_chunks


@dataclass
class CollectiveRecord:
    """Calls and payload bytes per collective name, filled while ``record_collectives`` is open."""

    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)

    def add(self, name: str, nbytes: int) -> None:
        self.calls[name] += 1
        self.bytes[name] += int(nbytes)


_ACTIVE_RECORDS: list[CollectiveRecord] = []  # diagnostics only; empty unless a test/bench listens


@contextlib.contextmanager
def record_collectives():
    """``with record_collectives() as rec: ...`` then read ``rec.calls`` and ``rec.bytes``."""
    record = CollectiveRecord()
    _ACTIVE_RECORDS.append(record)
    try:
        yield record
    finally:
        _ACTIVE_RECORDS.remove(record)


class CollectiveError(RuntimeError):
    """A plugin collective failed or timed out (a peer died or stalled); says which and where."""


def _note(name: str, tensor: torch.Tensor) -> None:
    for record in _ACTIVE_RECORDS:
        record.add(name, tensor.numel() * tensor.element_size())


@contextlib.contextmanager
def _collective(name: str, group, tensor: torch.Tensor):
    """Count a collective and turn a backend failure into an error naming it and its group."""
    _note(name, tensor)
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - gloo/NCCL raise several types; all mean the same here
        try:
            ranks = dist.get_process_group_ranks(group)
        except Exception:  # noqa: BLE001
            ranks = "?"
        raise CollectiveError(
            f"lss_plugin: {name} over the process group of ranks {ranks} failed on rank "
            f"{dist.get_rank()} ({type(exc).__name__}: {exc}). A peer rank probably died or stalled "
            f"longer than the group's timeout."
        ) from exc


# torch >= 2.13 names the flat collectives *_single and deprecates the *_tensor spellings; both
# take an output that is the inputs concatenated along dim 0.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_flat(output: torch.Tensor, tensor: torch.Tensor, group, name="all_gather_into_tensor") -> None:
    """output [N * tensor.shape[0], ...] = the ranks' ``tensor`` concatenated along dim 0."""
    with _collective(name, group, output):
        _all_gather_flat(output, tensor, group=group)


def reduce_scatter_flat(output: torch.Tensor, tensor: torch.Tensor, group) -> None:
    """output = this rank's dim-0 slice of the sum of the ranks' ``tensor`` [N * output.shape[0], ...]."""
    with _collective("reduce_scatter_tensor", group, tensor):
        _reduce_scatter_flat(output, tensor, op=dist.ReduceOp.SUM, group=group)


def all_reduce_sum(tensor: torch.Tensor, group) -> None:
    """In-place sum over ``group``; nothing is sent (or counted) for a group of one."""
    if dist.get_world_size(group) > 1:
        with _collective("all_reduce", group, tensor):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def _chunk_moves(local_len: int, sp_size: int, layout: str):
    """(source rank, local offset, global offset, length) of every chunk of the sequence."""
    for rank in range(sp_size):
        for c in rank_chunks(local_len, rank, sp_size, layout):
            yield rank, c.local_start, c.global_start, c.length


def gather_kv(k: torch.Tensor, v: torch.Tensor, group, layout: str,
              header: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One all-gather of packed (k, v) -> ([2, b, hkv, L, d] in global position order, headers).

    k, v: [b, s_local, hkv, d]. ``header`` ([n] in k's dtype, e.g. the call signature bit-cast)
    rides at the end of this rank's slice of the same collective; every rank gets all of them
    back as ``headers`` [N, n] (None without a header or with sp_size 1, where nothing is sent).
    """
    sp_size = dist.get_world_size(group)
    b, s_local, hkv, d = k.shape
    payload = 2 * k.numel()
    extra = 0 if header is None or sp_size == 1 else header.numel()
    send = k.new_empty((payload + extra,))  # [k; v; header] of this rank, one contiguous buffer
    packed = send[:payload].view(2, b, s_local, hkv, d)
    packed[0] = k
    packed[1] = v
    headers = None
    if sp_size == 1:
        gathered = packed.unsqueeze(0)
    else:
        if extra:
            send[payload:] = header
        flat = send.new_empty((sp_size, payload + extra))  # rank-major: [N, 2*b*s_local*hkv*d + n]
        all_gather_flat(flat.view(-1), send, group)
        gathered = flat[:, :payload].view(sp_size, 2, b, s_local, hkv, d)  # [N, 2, b, s_local, hkv, d]
        headers = flat[:, payload:] if extra else None  # [N, n]
    kv = k.new_empty((2, b, hkv, s_local * sp_size, d))  # [2, b, hkv, L, d]
    for rank, local_start, global_start, length in _chunk_moves(s_local, sp_size, layout):
        src = gathered[rank, :, :, local_start:local_start + length]  # [2, b, n, hkv, d]
        kv[:, :, :, global_start:global_start + length] = src.transpose(2, 3)
    return kv, headers


def reduce_scatter_kv(dkv: torch.Tensor, group, layout: str, send_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One reduce-scatter (sum) of packed (dK, dV) [2, b, hkv, L, d] -> this rank's [2, b, s_local, hkv, d].

    Sent, summed and returned in ``send_dtype`` (default ``dkv``'s); the cast happens in the
    staging copy the reorder makes anyway."""
    sp_size = dist.get_world_size(group)
    two, b, hkv, seq_len, d = dkv.shape
    s_local = seq_len // sp_size
    staged = dkv.new_empty((sp_size, 2, b, s_local, hkv, d), dtype=send_dtype or dkv.dtype)  # owner-major
    for rank, local_start, global_start, length in _chunk_moves(s_local, sp_size, layout):
        src = dkv[:, :, :, global_start:global_start + length]  # [2, b, hkv, n, d]
        staged[rank, :, :, local_start:local_start + length] = src.transpose(2, 3)
    if sp_size == 1:
        return staged[0]
    out = staged.new_empty((2, b, s_local, hkv, d))
    reduce_scatter_flat(out, staged.view((sp_size * 2, b, s_local, hkv, d)), group)
    return out
