"""The benchmark's instruments: collective counters, live-tensor tracker, report targets.

Counters: every collective type is called with known tensors on 2 ranks; calls, payload bytes and
bytes sent must equal the convention in ``lss_plugin.bench.counters`` exactly, a nested call is
counted once, and a reference taken before ``install()`` is re-pointed.
Tracker: tensors of known sizes; peak and activation bytes must be exact (views are free).
"""
import sys
import types

import torch
import torch.distributed as dist

from lss_plugin.bench.launch import launch
from lss_plugin.bench.memory import LiveTensorTracker


def _counter_cases():
    from lss_plugin.bench import counters

    rank, n = dist.get_rank(), dist.get_world_size()
    # a module that bound a collective before install(), as lss_plugin.comm and Megatron do
    stale = types.ModuleType("stale_reference_module")
    stale.all_reduce = counters._INSTALLED["all_reduce"]
    sys.modules[stale.__name__] = stale
    x = torch.ones(10)  # 40 bytes
    with counters.count_collectives() as c:
        dist.all_reduce(x)
        stale.all_reduce(x)
        dist.all_gather_into_tensor(torch.empty(10 * n), x)  # deprecated name -> all_gather_single
        dist.reduce_scatter_tensor(torch.empty(10), torch.ones(10 * n))
        dist.all_to_all_single(torch.empty(10 * n), torch.ones(10 * n))
        peer = (rank + 1) % n
        works = [dist.isend(x, peer), dist.irecv(torch.empty(10), (rank - 1) % n)]
        for w in works:
            w.wait()
    outside = counters.CommCounts()
    dist.all_reduce(x)  # not counted: no active block
    return c.to_dict(), outside.to_dict(), stale.all_reduce is dist.all_reduce


def test_counters_exact():
    n = 2
    for counts, outside, rebound in launch(_counter_cases, n, timeout_s=300):
        assert rebound
        assert outside["total_bytes"] == 0
        assert counts["calls"] == {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1,
                                   "all_to_all": 1, "send": 1, "recv": 1}
        assert counts["bytes"] == {"all_reduce": 80, "all_gather": 40 * n, "reduce_scatter": 40 * n,
                                   "all_to_all": 40 * n, "send": 40, "recv": 40}
        # ring all-reduce 2(N-1)/N, all-gather / reduce-scatter / all-to-all (N-1)/N, send 1, recv 0
        assert counts["sent_bytes"] == {"all_reduce": 80, "all_gather": 40, "reduce_scatter": 40,
                                        "all_to_all": 40, "send": 40, "recv": 0}


def test_tracker_exact_on_known_tensors():
    w = torch.ones(1000)  # static: 4000 bytes
    tracker = LiveTensorTracker()
    tracker.register_static([w])
    with tracker:
        a = w * 2  # 4000
        view = a[:500]  # a view: no new storage
        b = torch.ones(2000)  # 8000
        tracker.mark_forward_end()  # live activations: a + b = 12000
        del b  # peak so far 4000 + 12000
        c = torch.ones(250)  # 1000
        del a, view, c
    report = tracker.report()
    assert report.static_bytes == 4000
    assert report.activation_bytes_after_forward == 12000
    assert report.peak_activation_bytes == 12000
    assert report.peak_bytes == 16000


def test_tracker_classifies_gradients_as_static():
    p = torch.nn.Parameter(torch.ones(100))  # 400 bytes
    tracker = LiveTensorTracker()
    tracker.register_static([p])
    with tracker:
        loss = (p * 3).sum()  # p * 3 is not saved (constant factor): freed after forward
        tracker.mark_forward_end()
        loss.backward()  # p.grad: 400 bytes, created in the step
    tracker.classify_static([p.grad])
    report = tracker.report()
    assert report.static_bytes == 800
    assert report.activation_bytes_after_forward == 4  # the scalar loss


def test_targets_report_pass_and_miss():
    from lss_plugin.bench.report import check_targets

    def row(variant, world, sent, t, act, attention="mha"):
        return {"variant": variant, "sweep": "strong", "attention": attention, "world_size": world,
                "seq_len": 2048, "error": None, "sent_bytes": sent, "step_time_s": t,
                "peak_activation_bytes": act}

    rows = [row("lss[keep,contiguous]", 4, 50, 1.0, 0), row("megatron_tp_sp", 4, 100, 1.0, 0),
            row("lss[keep,contiguous]", 4, 30, 1.0, 0, "gqa"), row("megatron_tp_sp", 4, 100, 1.0, 0, "gqa"),
            row("lss[regather,contiguous]", 1, 0, 1.0, 400), row("lss[regather,contiguous]", 4, 0, 1.0, 130)]
    budget = [{"variant": "lss[regather,contiguous]", "world_size": 1, "longest_seq_len": 100, "max_len_searched": 1000},
              {"variant": "lss[regather,contiguous]", "world_size": 4, "longest_seq_len": 300, "max_len_searched": 1000}]
    status = {t["target"].split(" (")[0]: t["status"] for t in check_targets(rows, budget, hidden_size=64)}
    assert list(status.values()) == ["PASS", "PASS", "MISS", "MISS", "MISS"], status
