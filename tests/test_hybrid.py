"""Hybrid LSS x Ulysses on 4 ranks (U = 1, 2, 4) against full-sequence attention in one process.

One spawn of 4 ranks runs every case: both layouts, causal and not, MHA, GQA (Hkv = 2), MQA,
KV heads U does not divide (replicated to lcm(Hkv, U)), H divisible by U but not by N (H = 6,
U = 2), keep / regather, chunked and "auto" gathers, packed documents. Reference: the same
computation in one process (``tests/reference.py``; per document for packed cases).
Tolerance: float64 outputs and q/k/v gradients within 1e-10 relative to the largest reference
magnitude (absolute below 1), as ``tests/test_documents.py``.

Communication per call (``record_collectives``), U > 1, R = 4 / U LSS ranks, Hkv' KV heads after
replication, c KV heads per gather: all-to-all 4 (ONE fused q/k/v in + ONE out back in forward;
ONE dout + ONE fused dq/dk/dv in backward); the LSS gathers and reduce-scatters of the existing path
over the LSS group of R ranks (none when R = 1); the verdict (one 96-byte row per rank over the whole
SP group at the start of the forward and of the backward). U = 1 sends exactly what pure LSS sends.
"""
import itertools
import re

import pytest
import torch
import torch.distributed as dist

import lss_plugin
from lss_plugin.options import check_ulysses_heads, check_ulysses_size
from lss_plugin.sharding import local_token_indices
from lss_plugin.signature import SIGNATURE_BYTES
from lss_plugin.verdict import ROW_BYTES
from tests.distributed import run_ranks
from tests.test_attention import DKV, _expected_comm
from tests.test_documents import B, BOUNDS, D, L
from tests.test_documents import _one_case as one_documents_case

WORLD = 4  # L = 24 divisible by lcm(N, 2N / U) for U = 1, 2, 4
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1), "h6_kv2": (6, 2), "h6_kv3": (6, 3)}
KV = [("keep", None), ("regather", 1), ("auto", "auto")]
DOCS = BOUNDS["random_a"]  # packed cases
TOL = 1e-10
A2A, GATHER, SCATTER, VERDICT = "all_to_all_single", "all_gather_into_tensor", DKV, "verdict"


def _heads_for(u):
    return [name for name, (h, _) in HEADS.items() if h % u == 0]


def _one_case(u, causal, layout, heads, kv_backward, head_chunk, packed):
    return one_documents_case(causal, layout, HEADS[heads], kv_backward, head_chunk, "random_a" if packed else None,
                              ulysses_size=u, counted=(A2A, GATHER, SCATTER, VERDICT))


def _cases(u):
    out = []
    for i, (causal, layout, heads, (kv_backward, chunk)) in enumerate(
            itertools.product((True, False), ("contiguous", "balanced"), _heads_for(u), KV)):
        out.append((u, causal, layout, heads, kv_backward, chunk, i % 7 == 0))  # packed now and then
    return out


def _shards(u):
    """shard/unshard round trip and local_positions under the registered hybrid topology."""
    rank, out = dist.get_rank(), {}
    x = torch.arange(L * 3, dtype=torch.float64).view(1, L, 3)
    for layout in ("contiguous", "balanced"):
        idx = local_token_indices(L, rank, WORLD, layout, ulysses_size=u)
        mine = lss_plugin.shard_sequence(x, 1, layout=layout)
        out[layout] = dict(
            shard=torch.equal(mine, x[:, idx]),
            round_trip=torch.equal(lss_plugin.unshard_sequence(mine, 1, layout=layout), x),
            positions=lss_plugin.local_positions(L, layout=layout).tolist(),
            doc_positions=lss_plugin.local_positions(L, layout=layout, cu_seqlens=torch.tensor(DOCS)).tolist(),
            idx=idx.tolist(),
        )
    # the loss counts tokens over the whole SP group whichever form of the groups it is given
    topo = lss_plugin.get_topology()
    logits, labels = torch.randn(1, L // WORLD, 5, dtype=torch.float64), torch.arange(L // WORLD).view(1, -1) % 5
    labels[0, : rank % 3] = -100
    losses = [lss_plugin.sharded_cross_entropy(logits, labels, group=g) for g in (topo.sp_group, topo.sequence_groups)]
    if u > 1:  # groups a framework built: adopted when they follow the layout, refused by name otherwise
        adopted = lss_plugin.SequenceGroups.from_groups(topo.sp_group, topo.ulysses_group, topo.lss_group)
        out["adopted"] = adopted == topo.sequence_groups
        try:
            lss_plugin.SequenceGroups.from_groups(topo.sp_group, topo.lss_group, topo.ulysses_group)
            out["swapped"] = None
        except ValueError as exc:
            out["swapped"] = str(exc)
    out["loss"] = (losses[0].sequence_tokens, losses[1].sequence_tokens, torch.equal(losses[0].loss, losses[1].loss))
    return out


def _refusals():
    """Every refusal must come from the verdict, before any variable-size collective (a rank that reached
    one would hang the others); every disagreement is named over the whole SP group."""
    topo = lss_plugin.get_topology()  # U = 2
    x4, x3, x2, x1 = (torch.randn(1, L // WORLD, n, D, dtype=torch.float64) for n in (4, 3, 2, 1))
    messages = {}
    bad = {
        "heads": lambda: lss_plugin.lss_attention(x3, x1, x1),
        "chunk": lambda: lss_plugin.lss_attention(x4, x2, x2, kv_head_chunk=2),  # 1 KV head per rank after the all-to-all
        "length": lambda: lss_plugin.local_positions(L + 2),
    }
    for name, call in bad.items():
        with lss_plugin.record_collectives() as rec:
            try:
                call()
                messages[name] = None
            except ValueError as exc:
                messages[name] = str(exc)
        # "length" is local_positions, no attention call: nothing sent
        assert dict(rec.calls) == ({} if name == "length" else {"verdict": 1, "verdict_messages": 1}), (name, rec.calls)
    # Ranks 0, 1 call the hybrid (U = 2), ranks 2, 3 pure LSS over the same SP group.
    group = None if dist.get_rank() < 2 else topo.sp_group
    try:
        lss_plugin.lss_attention(x4, x2, x2, group=group, causal=True)
        messages["different_u"] = None
    except RuntimeError as exc:
        messages["different_u"] = str(exc)
    # Settings that do not size a collective, differing between ranks: caught by the verdict too.
    for name, causal_ranks in (("causal_one_rank", {0}), ("causal_per_ulysses_index", {0, 2})):
        try:
            lss_plugin.lss_attention(x4, x2, x2, causal=dist.get_rank() in causal_ranks)
            messages[name] = None
        except RuntimeError as exc:
            messages[name] = str(exc)
    # ... and no collective was left pending: the groups still work.
    out = lss_plugin.lss_attention(x4, x2, x2, causal=True)
    messages["usable_after"] = tuple(out.shape)
    return messages


def _sweep():
    results = {}
    for u in (1, 2, 4):
        topo = lss_plugin.init_topology(WORLD, ulysses_size=u, timeout_s=60)
        results[u] = dict(
            cases=[(case, _one_case(*case)) for case in _cases(u)],
            shards=_shards(u),
            sizes=(topo.ulysses_size, topo.lss_size, topo.ulysses_rank, topo.lss_rank),
        )
        if u == 4:
            lss_plugin.destroy_topology()
            lss_plugin.init_topology(WORLD, ulysses_size=2, timeout_s=60)
            results["refusals"] = _refusals()
        lss_plugin.destroy_topology()
    return results


def _expected_hybrid(u, heads, kv_backward, head_chunk):
    """(calls, bytes) per call of the hybrid, U > 1 (see the module docstring)."""
    h, hkv = HEADS[heads]
    kvh = check_ulysses_heads(h, hkv, u)  # KV heads the all-to-all carries
    r, s = WORLD // u, L // WORLD
    per_rank = kvh // u
    chunk = per_rank if head_chunk in (None, "auto") else head_chunk  # "auto": short sequence, one gather
    n_chunks = per_rank // chunk
    rounds = 2 if kv_backward == "regather" else 1
    element = B * s * D * 8
    a2a = element * (2 * (h + 2 * kvh) + 2 * h) + u * SIGNATURE_BYTES  # the row rides in the first one
    verdict = WORLD * ROW_BYTES * 2  # over the whole SP group, at the start of the forward and the backward
    if r == 1:
        return {A2A: 4, GATHER: 0, SCATTER: 0, VERDICT: 2}, {A2A: a2a, GATHER: 0, SCATTER: 0, VERDICT: verdict}
    kv_all = 2 * B * L * per_rank * D * 8
    return ({A2A: 4, GATHER: rounds * n_chunks, SCATTER: n_chunks, VERDICT: 2},
            {A2A: a2a, GATHER: rounds * (kv_all + n_chunks * r * SIGNATURE_BYTES), SCATTER: kv_all, VERDICT: verdict})


@pytest.fixture(scope="module")
def results():
    return run_ranks(_sweep, WORLD, timeout_s=600)


def test_float64_exact_against_one_process_with_the_expected_collectives(results):
    worst, count = 0.0, 0
    for rank_results in results:
        for u in (1, 2, 4):
            for case, (errors, calls, nbytes) in rank_results[u]["cases"]:
                assert max(errors.values()) < TOL, (case, errors)
                worst, count = max(worst, max(errors.values())), count + 1
                _, _, _, heads, kv_backward, chunk, _ = case
                if u == 1:  # exactly today's pure LSS: no all-to-all, the same gathers
                    exp_calls, exp_bytes = _expected_comm(WORLD, HEADS[heads], kv_backward,
                                                          None if chunk == "auto" else chunk, itemsize=8)
                    exp_calls, exp_bytes = {A2A: 0, **exp_calls}, {A2A: 0, **exp_bytes}
                else:
                    exp_calls, exp_bytes = _expected_hybrid(u, heads, kv_backward, chunk)
                assert calls == exp_calls, (case, calls, exp_calls)
                assert nbytes == exp_bytes, (case, nbytes, exp_bytes)
    print(f"hybrid: {count} rank-cases, max relative error {worst:.2e}")
    assert count == WORLD * sum(len(_cases(u)) for u in (1, 2, 4))


def test_shard_unshard_and_positions_follow_the_hybrid_layout(results):
    full = torch.arange(L)
    in_doc = torch.cat([torch.arange(b - a) for a, b in zip(DOCS[:-1], DOCS[1:])])
    for u in (1, 2, 4):
        held = []
        for rank, rank_results in enumerate(results):
            assert rank_results[u]["sizes"] == (u, WORLD // u, rank % u, rank // u)
            shards = dict(rank_results[u]["shards"])
            sp_tokens = sum(L // WORLD - r % 3 for r in range(WORLD))
            assert shards.pop("loss") == (sp_tokens, sp_tokens, True), (u, rank)
            if u > 1:
                assert shards.pop("adopted") is True
                swapped = shards.pop("swapped")
                assert u == WORLD or (swapped and "do not cut the sequence-parallel group" in swapped), swapped
            for layout, r in shards.items():
                assert r["shard"] and r["round_trip"], (u, layout, rank)
                assert r["positions"] == full[r["idx"]].tolist()
                assert r["doc_positions"] == in_doc[r["idx"]].tolist()
                held.append((layout, tuple(r["idx"])))
        for layout in ("contiguous", "balanced"):  # the ranks' tokens partition the sequence
            tokens = sorted(t for lay, idx in held if lay == layout for t in idx)
            assert tokens == list(range(L)), (u, layout)


@pytest.mark.parametrize("world, u", [(4, 2), (4, 4), (8, 2), (8, 4), (6, 3)])
def test_balanced_keeps_the_causal_work_equal_after_the_all_to_all(world, u):
    """After the all-to-all a rank holds its Ulysses group's tokens (a head slice): causal work ~ the
    number of (query, key <= query) pairs of those tokens. Equal over groups for balanced, not for contiguous."""
    seq = 4 * world
    def pairs(layout):
        work = []
        for g in range(world // u):
            tokens = torch.cat([local_token_indices(seq, g * u + i, world, layout, ulysses_size=u) for i in range(u)])
            assert tokens.tolist() == local_token_indices(seq, g, world // u, layout).tolist()  # the layout over R
            work.append(int((tokens + 1).sum()))
        return work
    balanced, contiguous = pairs("balanced"), pairs("contiguous")
    assert len(set(balanced)) == 1, balanced
    assert world // u == 1 or len(set(contiguous)) > 1, contiguous


def test_refusals_come_before_any_collective_and_every_rank_raises(results):
    for rank, rank_results in enumerate(results):
        m = rank_results["refusals"]
        assert m["heads"] and "ulysses_size (2) must divide the number of query heads (3)" in m["heads"], m
        assert m["chunk"] and "kv_head_chunk (KV heads per rank after the all-to-all)" in m["chunk"], m
        assert m["length"] and "sequence length 26" in m["length"], m
        assert m["different_u"] and re.search(r"ulysses: rank 0=2, rank 1=2, rank 2=1, rank 3=1", m["different_u"]), m
        # the verdict spans the whole SP group: every rank names every rank's value
        assert m["causal_one_rank"] and "causal: rank 0=True, rank 1=False, rank 2=False, rank 3=False" \
            in m["causal_one_rank"], m
        # every LSS group agrees within itself (ranks 0, 2 causal; 1, 3 not): the SP-wide verdict still sees it
        assert m["causal_per_ulysses_index"] and "causal: rank 0=True, rank 1=False, rank 2=True, rank 3=False" \
            in m["causal_per_ulysses_index"], m
        assert m["usable_after"] == (1, L // WORLD, 4, D)


def test_ulysses_sizes_and_heads_are_checked_by_name():
    assert check_ulysses_size(2, 4) == 2
    with pytest.raises(ValueError, match=r"ulysses_size \(3\) must divide the sequence-parallel size \(4\)"):
        check_ulysses_size(3, 4)
    with pytest.raises(ValueError, match=r"--lss-ulysses-size must be a positive integer, got 0"):
        check_ulysses_size(0, 4, "--lss-ulysses-size")
    assert check_ulysses_heads(8, 8, 4) == 8  # split
    assert check_ulysses_heads(8, 2, 4) == 4  # replicated twice: one KV head per rank
    assert check_ulysses_heads(8, 1, 4) == 4  # MQA
    assert check_ulysses_heads(12, 3, 2) == 6  # lcm(3, 2)
    assert check_ulysses_heads(6, 2, 2) == 2  # H not divisible by N = 4, only by U
    with pytest.raises(ValueError, match=r"ulysses_size \(4\) must divide the number of query heads \(6\)"):
        check_ulysses_heads(6, 2, 4)
    with pytest.raises(ValueError, match=r"query heads \(6\) must be a multiple of key/value heads \(4\)"):
        check_ulysses_heads(6, 4, 2)
