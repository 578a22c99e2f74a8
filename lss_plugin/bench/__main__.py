"""``python -m lss_plugin.bench``: LSS beside Megatron TP+SP, Ulysses, ring attention and one rank.

Runs every method on the same megatron-core GPTModel, the same data and the same global sequence
length, on 1, 2 and 4 ranks in one invocation: strong scaling (fixed L) and weak scaling (fixed
tokens per rank), MHA and GQA, and the longest L each method fits in a memory budget. Writes
``results.json``, ``results.md`` and PNG plots into ``--out`` (default ``runs/bench``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from lss_plugin.bench.model import ModelDims, Variant
from lss_plugin.bench.run import BUDGET_REFERENCE, worker


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lss_plugin.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench", help="output directory")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, few steps (CI: under two minutes)")
    p.add_argument("--ranks", default=None, help="comma-separated world sizes (default 1,2,4)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of lss,megatron_tp_sp,ulysses,ring,single,lss_tp")
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--num-heads", type=int, default=None)
    p.add_argument("--gqa-kv-heads", type=int, default=None,
                   help="KV heads of the GQA runs (MHA runs use --num-heads)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="strong scaling global length (default 32 x hidden size)")
    p.add_argument("--tokens-per-rank", type=int, default=None, help="weak scaling tokens per rank")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (median reported)")
    p.add_argument("--budget-mib", type=float, default=None,
                   help="memory budget per rank for the longest-sequence search (default: the "
                        "tracked peak of lss[regather,contiguous] on 1 rank at the strong-scaling "
                        "length, i.e. what one rank needs for that sequence without splitting it)")
    p.add_argument("--no-weak", action="store_true")
    p.add_argument("--no-budget", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="per rank-group wall clock limit")
    args = p.parse_args(argv)
    q = args.quick
    defaults = dict(num_layers=1 if q else 2, hidden_size=32 if q else 64, num_heads=8,
                    warmup=1 if q else 2, steps=1 if q else 5)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.gqa_kv_heads is None:
        args.gqa_kv_heads = max(args.num_heads // 2, 1)
    if args.seq_len is None:
        args.seq_len = 8 * args.hidden_size if q else 32 * args.hidden_size
    if args.tokens_per_rank is None:
        args.tokens_per_rank = 64 if q else 512
    args.ranks = [int(r) for r in (args.ranks or "1,2,4").split(",")]
    args.methods = (args.methods or "single,megatron_tp_sp,lss,ulysses,ring,lss_tp").split(",")
    return args


def variants_for(methods, world_size: int, quick: bool = False) -> list[Variant]:
    """Every variant of ``methods`` that runs on ``world_size`` ranks (--quick: LSS contiguous only)."""
    out = []
    for m in methods:
        if m == "single":
            if world_size == 1:
                out.append(Variant("single"))
        elif m == "lss":
            layouts = ("contiguous",) if quick else ("contiguous", "balanced")
            out += [Variant("lss", layout, mode) for layout in layouts for mode in ("keep", "regather")]
            if not quick:  # the memory-lean extreme: regather, one KV head gathered at a time
                out.append(Variant("lss", "contiguous", "regather", kv_head_chunk=1))
        elif m in ("megatron_tp_sp", "ulysses", "ring"):
            out.append(Variant(m))
        elif m == "lss_tp":
            if world_size >= 4 and world_size % 2 == 0:  # TP = 2 x LSS = world / 2 >= 2
                out.append(Variant("lss_tp"))
        else:
            raise ValueError(f"unknown method {m!r}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from lss_plugin.bench.launch import launch
    from lss_plugin.bench.report import write_outputs
    from lss_plugin.bench.run import Case

    os.makedirs(args.out, exist_ok=True)
    max_len = max(args.seq_len, args.tokens_per_rank * max(args.ranks))
    # The search runs between `unit` and `budget_max` tokens (~log2(budget_max / unit) probes).
    budget_max = 8 * args.seq_len
    unit = 32 * max(args.ranks) if args.quick else 16 * max(args.ranks)
    if args.seq_len % unit:
        raise SystemExit(f"--seq-len {args.seq_len} must be a multiple of {unit} (16 x max ranks)")
    # The learned position table is sized to the longest sequence of the sweep (it is a
    # parameter: a larger table would inflate every method's gradient all-reduce).
    dims_for = {
        "mha": ModelDims(args.num_layers, args.hidden_size, args.num_heads, args.num_heads,
                         max_positions=max_len),
        "gqa": ModelDims(args.num_layers, args.hidden_size, args.num_heads, args.gqa_kv_heads,
                         max_positions=max_len),
    }
    budget_dims = ModelDims(args.num_layers, args.hidden_size, args.num_heads, args.num_heads,
                            max_positions=budget_max)
    print(f"lss_plugin.bench: ranks {args.ranks}, methods {args.methods}, strong L={args.seq_len}, "
          f"weak {args.tokens_per_rank} tokens/rank, dims {dims_for['mha']}, GQA kv heads "
          f"{args.gqa_kv_heads}, output {args.out}", flush=True)
    started = time.time()
    all_cases, all_budget, budget_bytes = [], [], None
    if args.budget_mib:
        budget_bytes = int(args.budget_mib * 2**20)
    for world in sorted(args.ranks):
        cases = []
        for v in variants_for(args.methods, world, args.quick):
            common = dict(batch_size=args.batch_size, warmup=args.warmup, steps=args.steps)
            for attention, dims in dims_for.items():
                if attention == "gqa" and v.method == "single" and args.quick:
                    continue
                cases.append(Case(v, dims, args.seq_len, sweep="strong", attention=attention, **common))
            if not args.no_weak and not (args.quick and v.method in ("ulysses", "ring")):
                cases.append(Case(v, dims_for["mha"], args.tokens_per_rank * world, sweep="weak",
                                  attention="mha", **common))
        budget_jobs = []
        if not args.no_budget:
            for v in variants_for(args.methods, world, args.quick):
                if v.method == "lss" and (v.layout == "balanced"
                                          or (args.quick and v.kv_backward == "keep")):
                    continue  # same memory as contiguous; keeps the search short
                if args.quick and v.method != "lss":
                    continue  # --quick: the LSS search only
                budget_jobs.append(dict(variant=v, dims=budget_dims, budget_bytes=budget_bytes,
                                        unit=unit, max_len=budget_max, attention="mha",
                                        batch_size=args.batch_size))
            if budget_bytes is None:
                # measure the budget first: LSS (regather) on one rank at the strong-scaling length
                ref = [j for j in budget_jobs if j["variant"].name == BUDGET_REFERENCE]
                if not ref or world != 1:
                    raise SystemExit(f"the default budget is measured with {BUDGET_REFERENCE} on 1 rank: "
                                     "include lss and 1 in --ranks/--methods, or give --budget-mib")
                ref[0]["reference_len"] = args.seq_len
                budget_jobs.sort(key=lambda j: j is not ref[0])
        print(f"--- {world} rank(s): {len(cases)} cases, {len(budget_jobs)} budget searches", flush=True)
        per_rank = launch(worker, world, cases, budget_jobs, timeout_s=args.timeout_s,
                          threads=args.threads)
        for rank_out in per_rank:
            all_cases += rank_out["cases"]
        all_budget += per_rank[0]["budget"]
        if budget_bytes is None and per_rank[0].get("budget_reference_bytes"):
            budget_bytes = int(per_rank[0]["budget_reference_bytes"])
    meta = {
        "command": " ".join(["python -m lss_plugin.bench"] + (argv if argv is not None else sys.argv[1:])),
        "args": {k: v for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "processor": platform.processor()},
        "wall_clock_s": round(time.time() - started, 1),
        "memory_tracker": "lss_plugin.bench.memory.LiveTensorTracker (TorchDispatchMode, storage-level)",
    }
    try:
        import torch

        meta["torch"] = torch.__version__
    except ImportError:
        pass
    paths = write_outputs(args.out, meta, all_cases, all_budget, budget_bytes)
    print(f"done in {meta['wall_clock_s']} s; wrote " + ", ".join(paths), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
