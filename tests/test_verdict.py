"""Every refusal is collective: a check that fails on the LAST rank only raises on EVERY rank.

On 2 and 3 ranks, for each case of issue 27 (bad cu_seqlens, a too-small LSS_KV_BUFFER_MIB, an unknown
LSS_ATTENTION_KERNEL, LSS_CHECK_CONSISTENCY=never, a shape mismatch, a backward meeting a forward, and
transformers' default positions under the contiguous layout on a real model built from a config) every
rank must raise the same exception type with the same message, naming each rank's value. The group's
timeout is 120 s: a case that left one rank in a collective would fail with a TimeoutError (after
that long) instead of returning the messages; no time is asserted. After each case a correct call must
still match the one-process float64 reference within 1e-10 (relative): nothing was left pending.
The verdict's encoding is checked in one process at the end.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import lss_plugin
from lss_plugin.sharding import local_token_indices
from lss_plugin.signature import SIGNATURE_BYTES, check_mode
from lss_plugin.verdict import (
    MESSAGE_BYTES, ROW_BYTES, decode_message, decode_status, encode_message, encode_row, refusal,
)
from tests.distributed import run_ranks
from tests.reference import reference_attention

S, H, HKV, D = 4, 4, 2, 8  # per-rank length, heads, KV heads, head dim
TOL = 1e-10


def _qkv(world, seed=0, s=S, grad=False, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, s * world, h, D, generator=gen, dtype=torch.float64) for h in (H, HKV, HKV))
    idx = local_token_indices(s * world, dist.get_rank(), world, layout)
    return [t[:, idx].clone().requires_grad_(grad) for t in (q, k, v)], (q, k, v), idx


def _still_exact() -> float:
    world = dist.get_world_size()
    local, full, idx = _qkv(world, seed=1)
    out = lss_plugin.lss_attention(*local, causal=True, layout="contiguous")
    ref = reference_attention(*full, causal=True)[:, idx]
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _with_env(name, value, fn):
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    check_mode.cache_clear()  # LSS_CHECK_CONSISTENCY is read once per process
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
        check_mode.cache_clear()


def _call(**kwargs):
    local, _, _ = _qkv(dist.get_world_size())
    return lss_plugin.lss_attention(*local, causal=True, layout="contiguous", **kwargs)


def _hf_default_positions():
    """transformers' own positions arange(s_local): right on rank 0 only under the contiguous layout."""
    import lss_plugin.hf as hf

    hf.register_lss_attention(layout="contiguous")
    try:
        model = hf.build_causal_lm(hf.small_causal_lm_config("llama", hidden_size=16, num_heads=2, num_layers=2))
        ids = torch.randint(0, 256, (1, S * dist.get_world_size()), generator=torch.Generator().manual_seed(3))
        batch = hf.shard_causal_lm_batch(ids)
        model(input_ids=batch.input_ids, use_cache=False)
    finally:
        hf.register_lss_attention()


def _backward_meets_forward():
    local, _, _ = _qkv(dist.get_world_size(), grad=True)
    out = lss_plugin.lss_attention(*local, causal=True, layout="contiguous", kv_backward="regather")
    if dist.get_rank() == dist.get_world_size() - 1:
        _call(kv_backward="regather")  # a new forward while the others run the backward
    else:
        out.backward(torch.ones_like(out))


def _cases(last: bool, world: int):
    bad_cu = [0, 5, 5, S * world] if last else [0, 5, S * world]
    return {
        "cu_seqlens": lambda: _call(cu_seqlens=torch.tensor(bad_cu, dtype=torch.int32)),
        "budget": lambda: _with_env("LSS_KV_BUFFER_MIB", "1e-6" if last else None, lambda: _call(kv_head_chunk="auto")),
        "kernel": lambda: _with_env("LSS_ATTENTION_KERNEL", "bogus" if last else None, _call),
        "mode": lambda: _with_env("LSS_CHECK_CONSISTENCY", "never" if last else None, _call),
        "shape": lambda: lss_plugin.lss_attention(*_qkv(world, s=6 if last else S)[0], causal=True, layout="contiguous"),
        "backward_meets_forward": _backward_meets_forward,
        "hf_default_positions": _hf_default_positions,
    }


def _sweep():
    world = dist.get_world_size()
    lss_plugin.init_topology(world, timeout_s=120)
    last = dist.get_rank() == world - 1
    results = {}
    for name, case in _cases(last, world).items():
        try:
            case()
            error = None
        except Exception as exc:  # noqa: BLE001 - the type is part of what every rank must agree on
            error = (type(exc).__name__, str(exc))
        results[name] = (error, _still_exact())
    return results


# case -> (exception type, substrings the message must hold, formatted with the world size N)
EXPECT = {
    "cu_seqlens": ("ValueError", ["cu_seqlens must be strictly increasing", "rank 0: ok", "cu_seqlens [0, 5, {L}]",
                                  "rank {last}: REFUSED", "cu_seqlens [0, 5, 5, {L}]"]),
    "budget": ("ValueError", ["1e-06 MiB is below", "rank 0: ok", "LSS_KV_BUFFER_MIB unset",
                              "LSS_KV_BUFFER_MIB='1e-6'"]),
    "kernel": ("ValueError", ["LSS_ATTENTION_KERNEL='bogus' is not a kernel", "rank 0: ok",
                              "LSS_ATTENTION_KERNEL unset"]),
    "mode": ("ValueError", ["LSS_CHECK_CONSISTENCY='never'", "rank 0: ok", "LSS_CHECK_CONSISTENCY unset"]),
    "shape": ("RuntimeError", ["disagree", "s_local: rank 0=4", "rank {last}=6"]),
    "backward_meets_forward": ("RuntimeError", ["gather: rank 0='backward'", "rank {last}='forward'"]),
    "hf_default_positions": ("ValueError", ["rank 0: ok", "rank {last}: REFUSED", "position_ids [0, 1, 2, 3]",
                                            "on SP rank {last}"]),
}


@pytest.fixture(scope="module", params=[2, 3])
def sweep(request):
    world = request.param
    return world, run_ranks(_sweep, world, timeout_s=300, pg_timeout_s=120)


@pytest.mark.parametrize("case", sorted(EXPECT))
def test_last_rank_alone_diverging_raises_the_same_error_on_every_rank(sweep, case):
    world, per_rank = sweep
    kind, parts = EXPECT[case]
    errors = [r[case][0] for r in per_rank]
    assert all(e is not None for e in errors), (case, errors)
    assert len(set(errors)) == 1, (case, errors)  # the same type and message on every rank
    got_kind, message = errors[0]
    assert got_kind == kind, (case, got_kind, message)
    for part in parts:
        assert part.format(L=S * world, last=world - 1) in message, (case, part, message)


def test_the_group_stays_usable_after_every_refusal(sweep):
    world, per_rank = sweep
    for result in per_rank:
        for case, (_, error_after) in result.items():
            assert error_after < TOL, (world, case, error_after)


# ---------------------------------------------------------------------------------------------
# Encoding, in one process

def test_row_and_status_round_trip():
    row = encode_row(bytes(range(SIGNATURE_BYTES)), ValueError("x"), in_band=1)
    assert len(row) == ROW_BYTES == SIGNATURE_BYTES + 16 and row[:SIGNATURE_BYTES] == bytes(range(SIGNATURE_BYTES))
    assert decode_status(row) == (1, 1)
    assert decode_status(encode_row(None, None)) == (0, 0)
    assert decode_status(encode_row(None, NotImplementedError()))[0] == 2
    assert decode_status(encode_row(None, KeyError()))[0] == 4  # anything else: RuntimeError's code
    with pytest.raises(ValueError, match=f"a signature has {SIGNATURE_BYTES} bytes, got 3"):
        encode_row(b"abc", None)


def test_messages_are_fixed_size_and_cut_on_a_character_boundary():
    raw = encode_message("é" * MESSAGE_BYTES)  # 2 bytes each: cut in the middle of one
    assert len(raw) == MESSAGE_BYTES
    assert decode_message(raw) == "é" * (MESSAGE_BYTES // 2)
    assert decode_message(encode_message("rank 1: bad")) == "rank 1: bad"


def test_refusal_names_every_rank_and_keeps_a_common_type():
    err = refusal([0, 1, 1], ["q [1, 4]", "A", "B"], [4, 5, 6])
    assert type(err) is ValueError
    assert "ranks 5, 6 of the sequence-parallel group [4, 5, 6]" in str(err)
    assert "rank 4: ok; q [1, 4]" in str(err) and "rank 5: REFUSED: A" in str(err) and "rank 6: REFUSED: B" in str(err)
    assert type(refusal([1, 2], ["a", "b"], [0, 1])) is RuntimeError  # mixed types
    assert type(refusal([2, 0], ["a", "b"], [0, 1])) is NotImplementedError
