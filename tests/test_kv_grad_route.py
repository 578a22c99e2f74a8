"""LSS's dK/dV collective at the wire's floor on gloo (issue 31 item 3).

gloo's reduce-scatter is a clone and an all-reduce of the whole buffer (2(N-1)/N on the wire), so on gloo
``lss_plugin.comm.start_reduce_scatter_kv`` sends the same owner-major buffer with ONE all-to-all ((N-1)/N)
and sums the N received slices in rank order. Checked on real gloo ranks:
- the backward of ``lss_attention`` issues no reduce-scatter, one all-to-all per head chunk of payload
  N x the local packed dK,dV, as record_collectives and the benchmark's counters see it; the counters'
  wire bytes are (N-1)/N of it, where the forced reduce-scatter route's are 2(N-1)/N;
- the two routes agree: at 2 ranks bit for bit (a sum of two floats does not depend on the order), at
  3 and 4 within float32 rounding of the sum's order (gloo's ring adds in its own order): 4 ulp of
  float32 relative to the largest value; half inputs with ``kv_grad_dtype="fp32"`` send and sum float32
  on both routes, so dk, dv agree to one rounding of the half output (bit for bit at 2 ranks).
"""
from unittest import mock

import pytest
import torch
import torch.distributed as dist

import lss_plugin
import lss_plugin.comm as comm
from lss_plugin.sharding import local_token_indices
from tests.distributed import run_ranks

B, L, H, HKV, D = 2, 48, 4, 2, 8
F32_TOL = 4 * torch.finfo(torch.float32).eps


def _inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, L, HKV, D, generator=gen, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(B, L, H, D, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, dout)]


def _grads(dtype, head_chunk, kv_grad_dtype="fp32"):
    """This rank's dk, dv of one lss_attention call and what record_collectives and the counters saw."""
    from lss_plugin.bench import counters

    rank, world = dist.get_rank(), dist.get_world_size()
    q, k, v, dout = _inputs(dtype)
    idx = local_token_indices(L, rank, world, "balanced")
    local = [t[:, idx].clone().requires_grad_() for t in (q, k, v)]
    out = lss_plugin.lss_attention(*local, causal=True, layout="balanced", kv_backward="keep",
                                   kv_head_chunk=head_chunk, kv_grad_dtype=kv_grad_dtype)
    with lss_plugin.record_collectives() as rec, counters.count_collectives() as counted:
        out.backward(dout[:, idx])
    return local[1].grad, local[2].grad, dict(rec.calls), dict(rec.bytes), counted.to_dict()


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _compare(new, old):
    """Plain values only (tensors do not cross the rank's process boundary): equal, relative difference, dtypes."""
    return {"equal": all(torch.equal(x, y) for x, y in zip(new, old)),
            "rel": max(_rel(x, y) for x, y in zip(new, old)), "dtypes": {str(x.dtype) for x in (*new, *old)}}


def _routes():
    from lss_plugin.bench import counters

    counters.install()
    lss_plugin.init_topology(dist.get_world_size())
    out = {}
    for dtype, head_chunk in ((torch.float64, None), (torch.float64, 1), (torch.bfloat16, None),
                              (torch.float16, 1)):
        new = _grads(dtype, head_chunk)
        with mock.patch.object(comm, "REDUCE_SCATTER_AS_ALL_REDUCE", ()):  # gloo taken for a wire-optimal backend
            old = _grads(dtype, head_chunk)
        out[(str(dtype), head_chunk)] = (_compare(new[:2], old[:2]), new[2:], old[2:])
    # the helper alone, float32 sums of half dK,dV, each route forced
    gen = torch.Generator().manual_seed(dist.get_rank() + 7)
    dkv = torch.randn(2, B, HKV, L, D, generator=gen).to(torch.float16)  # [2, b, hkv, L, d]
    new, old = (comm.start_reduce_scatter_kv(dkv, None, "balanced", torch.float32, route=route).wait()
                for route in (comm.REDUCE_SCATTER_A2A, comm.REDUCE_SCATTER))
    out["helper"] = (_compare([new], [old]), tuple(new.shape))
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gloo_backward_all_to_all_matches_the_reduce_scatter(world):
    s_local = L // world
    for results in run_ranks(_routes, world, timeout_s=600):
        for (dtype, head_chunk), (same, new, old) in ((k, v) for k, v in results.items() if k != "helper"):
            (calls, nbytes, counted), (calls0, nbytes0, counted0) = new, old
            itemsize = 8 if dtype == "torch.float64" else 4  # kv_grad_dtype="fp32": half inputs send float32
            chunks = HKV // (head_chunk or HKV)
            payload = 2 * B * L * HKV * D * itemsize  # N x the local packed dK,dV [2, b, s_local, hkv, d]
            assert payload == world * 2 * B * s_local * HKV * D * itemsize
            assert calls == {comm.REDUCE_SCATTER_A2A: chunks, "verdict": 1}, (dtype, calls)
            assert nbytes[comm.REDUCE_SCATTER_A2A] == payload, (dtype, nbytes)
            assert calls0 == {comm.REDUCE_SCATTER: chunks, "verdict": 1}, (dtype, calls0)
            assert nbytes0[comm.REDUCE_SCATTER] == payload
            # the benchmark's counters: an all-to-all of the staged buffer, (N-1)/N of it on the wire;
            # the reduce-scatter: the same payload, twice the wire (gloo's all-reduce)
            assert counted["calls"].get("reduce_scatter", 0) == 0 and counted["calls"]["all_to_all"] == chunks
            assert counted["bytes"]["all_to_all"] == payload
            assert counted["wire_bytes"]["all_to_all"] == payload * (world - 1) // world
            assert counted0["bytes"]["reduce_scatter"] == payload and "all_to_all" not in counted0["calls"]
            assert counted0["wire_bytes"]["reduce_scatter"] == 2 * payload * (world - 1) // world
            assert counted0["sent_bytes"]["reduce_scatter"] == payload * (world - 1) // world
            assert same["dtypes"] == {dtype}, same
            if world == 2:
                assert same["equal"], (dtype, head_chunk, same)
            else:  # float32's order of the sum, then one rounding of a half output
                tol = F32_TOL if dtype == "torch.float64" else torch.finfo(getattr(torch, dtype[6:])).eps
                assert same["rel"] <= tol, (dtype, head_chunk, same)
        same, shape = results["helper"]
        assert same["dtypes"] == {"torch.float32"} and shape == (2, B, s_local, HKV, D)
        assert same["equal"] if world == 2 else same["rel"] <= F32_TOL, same


def _refuse_route():
    with pytest.raises(ValueError, match="route must be 'reduce_scatter_tensor', 'reduce_scatter_all_to_all' or "
                                         "None, got 'ring'"):
        comm.start_reduce_scatter_kv(torch.zeros(2, 1, 1, 4, 2), None, "contiguous", route="ring")
    return comm.reduce_scatter_kv_name(comm.backend_of(None, torch.device("cpu")))


def test_route_name_and_refusal():
    assert comm.reduce_scatter_kv_name("nccl") == comm.REDUCE_SCATTER == "reduce_scatter_tensor"
    assert comm.reduce_scatter_kv_name("gloo") == comm.REDUCE_SCATTER_A2A
    assert run_ranks(_refuse_route, 2, timeout_s=120) == [comm.REDUCE_SCATTER_A2A] * 2
