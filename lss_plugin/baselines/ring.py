"""Ring attention (Li et al., 2021; ring-flash-attention's zigzag variant): K/V blocks travel the ring.

Every rank keeps its queries. At step i, rank r holds the packed K/V block of rank (r - i) mod N,
attends to it, and passes it on to rank r + 1 with asynchronous point-to-point ``isend``/``irecv``
started before the step's compute and waited on after it. Partial results are merged by
log-sum-exp (``blocks.RowMerger``), so the output equals full attention. Backward sends the K/V
blocks around again together with their gradient accumulators, which are back at their owner after
N hops (as ring-flash-attention does).

Layout: ``balanced`` (default) is ring-flash-attention's zigzag: rank r holds chunks r and 2N-1-r.
Under a causal mask every step then costs half a block on every rank: from an earlier rank both
query halves see the block's first chunk; from a later rank only the second query half sees the
whole block (``blocks.plan_tasks`` finds exactly these calls). ``contiguous`` is accepted too
(unbalanced: the last rank does N times the work of the first).

Kernel: ``lss_plugin.kernels.block_forward`` / ``block_backward``, the kernel LSS uses.

Communication per rank and layer (N > 1), K/V never repeated for GQA:
  forward  N - 1 sends of packed [2, b, hkv, s_local, d]
  backward N - 1 sends of K/V + N sends of packed dK/dV (same size)
Three layers, as in ring-flash-attention: ``ring_forward``/``ring_backward`` hold the
communication, ``blocks.BlockAttentionFunction`` the autograd.Function, ``ring_attention`` the public call.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from lss_plugin.baselines.blocks import (BlockAttentionFunction, RowMerger, plan_tasks, task_backward,
                                         task_forward)
from lss_plugin.sharding import check_layout, rank_chunks


class _RingExchange:
    """One asynchronous hop: send ``buf`` to the next rank, receive the previous rank's."""

    def __init__(self, buf: torch.Tensor, group):
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        self.recv = torch.empty_like(buf)
        self._sending = buf  # referenced until the send completes
        self._works = [dist.isend(buf, dist.get_global_rank(group, (rank + 1) % size), group=group),
                       dist.irecv(self.recv, dist.get_global_rank(group, (rank - 1) % size), group=group)]

    def wait(self) -> torch.Tensor:
        for w in self._works:
            w.wait()
        self._sending = None
        return self.recv


def _step_tasks(s_local, rank, src, size, layout, causal):
    return plan_tasks(rank_chunks(s_local, rank, size, layout),
                      rank_chunks(s_local, src, size, layout), causal)


def ring_forward(q, k, v, group, scale, causal, layout):
    """q [b, H, s, d], k/v [b, Hkv, s, d] (local) -> out [b, H, s, d], lse [b, H, s] (fp32+)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    s_local = q.shape[2]
    kv = torch.stack((k, v))  # [2, b, Hkv, s, d]: one message per hop
    merger = RowMerger(q)
    for step in range(size):
        hop = _RingExchange(kv, group) if step + 1 < size else None  # overlaps this step's compute
        src = (rank - step) % size
        for t in _step_tasks(s_local, rank, src, size, layout, causal):
            out, lse = task_forward(q[:, :, t.q_rows], kv[0, :, :, t.k_rows], kv[1, :, :, t.k_rows],
                                    scale, t.diagonal)
            merger.add(t.q_rows, out, lse)
        if hop is not None:
            kv = hop.wait()
    return merger.result(q.dtype)


def ring_backward(dout, q, k, v, out, lse, group, scale, causal, layout):
    """dq [b, H, s, d] and dk, dv [b, Hkv, s, d] of the local block."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    s_local = q.shape[2]
    dq = torch.zeros_like(q)
    kv = torch.stack((k, v))  # [2, b, Hkv, s, d]
    dkv_hop = None  # the accumulator of the block currently held travels with it
    for step in range(size):
        kv_hop = _RingExchange(kv, group) if step + 1 < size else None
        src = (rank - step) % size
        block = torch.zeros_like(kv)  # [2, b, Hkv, s, d]
        for t in _step_tasks(s_local, rank, src, size, layout, causal):
            rows = t.q_rows
            dq_t, dk_t, dv_t = task_backward(dout[:, :, rows], q[:, :, rows], kv[0, :, :, t.k_rows],
                                             kv[1, :, :, t.k_rows], out[:, :, rows], lse[:, :, rows],
                                             scale, t.diagonal)
            dq[:, :, rows] += dq_t
            block[0, :, :, t.k_rows] += dk_t
            block[1, :, :, t.k_rows] += dv_t
        dkv = block if dkv_hop is None else dkv_hop.wait() + block
        if size > 1:
            dkv_hop = _RingExchange(dkv, group)
        else:
            dkv_hop = None
        if kv_hop is not None:
            kv = kv_hop.wait()
    if dkv_hop is not None:
        dkv = dkv_hop.wait()  # after N hops the accumulator of our own block is back
    return dq, dkv[0], dkv[1]


def check_qkv(q, k, v) -> None:
    """q [b, s, H, d] and k, v [b, s, Hkv, d] with H a multiple of Hkv, or a ValueError naming them."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [b, s, h, d] and k, v [b, s, hkv, d], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)}: batch, local length and head "
                         f"dim must agree and q heads must be a multiple of kv heads")


def ring_attention(q, k, v, *, group, causal=False, softmax_scale=None, layout="balanced"):
    """Ring attention over ``group``. q [b, s_local, H, d], k/v [b, s_local, Hkv, d] -> [b, s_local, H, d].

    ``layout`` says which global positions each rank holds (``lss_plugin.sharding``): ``balanced``
    is the zigzag layout; it only matters for the causal mask.
    """
    check_layout(layout)
    check_qkv(q, k, v)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    # [b, s, h, d] -> [b, h, s, d], the kernels' layout
    out = BlockAttentionFunction.apply(ring_forward, ring_backward, q.transpose(1, 2), k.transpose(1, 2),
                                       v.transpose(1, 2), group, scale,
                                       causal, layout)
    return out.transpose(1, 2)
