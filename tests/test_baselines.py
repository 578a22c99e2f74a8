"""The benchmark's baselines are exact against single-process attention, and move what they should.

Reference: ``reference_attention`` on the whole sequence in one process (explicit softmax, float64).
Each rank computes its shard's output and the gradients of its shard of q, k, v; they must equal the
reference's rows within 1e-10 (float64). Covered, at world sizes 2 and 4 (one spawn each): ring
(zigzag and contiguous), TransformerEngine-style all-gather CP, USP (every Ulysses x ring split),
DeepSpeed-Ulysses; causal and not, MHA and GQA. Communication is counted with the benchmark's
wrappers and checked against each scheme's definition (the cost model uses the same formulas).
At world size 2 the fused SDPA core attention is checked against megatron-core's local
``DotProductAttention`` under TP = 2 (output and input gradients, 1e-10).
Ranks are started with ``lss_plugin.bench.launch`` (it joins its result queue before exiting;
results of ranks that imported DeepSpeed got lost with a plain queue).
"""
import math

import pytest
import torch
import torch.distributed as dist

from lss_plugin.bench.launch import launch

TOL = 1e-10  # float64
B, D, ITEM = 2, 8, 8  # batch, head dim, float64 bytes


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


def _inputs(L, h, hkv, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: torch.randn(B, L, n, D, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(h), mk(hkv), mk(hkv), mk(h)


def _errors(attn_fn, idx, L, h, hkv, causal, seed):
    """Max abs errors (out, dq, dk, dv) of this rank's shard (global positions ``idx``)."""
    q, k, v, dout = _inputs(L, h, hkv, seed)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = reference_attention(*ref_in, causal)
    ref_out.backward(dout)
    loc = [t[:, idx].clone().requires_grad_() for t in (q, k, v)]
    out = attn_fn(*loc, causal)
    out.backward(dout[:, idx])
    return [(out - ref_out[:, idx]).abs().max().item()] + [
        (a.grad - r.grad[:, idx]).abs().max().item() for a, r in zip(loc, ref_in)]


def _counted(fn):
    from lss_plugin.bench import counters

    with counters.count_collectives() as counts:
        errs = fn()
    return errs, counts.to_dict()


def _sp_cases():
    """Every SP baseline on this world: (name, case, errors, counts) per case."""
    from lss_plugin.baselines.allgather_cp import allgather_cp_attention
    from lss_plugin.baselines.ring import ring_attention
    from lss_plugin.baselines.ulysses import UlyssesAttention
    from lss_plugin.baselines.usp import usp_attention, usp_groups, usp_token_indices
    from lss_plugin.bench import counters
    from lss_plugin.sharding import local_token_indices

    counters.install()
    world, rank = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD
    L = 8 * world
    out = []
    for causal in (True, False):
        for h, hkv in ((4, 4), (4, 2)):
            seed = 7 * h + hkv + causal
            for layout in ("balanced", "contiguous"):
                idx = local_token_indices(L, rank, world, layout)
                fn = lambda q, k, v, c: ring_attention(q, k, v, group=group, causal=c, layout=layout)  # noqa: E731
                out.append(("ring", (causal, h, hkv, layout), *_counted(lambda: _errors(fn, idx, L, h, hkv, causal, seed))))
            idx = local_token_indices(L, rank, world, "balanced")
            fn = lambda q, k, v, c: allgather_cp_attention(q, k, v, group=group, causal=c)  # noqa: E731
            out.append(("allgather_cp", (causal, h, hkv), *_counted(lambda: _errors(fn, idx, L, h, hkv, causal, seed))))
    for u in sorted({1, 2, world}):
        groups = usp_groups(world, u, timeout_s=120)
        idx = usp_token_indices(L, rank, world, u)
        for causal in (True, False):
            h, hkv = 4, 2 if u <= 2 else 4
            fn = lambda q, k, v, c: usp_attention(q, k, v, ulysses_group=groups[0], ring_group=groups[1], causal=c)  # noqa: E731
            out.append(("usp", (causal, h, hkv, u), *_counted(lambda: _errors(fn, idx, L, h, hkv, causal, 3 + u))))
    idx = local_token_indices(L, rank, world, "contiguous")
    for causal in (True, False):
        h = hkv = 4
        fn = lambda q, k, v, c: UlyssesAttention(group, causal=c)(q, k, v)  # noqa: E731
        out.append(("ulysses", (causal, h, hkv), *_counted(lambda: _errors(fn, idx, L, h, hkv, causal, 11))))
    return out


def _check_sp(world, results):
    """Numerics and communication of every case on every rank."""
    names = set()
    for rank_results in results:
        for name, case, errs, counts in rank_results:
            names.add(name)
            assert max(errs) < TOL, (world, name, case, errs)
            calls, sent, payload = counts["calls"], counts["sent_bytes"], counts["bytes"]
            hkv = case[2]
            s_local = 8  # L / N
            kv_block = 2 * B * s_local * hkv * D * ITEM  # packed local K and V
            if name == "ring":  # forward N-1 K/V hops; backward N-1 K/V hops + N dK/dV hops
                assert calls["send"] == calls["recv"] == 3 * world - 2, counts
                assert sent["send"] == (3 * world - 2) * kv_block, counts
            elif name == "allgather_cp":  # K, V gathered separately, twice; dK, dV scattered separately
                assert calls == {"all_gather": 4, "reduce_scatter": 2}, counts
                assert payload["all_gather"] == 4 * world * kv_block // 2, counts
                assert payload["reduce_scatter"] == 2 * world * kv_block // 2, counts
            elif name == "usp":
                u = case[3]
                r = world // u
                q_heads = case[1]
                a2a = 0 if u == 1 else 2 * (2 * q_heads + 2 * hkv) * B * s_local * D * ITEM
                assert payload.get("all_to_all", 0) == a2a, counts
                assert calls.get("send", 0) == (3 * r - 2 if r > 1 else 0), counts
                if r > 1:  # the ring carries the Ulysses group's tokens for a 1/U head slice
                    assert sent["send"] == (3 * r - 2) * kv_block, counts
            elif name == "ulysses":
                q_heads = case[1]
                assert calls == {"all_to_all": 8}, counts
                assert payload["all_to_all"] == 2 * (2 * q_heads + 2 * hkv) * B * s_local * D * ITEM
    assert names == {"ring", "allgather_cp", "usp", "ulysses"}, names


def _sdpa_core_case():
    """SDPADotProductAttention vs megatron-core's local DotProductAttention, TP = world size."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from lss_plugin.baselines.megatron import SDPADotProductAttention
    from lss_plugin.megatron.cpu_shim import apply_cpu_shim

    apply_cpu_shim()
    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             create_gloo_process_groups=False)
    tensor_parallel.model_parallel_cuda_manual_seed(1)  # megatron's attention forks this RNG
    errors = {}
    try:
        for heads, groups in ((4, 4), (4, 2)):
            config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=heads,
                                       num_query_groups=groups, tensor_model_parallel_size=tp,
                                       attention_dropout=0.0, params_dtype=torch.float64)
            for mask in (AttnMaskType.causal, AttnMaskType.no_mask):
                ref = DotProductAttention(config, 1, mask, "self")
                mine = SDPADotProductAttention(config, 1, mask, "self")
                g = torch.Generator().manual_seed(heads + groups + dist.get_rank())
                s, b, d = 12, 2, 32 // heads
                q = torch.randn(s, b, heads // tp, d, generator=g, dtype=torch.float64)
                k, v = (torch.randn(s, b, groups // tp, d, generator=g, dtype=torch.float64) for _ in "kv")
                dout = torch.randn(s, b, heads // tp * d, generator=g, dtype=torch.float64)
                results = []
                for module in (ref, mine):
                    ins = [t.clone().requires_grad_() for t in (q, k, v)]
                    out = module(*ins, attention_mask=None)
                    out.backward(dout)
                    results.append([out] + [t.grad for t in ins])
                errors[(heads, groups, mask.name)] = max(
                    (a - b_).abs().max().item() for a, b_ in zip(*results))
    finally:
        parallel_state.destroy_model_parallel()
    return errors


def _world_cases():
    out = {"sp": _sp_cases()}
    if dist.get_world_size() == 2:
        out["sdpa_core"] = _sdpa_core_case()
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_baselines_exact(world_size):
    results = launch(_world_cases, world_size, timeout_s=600, pg_timeout_s=180)
    _check_sp(world_size, [r["sp"] for r in results])
    if world_size == 2:
        for r in results:
            assert len(r["sdpa_core"]) == 4, r["sdpa_core"]
            for case, err in r["sdpa_core"].items():
                assert err < TOL, (case, err)


def test_baselines_refuse_what_they_cannot_do():
    from lss_plugin.baselines.ulysses import ulysses_attention
    from lss_plugin.baselines.usp import usp_token_indices

    x = torch.zeros(1, 4, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="layout must be 'contiguous'"):
        ulysses_attention(x, x, x, group=None, layout="balanced")  # refused before any collective
    with pytest.raises(ValueError, match="ulysses size 3 must divide the sequence-parallel size 2"):
        usp_token_indices(8, 0, 2, 3)
    with pytest.raises(ValueError, match="divisible by 2 x ring size x ulysses size = 8"):
        usp_token_indices(12, 0, 4, 2)
