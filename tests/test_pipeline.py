"""Pipelined head chunks and kv_head_chunk="auto" (issue 16).

Exactness: float64 outputs and gradients within 1e-10 of the one-process reference (relative to
the largest reference magnitude), with and without packed documents, on 1-4 ranks; the number and
bytes of collectives are those of the unpipelined schedule (ceil(Hkv/c) gathers forward,
ceil(Hkv/c) reduce-scatters backward, + ceil(Hkv/c) regathers). The issue order is checked from a
log of calls (chunk i's own keys are attended while its gather is in flight, gather i+1 starts when
gather i arrived, before chunk i's other keys are attended; a chunk's reduce-scatter is waited
for only after the next chunk computed), never from timings. The auto rule is a pure function.
"""
import os
import time
import traceback
from unittest import mock

import pytest
import torch
import torch.distributed as dist

import lss_plugin
import lss_plugin.attention as attention
from lss_plugin.comm import CollectiveError
from lss_plugin.options import (
    AUTO_MIN_GATHER_BYTES, KV_BUFFER_ENV, MiB, auto_head_chunk, check_kv_buffer_mib, kv_buffer_mib_from_env,
    resolve_kv_chunking,
)
from tests.distributed import run_ranks
from tests.test_attention import DKV, B, D, L, _expected_comm
from tests.test_attention import _one_case as _unpacked_case
from tests.test_documents import _one_case as _packed_case

# auto under this budget (float64, the tests' shapes) gathers one KV head at a time: two chunks fit
ONE_HEAD_BUDGET_MIB = 2 * (2 * B * L * D * 8) / MiB

# (causal, layout, heads, kv_backward, kv_head_chunk, documents or None) -> chunk and mode as run
CASES = [
    (True, "balanced", "mha", "keep", 2, None),  # 2 chunks of 2
    (True, "contiguous", "mha", "regather", 3, None),  # uneven: 3 + 1
    (False, "balanced", "gqa", "regather", 1, None),
    (True, "balanced", "mha", "auto", "auto", None),  # auto under ONE_HEAD_BUDGET_MIB: 1 head, regather
    (True, "balanced", "mha", "regather", 2, "random_a"),
    (True, "contiguous", "gqa", "keep", 1, "short_and_spanning"),
    (False, "balanced", "mha", "auto", "auto", "random_b"),
    (True, "balanced", "mqa", "auto", "auto", "random_a"),  # one KV head: auto cannot chunk, keeps
]
RESOLVED = {"mha": (1, "regather"), "mqa": (1, "keep")}  # auto under ONE_HEAD_BUDGET_MIB


def _as_run(case):
    _, _, heads, kv_backward, chunk, _ = case
    return RESOLVED[heads] if chunk == "auto" else (chunk, kv_backward)


def _schedule_log():
    """Starts (G: gather, R: reduce-scatter, numbered per call), their waits (wG, wR) and chunk
    computations (A: attend forward, B: backward) of one chunked regather call, in order."""
    import lss_plugin.comm as comm

    log, real = [], {}
    tags = {"all_gather_into_tensor": "G", DKV: "R"}

    def logged(owner, name, tag=None):
        fn = real[(owner, name)] = getattr(owner, name)

        def call(*args, **kwargs):
            if tag is None:  # Pending.wait: the collective's letter (the size pre-check is not logged)
                if args[0].name in tags:
                    log.append("w" + tags[args[0].name])
            else:
                log.append(f"{tag}{sum(e.startswith(tag) for e in log)}")
            return fn(*args, **kwargs)
        setattr(owner, name, call)

    logged(attention, "start_gather_kv", "G")
    logged(attention, "_attend_forward", "A")
    logged(attention, "_attend_backward", "B")
    logged(attention, "start_reduce_scatter_kv", "R")
    logged(comm.Pending, "wait")
    try:
        _unpacked_case(dist.get_rank(), dist.get_world_size(), True, "balanced", "mha", "regather", 1,
                       torch.float64)
    finally:
        for (owner, name), fn in real.items():
            setattr(owner, name, fn)
    return log


def _sweep(with_log):
    lss_plugin.init_topology(dist.get_world_size())
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for causal, layout, heads, kv_backward, chunk, docs in CASES:
        # the budget variable only beside "auto": with a fixed chunk it is refused, not ignored
        budget = {KV_BUFFER_ENV: repr(ONE_HEAD_BUDGET_MIB)} if chunk == "auto" else {}
        with mock.patch.dict(os.environ, budget):
            if docs is None:
                res = _unpacked_case(rank, world, causal, layout, heads, kv_backward, chunk, torch.float64)
            else:
                res = _packed_case(causal, layout, heads, kv_backward, chunk, docs)
        results.append(res)
    return results, (_schedule_log() if with_log else None)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_pipelined_chunks_exact_with_unchanged_collectives(world):
    for results, log in run_ranks(_sweep, world, world == 2):
        for case, (errors, calls, nbytes) in zip(CASES, results):
            assert max(errors.values()) < 1e-10, (case, errors)
            chunk, mode = _as_run(case)
            exp_calls, exp_bytes = _expected_comm(world, case[2], mode, chunk, itemsize=8)
            assert calls == exp_calls, (case, calls)
            assert nbytes == exp_bytes, (case, nbytes)
        if log is not None:  # 4 chunks of one KV head
            # forward: chunk i is attended (A) from before its gather is waited for (its own pieces run
            # while it is in flight, issue 31); gather i+1 starts as soon as gather i arrived
            forward = ["G0", "A0", "wG", "G1", "A1", "wG", "G2", "A2", "wG", "G3", "A3", "wG"]
            # backward: chunk i's own pieces (B, even) run while its regather is in flight; regather i+1
            # starts when it arrived, then the other pieces (B, odd); chunk i's reduce-scatter starts
            # after them and is waited for only after chunk i+1 computed, before R(i+1); all are waited for
            backward = ["G4", "B0", "wG", "G5", "B1", "R0", "B2", "wG", "G6", "B3", "wR", "R1", "B4", "wG", "G7", "B5",
                        "wR", "R2", "B6", "wG", "B7", "wR", "R3", "wR"]
            assert log == forward + backward, log


def _dies_before_its_second_gather(timeout_s):
    """Rank 1 exits instead of starting chunk 1's gather; rank 0 started it asynchronously and
    fails in wait()."""
    lss_plugin.init_topology(dist.get_world_size(), timeout_s=timeout_s)
    if dist.get_rank() == 1:
        real, calls = attention.start_gather_kv, []

        def dying(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                os._exit(3)
            return real(*args, **kwargs)
        attention.start_gather_kv = dying
    x = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    started = time.monotonic()
    try:
        lss_plugin.lss_attention(x, x, x, causal=True, kv_head_chunk=1)
    except Exception as exc:  # noqa: BLE001 - the error itself is what we check
        return type(exc).__name__, str(exc), traceback.format_exc(), time.monotonic() - started
    return None, None, None, None


def test_a_failure_at_wait_is_a_collective_error_within_the_timeout():
    timeout_s = 8.0
    name, message, trace, elapsed = run_ranks(_dies_before_its_second_gather, 2, timeout_s, timeout_s=120,
                                              pg_timeout_s=timeout_s, allow_exit=(1,))[0]
    assert name == "CollectiveError", (name, message)
    assert "all_gather_into_tensor over the process group of ranks [0, 1]" in message
    assert "in wait" in trace, trace  # raised where the started gather was waited for
    assert elapsed < timeout_s + 15, elapsed


def test_auto_rule():
    four = 4 * MiB  # one KV head of the config: 2 x L 8192 x d 64 x fp32
    assert auto_head_chunk(8, four) == 1  # 2 chunks in flight = 1/4 of K, V
    assert auto_head_chunk(8, four // 2) == 2  # bf16: one head would gather only 2 MiB
    assert auto_head_chunk(32, 8 * MiB) == 4  # the largest chunk within 1/4: 2 x 4 of 32 heads
    assert auto_head_chunk(6, 16 * MiB) == 1  # no divisor keeps 1/4: the leanest
    assert auto_head_chunk(8, 64 * 1024) == 8  # whole K, V (512 KiB) below the minimum gather: unchunked
    assert auto_head_chunk(1, 64 * MiB) == 1
    assert AUTO_MIN_GATHER_BYTES == 4 * MiB
    # an explicit budget: the largest divisor whose buffers (two chunks, one when unchunked) fit
    assert auto_head_chunk(8, four, budget_bytes=20 * MiB) == 2
    assert auto_head_chunk(8, four, budget_bytes=32 * MiB) == 8
    assert auto_head_chunk(8, 64 * 1024, budget_bytes=0.2 * MiB) == 1  # the budget overrides the minimum
    with pytest.raises(ValueError, match=r"kv_buffer_mib / LSS_KV_BUFFER_MIB = 7 MiB .* 8 MiB"):
        auto_head_chunk(8, four, budget_bytes=7 * MiB)


def test_auto_backward_regathers_exactly_when_chunked():
    resolve = resolve_kv_chunking  # (chunk, kv_backward, budget MiB, b, L, Hkv, d, itemsize)
    assert resolve("auto", "auto", None, 1, 8192, 8, 64, 4) == (1, "regather")
    assert resolve("auto", "keep", None, 1, 8192, 8, 64, 4) == (1, "keep")  # explicit wins
    assert resolve("auto", "auto", None, 1, 256, 8, 64, 4) == (8, "keep")  # short: unchunked
    assert resolve("auto", "auto", 20, 1, 8192, 8, 64, 4) == (2, "regather")
    assert resolve("auto", "auto", 40, 1, 8192, 8, 64, 4) == (8, "keep")  # all of K, V fits
    assert resolve(None, "auto", None, 1, 8192, 8, 64, 4) == (8, "keep")
    assert resolve(2, "auto", None, 1, 8192, 8, 64, 4) == (2, "regather")


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "64", True])
def test_bad_budgets_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="kv_buffer_mib must be a positive number"):
        check_kv_buffer_mib(bad)
    with pytest.raises(ValueError, match="kv_buffer_mib must be a positive number"):  # what lss_attention builds
        lss_plugin.AttentionSettings(kv_head_chunk="auto", kv_buffer_mib=bad)


def test_budget_settings_that_cannot_be_honoured_are_refused():
    assert kv_buffer_mib_from_env({}) is None and kv_buffer_mib_from_env({KV_BUFFER_ENV: "96"}) == 96.0
    for raw in ("lots", "0", "-5", "nan"):
        with pytest.raises(ValueError, match="LSS_KV_BUFFER_MIB must be a positive number"):
            kv_buffer_mib_from_env({KV_BUFFER_ENV: raw})
    for chunk in (None, 1):  # lss_attention's keywords build this object (inside its verdict)
        with pytest.raises(ValueError, match=rf"kv_buffer_mib \(64\) is the budget of kv_head_chunk='auto', got kv_head_chunk={chunk}"):
            lss_plugin.AttentionSettings(kv_head_chunk=chunk, kv_buffer_mib=64)
        with pytest.raises(ValueError, match=r"kv_buffer_mib \(64\) is the budget"):  # the module: when built
            lss_plugin.LSSAttention(kv_head_chunk=chunk, kv_buffer_mib=64)
    with pytest.raises(ValueError, match="kv_head_chunk must be"):
        lss_plugin.AttentionSettings(kv_head_chunk="fast")


def test_link_rate_turns_the_size_floor_into_a_time_floor_and_link_chunks_are_kept():
    """``link_gbit`` (issue 31): a gather must keep the link busy for 10x a collective's fixed cost
    (gloo 5 ms, NCCL 0.5 ms). L = 2048, 4 KV heads x 64, fp32, batch 1: the whole K, V is 4 MiB, so
    the size rule gathers everything at once; behind 1 Gbit/s on gloo one head (1 MiB, 8.4 ms on
    the wire) is enough, and those chunks are kept, not regathered (the size rule alone would not
    chunk: memory is not why). At L = 65536, 8 x 128, bf16 the size rule already chunks for memory:
    a 400 Gbit/s NCCL link keeps one head (32 MiB, 0.67 ms) and its regather."""
    assert resolve_kv_chunking("auto", "auto", None, 1, 2048, 4, 64, 4) == (4, "keep")
    assert resolve_kv_chunking("auto", "auto", None, 1, 2048, 4, 64, 4, 1.0, "gloo") == (1, "keep")
    assert resolve_kv_chunking("auto", "auto", None, 1, 2048, 4, 64, 4, 2.0, "gloo") == (2, "keep")  # 1.25 MB floor
    assert resolve_kv_chunking("auto", "auto", None, 1, 2048, 4, 64, 4, 10.0, "gloo") == (4, "keep")  # 6.25 MB
    assert resolve_kv_chunking("auto", "auto", None, 1, 65536, 8, 128, 2) == (1, "regather")
    assert resolve_kv_chunking("auto", "auto", None, 1, 65536, 8, 128, 2, 400.0, "nccl") == (1, "regather")
    assert resolve_kv_chunking("auto", "auto", None, 1, 65536, 8, 128, 2, 400.0, "gloo") == (8, "keep")
    assert resolve_kv_chunking(1, "auto", None, 1, 2048, 4, 64, 4) == (1, "regather")  # a fixed chunk: as asked
