"""The sparse K/V exchange against the all-gather: one LSS attention call, masks that read little (issue 29).

``python -m lss_plugin.bench.exchange``: one ``lss_attention`` forward + backward on N ranks (gloo on
CPU), balanced layout, head dim 64, every row run with ``kv_exchange="gather"``, ``"sparse"`` and
``"auto"``, timed round-robin (``lss_plugin.bench.packed.round_robin``) so the three pair per round.
Rows: full causal; causal sliding windows of W keys (``window=(W - 1, 0)``); packed causal documents of a
fixed length, and of random lengths around a mean (fixed seed; a fixed length that divides the layout's
chunks moves nothing at all); a few rows again with GQA.

Bytes of one step per rank (the busiest rank), from the benchmark's counters (``lss_plugin.bench.counters``):
payload and wire bytes sent, every collective of the call (the verdict's all-gathers included). Next to
them the plan's floor (``lss_plugin.exchange.exchange_plan``) in bytes: what the rank must send in one
step, the K, V its peers' queries read (once per K, V exchange pass: twice when the backward regathers)
and the dK, dV of the keys its own queries read. The sparse exchange's all-to-alls must send exactly the
floor plus one 80-byte signature row per peer per K, V exchange call; this is asserted per rank. Step
time: the slowest rank per round, median [IQR] over rounds, sparse / gather and auto / gather paired per
round. Run without a link limit and behind a rate-limited loopback (``lss_plugin.bench.netns``: every
byte between ranks passes one token bucket). Writes ``exchange.json``, ``exchange.md`` and
``exchange.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import lss_plugin
from lss_plugin.bench.masks import parse_windows
from lss_plugin.bench.packed import MiB, attention_inputs, attention_step, packed_boundaries, round_robin
from lss_plugin.bench.timing import quartiles

EXCHANGES = ("gather", "sparse", "auto")
LAYOUT = "balanced"
ITEMSIZE = 4  # float32 inputs; their dK, dV travel in float32 too


def exchange_rows(seq_len: int, heads: int, windows: list, doc_lens: list, random_mean: int | None,
                  gqa_kv_heads: int | None, seed: int = 0) -> list[dict]:
    """The rows: full causal, each window, each fixed document length, the random documents; then full
    causal, the middle window and the random documents again with ``gqa_kv_heads`` KV heads."""
    rows = [{"name": "causal", "kind": "causal", "x": None, "bounds": (0, seq_len), "window": None}]
    rows += [{"name": f"window={w}", "kind": "window", "x": w, "bounds": (0, seq_len), "window": (w - 1, 0)}
             for w in windows]
    rows += [{"name": f"docs={n}", "kind": "docs", "x": n, "bounds": tuple(range(0, seq_len, n)) + (seq_len,),
              "window": None} for n in doc_lens]
    if random_mean:
        bounds = tuple(packed_boundaries(seq_len, random_mean, seed).tolist())  # lengths in [n/2, 3n/2]
        rows.append({"name": f"docs~{random_mean}", "kind": "random_docs", "x": random_mean, "bounds": bounds,
                     "window": None})
    for row in rows:
        row["kv_heads"] = heads
    if gqa_kv_heads and gqa_kv_heads != heads:
        pick = [rows[0]] + ([rows[1 + len(windows) // 2]] if windows else []) + [r for r in rows if r["kind"] == "random_docs"]
        rows += [dict(r, name=f"{r['name']} gqa{gqa_kv_heads}", kv_heads=gqa_kv_heads) for r in pick]
    return rows


def case_name(row: dict, exchange: str) -> str:
    return f"{row['name']}|{exchange}"


def exchange_worker(seq_len: int, heads: int, head_dim: int, rows: list, warmup: int = 1, steps: int = 1,
                    repetitions: int = 3) -> dict:
    """On every rank: each row under each kv_exchange, one step's collectives counted, then timed round-robin."""
    from lss_plugin.bench.counters import count_collectives
    from lss_plugin.options import AttentionSettings, resolve_kv_chunking

    q, k, v, dout = attention_inputs(seq_len, heads, head_dim)  # [1, L / N, heads, head_dim]
    kv = {heads: (k, v)}
    for hkv in {r["kv_heads"] for r in rows} - {heads}:  # GQA: the first hkv heads, leaves of their own
        kv[hkv] = tuple(t[:, :, :hkv].detach().clone().requires_grad_() for t in (k, v))
    cases = {}
    for row in rows:
        keywords = {"cu_seqlens": torch.tensor(row["bounds"], device=q.device)}
        if row["window"] is not None:
            keywords["window"] = row["window"]
        k_, v_ = kv[row["kv_heads"]]
        for ex in EXCHANGES:
            cases[case_name(row, ex)] = (lambda k_=k_, v_=v_, kw=dict(keywords, kv_exchange=ex):
                                         attention_step(q, k_, v_, dout, LAYOUT, **kw))
    counted = {}
    for name, step in cases.items():
        for _ in range(warmup):
            step()
        with count_collectives() as wire, lss_plugin.record_collectives() as rec:
            step()
        counted[name] = {"payload": dict(wire.bytes), "sent": dict(wire.sent_bytes), "calls": dict(wire.calls),
                         "recorded_calls": dict(rec.calls), "recorded_bytes": dict(rec.bytes)}
    times, _ = round_robin(cases, 0, steps, repetitions)
    settings = AttentionSettings()
    chunking = {hkv: resolve_kv_chunking(settings.kv_head_chunk, settings.kv_backward, settings.kv_buffer_mib, 1,
                                         seq_len, hkv, head_dim, q.dtype.itemsize) for hkv in kv}
    lss_plugin.destroy_topology()
    return {"rank": dist.get_rank(), "times": times, "counted": counted, "chunking": chunking,
            "load_average": os.getloadavg()}


def expected_sparse_bytes(plan, rank: int, kv_heads: int, head_dim: int, head_chunk: int, kv_backward: str):
    """(floor, signature rows) in bytes that ``rank``'s sparse all-to-alls send in one forward + backward:
    the floor is the K, V of its tokens the peers read, once per K, V pass (forward; again when the
    backward regathers), and the dK, dV of the peers' tokens it read; one 80-byte row per peer rides
    with every K, V exchange call (one per head chunk and pass)."""
    from lss_plugin.signature import SIGNATURE_BYTES

    token = 2 * kv_heads * head_dim * ITEMSIZE  # one token's K and V, batch 1, all KV heads
    passes = 2 if kv_backward == "regather" else 1
    kv_calls = passes * (kv_heads // head_chunk)
    floor = passes * plan.sent(rank) * token + plan.received(rank) * token
    return floor, kv_calls * (plan.lss_size - 1) * SIGNATURE_BYTES


def summarize(per_rank: list, rows: list, seq_len: int, heads: int, head_dim: int, link_gbit) -> list[dict]:
    """One dict per row; raises when a sparse exchange sent anything but the floor plus the signature rows,
    or when ``auto`` ran something other than ``resolve_kv_exchange`` says."""
    from lss_plugin.comm import SPARSE_DKV, SPARSE_KV
    from lss_plugin.exchange import exchange_plan, resolve_kv_exchange

    world = len(per_rank)
    out = []
    for row in rows:
        hkv = row["kv_heads"]
        plan = exchange_plan(LAYOUT, world, seq_len // world, True, tuple(row["bounds"]), row["window"])
        picked = resolve_kv_exchange("auto", plan)
        head_chunk, kv_backward = per_rank[0]["chunking"][hkv]
        floors, rows_bytes = zip(*(expected_sparse_bytes(plan, r, hkv, head_dim, head_chunk, kv_backward)
                                   for r in range(world)))
        res = {"row": row["name"], "kind": row["kind"], "x": row["x"], "kv_heads": hkv, "auto_picks": picked,
               "documents": len(row["bounds"]) - 1, "bounds": list(row["bounds"]), "window": row["window"], "world_size": world, "seq_len": seq_len, "heads": heads,
               "head_dim": head_dim, "layout": LAYOUT, "link_gbit": link_gbit, "head_chunk": head_chunk,
               "kv_backward": kv_backward, "floor_tokens": plan.floor_tokens, "busiest_tokens": plan.busiest_tokens,
               "floor_bytes": max(floors), "floor_bytes_per_rank": list(floors),
               "signature_bytes": max(rows_bytes)}
        for ex in EXCHANGES:
            name = case_name(row, ex)
            counted = [r["counted"][name] for r in per_rank]
            ran = "sparse" if counted[0]["recorded_calls"].get(SPARSE_KV) else "gather"
            if ex != "gather" and ran != (picked if ex == "auto" else "sparse"):
                raise AssertionError(f"{name}: the call ran the {ran} exchange, the plan says "
                                     f"{picked if ex == 'auto' else 'sparse'}")
            if ran == "sparse":
                for r, c in enumerate(counted):
                    want = floors[r] + rows_bytes[r]
                    recorded = c["recorded_bytes"].get(SPARSE_KV, 0) + c["recorded_bytes"].get(SPARSE_DKV, 0)
                    wire, payload = c["sent"].get("all_to_all", 0), c["payload"].get("all_to_all", 0)
                    if not wire == payload == recorded == want:
                        raise AssertionError(
                            f"{name} rank {r}: the sparse all-to-alls sent {wire} B (payload {payload} B, recorded "
                            f"{recorded} B), the plan's floor {floors[r]} B + signature rows {rows_bytes[r]} B = "
                            f"{want} B")
            rounds = [max(r["times"][name][i] for r in per_rank) for i in range(len(per_rank[0]["times"][name]))]
            q25, med, q75 = quartiles(rounds)
            res[ex] = {"ran": ran, "sent_bytes": max(sum(c["sent"].values()) for c in counted),
                       "payload_bytes": max(sum(c["payload"].values()) for c in counted),
                       "all_to_all_sent_per_rank": [c["sent"].get("all_to_all", 0) for c in counted],
                       "calls": counted[0]["calls"], "step_s": med, "step_s_q25": q25, "step_s_q75": q75,
                       "round_step_s": rounds}
        gather = res["gather"]
        for ex in ("sparse", "auto"):
            res[ex]["bytes_vs_gather"] = res[ex]["sent_bytes"] / gather["sent_bytes"]
            res[ex]["time_vs_gather"] = statistics.median(
                a / b for a, b in zip(res[ex]["round_step_s"], gather["round_step_s"]))
        res["sparse_is_floor_plus_rows"] = res["sparse"]["ran"] == "sparse"  # checked exactly above, per rank
        out.append(res)
    return out


def _ms(r: dict) -> str:
    return f"{r['step_s'] * 1e3:.1f} [{r['step_s_q25'] * 1e3:.1f}-{r['step_s_q75'] * 1e3:.1f}]"


def table(results: list[dict]) -> list[str]:
    if not results:
        return []
    r0 = results[0]
    link = "no link limit" if r0["link_gbit"] is None else f"behind a {r0['link_gbit']:g} Gbit/s link"
    lines = [f"One causal lss_attention forward + backward, {r0['world_size']} ranks, L = {r0['seq_len']}, "
             f"{r0['heads']} heads x {r0['head_dim']}, layout {r0['layout']}, fp32, {link}. Bytes: one step's "
             "collectives (the verdict's all-gathers included), wire bytes sent (payload), the busiest rank, MiB; "
             "floor: the plan's bytes that rank must send (K, V per pass, dK, dV); sparse's all-to-alls sent the floor + "
             "the signature rows exactly (checked on every rank). Time: slowest rank per round, median [IQR] over rounds; x / gather: paired per round.", "",
             "| row | auto picks | chunks x passes | floor MiB | gather MiB | sparse MiB (= floor + rows) | auto MiB | "
             "bytes sparse / gather | gather ms | sparse ms | auto ms | time sparse / gather | time auto / gather |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        g, s, a = r["gather"], r["sparse"], r["auto"]
        passes = 2 if r["kv_backward"] == "regather" else 1
        lines.append(
            f"| {r['row']} | {r['auto_picks']} | {r['kv_heads'] // r['head_chunk']} x {passes} | "
            f"{r['floor_bytes'] / MiB:.3f} | {g['sent_bytes'] / MiB:.3f} ({g['payload_bytes'] / MiB:.3f}) | "
            f"{s['sent_bytes'] / MiB:.3f} ({s['payload_bytes'] / MiB:.3f}; + {r['signature_bytes']} B) | "
            f"{a['sent_bytes'] / MiB:.3f} | {s['bytes_vs_gather']:.3f} | {_ms(g)} | {_ms(s)} | {_ms(a)} | "
            f"{s['time_vs_gather']:.3f} | {a['time_vs_gather']:.3f} |")
    return lines


def targets(results: list[dict]) -> list[dict]:
    """Issue 29's targets on these rows (4 ranks, L = 4096 in the issue)."""
    by = {(r["row"], r["link_gbit"]): r for r in results}
    seq_len = results[0]["seq_len"] if results else 0
    links = sorted({r["link_gbit"] for r in results if r["link_gbit"] is not None})
    out = []

    def add(what, value, limit, ok=None):
        out.append({"target": what, "value": float(f"{value:.3g}") if isinstance(value, float) else value, "limit": limit,
                    "status": "n/a" if value is None else ("met" if (ok if ok is not None else value <= limit) else "missed")})

    for name, bytes_limit in ((f"window={seq_len // 16}", 0.2), ("docs=128", 0.1)):
        rows = [r for r in results if r["row"] == name]
        add(f"{name}: wire bytes sparse / gather", rows[0]["sparse"]["bytes_vs_gather"] if rows else None,
            bytes_limit)
        for gbit in links:
            r = by.get((name, gbit))
            add(f"{name}: step sparse / gather behind {gbit:g} Gbit/s", r and r["sparse"]["time_vs_gather"], 0.6)
    for r in (r for r in results if r["row"] == "causal"):
        link = "no link limit" if r["link_gbit"] is None else f"{r['link_gbit']:g} Gbit/s"
        add(f"causal ({link}): auto picks gather", r["auto_picks"], "gather", r["auto_picks"] == "gather")
        # no slower within the spread: auto / gather paired per round, at most gather's own upper quartile / median
        spread = r["gather"]["step_s_q75"] / r["gather"]["step_s"]
        add(f"causal ({link}): step auto / gather within gather's spread", r["auto"]["time_vs_gather"],
            round(spread, 3))
    for r in results:
        if r["auto"]["sent_bytes"] > r["gather"]["sent_bytes"]:
            add(f"{r['row']}: auto bytes <= gather bytes", r["auto"]["sent_bytes"], r["gather"]["sent_bytes"])
    return out


def plot(out_dir: str, results: list[dict]) -> list[str]:
    """exchange.png: wire MiB (top) and step time (bottom) against window size (left) and document length
    (right), gather beside sparse; one line style per link setting; the plan's floor dotted."""
    rows = [r for r in results if r["kv_heads"] == r["heads"]]
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    colours = {"gather": "tab:blue", "sparse": "tab:orange"}
    links = sorted({r["link_gbit"] for r in rows}, key=lambda g: -1 if g is None else g)
    styles = ["-", "--", ":"]
    for col, (kind, label) in enumerate((("window", "causal window W (keys)"), ("docs", "document length (tokens)"))):
        for li, gbit in enumerate(links):
            sel = sorted((r for r in rows if r["kind"] == kind and r["link_gbit"] == gbit), key=lambda r: r["x"])
            if not sel:
                continue
            xs = [r["x"] for r in sel]
            tag = "no limit" if gbit is None else f"{gbit:g} Gbit/s"
            for ex in ("gather", "sparse"):
                if li == 0:
                    axes[0][col].plot(xs, [r[ex]["sent_bytes"] / MiB for r in sel], "o-", color=colours[ex], label=ex)
                med = [r[ex]["step_s"] * 1e3 for r in sel]
                err = [[m - r[ex]["step_s_q25"] * 1e3 for m, r in zip(med, sel)],
                       [r[ex]["step_s_q75"] * 1e3 - m for m, r in zip(med, sel)]]
                axes[1][col].errorbar(xs, med, yerr=err, fmt="o" + styles[li % 3], color=colours[ex], capsize=3,
                                      label=f"{ex}, {tag}")
                for r in (r for r in rows if r["kind"] == "random_docs" and r["link_gbit"] == gbit and kind == "docs"):
                    axes[1][col].plot([r["x"]], [r[ex]["step_s"] * 1e3], "*", ms=11, color=colours[ex])
            if li == 0:  # a floor of 0 has no place on a log axis: noted in the legend instead
                nonzero = [r for r in sel if r["floor_bytes"]]
                zero = [str(r["x"]) for r in sel if not r["floor_bytes"]]
                axes[0][col].plot([r["x"] for r in nonzero], [r["floor_bytes"] / MiB for r in nonzero], "k:",
                                  label="plan's floor" + (f" (0 at {', '.join(zero)})" if zero else ""))
                for r in (r for r in rows if r["kind"] == "random_docs" and r["link_gbit"] == gbit and kind == "docs"):
                    for ex in ("gather", "sparse"):
                        axes[0][col].plot([r["x"]], [r[ex]["sent_bytes"] / MiB], "*", ms=11, color=colours[ex],
                                          label=f"{ex}, random lengths ~{r['x']}")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.set_xlabel(label)
        axes[0][col].set_yscale("log")
        axes[0][col].set_ylabel("MiB sent per step (busiest rank)")
        axes[1][col].set_ylabel("step ms (slowest rank, median [IQR])")
        axes[0][col].legend(fontsize=7)
        axes[1][col].legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(f"LSS K/V exchange: gather vs sparse, {r0['world_size']} ranks, L = {r0['seq_len']}, "
                 f"{r0['heads']}x{r0['head_dim']}, {r0['layout']}", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "exchange.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def run(rows: list, world: int, seq_len: int, heads: int, head_dim: int, gbit: float | None = None,
        **launch_kwargs) -> list[dict]:
    """One launch of every row on ``world`` ranks (behind a ``gbit`` Gbit/s link unless None), summarized.
    ``launch_kwargs``: warmup, steps, repetitions (the worker's), timeout_s, threads (the launch's)."""
    from lss_plugin.bench.exchange import exchange_worker  # by module name: `python -m` makes this __main__
    from lss_plugin.bench.launch import launch
    from lss_plugin.bench.netns import launch_with_link

    worker_args = (exchange_worker, world, seq_len, heads, head_dim, rows)
    per_rank = (launch(*worker_args, **launch_kwargs) if gbit is None
                else launch_with_link(gbit, *worker_args, **launch_kwargs))
    return summarize(per_rank, rows, seq_len, heads, head_dim, gbit)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lss_plugin.bench.exchange", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/bench/exchange", help="output directory")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--gqa-kv-heads", type=int, default=2, help="KV heads of the GQA rows (0: none)")
    p.add_argument("--windows", default="L/64,L/32,L/16,L/8,L/4", help="causal windows, keys or L/n ('none')")
    p.add_argument("--doc-lens", default="32,128,512,2048", help="fixed document lengths ('none')")
    p.add_argument("--random-doc-mean", type=int, default=128,
                   help="mean length of the random documents (drawn in [n/2, 3n/2], seed --seed; 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--link-gbit", default="none,1",
                   help="comma-separated link settings, one launch each: 'none' (no limit) or a rate in Gbit/s")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per case before its counted one")
    p.add_argument("--steps", type=int, default=1, help="timed steps per case per round (their median)")
    p.add_argument("--repetitions", type=int, default=4, help="round-robin rounds")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--timeout-s", type=float, default=3600.0)
    p.add_argument("--replot", metavar="JSON", default=None,
                   help="run nothing: write exchange.md, exchange.png and the targets again from a run's exchange.json")
    args = p.parse_args(argv)
    try:
        args.windows = [] if args.windows == "none" else parse_windows(args.windows, args.seq_len)
    except ValueError as err:
        p.error(f"--windows: {err}")
    args.doc_lens = [] if args.doc_lens == "none" else [int(n) for n in args.doc_lens.split(",")]
    args.link_gbit = [None if g.strip().lower() == "none" else float(g) for g in args.link_gbit.split(",")]
    if args.seq_len % (2 * args.ranks):
        p.error(f"--seq-len {args.seq_len} must be divisible by 2 x --ranks = {2 * args.ranks} (balanced layout)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from lss_plugin.bench.netns import link_unavailable

    os.makedirs(args.out, exist_ok=True)
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        return write(args.out, saved["meta"], saved["rows"])
    rows = exchange_rows(args.seq_len, args.heads, args.windows, args.doc_lens, args.random_doc_mean,
                         args.gqa_kv_heads, args.seed)
    meta = {"command": " ".join(["python -m lss_plugin.bench.exchange"] + (sys.argv[1:] if argv is None else argv)),
            "args": vars(args), "load_average_before": os.getloadavg(), "launches": [], "link_skipped": None}
    started = time.time()
    results = []
    for gbit in args.link_gbit:
        if gbit is not None and (why := link_unavailable()):
            meta["link_skipped"] = why
            print(f"--- skipping the {gbit:g} Gbit/s run: {why}", flush=True)
            continue
        print(f"--- {args.ranks} ranks, {'no link limit' if gbit is None else f'{gbit:g} Gbit/s link'}: "
              f"{len(rows)} rows x {EXCHANGES}, L = {args.seq_len}", flush=True)
        t0 = time.time()
        got = run(rows, args.ranks, args.seq_len, args.heads, args.head_dim, gbit, warmup=args.warmup,
                  steps=args.steps, repetitions=args.repetitions, timeout_s=args.timeout_s, threads=args.threads)
        meta["launches"].append({"link_gbit": gbit, "wall_s": round(time.time() - t0, 1),
                                 "load_average": os.getloadavg()})
        print("\n".join(table(got)), flush=True)
        results += got
    meta["wall_clock_s"] = round(time.time() - started, 1)
    meta["load_average_after"] = os.getloadavg()
    return write(args.out, meta, results)


def write(out_dir: str, meta: dict, results: list[dict]) -> int:
    """exchange.json (meta, rows, targets), exchange.md (a table per link setting, the targets), exchange.png."""
    checks = targets(results)
    lines = []
    for gbit in dict.fromkeys(r["link_gbit"] for r in results):
        lines += table([r for r in results if r["link_gbit"] == gbit]) + [""]
    target_lines = ["Targets (issue 29):", ""] + [f"- {t['target']}: {t['value']} (limit {t['limit']}): {t['status']}"
                                                  for t in checks]
    print("\n".join(target_lines), flush=True)
    json_path, md_path = os.path.join(out_dir, "exchange.json"), os.path.join(out_dir, "exchange.md")
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": results, "targets": checks}, f, indent=1, default=str)
    with open(md_path, "w") as f:
        f.write("\n".join(["## Sparse K/V exchange", "", f"`{meta['command']}`", ""] + lines + target_lines + [""]))
    print("wrote " + ", ".join([json_path, md_path] + plot(out_dir, results)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
