"""Attention of local query chunks over key chunks with LSS's block kernel, merged by log-sum-exp.

Every sequence-parallel baseline here (ring, allgather_cp, usp) computes with the kernel LSS
computes with, ``lss_plugin.kernels.block_forward`` / ``block_backward``, so that a benchmark row
differs from LSS by its communication only.

A rank's tokens are chunks of consecutive global positions (``lss_plugin.sharding.Chunk``). Under
a causal mask a query chunk sees an earlier key chunk fully, its own chunk as the lower triangle
(the "diagonal" block) and a later chunk not at all, so masked blocks are skipped, never computed
(ring attention's half-block skipping in the zigzag layout falls out of this). ``plan_tasks``
merges neighbouring chunks so one kernel call covers, e.g., both query halves of a zigzag rank.

Tensors are ``[b, heads, s, d]``; ``lse`` is ``[b, heads, s]``. K/V may have fewer heads (GQA):
the kernels take them as LSS hands them over (natively, or through ``lss_plugin.kernels.gqa``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lss_plugin.kernels import block_backward, block_forward
from lss_plugin.sharding import Chunk


@dataclass(frozen=True)
class Task:
    """One kernel call: local query rows against local key rows; ``diagonal`` = causal block."""

    q_rows: slice
    k_rows: slice
    diagonal: bool


def _span(chunks: list[Chunk]) -> slice | None:
    """The local rows of chunks that are adjacent in local order, else None."""
    chunks = sorted(chunks, key=lambda c: c.local_start)
    for a, b in zip(chunks, chunks[1:]):
        if a.local_start + a.length != b.local_start:
            return None
    return slice(chunks[0].local_start, chunks[-1].local_start + chunks[-1].length)


def plan_tasks(q_chunks, k_chunks, causal: bool) -> list[Task]:
    """Kernel calls covering every visible (query chunk, key chunk) pair exactly once.

    Chunks of one call have equal lengths (a layout's chunks do), so a key chunk is either
    before, the same as, or after a query chunk in global positions.
    """
    diagonal, full = [], {}
    for qc in q_chunks:
        seen = []
        for kc in k_chunks:
            if not causal or kc.global_start < qc.global_start:
                seen.append(kc)
            elif kc.global_start == qc.global_start:
                diagonal.append(Task(slice(qc.local_start, qc.local_start + qc.length),
                                     slice(kc.local_start, kc.local_start + kc.length), True))
        if seen:
            full.setdefault(tuple(seen), []).append(qc)
    tasks = list(diagonal)
    for seen, queries in full.items():
        k_span, q_span = _span(list(seen)), _span(queries)
        k_spans = [k_span] if k_span else [slice(c.local_start, c.local_start + c.length) for c in seen]
        q_spans = [q_span] if q_span else [slice(c.local_start, c.local_start + c.length) for c in queries]
        tasks += [Task(q, k, False) for q in q_spans for k in k_spans]
    return tasks


def task_forward(q, k, v, scale: float, diagonal: bool):
    """q [b, H, n, d], k/v [b, Hkv, m, d] -> out [b, H, n, d], lse [b, H, n] of one block."""
    return block_forward(q, k, v, scale, diagonal)


def task_backward(dout, q, k, v, out, lse, scale: float, diagonal: bool):
    """dq [b, H, n, d], dk/dv [b, Hkv, m, d] of one block, from the row's merged out and lse."""
    return block_backward(dout, q, k, v, out, lse, scale, diagonal)


class RowMerger:
    """Partial softmax results of disjoint key blocks, merged per query row by log-sum-exp.

    ``out`` [b, H, s, d] and ``lse`` [b, H, s] (fp32 or wider: merges are done in the wider type,
    as flash attention does). Rows no block has reached keep lse = -inf and out = 0.
    """

    def __init__(self, q: torch.Tensor):
        wide = torch.promote_types(q.dtype, torch.float32)
        b, h, s, d = q.shape
        # stored [b, s, H, d]: the caller's layout, so returning it to [b, s, H, d] copies nothing
        self.out = torch.zeros((b, s, h, d), dtype=wide, device=q.device).transpose(1, 2)
        self.lse = torch.full(q.shape[:-1], float("-inf"), dtype=wide, device=q.device)

    def add(self, rows: slice, out: torch.Tensor, lse: torch.Tensor) -> None:
        old_out, old_lse = self.out[:, :, rows], self.lse[:, :, rows]
        new_lse = torch.logaddexp(old_lse, lse.to(old_lse.dtype))
        # exp(-inf - finite) = 0: a row's first block replaces the zeros exactly
        old_w = torch.exp(old_lse - new_lse).unsqueeze(-1)
        new_w = torch.exp(lse.to(old_lse.dtype) - new_lse).unsqueeze(-1)
        self.out[:, :, rows] = old_out * old_w + out.to(old_out.dtype) * new_w
        self.lse[:, :, rows] = new_lse

    def result(self, dtype: torch.dtype):
        return self.out.to(dtype), self.lse


class BlockAttentionFunction(torch.autograd.Function):
    """Autograd around a pure ``forward(q, k, v, *args) -> (out, lse)`` / ``backward`` pair.

    Saves the local q, k, v, out and lse only (what a flash-style backward needs).
    """

    @staticmethod
    def forward(ctx, forward_fn, backward_fn, q, k, v, *args):
        out, lse = forward_fn(q, k, v, *args)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.backward_fn, ctx.args = backward_fn, args
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.backward_fn(dout.contiguous(), q, k, v, out, lse, *ctx.args)
        return (None, None, dq, dk, dv) + (None,) * len(ctx.args)
