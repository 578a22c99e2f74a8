"""USP, the Ulysses x ring hybrid (Fang and Zhao, 2024): all-to-all inside groups, ring across.

The SP group of N = U x R ranks is cut into R Ulysses groups of U consecutive ranks; the ranks
with the same index in every Ulysses group form a ring group. Per layer, on every rank:
1. all-to-all inside the Ulysses group: q, k, v [b, s_local, H, d] -> [b, U * s_local, H / U, d]
   (the group's tokens, a slice of the heads; KV heads are split, never repeated: Hkv % U == 0);
2. ring attention (``lss_plugin.baselines.ring``, zigzag) over the ring group on those tokens;
3. all-to-all back to [b, s_local, H, d]. Backward mirrors it.

Causal balance: the sequence is cut into 2R chunks; Ulysses group g holds chunks g and 2R-1-g
(the zigzag layout of the ring group), split contiguously among its U members
(``usp_token_indices``), so after the all-to-all every ring rank holds a zigzag shard.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from lss_plugin.baselines.ring import check_qkv, ring_attention
from lss_plugin.sharding import local_token_indices


def check_usp_sizes(sp_size: int, ulysses_size: int) -> int:
    """The ring size R = N / U, or a ValueError naming both sizes."""
    if ulysses_size < 1 or sp_size % ulysses_size:
        raise ValueError(f"usp: ulysses size {ulysses_size} must divide the sequence-parallel size {sp_size}")
    return sp_size // ulysses_size


def usp_token_indices(seq_len: int, sp_rank: int, sp_size: int, ulysses_size: int) -> torch.Tensor:
    """Global positions of SP rank ``sp_rank``'s tokens under USP's layout. LongTensor[L / N]."""
    ring_size = check_usp_sizes(sp_size, ulysses_size)
    if seq_len % (2 * sp_size):
        raise ValueError(f"usp: sequence length {seq_len} must be divisible by 2 x ring size x "
                         f"ulysses size = {2 * sp_size}")
    group_tokens = local_token_indices(seq_len, sp_rank // ulysses_size, ring_size, "balanced")
    return group_tokens.chunk(ulysses_size)[sp_rank % ulysses_size]


def usp_groups(sp_size: int, ulysses_size: int, timeout_s: float = 300.0):
    """(ulysses_group, ring_group) of this rank; collective over the whole world.

    SP groups are the consecutive blocks of ``sp_size`` ranks (the LSS / Megatron CP grid with
    TP = 1: rank = dp_rank * sp_size + sp_rank). Every rank creates every subgroup, in one order.
    """
    ring_size = check_usp_sizes(sp_size, ulysses_size)
    world, me = dist.get_world_size(), dist.get_rank()
    if world % sp_size:
        raise ValueError(f"usp: sequence-parallel size {sp_size} does not divide world size {world}")
    timeout = datetime.timedelta(seconds=timeout_s)
    mine = {}
    for base in range(0, world, sp_size):
        for g in range(ring_size):
            ranks = [base + g * ulysses_size + u for u in range(ulysses_size)]
            group = dist.new_group(ranks, timeout=timeout)
            if me in ranks:
                mine["ulysses"] = group
        for u in range(ulysses_size):
            ranks = [base + g * ulysses_size + u for g in range(ring_size)]
            group = dist.new_group(ranks, timeout=timeout)
            if me in ranks:
                mine["ring"] = group
    return mine["ulysses"], mine["ring"]


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[b, s, H, d] on each of U ranks -> [b, U * s, H / U, d]: the group's tokens, my head slice."""
    u = dist.get_world_size(group)
    if u == 1:
        return x
    b, s, h, d = x.shape
    send = x.reshape(b, s, u, h // u, d).permute(2, 0, 1, 3, 4).contiguous()  # [U, b, s, H/U, d]
    recv = torch.empty_like(send)  # chunk j: rank j's tokens
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 0, 2, 3, 4).reshape(b, u * s, h // u, d)


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of ``_seq_to_heads``: [b, U * s, H / U, d] -> [b, s, H, d]."""
    u = dist.get_world_size(group)
    if u == 1:
        return x
    b, us, hu, d = x.shape
    send = x.reshape(b, u, us // u, hu, d).transpose(0, 1).contiguous()  # [U, b, s, H/U, d]
    recv = torch.empty_like(send)  # chunk j: my tokens, rank j's head slice
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, us // u, u * hu, d)


class _AllToAll(torch.autograd.Function):
    """One all-to-all in forward (``there``), its inverse in backward (``back``)."""

    @staticmethod
    def forward(ctx, x, group, there, back):
        ctx.group, ctx.back = group, back
        return there(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.back(grad.contiguous(), ctx.group), None, None, None


def usp_attention(q, k, v, *, ulysses_group, ring_group, causal=False, softmax_scale=None):
    """q [b, s_local, H, d], k/v [b, s_local, Hkv, d] -> [b, s_local, H, d].

    Tokens must follow ``usp_token_indices`` (U = size of ``ulysses_group``).
    """
    check_qkv(q, k, v)
    u = dist.get_world_size(ulysses_group)
    if q.shape[2] % u or k.shape[2] % u:
        raise ValueError(f"usp: heads ({q.shape[2]}) and kv heads ({k.shape[2]}) must be divisible "
                         f"by the ulysses size ({u})")
    qh, kh, vh = (_AllToAll.apply(t, ulysses_group, _seq_to_heads, _heads_to_seq) for t in (q, k, v))  # [b, U*s, H/U, d]
    out = ring_attention(qh, kh, vh, group=ring_group, causal=causal, softmax_scale=softmax_scale,
                         layout="balanced")
    return _AllToAll.apply(out, ulysses_group, _heads_to_seq, _seq_to_heads)
