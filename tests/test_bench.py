"""The benchmark's instruments: collective counters, live-tensor tracker, timing aggregation, targets.

Counters: every collective type is called with known tensors on 2 ranks; calls, payload bytes and
bytes sent must equal the convention in ``lss_plugin.bench.counters`` exactly, a nested call is
counted once, and a reference taken before ``install()`` is re-pointed.
Tracker: tensors of known sizes; peak and activation bytes must be exact (views are free).
Timing: fabricated per-rank step times; rows keep the slower rank per step, ratios pair rounds.
Targets: fabricated rows on both sides of every threshold, the status and value of each target.
"""
import sys
import types

import pytest
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
        # on the wire: gloo's reduce-scatter is an all-reduce of its whole input, 2(N-1)/N; the rest as sent
        assert counts["wire_bytes"] == dict(counts["sent_bytes"], reduce_scatter=80)
        assert counts["total_wire_bytes"] == counts["total_sent_bytes"] + 40


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


def _rank_result(variant, method, rank, rounds, sweep="strong", attention="mha", world=2, link=None):
    """A fabricated per-rank case result, as ``run_cases`` returns it."""
    return {"case": {"variant_name": variant, "variant": {"method": method, "kernel": "fused"},
                     "sweep": sweep, "attention": attention, "seq_len": 64},
            "world_size": world, "rank": rank, "loss": 1.0, "step_times_s": rounds, "error": None,
            "link_gbit": link, "attention_ops": ["aten._scaled_dot_product_flash_attention_for_cpu"],
            "comm": {"total_sent_bytes": 10, "total_bytes": 20, "calls": {}, "bytes": {}, "sent_bytes": {}},
            "memory": {"peak_bytes": 1, "peak_activation_bytes": 1, "activation_bytes_after_forward": 1,
                       "static_bytes": 1},
            "peak_rss_bytes": 1}


def test_timings_are_max_over_ranks_and_ratios_pair_rounds():
    from lss_plugin.bench.report import aggregate, paired_ratios

    # 3 rounds x 2 steps; rank 1 is slower in some steps: the row keeps the slower rank per step
    lss = [[[1.0, 3.0], [2.0, 2.0], [4.0, 4.0]], [[1.5, 1.0], [2.0, 2.5], [4.0, 4.0]]]
    base = [[[2.0, 2.0], [8.0, 8.0], [4.0, 4.0]], [[2.0, 2.0], [8.0, 8.0], [4.0, 6.0]]]
    cases = [_rank_result("lss[keep,balanced]", "lss", r, lss[r]) for r in range(2)]
    cases += [_rank_result("megatron_tp_sp", "megatron_tp_sp", r, base[r]) for r in range(2)]
    rows = {r["variant"]: r for r in aggregate(cases)}
    row = rows["lss[keep,balanced]"]
    assert row["step_times_s"] == [1.5, 3.0, 2.0, 2.5, 4.0, 4.0]
    assert row["round_step_s"] == [2.25, 2.25, 4.0]
    assert row["step_time_s"] == 2.25  # the median of the rounds
    assert row["attention_kernel"].endswith("[_scaled_dot_product_flash_attention_for_cpu]")
    assert rows["megatron_tp_sp"]["round_step_s"] == [2.0, 8.0, 5.0]
    (pair,) = paired_ratios(list(rows.values()))
    # per round: 2.25 / 2, 2.25 / 8, 4 / 5 -> median 0.8, quartiles (inclusive) 0.540625 and 0.9625
    assert pair["ratios"] == [1.125, 0.28125, 0.8]
    assert pair["median"] == 0.8 and pair["rounds"] == 3
    assert abs(pair["q25"] - 0.540625) < 1e-12 and abs(pair["q75"] - 0.9625) < 1e-12


def test_rows_keep_the_busiest_ranks_wire_bytes():
    from lss_plugin.bench.report import aggregate

    cases = [_rank_result("lss[keep,balanced]", "lss", r, [[1.0]]) for r in range(2)]
    assert aggregate(cases)[0]["wire_bytes"] is None  # results from before the counter: no figure, not 0
    for r, wire in zip(cases, (30, 40)):
        r["comm"]["total_wire_bytes"] = wire
    row = aggregate(cases)[0]
    assert (row["sent_bytes"], row["wire_bytes"]) == (10, 40)


def test_targets_report_pass_and_miss():
    from lss_plugin.bench.report import check_targets

    def row(variant, world, sent, rounds, act=0, attention="mha", link=None, method=None, error=None):
        return {"variant": variant, "method": method or variant.split("[")[0], "sweep": "strong",
                "attention": attention, "world_size": world, "seq_len": 2048, "link_gbit": link,
                "error": error, "sent_bytes": sent, "round_step_s": rounds, "peak_activation_bytes": act}

    lss = "lss[keep,balanced]"
    rows = [row(lss, 4, 50, [1.0, 1.0, 1.0]), row("megatron_tp_sp", 4, 100, [1.0, 1.2, 1.1]),
            row(lss, 4, 30, [1.0, 1.0, 1.0], attention="gqa"), row("megatron_tp_sp", 4, 100, [1.0] * 3, attention="gqa"),
            row(lss, 4, 50, [1.0] * 3, link=1.0), row("megatron_tp_sp", 4, 100, [3.0] * 3, link=1.0),
            row("ulysses", 4, 10, [0.8] * 3), row("allgather_cp", 4, 10, [1.2] * 3), row("usp[u2]", 4, 10, [1.0] * 3, method="usp"),
            row("ulysses", 4, 10, None, attention="gqa", error="ValueError: Ulysses needs heads"),
            row("allgather_cp", 4, 10, [2.0] * 3, attention="gqa"), row("usp[u2]", 4, 10, [0.9] * 3, attention="gqa", method="usp"),
            row("lss[regather,contiguous]", 1, 0, None, act=400), row("lss[regather,contiguous]", 4, 0, None, act=130),
            row("lss[auto,balanced]", 1, 0, None, act=400), row("lss[auto,balanced]", 4, 0, [1.0] * 3, act=105),
            row("lss[auto,balanced]", 4, 0, [1.0] * 3, attention="gqa"),
            row("lss_ulysses[u2]", 4, 20, [0.9] * 3), row("lss_ulysses[u2]", 4, 20, [0.8] * 3, attention="gqa"),
            row("lss[auto,balanced]", 4, 0, [1.2] * 3, link=1.0), row("usp[u2]", 4, 10, [1.0] * 3, link=1.0, method="usp"),
            row("ulysses", 4, 10, [1.0] * 3, link=1.0), row("lss[auto,balanced]", 4, 0, [0.8] * 3, attention="gqa", link=1.0),
            row("usp[u2]", 4, 10, [1.0] * 3, attention="gqa", link=1.0, method="usp")]
    budget = [{"variant": v, "world_size": w, "longest_seq_len": n, "max_len_searched": 10_000}
              for v, w, n in (("lss[regather,contiguous]", 1, 100), ("lss[regather,contiguous]", 4, 300),
                              ("lss[auto,balanced]", 1, 100), ("lss[auto,balanced]", 4, 300),
                              ("lss[auto,balanced]+zero1", 4, 340),
                              ("single", 1, 100), ("megatron_tp_sp", 4, 320))]
    got = {t["target"]: (t["status"], t["value"]) for t in check_targets(rows, budget, 64, 8, 2, world=4)}
    assert got == {
        "LSS comm/step <= 0.6 x Megatron TP+SP (MHA, 4 ranks, L >= 32 h)": ("PASS", 0.5),
        "(extra) LSS comm ratio lower still with GQA": ("PASS", 0.3),
        "LSS step <= 0.8 x Megatron TP+SP (MHA, 4 ranks, no link limit)": ("MISS", 0.909),  # median of 1/1, 1/1.2, 1/1.1
        "LSS step <= 0.5 x Megatron TP+SP (MHA, 4 ranks, 1 Gbit/s link)": ("PASS", 0.333),
        "LSS step <= 1.1 x best of ulysses/allgather_cp/usp[u2] (MHA, 4 ranks, no link limit)": ("MISS", 1.25),
        "LSS step <= 1.1 x best of ulysses/allgather_cp/usp[u2] (MHA, 4 ranks, 1 Gbit/s link)": ("n/a", None),
        "LSS faster than ulysses where heads % N != 0 or KV heads < N (GQA: 8 heads, 2 KV heads, N = 4)": ("n/a", None),
        "LSS faster than allgather_cp where heads % N != 0 or KV heads < N (GQA: 8 heads, 2 KV heads, N = 4)": ("PASS", 0.5),
        "LSS faster than usp[u2] where heads % N != 0 or KV heads < N (GQA: 8 heads, 2 KV heads, N = 4)": ("MISS", 1.111),
        "LSS regather: longest sequence in budget 1 -> 4 ranks grows >= Megatron TP+SP's": ("MISS", 3.0),
        "(extra) lss[regather,contiguous,chunk1]: longest sequence in budget 1 -> 4 ranks grows >= Megatron TP+SP's": ("n/a", None),
        "(extra) lss[regather,contiguous] activation memory 1 -> 4 ranks >= 80% of ideal 1/N": ("MISS", 0.769),
        "LSS default lss[auto,balanced]: longest sequence in budget 1 -> 4 ranks grows >= Megatron TP+SP's": ("MISS", 3.0),
        "LSS default lss[auto,balanced]+zero1: longest sequence in budget 1 -> 4 ranks grows >= Megatron TP+SP's": ("PASS", 3.4),
        "LSS default lss[auto,balanced] activation memory 1 -> 4 ranks >= 90% of ideal 1/N": ("PASS", 0.952),
        # the hybrid against the best of the others, per round: 0.9 / min(1.0, 0.8, 1.0); 0.8 / min(1.0, 0.9)
        "(issue 17) lss_ulysses[u2] step / best of lss[auto,balanced]/ulysses/usp[u2] (MHA, 4 ranks, no link limit)": ("MISS", 1.125),
        "(issue 17) lss_ulysses[u2] step / best of lss[auto,balanced]/ulysses/usp[u2] (MHA, 4 ranks, 1 Gbit/s link)": ("n/a", None),
        "(issue 17) lss_ulysses[u2] step / best of lss[auto,balanced]/usp[u2] (GQA, 4 ranks, no link limit)": ("PASS", 0.889),
        "(issue 17) lss_ulysses[u2] step / best of lss[auto,balanced]/usp[u2] (GQA, 4 ranks, 1 Gbit/s link)": ("n/a", None),
        # the default beside USP and Ulysses: 1.2 / 1.0 behind the link, 1.0 / 1.0 without, GQA 0.8 / 1.0
        "(issue 31) lss[auto,balanced] step <= 1.05 x usp[u2] (MHA, 4 ranks, 1 Gbit/s link)": ("MISS", 1.2),
        "(issue 31) lss[auto,balanced] step <= 1.25 x ulysses (MHA, 4 ranks, 1 Gbit/s link)": ("PASS", 1.2),
        "(issue 31) lss[auto,balanced] step <= 1.05 x usp[u2] (MHA, 4 ranks, no link limit)": ("PASS", 1.0),
        "(issue 31) lss[auto,balanced] step <= 0.9 x usp[u2] (GQA, 4 ranks, 1 Gbit/s link)": ("PASS", 0.8),
    }, got


def test_packed_rows_count_pairs_and_pair_rounds_with_unpacked():
    from lss_plugin.bench.packed import packed_boundaries, summarize, table
    from lss_plugin.documents import visible_pairs

    cu = packed_boundaries(4096, 128)
    lengths = (cu[1:] - cu[:-1]).tolist()
    assert cu[0] == 0 and cu[-1] == 4096 and all(1 <= n <= 192 for n in lengths)  # drawn in [64, 192], last cut
    assert packed_boundaries(64, None).tolist() == [0, 64]

    pairs = {"None": visible_pairs((0, 64), True), "16": visible_pairs((0, 16, 32, 48, 64), True)}
    comm = {"calls": {"all_gather_into_tensor": 1, "reduce_scatter_tensor": 1}, "bytes": {"all_gather_into_tensor": 100}}
    per_rank = [{"rank": r, "pairs": pairs, "documents": {"None": 1, "16": 4},
                 "comm": {"None": comm, "16": comm},
                 "times": {"None": [1.0, 2.0, 4.0], "16": [0.5, 0.5 + r, 1.0]}} for r in range(2)]
    rows = {r["doc_len"]: r for r in summarize(per_rank, 64, 2, 8, "balanced")}
    assert rows[16]["pairs_fraction"] == 4 * 136 / 2080  # 4 causal documents of 16 vs one of 64
    # per round the slower rank: 16-token docs [0.5, 1.5, 1.0] against [1, 2, 4] -> ratios .5, .75, .25
    assert rows[16]["step_s"] == 1.0 and rows[16]["time_vs_unpacked"] == 0.5
    assert rows[None]["time_vs_unpacked"] is None and rows[16]["sent_bytes"] == 100
    assert len(table(list(rows.values()))) == 4 + 2


def test_overlap_rows_pair_rounds_and_check_issue_16_targets():
    from lss_plugin.bench.overlap import summarize, table, targets

    def variant(times, between, peak, blocked, busy):
        return {"times": times, "calls": {"all_gather_into_tensor": 2}, "blocked_s": blocked, "busy_s": busy,
                "hidden_fraction": 1 - blocked / busy,
                "attention": {"between_bytes": between, "peak_bytes": peak, "whole_kv_bytes": 100},
                "model": {"activation_bytes_after_forward": between, "peak_activation_bytes": peak}}

    def ranks(auto_times):  # rank 1 is slower in round 2 (the round's time is the slower rank's)
        return [{"rank": r, "variants": {
            "default": variant([4.0, 4.0 + r, 6.0], 100, 200, 1.0, 1.0),
            "auto": variant([t + r * (i == 1) for i, t in enumerate(auto_times)], 30, 150, 0.2, 1.0),
            "chunk1": variant([5.0, 5.0, 5.0], 20, 100, 0.1, 1.0)}} for r in range(2)]

    fast = summarize(ranks([4.0, 4.0, 6.6]), "loopback")
    slow = summarize(ranks([3.0, 3.0, 5.4]), "1 Gbit/s")
    assert fast["default"]["rounds_s"] == [4.0, 5.0, 6.0] and fast["auto"]["rounds_s"] == [4.0, 5.0, 6.6]
    assert fast["auto"]["vs_default"] == 1.0  # median of 1, 1, 1.1
    assert slow["auto"]["vs_default"] == 0.8  # median of .75, .8, .9
    assert fast["auto"]["hidden_fraction"] == [0.8, 0.8]
    got = {t["target"]: (t["value"], t["status"]) for t in targets({"fast": fast, "slow": slow})}
    assert got == {"auto / default, step time, slow link": (0.8, "met"),
                   "auto / default, step time, fast link": (1.0, "met"),
                   "auto / default, attention memory between forward and backward": (0.3, "met"),
                   "auto / default, attention peak memory": (0.75, "MISSED")}
    meta = {"args": {"ranks": 2, "num_layers": 2, "seq_len": 64, "num_heads": 8, "kv_heads": 8, "head_dim": 8,
                     "layout": "balanced", "repetitions": 3}}
    assert len(table({"fast": fast, "slow": slow}, meta)) == 4 + 6 + 3 + 4


def test_hidden_fraction_is_blocked_time_over_the_union_of_in_flight_spans():
    from lss_plugin.bench.timing import CollectiveTimer

    timer = CollectiveTimer()
    timer.spans = [["reduce_scatter_tensor", 0.0, 1.0], ["all_gather_into_tensor", 0.5, 2.0],
                   ["all_gather_into_tensor", 3.0, 4.0], ["all_gather_into_tensor", 5.0, None]]  # unfinished: out
    timer.blocked_s.update({"all_gather_into_tensor": 0.5, "reduce_scatter_tensor": 0.25})
    assert timer.busy_s() == 3.0  # [0, 2] and [3, 4]
    assert timer.hidden_fraction() == 0.75
    assert CollectiveTimer().hidden_fraction() is None


def _timed_kv_collectives():
    from lss_plugin.bench.timing import time_collectives
    from lss_plugin.comm import record_collectives, start_gather_kv, start_reduce_scatter_kv

    k = torch.ones(1, 4, 2, 3)  # [b, s_local, hkv, d]
    with record_collectives() as rec, time_collectives() as timer:
        kv, _ = start_gather_kv(k, k, None, "contiguous").wait()  # [2, b, hkv, L, d]
        start_reduce_scatter_kv(kv, None, "contiguous").wait()
    start_gather_kv(k, k, None, "contiguous").wait()  # after the block: not timed
    return {"blocked": dict(timer.blocked_s), "spans": [list(s) for s in timer.spans], "open": len(timer._open),
            "calls": dict(rec.calls)}


def test_timer_sees_every_started_collective_through_comms_listener():
    # comm.py only reports issue and wait; the spans and blocked time are the benchmark's (bench.timing).
    from tests.distributed import run_ranks

    for out in run_ranks(_timed_kv_collectives, 2, timeout_s=120):
        names = ["all_gather_into_tensor", "reduce_scatter_all_to_all"]  # gloo: dK,dV as an all-to-all
        assert out["calls"] == {name: 1 for name in names}
        assert [s[0] for s in out["spans"]] == names
        assert all(s[2] is not None and s[2] >= s[1] for s in out["spans"])  # finished after issued
        assert sorted(out["blocked"]) == names and all(v >= 0 for v in out["blocked"].values())
        assert out["open"] == 0  # every waited collective released


def test_window_rows_count_pairs_and_pair_rounds_with_full_causal():
    from lss_plugin.bench.masks import parse_windows, summarize, table, window_pairs
    from lss_plugin.masks import MaskSpec, dense_hidden

    for seq_len, w in ((64, 8), (64, 1), (64, 64), (50, 7), (16, 40)):  # against the dense mask itself
        hidden = dense_hidden(seq_len, (0, seq_len), MaskSpec.sliding(w))
        assert window_pairs(seq_len, w) == int((~hidden).sum()), (seq_len, w)
    assert window_pairs(64, None) == 64 * 65 // 2
    assert parse_windows("L/8, 100", 2048) == [256, 100]
    with pytest.raises(ValueError, match=r"window 'L/4096' = 0 keys is outside \[1, 2048\]"):
        parse_windows("L/4096", 2048)

    comm = {"calls": {"all_gather_into_tensor": 1, "reduce_scatter_tensor": 1}, "bytes": {"all_gather_into_tensor": 100}}
    names = {"lss": None, "lss[window=8]": 8}
    per_rank = [{"rank": r, "windows": names, "pairs": {n: window_pairs(64, w) for n, w in names.items()},
                 "kernel_pairs": {"lss": 600 + r, "lss[window=8]": 150 + r}, "comm": {n: comm for n in names},
                 "times": {"lss": [1.0, 2.0, 4.0], "lss[window=8]": [0.5, 0.5 + r, 1.0]}} for r in range(2)]
    rows = {r["variant"]: r for r in summarize(per_rank, 64, 2, 8, "balanced")}
    assert rows["lss[window=8]"]["pairs_fraction"] == (36 + 56 * 8) / 2080
    assert rows["lss[window=8]"]["kernel_pairs"] == 301 and rows["lss[window=8]"]["kernel_pairs_fraction"] == 301 / 1201
    # per round the slower rank: [0.5, 1.5, 1.0] against [1, 2, 4] -> ratios .5, .75, .25
    assert rows["lss[window=8]"]["step_s"] == 1.0 and rows["lss[window=8]"]["time_vs_full"] == 0.5
    assert rows["lss"]["time_vs_full"] is None and rows["lss"]["sent_bytes"] == 100
    assert len(table(list(rows.values()))) == 4 + 2


TINY = ["--hidden-size", "32", "--num-heads", "4", "--gqa-kv-heads", "2", "--seq-len", "128", "--no-weak",
        "--no-budget", "--packed-doc-lens", "skip"]


def test_link_cases_tell_lss_auto_chunking_the_configured_rate():
    # Behind a G Gbit/s link every case carries G; LSS's default (auto chunks) and the hybrid's LSS leg
    # run with link_gbit=G, a fixed chunk runs as named; without a limit link_gbit stays None.
    from lss_plugin.bench.__main__ import link_cases, parse_args, strong_and_weak_cases
    from lss_plugin.bench.methods import LSS_DEFAULT_VARIANT, method_of
    from lss_plugin.bench.model import ModelDims

    args = parse_args(TINY + ["--methods", "lss,lss_ulysses,usp"])
    dims_for = {"mha": ModelDims(1, 32, 4, 4, max_positions=128), "gqa": ModelDims(1, 32, 4, 2, max_positions=128)}
    cases = link_cases(args, 4, dims_for, 0.5)
    assert {c.link_gbit for c in cases} == {0.5}
    settings = {}
    for c in cases:
        m = method_of(c.variant)
        if m.runs_lss:
            settings[c.variant.name] = m.core_attention(c.variant, None, c.link_gbit).lss_settings
    assert settings[LSS_DEFAULT_VARIANT.name].link_gbit == 0.5
    assert settings["lss_ulysses[u2]"].link_gbit == 0.5
    assert settings["lss[keep,balanced]"].link_gbit is None  # unchunked keep: link_gbit would be refused
    assert sorted(settings) == sorted(["lss[keep,balanced]", "lss[keep,contiguous]", "lss[regather,balanced]",
                                       LSS_DEFAULT_VARIANT.name, "lss_ulysses[u2]"])
    assert not method_of(next(c.variant for c in cases if c.variant.method == "usp")).runs_lss
    assert {c.link_gbit for c in strong_and_weak_cases(args, 4, dims_for)} == {None}


def _link_case_runs():
    """2 ranks: a link-tagged LSS default case and all-gather CP, 2 rounds; the model's LSS settings."""
    from lss_plugin.bench import counters
    from lss_plugin.bench.context import Contexts
    from lss_plugin.bench.methods import LSS_DEFAULT_VARIANT, Variant
    from lss_plugin.bench.model import ModelDims
    from lss_plugin.bench.run import Case, build, run_cases

    counters.install()
    dims = ModelDims(num_layers=1, hidden_size=32, num_heads=4, num_kv_heads=4, max_positions=64)
    cases = [Case(LSS_DEFAULT_VARIANT, dims, 64, steps=1, link_gbit=0.5),
             Case(Variant("allgather_cp", "balanced"), dims, 64, steps=1, link_gbit=0.5)]
    contexts = Contexts()
    model = build(cases[0], 2, contexts).model.module
    link = [m.lss_settings.link_gbit for m in model.modules() if hasattr(m, "lss_settings")]
    contexts.destroy()
    return {"cases": run_cases(cases, repetitions=2)["cases"], "link": link}


def test_lss_rows_report_the_hidden_fraction_of_their_collectives():
    import json

    from lss_plugin.bench.methods import LSS_DEFAULT_VARIANT
    from lss_plugin.bench.report import aggregate, markdown
    from tests.distributed import run_ranks

    outs = run_ranks(_link_case_runs, 2, timeout_s=240)
    cases = [c for out in outs for c in out["cases"]]
    for out in outs:
        assert out["link"] == [0.5]  # the one layer's core attention was built with the launch's rate
    assert all(c["error"] is None for c in cases), [c["error"] for c in cases]
    assert all(c["case"]["link_gbit"] == 0.5 for c in cases)
    for c in cases:  # one untimed step per round under the collective timer, LSS only
        if c["case"]["variant"]["method"] == "lss":
            assert len(c["comm_timing"]) == 2
            assert all(t["busy_s"] > 0 and 0 <= t["hidden_fraction"] <= 1 for t in c["comm_timing"])
        else:
            assert c["comm_timing"] == []
    for c in cases:
        c["link_gbit"] = c["case"]["link_gbit"]  # as __main__._tag does
    rows = {r["variant"]: json.loads(json.dumps(r)) for r in aggregate(cases)}
    lss = rows[LSS_DEFAULT_VARIANT.name]
    per_round = [sum(t["hidden_fraction"] for t in rnd) / 2
                 for rnd in zip(*(c["comm_timing"] for c in cases if c["case"]["variant"]["method"] == "lss"))]
    assert lss["hidden_fraction_rounds"] == pytest.approx(per_round, abs=1e-12)  # per round: the mean over ranks
    assert lss["hidden_fraction"] == pytest.approx(sum(per_round) / 2, abs=1e-12)  # median of two rounds: their mean
    assert lss["comm_busy_s"] > 0 and "hidden_fraction" not in rows["allgather_cp"]
    meta = {"command": "test", "machine": {"platform": "test", "cpus": 2}, "wall_clock_s": 0, "launches": [],
            "memory_tracker": "test", "args": {"ranks": [2], "link_gbit": [0.5], "repetitions": 2, "steps": 1}}
    md = markdown(meta, list(rows.values()), [], [], [], 0).splitlines()
    header = next(line for line in md if line.startswith("| method | attn | ranks | L | loss | step ms"))
    column = header.split(" | ").index("hidden comm %")
    lss_line = next(line for line in md if line.startswith(f"| {LSS_DEFAULT_VARIANT.name} |"))
    assert lss_line.split(" | ")[column] == f"{lss['hidden_fraction']:.0%}"
    assert next(line for line in md if line.startswith("| allgather_cp |")).split(" | ")[column] == "-"
