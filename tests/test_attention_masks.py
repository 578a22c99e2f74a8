"""Per-layer masks of lss_attention (windows, chunks, softcap, sinks) on 1-4 ranks and the hybrid at U = 2.

Reference: the same attention in one process with a dense mask (``tests/reference.py``,
``masks.dense_hidden``), softcap and sinks. float64; outputs and every gradient (dq, dk, dv and
d sinks, the latter summed over the ranks as any weight's gradient is) within 1e-10 relative to the
largest reference magnitude (absolute where that is below 1). One spawn per world size runs every
case: windows of 1, 7, s_local, L/2 and L tokens (causal) and two-sided non-causal ones, chunk
sizes 5 and 7 (dividing no s_local), sinks, softcap and all together, each with both layouts and
with and without packed documents; heads (MHA / GQA / MQA) and K/V modes (keep, pipelined chunks
of one KV head, regather, auto) cycle through the cases. Also: masks change no collective (calls
and bytes as the same call without masks), ranks disagreeing on a mask field or holding a bad mask
argument raise together naming it, and key blocks outside the window or chunk are never computed.
"""
import itertools
import re

import pytest
import torch
import torch.distributed as dist

import lss_plugin
import lss_plugin.attention as attention
from lss_plugin.documents import visible_pairs
from lss_plugin.masks import MaskSpec, dense_hidden
from lss_plugin.sharding import local_token_indices
from tests.distributed import run_ranks
from tests.reference import reference_attention
from tests.test_attention import DKV

B, L, D = 2, 24, 8  # L divisible by 2N for N = 1..4 (and by the hybrid's layouts at N = 4, U = 2)
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
KV = [("keep", None), ("regather", 1), ("keep", 1), ("auto", "auto")]
DOCS = (0, 5, 13, 24)
TOL = 1e-10
COUNTED = ("all_gather_into_tensor", DKV, "verdict", "all_to_all_single")


def _masks(s_local):
    """Mask arguments of the sweep (``sinks=True``: a random [H] tensor)."""
    out = [dict(causal=True, window=(w - 1, 0)) for w in (1, 7, s_local, L // 2, L)]
    out += [dict(causal=False, window=(3, 5)), dict(causal=False, window=(0, 2))]
    out += [dict(causal=c, chunk=n) for c in (True, False) for n in (5, 7)]
    out += [dict(causal=c, sinks=True) for c in (True, False)]
    out += [dict(causal=c, softcap=2.0) for c in (True, False)]
    out += [dict(causal=True, window=(6, 0), chunk=5, softcap=2.0, sinks=True),
            dict(causal=False, window=(2, 3), chunk=7, softcap=1.5, sinks=True)]
    return out


def _rel(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1.0)


def _inputs(h, hkv, seq=L, seed=7):
    gen = torch.Generator().manual_seed(seed)  # the same full tensors on every rank
    q, k, v = (torch.randn(B, seq, n, D, generator=gen, dtype=torch.float64) for n in (h, hkv, hkv))
    dout = torch.randn(B, seq, h, D, generator=gen, dtype=torch.float64)
    sinks = torch.randn(h, generator=gen, dtype=torch.float64)
    return q, k, v, dout, sinks


def _call(local, mask, docs, sinks, **settings):
    cu = torch.tensor(DOCS, dtype=torch.int32) if docs else None
    return lss_plugin.lss_attention(*local, causal=mask["causal"], cu_seqlens=cu, window=mask.get("window"),
                                    chunk=mask.get("chunk"), softcap=mask.get("softcap"), sinks=sinks, **settings)


def _one_case(mask, layout, heads, kv, docs, ulysses_size=1):
    """Errors of this rank's out and gradients (d sinks summed over the ranks), and the collectives
    of the call with the masks and of the same call without them."""
    rank, world = dist.get_rank(), dist.get_world_size()
    h, hkv = HEADS[heads]
    q, k, v, dout, sinks = _inputs(h, hkv)
    use_sinks = mask.get("sinks", False)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    ref_out = reference_attention(*ref_in[:3], causal=mask["causal"], bounds=DOCS if docs else None,
                                  window=mask.get("window"), chunk=mask.get("chunk"), softcap=mask.get("softcap"),
                                  sinks=ref_in[3] if use_sinks else None)
    ref_out.backward(dout)

    idx = local_token_indices(L, rank, world, layout, ulysses_size=ulysses_size)
    # the all-gather, whose collectives masks leave unchanged (the sparse exchange: tests/test_exchange.py)
    settings = dict(layout=layout, kv_backward=kv[0], kv_head_chunk=kv[1], kv_exchange="gather")
    recs = []
    for masked in (True, False):
        local = [t[:, idx].clone().requires_grad_() for t in (q, k, v)]
        mine_sinks = sinks.clone().requires_grad_() if use_sinks and masked else None
        with lss_plugin.record_collectives() as rec:
            out = _call(local, mask if masked else {"causal": mask["causal"]}, docs, mine_sinks, **settings)
            out.backward(dout[:, idx])
        recs.append(({n: rec.calls[n] for n in COUNTED}, {n: rec.bytes[n] for n in COUNTED}))
        if masked:
            errors = {"out": _rel(out, ref_out[:, idx])}
            for name, t, ref in zip(("dq", "dk", "dv"), local, ref_in):
                errors[name] = _rel(t.grad, ref.grad[:, idx])
            if use_sinks:
                grad = mine_sinks.grad.clone()
                dist.all_reduce(grad)  # a weight's gradient: each rank holds its queries' part
                errors["dsinks"] = _rel(grad, ref_in[3].grad)
    return errors, recs[0], recs[1]


def _cases(world, hybrid=False):
    cases = []
    for i, (mask, layout, docs) in enumerate(itertools.product(
            _masks(L // world), ("contiguous", "balanced"), (False, True))):
        if hybrid and i % 3:  # the hybrid: a third of the cases (every mask meets it)
            continue
        cases.append((mask, layout, list(HEADS)[i % 3], KV[i % 4], docs))
    return cases


def _kernel_calls(fn):
    """(queries, keys) of every block_forward call ``fn()`` makes on this rank."""
    calls, real = [], attention.block_forward

    def spy(q, k, *args, **kwargs):
        calls.append((q.shape[2], k.shape[2]))
        return real(q, k, *args, **kwargs)

    attention.block_forward = spy
    try:
        fn()
    finally:
        attention.block_forward = real
    return calls


def _computed_blocks():
    """Keys each block_forward call reads, contiguous layout, 2 ranks: windows and chunks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for seq, window in ((L, (6, 0)), (256, (7, 0))):
        q, k, v, _, _ = _inputs(4, 2, seq=seq)
        idx = local_token_indices(seq, rank, world, "contiguous")
        local = [t[:, idx] for t in (q, k, v)]
        result = []
        out[seq] = _kernel_calls(lambda: result.append(lss_plugin.lss_attention(*local, causal=True, window=window,
                                                                                   layout="contiguous")))
        ref = reference_attention(q, k, v, causal=True, window=window)[:, idx]
        out[f"{seq}_error"] = _rel(result[0], ref)
    q, k, v, _, _ = _inputs(4, 2)
    idx = local_token_indices(L, rank, world, "balanced")
    out["chunk"] = _kernel_calls(lambda: lss_plugin.lss_attention(*(t[:, idx] for t in (q, k, v)), causal=True,
                                                                  layout="balanced", chunk=5))
    return out


BASE_MASK = dict(causal=True, window=(6, 0), chunk=5, softcap=2.0, sinks=True)
DISAGREE = {  # field -> the last rank's variant of BASE_MASK
    "window": {"window": (7, 0)}, "chunk": {"chunk": 7}, "softcap": {"softcap": 3.0}, "sinks": {"sinks": False},
}
REFUSE = {  # the last rank's bad argument -> what every rank's error must quote
    "window": ({"window": (-1, 0)}, "window must be a (left, right) pair of non-negative integers, got (-1, 0)"),
    "chunk": ({"chunk": 0}, "chunk must be a positive integer (C-aligned chunks of positions), got 0"),
    "softcap": ({"softcap": float("inf")}, "softcap must be a positive finite number (or None), got inf"),
    "sinks": ({"sinks": "short"}, "sinks must be a 1-D floating tensor of this rank's 4 query heads, got shape (3,)"),
}


def _disagreements():
    """Only the last rank varies a mask field; the error of every rank, then a plain call still exact."""
    last = dist.get_rank() == dist.get_world_size() - 1
    q, k, v, _, sinks = _inputs(4, 2)
    idx = local_token_indices(L, dist.get_rank(), dist.get_world_size(), "contiguous")
    local = [t[:, idx] for t in (q, k, v)]

    def call(mask):
        s = {True: sinks, False: None, "short": sinks[:3]}[mask.get("sinks", False)]
        with lss_plugin.record_collectives() as rec:
            try:
                _call(local, mask, False, s, layout="contiguous")
                return None, dict(rec.calls)
            except (RuntimeError, ValueError) as exc:
                return f"{type(exc).__name__}: {exc}", dict(rec.calls)

    out = {}
    for name, variant in DISAGREE.items():
        out[f"disagree_{name}"] = call({**BASE_MASK, **variant} if last else BASE_MASK)
    for name, (variant, _) in REFUSE.items():
        out[f"refuse_{name}"] = call({**BASE_MASK, **variant} if last else BASE_MASK)
    ref = reference_attention(q, k, v, causal=True, window=(6, 0), chunk=5, softcap=2.0, sinks=sinks)[:, idx]
    out["after"] = _rel(_call(local, BASE_MASK, False, sinks, layout="contiguous"), ref)
    return out


def _sweep():
    world = dist.get_world_size()
    lss_plugin.init_topology(world, timeout_s=60)
    results = {"cases": [(case, _one_case(*case)) for case in _cases(world)]}
    if world == 2:
        results["blocks"] = _computed_blocks()
    if world > 1:
        results["disagree"] = _disagreements()
    if world == 4:  # the hybrid LSS x Ulysses at U = 2 (2 LSS ranks of 2)
        lss_plugin.init_topology(world, ulysses_size=2, timeout_s=60)
        results["hybrid"] = [(case, _one_case(*case, ulysses_size=2)) for case in _cases(world, hybrid=True)]
    return results


@pytest.fixture(scope="module", params=[1, 2, 3, 4])
def sweep(request):
    return request.param, run_ranks(_sweep, request.param, timeout_s=600)


def test_masks_float64_exact_against_dense_reference(sweep):
    world, per_rank = sweep
    for results in per_rank:
        assert len(results["cases"]) == 4 * len(_masks(L // world))
        for case, (errors, _, _) in results["cases"] + results.get("hybrid", []):
            assert max(errors.values()) < TOL, (world, case, errors)
            assert ("dsinks" in errors) == case[0].get("sinks", False)


def test_masks_change_no_collective(sweep):
    """Calls and bytes of every collective (verdict, K/V gathers, reduce-scatters, all-to-alls) per
    call are those of the same call without masks."""
    world, per_rank = sweep
    for results in per_rank:
        for case, (_, masked, plain) in results["cases"] + results.get("hybrid", []):
            assert masked == plain, (world, case, masked, plain)
            if world > 1:
                assert masked[0]["verdict"] == 2 and masked[0]["all_gather_into_tensor"] >= 1, masked
        if world == 4:
            assert all(m[0]["all_to_all_single"] == 4 for _, (_, m, _) in results["hybrid"])


def test_disagreeing_or_bad_mask_arguments_raise_on_every_rank_by_name(sweep):
    world, per_rank = sweep
    if world == 1:
        pytest.skip("needs ranks to disagree")
    first = per_rank[0]["disagree"]
    for results in per_rank:
        got = results["disagree"]
        for name in DISAGREE:
            message, calls = got[f"disagree_{name}"]
            assert message is not None and message.startswith("RuntimeError") and "disagree" in message, message
            assert re.search(rf"\b{name}: rank 0=.*rank {world - 1}=", message), (name, message)
            assert message == first[f"disagree_{name}"][0]  # the same error on every rank
            assert calls == {"verdict": 1}, calls  # before any K/V collective
        for name, (_, quoted) in REFUSE.items():
            message, calls = got[f"refuse_{name}"]
            assert message is not None and message.startswith("ValueError") and quoted in message, (name, message)
            assert f"rank {world - 1}: REFUSED" in message and message == first[f"refuse_{name}"][0]
            assert calls == {"verdict": 1, "verdict_messages": 1}, calls
        assert got["after"] < TOL  # nothing was left pending


def test_key_blocks_outside_the_window_or_chunk_are_never_computed(sweep):
    """2 ranks, contiguous. L = 24, window 7: rank 0's queries [0, 12) read keys [0, 12), rank 1's
    [12, 24) read [6, 24) (18 keys, not 24): its own [12, 24) first, while the gather runs, then
    [6, 12). L = 256, window 8: query tiles of 64 read 64 + 7 keys at most (rank 1: 2 x 64 x 71 =
    9088 pairs computed, not the causal prefix's 128 x 256 = 32768; the first tile's 7 keys of
    rank 0 in a call of their own, after the gather). Chunks of 5: no call reads more than 5 keys."""
    world, per_rank = sweep
    if world != 2:
        pytest.skip("counted on 2 ranks")
    blocks = [r["blocks"] for r in per_rank]
    assert blocks[0][L] == [(12, 12)] and blocks[1][L] == [(12, 12), (12, 6)], blocks
    assert blocks[0][256] == [(64, 64), (64, 71)] and blocks[1][256] == [(64, 64), (64, 71), (64, 7)], blocks
    assert sum(sq * sk for sq, sk in blocks[1][256]) == 9088
    for b in blocks:
        assert b[f"{L}_error"] < TOL and b["256_error"] < TOL
        assert b["chunk"] and all(sk <= 5 for _, sk in b["chunk"]), b["chunk"]


def test_visible_pairs_of_windows_and_chunks_match_the_dense_mask():
    for bounds, causal, window, chunk in itertools.product(
            ((0, L), DOCS), (True, False), (None, (0, 0), (6, 0), (3, 5), (L, L)), (None, 5, 7)):
        expected = int((~dense_hidden(L, bounds, MaskSpec(causal, window, chunk))).sum())
        assert visible_pairs(bounds, causal, window, chunk) == expected, (bounds, causal, window, chunk)
    assert visible_pairs((0, 4096), True, (511, 0)) == 512 * 513 // 2 + (4096 - 512) * 512  # L/8 window
