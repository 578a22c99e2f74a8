"""Megatron / TransformerEngine context parallelism with K/V all-gather (``cp_comm_type="all_gather"``).

The closest prior art to LSS, as TransformerEngine's ``AttnFuncWithCPAndKVAllGather`` does it
(Llama 3 paper, section 3.3.2), on LSS's block kernel:
- balanced layout: rank r holds chunks r and 2N-1-r of the sequence;
- forward: K and V are all-gathered by two SEPARATE collectives and put in global order; each of
  the two local query chunks attends to the keys up to its own end (a bottom-right causal block,
  computed here as the fully visible prefix plus the diagonal block, merged by log-sum-exp);
- only the local q, k, v, out and lse are saved: backward ALWAYS all-gathers K and V again (two
  more collectives), computes dQ and dK/dV for all L positions, and returns dK and dV to their
  owners by two SEPARATE reduce-scatters.
Per rank and layer (N > 1): 4 all-gathers of [b, s_local, Hkv, d] and 2 reduce-scatters of
[b, L, Hkv, d]; LSS moves the same bytes in 1 gather + 1 reduce-scatter (``keep``) or 2 + 1
(``regather``), each of packed K and V together.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from lss_plugin.baselines.blocks import (BlockAttentionFunction, RowMerger, plan_tasks, task_backward,
                                         task_forward)
from lss_plugin.baselines.ring import check_qkv
from lss_plugin.sharding import Chunk, check_layout, local_token_indices, rank_chunks

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _global_order(s_local: int, size: int, layout: str, device) -> torch.Tensor:
    """Index into the rank-major concatenation of local rows that puts them in global order."""
    owner_major = torch.cat([local_token_indices(s_local * size, r, size, layout) for r in range(size)])
    return torch.argsort(owner_major).to(device)


def _gather(x: torch.Tensor, group, order: torch.Tensor) -> torch.Tensor:
    """One all-gather: x [b, H, s_local, d] of every rank -> [b, H, L, d] in global order."""
    size = dist.get_world_size(group)
    if size == 1:
        return x
    local = x.permute(2, 0, 1, 3).contiguous()  # [s_local, b, H, d]: ranks concatenate along dim 0
    flat = local.new_empty((size * local.shape[0],) + tuple(local.shape[1:]))
    _all_gather(flat, local, group=group)
    return flat.index_select(0, order).permute(1, 2, 0, 3)  # [b, H, L, d]


def _reduce_scatter_rows(dx: torch.Tensor, group, order: torch.Tensor) -> torch.Tensor:
    """One reduce-scatter (sum): dx [b, H, L, d] in global order -> this rank's [b, H, s_local, d]."""
    size = dist.get_world_size(group)
    if size == 1:
        return dx
    b, heads, seq_len, d = dx.shape
    owner_major = dx.new_empty((seq_len, b, heads, d))  # ranks' rows one after the other
    owner_major[order] = dx.permute(2, 0, 1, 3)
    out = owner_major.new_empty((owner_major.shape[0] // size,) + tuple(owner_major.shape[1:]))
    _reduce_scatter(out, owner_major, op=dist.ReduceOp.SUM, group=group)
    return out.permute(1, 2, 0, 3)  # [b, H, s_local, d]


def _tasks(s_local, rank, size, layout, causal):
    """Every local query chunk against the gathered keys in global order (one big key 'chunk' set)."""
    q_chunks = rank_chunks(s_local, rank, size, layout)
    n = q_chunks[0].length
    k_chunks = [Chunk(i * n, i * n, n) for i in range(s_local * size // n)]  # global order
    return plan_tasks(q_chunks, k_chunks, causal)


def allgather_forward(q, k, v, group, scale, causal, layout):
    """q [b, H, s, d], k/v [b, Hkv, s, d] -> out [b, H, s, d], lse [b, H, s]."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    order = _global_order(q.shape[2], size, layout, q.device)
    k_all, v_all = _gather(k, group, order), _gather(v, group, order)  # [b, Hkv, L, d] each
    merger = RowMerger(q)
    for t in _tasks(q.shape[2], rank, size, layout, causal):
        out, lse = task_forward(q[:, :, t.q_rows], k_all[:, :, t.k_rows], v_all[:, :, t.k_rows],
                                scale, t.diagonal)
        merger.add(t.q_rows, out, lse)
    return merger.result(q.dtype)


def allgather_backward(dout, q, k, v, out, lse, group, scale, causal, layout):
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    order = _global_order(q.shape[2], size, layout, q.device)
    k_all, v_all = _gather(k, group, order), _gather(v, group, order)  # always re-gathered
    dq = torch.zeros_like(q)
    dk_all, dv_all = torch.zeros_like(k_all), torch.zeros_like(v_all)  # [b, Hkv, L, d]
    for t in _tasks(q.shape[2], rank, size, layout, causal):
        rows = t.q_rows
        dq_t, dk_t, dv_t = task_backward(dout[:, :, rows], q[:, :, rows], k_all[:, :, t.k_rows],
                                         v_all[:, :, t.k_rows], out[:, :, rows], lse[:, :, rows],
                                         scale, t.diagonal)
        dq[:, :, rows] += dq_t
        dk_all[:, :, t.k_rows] += dk_t
        dv_all[:, :, t.k_rows] += dv_t
    del k_all, v_all
    return dq, _reduce_scatter_rows(dk_all, group, order), _reduce_scatter_rows(dv_all, group, order)


def allgather_cp_attention(q, k, v, *, group, causal=False, softmax_scale=None, layout="balanced"):
    """q [b, s_local, H, d], k/v [b, s_local, Hkv, d] -> [b, s_local, H, d] over ``group``."""
    check_layout(layout)
    check_qkv(q, k, v)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = BlockAttentionFunction.apply(allgather_forward, allgather_backward, q.transpose(1, 2),
                                       k.transpose(1, 2), v.transpose(1, 2), group, scale, causal, layout)
    return out.transpose(1, 2)
