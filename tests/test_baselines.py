"""Ring attention and the Ulysses wrapper are exact against single-process attention.

Reference: ``reference_attention`` on the whole sequence in one process (explicit softmax, float64).
Ranks are started with ``lss_plugin.bench.launch`` (it joins its result queue before exiting,
which ``tests/distributed.run_ranks`` does not yet do: results of ranks that imported DeepSpeed got
lost). Each rank computes its shard's output and the gradients of q, k, v of its shard; they must equal the
reference's rows of those tensors within 1e-10 (float64). Communication is counted and checked
against the formulas the cost model uses.
"""
import math
import pytest
import torch
import torch.distributed as dist

from lss_plugin.bench.launch import launch

TOL = 1e-10  # float64


def reference_attention(q, k, v, causal):
    """q [b, L, h, d], k/v [b, L, hkv, d] -> [b, L, h, d], plain softmax attention in one process."""
    heads, hkv = q.shape[2], k.shape[2]
    k = k.repeat_interleave(heads // hkv, dim=2)
    v = v.repeat_interleave(heads // hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if causal:
        L = q.shape[1]
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def _inputs(b, L, h, hkv, d, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: torch.randn(b, L, n, d, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(h), mk(hkv), mk(hkv), torch.randn(b, L, h, d, generator=g, dtype=torch.float64)


def _check_case(attn_fn, b, L, h, hkv, d, causal, layout, seed):
    """Return (max abs error of out, dq, dk, dv) of this rank's shard against the reference."""
    from lss_plugin.sharding import local_token_indices

    rank, size = dist.get_rank(), dist.get_world_size()
    q, k, v, dout = _inputs(b, L, h, hkv, d, seed)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = reference_attention(*ref_in, causal)
    ref_out.backward(dout)
    idx = local_token_indices(L, rank, size, layout)
    loc = [t[:, idx].clone().requires_grad_() for t in (q, k, v)]
    out = attn_fn(*loc, group=dist.group.WORLD, causal=causal, layout=layout)
    out.backward(dout[:, idx])
    errs = [(out - ref_out[:, idx]).abs().max().item()]
    errs += [(a.grad - r.grad[:, idx]).abs().max().item() for a, r in zip(loc, ref_in)]
    return errs


def _ring_cases():
    from lss_plugin.baselines.ring import ring_attention
    from lss_plugin.bench import counters

    counters.install()
    size = dist.get_world_size()
    results = []
    for causal in (False, True):
        for layout in ("contiguous", "balanced"):
            for h, hkv in ((4, 4), (4, 2)):
                with counters.count_collectives() as counts:
                    errs = _check_case(ring_attention, 2, 8 * size, h, hkv, 8, causal, layout, seed=h + hkv)
                results.append(((causal, layout, h, hkv), errs, counts.to_dict()))
    return results


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_ring_attention_exact(world_size):
    results = launch(_ring_cases, world_size, timeout_s=300, pg_timeout_s=120)
    for rank_results in results:
        for case, errs, counts in rank_results:
            assert max(errs) < TOL, (world_size, case, errs)
            b, L, hkv, d = 2, 8 * world_size, case[3], 8
            kv_bytes = 2 * b * (L // world_size) * hkv * d * 8  # packed k, v of one rank, float64
            n = world_size
            if n == 1:
                assert counts["total_bytes"] == 0
            else:
                # forward N-1 K/V hops; backward N-1 K/V hops and N dK/dV hops
                assert counts["calls"]["send"] == 3 * n - 2, counts
                assert counts["calls"]["recv"] == 3 * n - 2, counts
                assert counts["sent_bytes"]["send"] == (3 * n - 2) * kv_bytes, counts


def _ulysses_cases():
    from lss_plugin.baselines.ulysses import ulysses_attention
    from lss_plugin.bench import counters

    counters.install()
    results = []
    for causal in (False, True):
        for h, hkv in ((4, 4), (8, 2)):
            with counters.count_collectives() as counts:
                errs = _check_case(ulysses_attention, 2, 6 * dist.get_world_size(), h, hkv, 8,
                                   causal, "contiguous", seed=h)
            results.append(((causal, h, hkv), errs, counts.to_dict()))
    results.append(("balanced refused", _refuses_balanced(ulysses_attention)))
    return results


def _refuses_balanced(fn):
    x = torch.zeros(1, 4, 2, 2, dtype=torch.float64)
    try:
        fn(x, x, x, group=dist.group.WORLD, layout="balanced")
    except ValueError as e:
        return "contiguous" in str(e)
    return False


@pytest.mark.parametrize("world_size", [2])
def test_ulysses_wrapper_exact(world_size):
    results = launch(_ulysses_cases, world_size, timeout_s=300, pg_timeout_s=120)
    for rank_results in results:
        *cases, refused = rank_results
        assert refused[1], refused
        for case, errs, counts in cases:
            assert max(errs) < TOL, (case, errs)
            b, L, d = 2, 6 * world_size, 8
            h, hkv = case[1], case[2]
            # 4 all-to-alls forward (q, k, v, out) and 4 backward, each of this rank's [b, s_local, heads, d]
            expected = 2 * (2 * h + 2 * hkv) * b * (L // world_size) * d * 8
            assert counts["calls"]["all_to_all"] == 8, counts
            assert counts["bytes"]["all_to_all"] == expected, counts
