"""USP, the Ulysses x ring hybrid (Fang and Zhao, 2024): all-to-all inside groups, ring across.

The SP group of N = U x R ranks is cut into R Ulysses groups of U consecutive ranks; the ranks
with the same index in every Ulysses group form a ring group. Per layer, on every rank:
1. all-to-all inside the Ulysses group: q, k, v [b, s_local, H, d] -> [b, U * s_local, H / U, d]
   (the group's tokens, a slice of the heads; KV heads are split, never repeated: Hkv % U == 0;
   ONE fused all-to-all for q, k, v, ``lss_plugin.ulysses``, shared with the hybrid LSS x Ulysses);
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
from lss_plugin.ulysses import to_heads, to_sequence


def check_usp_sizes(sp_size: int, ulysses_size: int) -> int:
    """The ring size R = N / U, or a ValueError naming both sizes."""
    if ulysses_size < 1 or sp_size % ulysses_size:
        raise ValueError(f"usp: ulysses size {ulysses_size} must divide the sequence-parallel size {sp_size}")
    return sp_size // ulysses_size


def usp_token_indices(seq_len: int, sp_rank: int, sp_size: int, ulysses_size: int) -> torch.Tensor:
    """Global positions of SP rank ``sp_rank``'s tokens under USP's layout (the hybrid's balanced
    layout, ``local_token_indices``). LongTensor[L / N]."""
    check_usp_sizes(sp_size, ulysses_size)
    if seq_len % (2 * sp_size):
        raise ValueError(f"usp: sequence length {seq_len} must be divisible by 2 x ring size x "
                         f"ulysses size = {2 * sp_size}")
    return local_token_indices(seq_len, sp_rank, sp_size, "balanced", ulysses_size)


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


def usp_attention(q, k, v, *, ulysses_group, ring_group, causal=False, softmax_scale=None):
    """q [b, s_local, H, d], k/v [b, s_local, Hkv, d] -> [b, s_local, H, d].

    Tokens must follow ``usp_token_indices`` (U = size of ``ulysses_group``).
    """
    check_qkv(q, k, v)
    u = dist.get_world_size(ulysses_group)
    if q.shape[2] % u or k.shape[2] % u:
        raise ValueError(f"usp: heads ({q.shape[2]}) and kv heads ({k.shape[2]}) must be divisible "
                         f"by the ulysses size ({u})")
    qh, kh, vh, _ = to_heads(q, k, v, group=ulysses_group)  # one all-to-all: [b, U*s, H/U or Hkv/U, d]
    out = ring_attention(qh, kh, vh, group=ring_group, causal=causal, softmax_scale=softmax_scale,
                         layout="balanced")
    return to_sequence(out, group=ulysses_group)[0]
