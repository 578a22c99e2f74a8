"""The mask-aware sparse K/V exchange (``kv_exchange="sparse" | "auto"``, ``lss_plugin.exchange``).

Pure plan (one process): for random documents, windows, chunks, both layouts and N = 1..4, the
keys the plan sends each rank are exactly the keys some query of that rank reads under the dense
one-device mask, less its own. Multi-rank (worlds 1-4, one spawn each): float64 against the
one-process dense reference, out and dq, dk, dv within 1e-10 relative to the largest reference
magnitude, over random documents, windows and chunks, both layouts, MHA / GQA / MQA, whole and
pipelined head chunks, keep and regather, fp32 and input-dtype dK/dV, and (world 4) the hybrid at
U = 2; the collectives of every call counted exactly against the plan (calls, and bytes = the
floor plus one signature row per peer); ``auto`` picks the gather for full causal masks; ranks
whose exchange plans differ raise by name on every rank before any K/V collective.
"""
import itertools
import random

import pytest
import torch
import torch.distributed as dist

import lss_plugin
from lss_plugin.comm import SPARSE_DKV, SPARSE_KV
from lss_plugin.exchange import exchange_plan, resolve_kv_exchange
from lss_plugin.masks import MaskSpec, dense_hidden
from lss_plugin.sharding import local_token_indices
from lss_plugin.signature import SIGNATURE_BYTES
from lss_plugin.verdict import ROW_BYTES
from tests.distributed import run_ranks
from tests.reference import reference_attention
from tests.test_attention import DKV

B, L, D = 2, 48, 8  # L divisible by 2N for N = 1..4 and by the hybrid's layouts at N = 4, U = 2
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
KV = [("keep", None), ("regather", 1), ("keep", 1), ("regather", None)]
TOL = 1e-10
COUNTED = ("all_gather_into_tensor", DKV, "verdict", SPARSE_KV, SPARSE_DKV)


def _random_bounds(rng: random.Random, seq_len: int) -> tuple[int, ...]:
    cuts = sorted(rng.sample(range(1, seq_len), rng.randint(0, 6)))
    return (0, *cuts, seq_len)


def _random_mask(rng: random.Random, seq_len: int) -> dict:
    causal = rng.random() < 0.7
    mask = {"causal": causal}
    if rng.random() < 0.7:
        left = rng.choice([0, 1, 3, 7, seq_len // 8, seq_len // 3])
        mask["window"] = (left, 0 if causal else rng.choice([0, 2, 5]))
    if rng.random() < 0.3:
        mask["chunk"] = rng.choice([5, 7, 12])
    return mask


# ---------------------------------------------------------------------------------------------
# The plan, in one process, against the dense mask


def _dense_reads(bounds, mask, world, layout, dst):
    """Global keys some query of rank ``dst`` reads under the dense mask, less its own."""
    hidden = dense_hidden(L, bounds, MaskSpec(mask["causal"], mask.get("window"), mask.get("chunk")))
    mine = local_token_indices(L, dst, world, layout)
    read = (~hidden[mine]).any(dim=0)
    read[mine] = False
    return set(torch.nonzero(read).flatten().tolist())


def test_plan_sends_exactly_the_keys_each_rank_reads():
    rng = random.Random(0)
    checked = 0
    for _ in range(60):
        bounds, mask = _random_bounds(rng, L), _random_mask(rng, L)
        for world, layout in itertools.product((1, 2, 3, 4), ("contiguous", "balanced")):
            plan = exchange_plan(layout, world, L // world, mask["causal"], bounds, mask.get("window"),
                                 mask.get("chunk"))
            for dst in range(world):
                got = plan.receive_positions(dst)
                assert len(got) == len(set(got)) == plan.received(dst)
                assert set(got) == _dense_reads(bounds, mask, world, layout, dst), (bounds, mask, world, layout, dst)
                owned = set(local_token_indices(L, dst, world, layout).tolist())
                sent = plan.send_indices(dst)  # local indices of dst's own tokens, destination-major
                assert len(sent) == plan.sent(dst) and all(0 <= i < L // world for i in sent)
                positions = local_token_indices(L, dst, world, layout)
                assert {positions[i].item() for i in sent} <= owned
                checked += 1
    assert checked == 60 * 2 * 10


def test_plan_floor_of_the_issue_shapes():
    """4 ranks, balanced, L = 4096: a causal window of L/16 moves 6 halos of 255 keys (each of the 8
    chunks' windows reaches back 255 keys into the chunk before; chunk 0 has none, and chunk 4's,
    chunk 3, is held by the same rank);
    packed documents of 128 tokens inside chunks of 512 move nothing; full causal needs nearly all
    (auto picks the gather)."""
    seq, n = 4096, 4
    window = exchange_plan("balanced", n, seq // n, True, (0, seq), (seq // 16 - 1, 0))
    assert window.floor_tokens == 6 * (seq // 16 - 1) and resolve_kv_exchange("auto", window) == "sparse"
    docs = exchange_plan("balanced", n, seq // n, True, tuple(range(0, seq + 1, 128)))
    assert docs.floor_tokens == 0 and resolve_kv_exchange("auto", docs) == "sparse"
    full = exchange_plan("balanced", n, seq // n, True, (0, seq))
    assert full.busiest_tokens == full.gather_tokens_per_rank and resolve_kv_exchange("auto", full) == "gather"
    contiguous = exchange_plan("contiguous", n, seq // n, True, (0, seq))
    assert contiguous.received(0) == 0 and contiguous.received(3) == 3 * seq // 4
    assert resolve_kv_exchange("auto", contiguous) == "gather"
    assert len({window.digest, docs.digest, full.digest, contiguous.digest}) == 4
    assert all(p.digest % 2 == 1 for p in (window, docs, full, contiguous))  # never 0 (0 means the gather)


# ---------------------------------------------------------------------------------------------
# Multi-rank exactness and counts


def _inputs(h, hkv, seed):
    gen = torch.Generator().manual_seed(seed)  # the same full tensors on every rank
    q, k, v = (torch.randn(B, L, n, D, generator=gen, dtype=torch.float64) for n in (h, hkv, hkv))
    dout = torch.randn(B, L, h, D, generator=gen, dtype=torch.float64)
    return q, k, v, dout


def _rel(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1.0)


def _expected_counts(plan, rank, heads_k, head_chunk, regather, grad_itemsize, itemsize=8):
    """Calls and bytes of one forward + backward on ``rank`` from the plan alone."""
    chunks = -(-heads_k // (head_chunk or heads_k))
    n = plan.lss_size
    calls, nbytes = {}, {}
    if n > 1:
        token = 2 * B * (head_chunk or heads_k) * D  # elements of a token's packed k, v per head chunk
        kv_calls = chunks * (2 if regather else 1)
        calls[SPARSE_KV] = kv_calls
        nbytes[SPARSE_KV] = kv_calls * (plan.sent(rank) * token * itemsize + (n - 1) * SIGNATURE_BYTES)
        if plan.floor_tokens:
            calls[SPARSE_DKV] = chunks
            nbytes[SPARSE_DKV] = chunks * plan.received(rank) * token * grad_itemsize
    return calls, {name: value for name, value in nbytes.items() if value}  # as counted: nonzero bytes only


def _one_case(case, ulysses_size=1):
    rank, world = dist.get_rank(), dist.get_world_size()
    h, hkv = HEADS[case["heads"]]
    q, k, v, dout = _inputs(h, hkv, case["seed"])
    bounds, mask = case["bounds"], case["mask"]
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_in, causal=mask["causal"], bounds=bounds, window=mask.get("window"),
                              chunk=mask.get("chunk"))
    ref.backward(dout)
    idx = local_token_indices(L, rank, world, case["layout"], ulysses_size=ulysses_size)
    local = [t[:, idx].clone().requires_grad_() for t in (q, k, v)]
    kv_backward, head_chunk = case["kv"]
    with lss_plugin.record_collectives() as rec:
        out = lss_plugin.lss_attention(*local, causal=mask["causal"], cu_seqlens=torch.tensor(bounds),
                                       window=mask.get("window"), chunk=mask.get("chunk"), layout=case["layout"],
                                       kv_backward=kv_backward, kv_head_chunk=head_chunk,
                                       kv_exchange=case["exchange"])
        out.backward(dout[:, idx])
    errors = {"out": _rel(out, ref[:, idx])}
    for name, t, r in zip(("dq", "dk", "dv"), local, ref_in):
        errors[name] = _rel(t.grad, r.grad[:, idx])
    counted = ({n: rec.calls[n] for n in COUNTED if rec.calls[n]}, {n: rec.bytes[n] for n in COUNTED if rec.bytes[n]})
    return errors, counted


def _cases(world, count, seed):
    rng = random.Random(seed + world)
    cases = []
    for i in range(count):
        cases.append(dict(bounds=_random_bounds(rng, L), mask=_random_mask(rng, L),
                          layout=("contiguous", "balanced")[i % 2], heads=list(HEADS)[i % 3], kv=KV[i % 4],
                          exchange="sparse", seed=i))
    # the issue's shapes, small: a window of L/16, documents of L/32 tokens, full causal under auto
    for layout in ("balanced", "contiguous"):
        cases.append(dict(bounds=(0, L), mask={"causal": True, "window": (L // 16 - 1, 0)}, layout=layout,
                          heads="gqa", kv=("keep", None), exchange="auto", seed=100))
        cases.append(dict(bounds=tuple(range(0, L + 1, L // 16)), mask={"causal": True}, layout=layout,
                          heads="gqa", kv=("regather", 1), exchange="auto", seed=101))
        cases.append(dict(bounds=(0, L), mask={"causal": True}, layout=layout, heads="mha", kv=("keep", None),
                          exchange="auto", seed=102))
    return cases


def _disagreement():
    """The last rank runs the gather while the others run the sparse exchange: every rank raises
    naming the field, before any K/V collective; the group still works afterwards."""
    rank, world = dist.get_rank(), dist.get_world_size()
    q, k, v, _ = _inputs(4, 2, 3)
    idx = local_token_indices(L, rank, world, "balanced")
    local = [t[:, idx] for t in (q, k, v)]
    mode = "gather" if rank == world - 1 else "sparse"
    with lss_plugin.record_collectives() as rec:
        try:
            lss_plugin.lss_attention(*local, causal=True, window=(3, 0), kv_exchange=mode)
            message = None
        except RuntimeError as exc:
            message = str(exc)
    after = lss_plugin.lss_attention(*local, causal=True, window=(3, 0), kv_exchange="sparse")
    ref = reference_attention(q, k, v, causal=True, window=(3, 0))[:, idx]
    return message, dict(rec.calls), _rel(after, ref)


def _sweep():
    world = dist.get_world_size()
    lss_plugin.init_topology(world, timeout_s=60)
    results = {"cases": [(case, _one_case(case)) for case in _cases(world, 24, 0)]}
    if world > 1:
        results["disagree"] = _disagreement()
    if world == 4:
        lss_plugin.init_topology(world, ulysses_size=2, timeout_s=60)
        results["hybrid"] = [(case, _one_case(case, ulysses_size=2)) for case in _cases(world, 8, 1)]
    return results


@pytest.fixture(scope="module", params=[1, 2, 3, 4])
def sweep(request):
    return request.param, run_ranks(_sweep, request.param, timeout_s=600)


def test_sparse_exchange_float64_exact_against_dense_reference(sweep):
    world, per_rank = sweep
    for results in per_rank:
        assert len(results["cases"]) == 30
        for case, (errors, _) in results["cases"] + results.get("hybrid", []):
            assert max(errors.values()) < TOL, (world, case, errors)


def test_collectives_and_bytes_are_the_plans_exactly(sweep):
    """Calls and bytes per call from the plan alone; ``auto`` picks the gather for full causal masks
    and the sparse exchange for the window and the small documents."""
    world, per_rank = sweep
    for rank, results in enumerate(per_rank):
        for case, (_, (calls, nbytes)) in results["cases"]:
            mask = case["mask"]
            plan = exchange_plan(case["layout"], world, L // world, mask["causal"], case["bounds"],
                                 mask.get("window"), mask.get("chunk"))
            chosen = resolve_kv_exchange(case["exchange"], plan)
            kv_backward, head_chunk = case["kv"]
            hkv = HEADS[case["heads"]][1]
            if world == 1:
                assert calls == {} and nbytes == {}, (case, calls)  # a group of one moves nothing
                continue
            if chosen == "gather":
                assert world > 1 and case["exchange"] == "auto" and "window" not in mask, case
                assert calls["all_gather_into_tensor"] >= 1 and SPARSE_KV not in calls, calls
                continue
            want_calls, want_bytes = _expected_counts(plan, rank, hkv, head_chunk, kv_backward == "regather", 8)
            if world > 1:
                want_calls["verdict"], want_bytes["verdict"] = 2, 2 * world * ROW_BYTES  # forward's and backward's
            assert calls == want_calls and nbytes == want_bytes, (case, calls, nbytes, want_calls, want_bytes)
        if world > 1:
            autos = [c for c, _ in results["cases"] if c["exchange"] == "auto"]
            picked = [resolve_kv_exchange("auto", exchange_plan(c["layout"], world, L // world, True, c["bounds"],
                                                                c["mask"].get("window"))) for c in autos]
            assert picked == ["sparse", "sparse", "gather"] * 2, picked


def test_ranks_with_different_exchange_plans_raise_by_name_on_every_rank(sweep):
    world, per_rank = sweep
    if world == 1:
        pytest.skip("needs ranks to disagree")
    first = per_rank[0]["disagree"][0]
    for results in per_rank:
        message, calls, after = results["disagree"]
        assert message is not None and "disagree" in message and message == first, message
        assert "exchange: rank 0=" in message and f"rank {world - 1}=0" in message, message
        assert calls == {"verdict": 1}, calls  # before any K/V collective
        assert after < TOL
