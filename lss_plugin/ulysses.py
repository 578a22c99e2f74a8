"""The Ulysses all-to-all: sequence-sharded, all heads <-> the group's tokens, a slice of the heads.

Inside a Ulysses group of U ranks, each holding s local tokens of every head::

    to_heads:    [b, s, H, d] on each rank  ->  [b, U * s, H / U, d]   (rank j: head slice j)
    to_sequence: [b, U * s, H / U, d]       ->  [b, s, H, d]           (the inverse)

Several tensors (q, k, v; or dq, dk, dv) travel in ONE fused ``all_to_all_single``: each rank's
slice for destination j packs every tensor's head slice j. Autograd-aware: the backward of one
direction is the other. Used by the hybrid LSS x Ulysses (``lss_plugin.attention``) and by the
USP baseline (``lss_plugin.baselines.usp``). Counted by ``record_collectives`` as
``all_to_all_single`` with the bytes this rank sends (the whole send buffer, its own slice
included). A group of one sends nothing.

KV heads that U does not divide are replicated first (``replicate_kv_heads``) to lcm(Hkv, U), so
each rank gets whole GQA groups; autograd sums the replicas' gradients back.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lss_plugin.comm import counted_collective

NAME = "all_to_all_single"


def _exchange(send: torch.Tensor, group) -> torch.Tensor:
    """send [U, ...] (slice j for rank j) -> recv [U, ...] (slice j from rank j)."""
    recv = torch.empty_like(send)
    with counted_collective(NAME, group, send):
        dist.all_to_all_single(recv, send, group=group)
    return recv


def _pack(parts: list[torch.Tensor], header: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """[U, ...] per tensor (+ a header row for every destination) -> flat [U, n] and the payload n."""
    u = parts[0].shape[0]
    flat = [p.reshape(u, -1) for p in parts]
    payload = sum(f.shape[1] for f in flat)
    if header is not None:
        flat.append(header.reshape(1, -1).expand(u, -1))
    return torch.cat(flat, dim=1), payload


def _unpack(recv: torch.Tensor, shapes: list[tuple], payload: int):
    """flat [U, n] -> the tensors [U, ...] and the header rows [U, n_header] (None without)."""
    out, offset = [], 0
    for shape in shapes:
        size = 1
        for dim in shape[1:]:
            size *= dim
        out.append(recv[:, offset:offset + size].reshape(shape))
        offset += size
    headers = recv[:, payload:] if recv.shape[1] > payload else None
    return out, headers


def seq_to_heads(tensors, group, header: torch.Tensor | None = None):
    """Each [b, s, h_t, d] -> [b, U * s, h_t / U, d] (my head slice of the group's tokens), ONE
    all-to-all for all of them; ``header`` [n] rides to every rank, which gets the rows [U, n]."""
    u = dist.get_world_size(group)
    if u == 1:
        return list(tensors), (None if header is None else header.reshape(1, -1))
    b, s = tensors[0].shape[:2]
    # [U, b, s, h_t / U, d]: slice j goes to rank j
    parts = [t.reshape(b, s, u, t.shape[2] // u, t.shape[3]).permute(2, 0, 1, 3, 4) for t in tensors]
    send, payload = _pack(parts, header)
    received, headers = _unpack(_exchange(send, group), [p.shape for p in parts], payload)
    # slice j: rank j's tokens -> [b, U * s, h_t / U, d] in the group's token order
    return [r.transpose(0, 1).reshape(b, u * s, *r.shape[3:]) for r in received], headers


def heads_to_seq(tensors, group):
    """Inverse of ``seq_to_heads``: each [b, U * s, h_t / U, d] -> [b, s, h_t, d], ONE all-to-all."""
    u = dist.get_world_size(group)
    if u == 1:
        return list(tensors)
    b, us = tensors[0].shape[:2]
    s = us // u
    parts = [t.reshape(b, u, s, *t.shape[2:]).transpose(0, 1) for t in tensors]  # [U, b, s, h_t/U, d]: my tokens j
    send, payload = _pack(parts, None)
    received, _ = _unpack(_exchange(send, group), [p.shape for p in parts], payload)
    # slice j: my tokens, rank j's head slice -> [b, s, U * h_t / U, d]
    return [r.permute(1, 2, 0, 3, 4).reshape(b, s, u * r.shape[3], r.shape[4]) for r in received]


class _ToHeads(torch.autograd.Function):
    """``seq_to_heads`` in forward, ``heads_to_seq`` of the gradients in backward."""

    @staticmethod
    def forward(ctx, group, header, *tensors):
        ctx.group = group
        outs, headers = seq_to_heads(tensors, group, header)
        headers = headers.clone() if headers is not None else torch.empty(0)
        ctx.mark_non_differentiable(headers)
        return (*outs, headers)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *heads_to_seq([g.contiguous() for g in grads[:-1]], ctx.group))


class _ToSequence(torch.autograd.Function):
    """``heads_to_seq`` in forward, ``seq_to_heads`` of the gradient in backward."""

    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        return tuple(heads_to_seq(tensors, group))

    @staticmethod
    def backward(ctx, *grads):
        return (None, *seq_to_heads([g.contiguous() for g in grads], ctx.group)[0])


def to_heads(*tensors, group, header: torch.Tensor | None = None):
    """Autograd-aware ``seq_to_heads``: (outputs..., header rows [U, n] or None)."""
    *outs, headers = _ToHeads.apply(group, header, *tensors)
    return (*outs, headers if header is not None else None)


def to_sequence(*tensors, group):
    """Autograd-aware ``heads_to_seq``: a tuple of the outputs."""
    return _ToSequence.apply(group, *tensors)


def replicate_kv_heads(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[b, s, Hkv, d] -> [b, s, kv_heads, d], each KV head repeated kv_heads / Hkv times in place
    (query head j keeps reading a copy of its own KV head); gradients of the copies are summed."""
    repeats = kv_heads // x.shape[2]
    return x if repeats == 1 else x.repeat_interleave(repeats, dim=2)
