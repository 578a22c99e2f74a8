"""Half-precision accuracy of lss_attention against single-device SDPA in the same dtype.

For bfloat16 and float16, both layouts, causal GQA (4 query / 2 KV heads), on 2 and 3 ranks and
the hybrid LSS x Ulysses on 4 ranks (U = 2) (one spawn each), every one of out, dq, dk, dv is
compared with ``F.scaled_dot_product_attention`` run on the whole sequence in one process in the
same dtype, both measured against a float64 reference of the same inputs, two ways:

- per rank, LSS on this rank's rows against SDPA on the same rows, ratio <= ``PER_RANK_RATIO`` = 1.2
  (the issue's target) on every rank and tensor: at these shapes with the relative Frobenius norm
  ||x - ref64||_F / ||ref64||_F over the rank's rows; on 3 ranks at the issue's shape (L = 384,
  8 / 2 heads, d = 64, ``ISSUE_SHAPE``) with the issue's max |x - ref64| / max |ref64|. At the small
  shapes the max is one element a rounding away from its neighbour value: a computation that is
  not bitwise SDPA's (LSS computes its blocks in float32) measured up to 1.6x there on one element
  while its Frobenius ratio stayed <= 1.07, so the max is asserted only at the issue's shape.
- over the whole sequence: relative Frobenius norm (each rank contributes the squared sums of its
  tokens), within ``RATIO`` = 1.1: it sees a small systematic loss that per-rank noise would hide.

``kv_grad_dtype="input"`` (dK, dV reduce-scattered in the input dtype: half the bytes) rounds each
rank's fp32 partial sums before the sum (the test also checks the reduce-scatter's bytes, exactly:
4-byte items by default, 2-byte with "input"); its dk/dv ratios are recorded (printed with -s) and must stay
within the looser ``INPUT_RATIO``. out and dq do not depend on it.
"""
import pytest
import torch
import torch.distributed as dist

import lss_plugin
from lss_plugin import ulysses
from lss_plugin.bench.precision import _single_device, rank_errors
from lss_plugin.sharding import local_token_indices
from tests.distributed import run_ranks
from tests.test_attention import _expected_comm

NAMES = ("out", "dq", "dk", "dv")
# Default kv_grad_dtype="fp32". Frobenius: we assert 1.1; main before fp32 merges and accumulators
# measured out at up to 1.18 (3 ranks), so 1.1 is what fails if they go back to half precision.
RATIO = 1.1
PER_RANK_RATIO = 1.2  # the issue's target, per rank and tensor
INPUT_RATIO = 1.3  # kv_grad_dtype="input", dk and dv (measured <= 1.08 on these shapes)
# (seed, batch, L, heads, kv_heads, head_dim): L divisible by 2N for N = 2, 3
SHAPES = ((0, 1, 192, 4, 2, 32), (1, 2, 96, 4, 2, 16))
ISSUE_SHAPE = (0, 1, 384, 8, 2, 64)


def _squared(x, ref):
    """(sum of squared error, sum of squared reference) of x against the float64 ref."""
    return (x.double() - ref).pow(2).sum().item(), ref.pow(2).sum().item()


def _rank_sums(ulysses_size=1):
    """Per case: LSS's squared sums on this rank's tokens and SDPA's on the whole sequence (rank 0),
    and per rank {name: (LSS max error, SDPA max error)} on this rank's rows.
    ``ulysses_size`` > 1: the hybrid (its all-to-alls move q, k, v and out unrounded)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    lss_plugin.init_topology(world, ulysses_size=ulysses_size)
    results, per_rank = {}, {}
    for seed, b, seq, h, hkv, d in SHAPES:
        gen = torch.Generator().manual_seed(seed)
        q, dout = (torch.randn(b, seq, h, d, generator=gen, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(b, seq, hkv, d, generator=gen, dtype=torch.float64) for _ in range(2))
        ref = _single_device(q, k, v, dout)  # float64: out, dq, dk, dv [b, L, heads, d]
        for dtype in (torch.bfloat16, torch.float16):
            half = _single_device(*(t.to(dtype) for t in (q, k, v, dout)))
            sdpa = [_squared(x, r) for x, r in zip(half, ref)] if rank == 0 else None
            for layout in ("contiguous", "balanced"):
                idx = local_token_indices(seq, rank, world, layout, ulysses_size)
                for kv_grad_dtype in ("fp32", "input"):
                    local = [t[:, idx].to(dtype).requires_grad_() for t in (q, k, v)]
                    with lss_plugin.record_collectives() as rec:
                        out = lss_plugin.lss_attention(*local, causal=True, layout=layout,
                                                       kv_grad_dtype=kv_grad_dtype)
                        out.backward(dout[:, idx].to(dtype))
                    got = (out, *(t.grad for t in local))
                    lss = [_squared(x, r[:, idx]) for x, r in zip(got, ref)]
                    if ulysses_size > 1:  # the hybrid ran (its bytes: tests/test_hybrid.py)
                        assert rec.calls[ulysses.NAME] == 4, dict(rec.calls)
                    else:
                        _, want = _expected_comm(world, (h, hkv), "keep", None, 2, kv_grad_dtype, (b, seq, d))
                        sent = {name: rec.bytes[name] for name in want}  # not the size pre-check's
                        assert sent == want, (kv_grad_dtype, sent, want)
                    results[(seed, str(dtype), layout, kv_grad_dtype)] = (lss, sdpa)
                    if kv_grad_dtype == "fp32":
                        per_rank[(seed, str(dtype), layout, "frobenius")] = {
                            name: (_frobenius(x, r[:, idx]), _frobenius(s[:, idx], r[:, idx]))
                            for name, x, s, r in zip(NAMES, got, half, ref)}
    if world == 3 and ulysses_size == 1:  # the issue's shape and measure
        seed, b, seq, h, hkv, d = ISSUE_SHAPE
        for dtype in ("bfloat16", "float16"):
            for layout in ("contiguous", "balanced"):
                per_rank[("issue", dtype, layout, "max")] = rank_errors(seq, h, hkv, d, dtype, layout, None,
                                                                        seed=seed, batch=b)
    return results, per_rank


def _frobenius(x, ref):
    """||x - ref||_F / ||ref||_F (ref float64)."""
    return ((x.double() - ref).norm() / ref.norm()).item()


def _ratios(per_rank):
    """case -> {name: (LSS error, SDPA error, ratio)} with relative Frobenius errors over all ranks."""
    table = {}
    for case, (_, sdpa) in per_rank[0].items():
        row = {}
        for i, name in enumerate(NAMES):
            err2 = sum(r[case][0][i][0] for r in per_rank)
            ref2 = sum(r[case][0][i][1] for r in per_rank)
            lss = (err2 / ref2) ** 0.5
            single = (sdpa[i][0] / sdpa[i][1]) ** 0.5
            row[name] = (lss, single, lss / single)
        table[case] = row
    return table


@pytest.mark.parametrize("world, ulysses_size", [(2, 1), (3, 1), (4, 2)])
def test_half_precision_within_1_2x_of_single_device_sdpa_per_rank(world, ulysses_size):
    results = run_ranks(_rank_sums, world, ulysses_size, timeout_s=600)
    table = _ratios([sums for sums, _ in results])
    for case, row in sorted(table.items()):
        print(world, ulysses_size, case, {n: f"{lss:.2e}/{single:.2e} ({ratio:.2f})" for n, (lss, single, ratio) in row.items()})
    for rank, (_, per_rank) in enumerate(results):
        for case, errors in sorted(per_rank.items(), key=str):
            print(world, ulysses_size, "rank", rank, case, {n: f"{a:.2e}/{b:.2e} ({a / b:.2f})" for n, (a, b) in errors.items()})
    for case, row in table.items():
        bound = {"fp32": RATIO, "input": INPUT_RATIO}[case[3]]
        for name, (lss, single, ratio) in row.items():
            limit = RATIO if name in ("out", "dq") else bound
            assert ratio <= limit, (world, case, name, lss, single, ratio)
    for rank, (_, per_rank) in enumerate(results):
        assert (world != 3 or ulysses_size != 1) or any(case[0] == "issue" for case in per_rank)
        for case, errors in per_rank.items():
            for name, (lss, single) in errors.items():
                assert lss <= PER_RANK_RATIO * single, (world, ulysses_size, rank, case, name, lss, single, lss / single)
