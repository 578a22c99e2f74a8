"""lss_attention on 1-4 ranks against full-sequence attention in one process.

Tolerances: float64 outputs and gradients within 1e-10 (absolute, values are O(1));
float32 within 1e-5 relative to the largest reference magnitude.
"""
import itertools
import os

import pytest
import torch
import torch.distributed as dist

import lss_plugin
from lss_plugin.comm import reduce_scatter_kv_name
from lss_plugin.sharding import local_token_indices
from lss_plugin.signature import SIGNATURE_BYTES
from lss_plugin.verdict import ROW_BYTES
from tests.distributed import run_ranks
from tests.reference import reference_attention

HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
B, L, D = 2, 24, 8  # L divisible by 2N for N = 1..4


def _one_case(rank, world, causal, layout, heads, kv_backward, head_chunk, dtype, scale=None):
    h, hkv = HEADS[heads]
    gen = torch.Generator().manual_seed(1234)  # same full tensors on every rank
    q = torch.randn(B, L, h, D, generator=gen, dtype=dtype)
    k = torch.randn(B, L, hkv, D, generator=gen, dtype=dtype)
    v = torch.randn(B, L, hkv, D, generator=gen, dtype=dtype)
    dout = torch.randn(B, L, h, D, generator=gen, dtype=dtype)

    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = reference_attention(*ref_in, causal=causal, scale=scale)
    ref_out.backward(dout)

    idx = local_token_indices(L, rank, world, layout)
    local = [t[:, idx].clone().requires_grad_() for t in (q, k, v)]
    with lss_plugin.record_collectives() as rec:
        out = lss_plugin.lss_attention(*local, causal=causal, layout=layout, kv_backward=kv_backward,
                                       kv_head_chunk=head_chunk, softmax_scale=scale)
        out.backward(dout[:, idx])
    errors = {
        "out": (out - ref_out[:, idx]).abs().max().item() / ref_out.abs().max().item(),
        "dq": (local[0].grad - ref_in[0].grad[:, idx]).abs().max().item() / ref_in[0].grad.abs().max().item(),
        "dk": (local[1].grad - ref_in[1].grad[:, idx]).abs().max().item() / ref_in[1].grad.abs().max().item(),
        "dv": (local[2].grad - ref_in[2].grad[:, idx]).abs().max().item() / ref_in[2].grad.abs().max().item(),
    }
    calls = {name: rec.calls[name] for name in COUNTED}
    nbytes = {name: rec.bytes[name] for name in COUNTED}
    return errors, calls, nbytes


# every test here runs on gloo, whose reduce-scatter is an all-reduce on the wire: there LSS hands dK, dV back
# with an all-to-all of the same buffer and a local sum (lss_plugin.comm), recorded under this name
DKV = reduce_scatter_kv_name("gloo")
COUNTED = ("all_gather_into_tensor", DKV, "verdict")
CASES = list(itertools.product(
    (True, False), ("contiguous", "balanced"), tuple(HEADS), ("keep", "regather"), (None, 1)
))


def _sweep(dtype_name):
    dtype = getattr(torch, dtype_name)
    lss_plugin.init_topology(dist.get_world_size())
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for case in CASES:
        results.append((case, _one_case(rank, world, *case, dtype)))
    results.append((("scale",), _one_case(rank, world, True, "balanced", "gqa", "keep", None, dtype, scale=0.3)))
    return results


def _expected_comm(world, heads, kv_backward, head_chunk, itemsize, kv_grad_dtype="fp32", shape=(B, L, D)):
    """Calls and payload bytes; dK,dV of half inputs are reduce-scattered as float32 by default.

    ``heads``: a name of ``HEADS`` or (heads, kv_heads); ``shape``: (batch, L, head dim)."""
    h, hkv = HEADS[heads] if isinstance(heads, str) else heads
    b, seq, d = shape
    grad_itemsize = 4 if itemsize < 4 and kv_grad_dtype == "fp32" else itemsize
    chunk = head_chunk or hkv
    n_chunks = -(-hkv // chunk)
    if world == 1:
        return dict.fromkeys(COUNTED, 0), dict.fromkeys(COUNTED, 0)
    rounds = 2 if kv_backward == "regather" else 1  # gathers of every head: forward (+ regather)
    all_heads = 2 * b * seq * hkv * d * itemsize  # packed [k; v] of every KV head, all L positions
    all_grads = 2 * b * seq * hkv * d * grad_itemsize  # packed [dk; dv]
    signatures = world * SIGNATURE_BYTES  # each rank's SIGNATURE_BYTES-byte call signature rides in every gather
    # the verdict: one ROW_BYTES-byte row per rank at the start of the forward and of the backward
    return ({"all_gather_into_tensor": rounds * n_chunks, DKV: n_chunks, "verdict": 2},
            {"all_gather_into_tensor": rounds * (all_heads + n_chunks * signatures), DKV: all_grads,
             "verdict": 2 * world * ROW_BYTES})


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_float64_exact_against_single_process(world):
    per_rank = run_ranks(_sweep, world, "float64")
    for rank_results in per_rank:
        for case, (errors, calls, nbytes) in rank_results:
            assert max(errors.values()) < 1e-10, (case, errors)
            if len(case) == 5:
                exp_calls, exp_bytes = _expected_comm(world, case[2], case[3], case[4], itemsize=8)
                assert calls == exp_calls, (case, calls)
                assert nbytes == exp_bytes, (case, nbytes)


def test_float32_within_1e5_relative():
    for rank_results in run_ranks(_sweep, 3, "float32"):
        for case, (errors, _, _) in rank_results:
            assert max(errors.values()) < 1e-5, (case, errors)


def _kernel_calls(causal, heads):
    """block_forward calls of one contiguous lss_attention forward on this rank (one head chunk)."""
    import lss_plugin.attention as attention

    calls, real = [], attention.block_forward
    attention.block_forward = lambda *args: calls.append(args[1].shape[2]) or real(*args)  # keys per call
    try:
        _one_case(dist.get_rank(), dist.get_world_size(), causal, "contiguous", heads, "keep", None, torch.float64)
    finally:
        attention.block_forward = real
    return calls


def _math_kernel_sweep():
    assert os.environ["LSS_ATTENTION_KERNEL"] == "math"
    results = _sweep("float64")  # also registers the topology
    return results, {heads: _kernel_calls(True, heads) for heads in ("mha", "gqa")}


def test_math_kernel_matches_reference():
    """The device-agnostic kernel (used off-CPU) is exact too. It aligns a causal mask bottom-right
    and takes GQA natively, so a query chunk whose prefix is all its rank's own is one call over keys
    [0, end): on 2 ranks (contiguous), rank 0 (queries [0, L/2)) makes one call over its L/2 keys;
    rank 1 (queries [L/2, L)) attends its diagonal (its own keys, while the gather runs) and then
    the prefix [0, L/2) that arrived: two calls of L/2 keys, GQA or not."""
    for rank, (rank_results, calls) in enumerate(run_ranks(_math_kernel_sweep, 2, env={"LSS_ATTENTION_KERNEL": "math"})):
        for case, (errors, _, _) in rank_results:
            assert max(errors.values()) < 1e-10, (case, errors)
        assert calls["mha"] == ([L // 2] if rank == 0 else [L // 2, L // 2]), calls
        assert calls["gqa"] == ([L // 2] if rank == 0 else [L // 2, L // 2]), calls
