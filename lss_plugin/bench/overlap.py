"""``python -m lss_plugin.bench.overlap``: pipelined head chunks and ``kv_head_chunk="auto"`` (issue 16).

The issue's configuration by default: 2 ranks, the benchmark's megatron-core GPTModel with 2 layers,
L = 8192, 8 heads of d = 64 (hidden 512), fp32, LSS on every rank, once on the plain loopback (the
fast link) and once behind a rate-limited one (``--link-gbit``, ``bench.netns``). Variants, all with
the same ``--layout`` (balanced by default, so that wait times measure communication rather than the
contiguous layout's causal load imbalance):

- ``default``: the unchunked blocking default (``kv_backward="keep"``, ``kv_head_chunk=None``);
- ``auto``: ``kv_head_chunk="auto"``, ``kv_backward="auto"`` (regathers when it chunks);
- ``chunk1``: one KV head per collective, regather, pipelined.

Per variant: the step time (round-robin rounds, each round's time is the slowest rank's; ratios to
``default`` paired per round), LSS's communication from ``lss_plugin.record_collectives`` and
``bench.timing.time_collectives`` over one step (busy = time at least one LSS collective was in flight, blocked = time the rank waited for one,
hidden = 1 - blocked / busy; Megatron's gradient all-reduce is not an LSS collective and not in it),
and memory from ``bench.memory.LiveTensorTracker``: of one ``lss_attention`` call of the layer's
shape (activation bytes held between its forward and backward, and its peak; inputs and gradients
excluded) and of the whole model step (activations after forward, activation peak). Writes
``overlap.json``, ``overlap.md`` and ``overlap.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

MiB = 2**20
VARIANTS = {"default": ("keep", None), "auto": ("auto", "auto"), "chunk1": ("regather", 1)}
SHORT = {"all_gather_into_tensor": "gather", "reduce_scatter_tensor": "reduce-scatter",
         "reduce_scatter_all_to_all": "reduce-scatter (all-to-all)"}
# issue 16's targets: auto / default
TARGETS = (("step time, slow link", "step_s", "slow", 0.85), ("step time, fast link", "step_s", "fast", 1.05),
           ("attention memory between forward and backward", "attn_between", "fast", 0.4),
           ("attention peak memory", "attn_peak", "fast", 0.7))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lss_plugin.bench.overlap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/overlap")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --num-heads (MHA)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layout", default="balanced")
    p.add_argument("--link-gbit", type=float, default=1.0, help="the slow link; 0 skips it")
    p.add_argument("--steps", type=int, default=1, help="timed steps per variant per round")
    p.add_argument("--repetitions", type=int, default=3, help="round-robin rounds")
    p.add_argument("--quick", action="store_true", help="L = 1024, d = 16: a smoke run of a minute")
    args = p.parse_args(argv)
    if args.quick:
        args.seq_len, args.head_dim, args.repetitions = 1024, 16, 2
    args.kv_heads = args.kv_heads or args.num_heads
    return args


def _variant(name: str, layout: str):
    from lss_plugin.bench.methods import Variant

    kv_backward, chunk = VARIANTS[name]
    return Variant("lss", layout, kv_backward, kv_head_chunk=chunk)


def attention_memory(variant, seq_len: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    """Activation bytes of one lss_attention call: held between forward and backward, and peak."""
    import torch
    import torch.distributed as dist

    import lss_plugin
    from lss_plugin.bench.memory import LiveTensorTracker

    s = seq_len // dist.get_world_size()
    gen = torch.Generator().manual_seed(dist.get_rank())
    q, k, v = (torch.randn(1, s, h, head_dim, generator=gen).requires_grad_() for h in (heads, kv_heads, kv_heads))
    dout = torch.randn(1, s, heads, head_dim, generator=gen)
    tracker = LiveTensorTracker()
    tracker.register_static([q, k, v, dout])
    with tracker:
        out = lss_plugin.lss_attention(q, k, v, causal=True, layout=variant.layout, kv_backward=variant.kv_backward,
                                       kv_head_chunk=variant.kv_head_chunk)
        tracker.mark_forward_end()
        out.backward(dout)
        tracker.mark_backward_end()
    tracker.classify_static([q.grad, k.grad, v.grad])
    report = tracker.report()
    return {"between_bytes": report.activation_bytes_after_forward, "peak_bytes": report.peak_activation_bytes,
            "whole_kv_bytes": 2 * seq_len * kv_heads * head_dim * 4}


def overlap_worker(names, layout, dims, seq_len, steps, repetitions, measure_memory):
    """On every rank: per variant one measured step (LSS collectives' timing, memory), then timing rounds."""
    import torch.distributed as dist

    import lss_plugin
    from lss_plugin.bench.context import Contexts
    from lss_plugin.bench.run import Case, build, timed_steps, tracked_step
    from lss_plugin.bench.timing import sync_ranks, time_collectives
    from lss_plugin.bench.model import make_batch

    world = dist.get_world_size()
    contexts = Contexts()
    out, live = {}, []
    for name in names:
        variant = _variant(name, layout)
        trainer = build(Case(variant, dims, seq_len), world, contexts)
        batch = make_batch(variant, seq_len, 1, dims.vocab_size, world)
        trainer.step(batch)  # warm-up (and the size pre-check)
        with lss_plugin.record_collectives() as rec, time_collectives() as timer:
            sync_ranks()
            trainer.step(batch)
            sync_ranks()
        row = {"calls": dict(rec.calls), "bytes": dict(rec.bytes), "blocked_s": sum(timer.blocked_s.values()),
               "busy_s": timer.busy_s(), "hidden_fraction": timer.hidden_fraction()}
        if measure_memory:
            row["model"] = tracked_step(trainer, batch)
            row["attention"] = attention_memory(variant, seq_len, dims.num_heads, dims.num_kv_heads, dims.head_dim)
        out[name] = dict(row, times=[])
        live.append((name, trainer, batch))
        if dist.get_rank() == 0:
            print(f"[overlap] measured {name}: hidden {row['hidden_fraction']}", flush=True)
    for rep in range(repetitions):
        shift = rep % len(live)
        for name, trainer, batch in live[shift:] + live[:shift]:
            out[name]["times"].append(statistics.median(timed_steps(trainer, batch, steps)))
    contexts.destroy()
    return {"rank": dist.get_rank(), "variants": out, "load_average": os.getloadavg()[0]}


def summarize(per_rank: list, link: str) -> dict:
    """Per variant: step time (slowest rank per round: median, and paired ratio to default), comm, memory."""
    names = list(per_rank[0]["variants"])
    rounds = {n: [max(r["variants"][n]["times"][i] for r in per_rank)
                  for i in range(len(per_rank[0]["variants"][n]["times"]))] for n in names}
    rows = {}
    for n in names:
        mine = [r["variants"][n] for r in per_rank]
        row = {"link": link, "step_s": statistics.median(rounds[n]), "rounds_s": rounds[n],
               "vs_default": statistics.median(a / b for a, b in zip(rounds[n], rounds["default"])),
               "calls": mine[0]["calls"], "comm_busy_s": max(m["busy_s"] for m in mine),
               "comm_blocked_s": max(m["blocked_s"] for m in mine),
               "hidden_fraction": [m["hidden_fraction"] for m in mine]}
        if "attention" in mine[0]:
            row["attention"] = {k: max(m["attention"][k] for m in mine) for k in mine[0]["attention"]}
            row["model"] = {k: max(m["model"][k] for m in mine) for k in ("activation_bytes_after_forward",
                                                                          "peak_activation_bytes")}
        rows[n] = row
    return rows


def targets(results: dict) -> list[dict]:
    fast, slow = results.get("fast"), results.get("slow")
    out = []
    for label, key, link, threshold in TARGETS:
        rows = fast if link == "fast" else slow
        if not rows:
            continue
        if key == "step_s":
            value = rows["auto"]["vs_default"]
        else:
            field = "between_bytes" if key == "attn_between" else "peak_bytes"
            value = rows["auto"]["attention"][field] / rows["default"]["attention"][field]
        out.append({"target": f"auto / default, {label}", "value": round(value, 3), "threshold": threshold,
                    "status": "met" if value <= threshold else "MISSED"})
    return out


def table(results: dict, meta: dict) -> list[str]:
    a = meta["args"]
    lines = [f"{a['ranks']} ranks, GPTModel {a['num_layers']} layers, L = {a['seq_len']}, {a['num_heads']} heads "
             f"({a['kv_heads']} KV) x d = {a['head_dim']}, fp32, layout {a['layout']}; step = slowest rank, median "
             f"of {a['repetitions']} rounds; x default paired per round. Comm: LSS collectives over one step (busy: "
             "one in flight; blocked: waited for; hidden = 1 - blocked / busy, per rank). Memory: activations of "
             "one lss_attention call between forward and backward / its peak, then the whole model's "
             "(after forward / peak), MiB, max over ranks.", "",
             "| link | variant | step s | x default | LSS collectives | comm busy s | blocked s | hidden | "
             "attention between | attention peak | model after fwd | model peak |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    memory = results["fast"]
    for link, rows in results.items():
        for n, r in rows.items():
            calls = ", ".join(f"{SHORT.get(k, k)} {v}" for k, v in sorted(r["calls"].items()))
            hidden = " / ".join("-" if h is None else f"{h:.0%}" for h in r["hidden_fraction"])
            m = memory[n]
            lines.append(f"| {r['link']} | {n} | {r['step_s']:.2f} | {r['vs_default']:.3f} | {calls} | "
                         f"{r['comm_busy_s']:.2f} | {r['comm_blocked_s']:.2f} | {hidden} | "
                         f"{m['attention']['between_bytes'] / MiB:.1f} | {m['attention']['peak_bytes'] / MiB:.1f} | "
                         f"{m['model']['activation_bytes_after_forward'] / MiB:.1f} | "
                         f"{m['model']['peak_activation_bytes'] / MiB:.1f} |")
    lines += ["", "| target | value | threshold | status |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | <= {t['threshold']} | {t['status']} |" for t in targets(results)]
    return lines


def plot(out_dir: str, results: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["fast"])
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (link, rows) in enumerate(results.items()):
        xs = [j + 0.4 * i for j in range(len(names))]
        ax_t.bar(xs, [rows[n]["step_s"] for n in names], width=0.4, label=rows[names[0]]["link"])
        ax_t.bar(xs, [rows[n]["comm_blocked_s"] for n in names], width=0.4, fill=False, hatch="//",
                 label="blocked on LSS comm" if i == 0 else None)
    ax_t.set_xticks([j + 0.2 for j in range(len(names))], names)
    ax_t.set_ylabel("step s (slowest rank)")
    ax_t.legend(fontsize=8)
    fast = results["fast"]
    for i, (key, label) in enumerate((("between_bytes", "between fwd and bwd"), ("peak_bytes", "peak"))):
        ax_m.bar([j + 0.4 * i for j in range(len(names))], [fast[n]["attention"][key] / MiB for n in names],
                 width=0.4, label=label)
    ax_m.set_xticks([j + 0.2 for j in range(len(names))], names)
    ax_m.set_ylabel("lss_attention activations, MiB")
    ax_m.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "overlap.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    from lss_plugin.bench.launch import launch
    from lss_plugin.bench.model import ModelDims
    from lss_plugin.bench.netns import launch_with_link, link_unavailable
    # by its module name: under `python -m` this file is __main__, which the link's launcher cannot unpickle
    from lss_plugin.bench.overlap import overlap_worker

    os.makedirs(args.out, exist_ok=True)
    dims = ModelDims(args.num_layers, args.num_heads * args.head_dim, args.num_heads, args.kv_heads,
                     max_positions=args.seq_len)
    started, load = time.time(), os.getloadavg()
    common = (list(VARIANTS), args.layout, dims, args.seq_len, args.steps, args.repetitions)
    print(f"lss_plugin.bench.overlap: {args.ranks} ranks, {dims}, L={args.seq_len}, load average {load[0]:.2f}",
          flush=True)
    results, launches = {}, []
    per_rank = launch(overlap_worker, args.ranks, *common, True)
    results["fast"] = summarize(per_rank, "loopback")
    launches.append({"link": "loopback", "load_average": per_rank[0]["load_average"]})
    skipped = link_unavailable() if args.link_gbit else "--link-gbit 0"
    if not skipped:
        per_rank = launch_with_link(args.link_gbit, overlap_worker, args.ranks, *common, False)
        results["slow"] = summarize(per_rank, f"{args.link_gbit:g} Gbit/s")
        launches.append({"link": f"{args.link_gbit:g} Gbit/s", "load_average": per_rank[0]["load_average"]})
    meta = {"command": " ".join(["python -m lss_plugin.bench.overlap"] + (argv if argv is not None else sys.argv[1:])),
            "args": vars(args), "load_average_at_start": load, "launches": launches, "slow_link_skipped": skipped,
            "wall_clock_s": round(time.time() - started, 1), "cpus": os.cpu_count()}
    lines = table(results, meta)
    print("\n".join(lines), flush=True)
    with open(os.path.join(args.out, "overlap.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "targets": targets(results)}, f, indent=1, default=str)
    with open(os.path.join(args.out, "overlap.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"done in {meta['wall_clock_s']} s; wrote {args.out}/overlap.json, overlap.md, {plot(args.out, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
