"""Aggregate per-rank results, check the issue's targets, write results.json, results.md, plots.

Per case the row shows the worst rank (max over ranks) of: median step time, bytes sent per step,
peak live tensor bytes, peak activation bytes, peak RSS. The loss is the global token mean
(mean of the ranks' local means for sequence-parallel methods: equal token counts; rank 0's for
single / Megatron TP+SP, whose ranks all see the whole loss).
"""
from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict

from lss_plugin.bench.model import SP_METHODS

MiB = 2**20
LSS_MAIN = "lss[keep,contiguous]"
LSS_LEAN = "lss[regather,contiguous]"
LSS_CHUNK = "lss[regather,contiguous,chunk1]"


def aggregate(cases: list[dict]) -> list[dict]:
    groups = defaultdict(list)
    for c in cases:
        k = c["case"]
        groups[(k["variant_name"], k["sweep"], k["attention"], c["world_size"], k["seq_len"])].append(c)
    rows = []
    for (name, sweep, attention, world, seq_len), rs in sorted(groups.items(), key=lambda kv: (
            kv[0][1], kv[0][2], kv[0][0], kv[0][3], kv[0][4])):
        rs = sorted(rs, key=lambda r: r["rank"])
        errors = [r["error"] for r in rs if r["error"]]
        method = rs[0]["case"]["variant"]["method"]
        row = {"variant": name, "method": method, "sweep": sweep, "attention": attention,
               "world_size": world, "seq_len": seq_len, "ranks_reporting": len(rs),
               "error": errors[0].splitlines()[0] if errors else None}
        if not errors:
            losses = [r["loss"] for r in rs]
            row.update(
                loss=statistics.fmean(losses) if method in SP_METHODS else losses[0],
                step_time_s=max(statistics.median(r["step_times_s"]) for r in rs) if rs[0]["step_times_s"] else None,
                sent_bytes=max(r["comm"]["total_sent_bytes"] for r in rs),
                payload_bytes=max(r["comm"]["total_bytes"] for r in rs),
                calls=dict(rs[0]["comm"]["calls"]),
                bytes_by_type=dict(rs[0]["comm"]["bytes"]),
                sent_by_type=dict(rs[0]["comm"]["sent_bytes"]),
                peak_bytes=max(r["memory"]["peak_bytes"] for r in rs),
                peak_activation_bytes=max(r["memory"]["peak_activation_bytes"] for r in rs),
                activation_bytes_after_forward=max(r["memory"]["activation_bytes_after_forward"] for r in rs),
                static_bytes=max(r["memory"]["static_bytes"] for r in rs),
                peak_rss_bytes=max(r["peak_rss_bytes"] for r in rs),
            )
        rows.append(row)
    return rows


def _find(rows, variant, sweep="strong", attention="mha", world=None):
    for r in rows:
        if (r["variant"] == variant and r["sweep"] == sweep and r["attention"] == attention
                and (world is None or r["world_size"] == world) and not r["error"]):
            return r
    return None


def _target(name, value, threshold, passed, detail):
    return {"target": name, "value": value, "threshold": threshold,
            "status": "n/a" if passed is None else ("PASS" if passed else "MISS"), "detail": detail}


def check_targets(rows, budget, hidden_size, world=4) -> list[dict]:
    """The issue's targets at ``world`` ranks, same run. Reported, never asserted."""
    out = []
    lss, meg = _find(rows, LSS_MAIN, world=world), _find(rows, "megatron_tp_sp", world=world)
    L = lss["seq_len"] if lss else None
    long_enough = L is not None and L >= 32 * hidden_size
    note = "" if long_enough else f" (L={L} < 32 x hidden={32 * hidden_size}: setting below the target's)"
    if lss and meg:
        ratio = lss["sent_bytes"] / meg["sent_bytes"]
        out.append(_target(f"LSS comm/step <= 0.6 x Megatron TP+SP (MHA, {world} ranks)",
                           round(ratio, 3), 0.6, (ratio <= 0.6) if long_enough else None,
                           f"{lss['sent_bytes'] / MiB:.2f} vs {meg['sent_bytes'] / MiB:.2f} MiB sent per rank{note}"))
        lg, mg = _find(rows, LSS_MAIN, attention="gqa", world=world), _find(rows, "megatron_tp_sp", attention="gqa", world=world)
        if lg and mg:
            ratio_g = lg["sent_bytes"] / mg["sent_bytes"]
            out.append(_target("LSS comm ratio lower still with GQA", round(ratio_g, 3), round(ratio, 3),
                               ratio_g < ratio, f"GQA ratio {ratio_g:.3f} vs MHA ratio {ratio:.3f}"))
        if lss.get("step_time_s") and meg.get("step_time_s"):
            t = lss["step_time_s"] / meg["step_time_s"]
            out.append(_target(f"LSS step time <= 0.8 x Megatron TP+SP (MHA, {world} ranks)", round(t, 3), 0.8,
                               (t <= 0.8) if long_enough else None,
                               f"{lss['step_time_s'] * 1e3:.1f} vs {meg['step_time_s'] * 1e3:.1f} ms{note}; "
                               "CPU timings on a shared machine are noisy"))
    for variant, label in ((LSS_LEAN, f"LSS activation memory 1 -> {world} ranks >= 80% of ideal 1/N (regather)"),
                           (LSS_CHUNK, f"(extra) same with one KV head gathered at a time ({LSS_CHUNK})")):
        one, many = _find(rows, variant, world=1), _find(rows, variant, world=world)
        if one and many:
            eff = (one["peak_activation_bytes"] / many["peak_activation_bytes"]) / world
            out.append(_target(label, round(eff, 3), 0.8, eff >= 0.8,
                               f"peak activation {one['peak_activation_bytes'] / MiB:.2f} -> "
                               f"{many['peak_activation_bytes'] / MiB:.2f} MiB"))
    fits = {(b["variant"], b["world_size"]): b.get("longest_seq_len") for b in budget if not b.get("error")}
    for variant, label in ((LSS_LEAN, f"longest sequence in budget grows >= 3.2x from 1 to {world} ranks (LSS regather)"),
                           (LSS_CHUNK, f"(extra) same with one KV head gathered at a time ({LSS_CHUNK})")):
        l1, ln = fits.get((variant, 1)), fits.get((variant, world))
        if l1 and ln:
            growth = ln / l1
            capped = any(b["variant"] == variant and b["world_size"] == world and
                         b["longest_seq_len"] >= b["max_len_searched"] for b in budget if not b.get("error"))
            out.append(_target(label, round(growth, 2), 3.2, growth >= 3.2, f"{l1} -> {ln} tokens" + (
                " (hit the search cap: growth is a lower bound)" if capped else "")))
    return out


def _fmt(x, scale=1.0, digits=2):
    return "-" if x is None else f"{x / scale:.{digits}f}"


def markdown(meta, rows, budget, targets, budget_bytes) -> str:
    lines = [f"# LSS benchmark", "", f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']['platform']}, {meta['machine']['cpus']} CPUs, torch "
             f"{meta.get('torch', '?')}; wall clock {meta['wall_clock_s']} s  ",
             f"Memory: {meta['memory_tracker']}; communication: torch.distributed wrappers "
             "(bytes sent per rank per training step, ring/pairwise algorithms)", ""]
    lines += ["## Targets (4 ranks, this run)", "", "| target | value | threshold | status | detail |",
              "|---|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t['target']} | {t['value']} | {t['threshold']} | **{t['status']}** | {t['detail']} |")
    if not targets:
        lines.append("| (needs lss and megatron_tp_sp on 1 and 4 ranks) | | | n/a | |")
    for sweep in ("strong", "weak"):
        sub = [r for r in rows if r["sweep"] == sweep]
        if not sub:
            continue
        what = "fixed global length" if sweep == "strong" else "fixed tokens per rank"
        lines += ["", f"## {sweep.capitalize()} scaling ({what})", "",
                  "| method | attn | ranks | L | loss | step ms | sent MiB/step | payload MiB | "
                  "collectives (calls) | peak MiB | act. peak MiB | act. after fwd MiB | RSS MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sub:
            if r["error"]:
                lines.append(f"| {r['variant']} | {r['attention']} | {r['world_size']} | {r['seq_len']} | "
                             f"error: {r['error'][:80]} |||||||||")
                continue
            calls = ", ".join(f"{k} {v}" for k, v in sorted(r["calls"].items()) if v)
            lines.append(
                f"| {r['variant']} | {r['attention']} | {r['world_size']} | {r['seq_len']} | {r['loss']:.4f} | "
                f"{_fmt(r['step_time_s'], 1e-3, 1)} | {_fmt(r['sent_bytes'], MiB, 3)} | "
                f"{_fmt(r['payload_bytes'], MiB, 3)} | {calls} | {_fmt(r['peak_bytes'], MiB)} | "
                f"{_fmt(r['peak_activation_bytes'], MiB)} | {_fmt(r['activation_bytes_after_forward'], MiB)} | "
                f"{_fmt(r['peak_rss_bytes'], MiB, 0)} |")
    if budget:
        lines += ["", f"## Longest sequence within {budget_bytes / MiB:.2f} MiB of live tensors per rank (MHA)",
                  "", "| method | ranks | longest L | probes (L: peak MiB) |", "|---|---|---|---|"]
        for b in sorted(budget, key=lambda b: (b["variant"], b["world_size"])):
            if b.get("error"):
                lines.append(f"| {b['variant']} | {b['world_size']} | error: {b['error'][:80]} | |")
                continue
            probes = ", ".join(f"{k}: {v / MiB:.2f}" for k, v in sorted(b["probes"].items(), key=lambda kv: int(kv[0])))
            cap = " (cap)" if b["longest_seq_len"] >= b["max_len_searched"] else ""
            lines.append(f"| {b['variant']} | {b['world_size']} | {b['longest_seq_len']}{cap} | {probes} |")
    lines.append("")
    return "\n".join(lines)


def plots(out_dir, rows) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # memory and time span orders of magnitude between methods: log scale; bytes sent start at 0
    specs = [("memory.png", "peak_activation_bytes", MiB, "peak activation MiB / rank", "log"),
             ("communication.png", "sent_bytes", MiB, "MiB sent / rank / step", "linear"),
             ("step_time.png", "step_time_s", 1e-3, "step time ms (median)", "log")]
    variants = sorted({r["variant"] for r in rows})
    cmap = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")
    color = {v: cmap(i % cmap.N) for i, v in enumerate(variants)}  # one colour per method
    paths = []
    for fname, key, scale, label, yscale in specs:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, sweep, xkey, xlabel in ((axes[0], "strong", "world_size", "ranks (fixed global L)"),
                                        (axes[1], "weak", "seq_len", "global L (fixed tokens / rank)")):
            series = defaultdict(list)
            for r in rows:
                if r["sweep"] == sweep and not r["error"] and r.get(key) is not None:
                    series[(r["variant"], r["attention"])].append((r[xkey], r[key] / scale))
            for (variant, attention), pts in sorted(series.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color[variant],
                        linestyle="-" if attention == "mha" else "--", label=f"{variant} {attention}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.set_title(f"{sweep} scaling")
            ax.set_xscale("log", base=2)
            xs = sorted({x for pts in series.values() for x, _ in pts})
            if xs:
                ax.set_xticks(xs, [str(x) for x in xs])
            ax.grid(alpha=0.3)
            if series:
                ax.set_yscale(yscale)
                ax.legend(fontsize=6, loc="best")
            else:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_outputs(out_dir, meta, cases, budget, budget_bytes) -> list[str]:
    rows = aggregate(cases)
    hidden = meta["args"]["hidden_size"]
    targets = check_targets(rows, budget, hidden, world=max(meta["args"]["ranks"]))
    results = {"meta": meta, "rows": rows, "budget": budget, "budget_bytes": budget_bytes,
               "targets": targets, "per_rank": cases}
    json_path = os.path.join(out_dir, "results.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    md_path = os.path.join(out_dir, "results.md")
    with open(md_path, "w") as f:
        f.write(markdown(meta, rows, budget, targets, budget_bytes or 0))
    for t in targets:
        print(f"target: {t['status']:4} {t['target']}: {t['value']} (threshold {t['threshold']}) - {t['detail']}")
    return [json_path, md_path] + plots(out_dir, rows)
