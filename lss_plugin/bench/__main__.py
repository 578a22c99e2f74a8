"""``python -m lss_plugin.bench``: LSS beside its prior art, every method on a fused kernel.

Runs every method on the same megatron-core GPTModel, the same data and the same global sequence
length, on 1, 2 and 4 ranks: one device and Megatron TP+SP on torch's SDPA (flash), LSS, ring
(zigzag), TransformerEngine-style all-gather CP and USP on LSS's block kernel, DeepSpeed-Ulysses on
SDPA; Megatron's dense local attention only in extra ``[unfused]`` rows. Strong scaling (fixed L)
and weak scaling (fixed tokens per rank), MHA and GQA, the largest world size again behind a
rate-limited link (``--link-gbit``), and the longest L each method fits in a memory budget. Within
a launch the methods are timed round-robin (``--repetitions`` x ``--steps``), so ratios pair per
round. Writes ``results.json``, ``results.md``, ``readme_table.md`` and PNG plots into ``--out``.
Attention-level sections at the largest world size: packed documents, and sliding windows (``lss`` beside
``lss[window=W]``, key pairs computed and step time; ``--masks-only`` runs just those rows and writes
``masks.json``, ``masks.md`` and ``masks.png``), and the sparse K/V exchange beside the all-gather (full
causal, a window of L/16, packed documents of 128 tokens; the whole sweep, behind a slow link too, is
``python -m lss_plugin.bench.exchange``).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace

from lss_plugin.bench.methods import DEFAULT_METHODS, LSS_DEFAULT_VARIANT, variants_for
from lss_plugin.bench.model import ModelDims
from lss_plugin.bench.run import BUDGET_REFERENCE, Case, worker

# LSS variants timed behind the slow link (the others differ from these in memory, not traffic)
LINK_LSS = ("lss[keep,balanced]", "lss[keep,contiguous]", "lss[regather,balanced]", LSS_DEFAULT_VARIANT.name)
BUDGET_METHODS = ("single", "megatron_tp_sp", "allgather_cp")  # besides LSS regather (+ chunk1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lss_plugin.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench", help="output directory")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, 2 rounds x 2 steps, ranks 1 and 4 (CI: sized for about three "
                        "minutes on a quiet machine)")
    p.add_argument("--ranks", default=None, help="comma-separated world sizes (default 1,2,4)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of " + ",".join(DEFAULT_METHODS))
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--num-heads", type=int, default=None)
    p.add_argument("--gqa-kv-heads", type=int, default=None,
                   help="KV heads of the GQA runs (default 2: fewer than 4 ranks, so Ulysses cannot run)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="strong scaling global length (default 32 x hidden size)")
    p.add_argument("--tokens-per-rank", type=int, default=None, help="weak scaling tokens per rank")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per case per round")
    p.add_argument("--repetitions", type=int, default=None,
                   help="round-robin rounds (every case runs --steps timed steps per round)")
    p.add_argument("--link-gbit", default=None,
                   help="comma-separated link rates in Gbit/s for the extra runs behind a rate-limited "
                        "loopback (default 1; 'none' to skip)")
    p.add_argument("--link-ranks", type=int, default=None,
                   help="world size of the link-limited runs (default: the largest of --ranks)")
    p.add_argument("--budget-mib", type=float, default=None,
                   help="memory budget per rank for the longest-sequence search (default: the "
                        "tracked peak of lss[regather,contiguous] on 1 rank at the strong-scaling "
                        "length, i.e. what one rank needs for that sequence without splitting it)")
    p.add_argument("--packed-doc-lens", default=None,
                   help="typical document lengths of the packed-documents rows ('none' = unpacked; "
                        "default none,512,128,32; 'skip' to skip them)")
    p.add_argument("--packed-seq-len", type=int, default=None,
                   help="global length of the packed-documents rows (default 4096; quick 512)")
    p.add_argument("--mask-windows", default=None,
                   help="sliding windows (keys, or L/n of --mask-seq-len) of the lss[window=W] rows beside full "
                        "causal lss (default L/8; 'skip' to skip them)")
    p.add_argument("--mask-seq-len", type=int, default=None, help="global length of the window rows (default 2048; "
                                                                  "quick 512)")
    p.add_argument("--mask-heads", type=int, default=None, help="heads of the window rows (default 4)")
    p.add_argument("--mask-head-dim", type=int, default=None, help="head dim of the window rows (default 64; quick 16)")
    p.add_argument("--exchange-seq-len", type=int, default=None,
                   help="global length of the sparse K/V exchange rows (gather, sparse, auto for full causal, a "
                        "window of L/16 and documents of 128; 4 heads x --mask-head-dim; default 4096, quick 512; "
                        "0 to skip them)")
    p.add_argument("--masks-only", action="store_true",
                   help="run only the window rows (at the largest of --ranks) and write masks.json/.md/.png")
    p.add_argument("--no-weak", action="store_true")
    p.add_argument("--no-budget", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="per rank-group wall clock limit")
    args = p.parse_args(argv)
    q = args.quick
    defaults = dict(num_layers=1 if q else 2, hidden_size=32 if q else 64, num_heads=8, gqa_kv_heads=2,
                    warmup=1 if q else 2, steps=2 if q else 5, repetitions=2 if q else 5,
                    tokens_per_rank=64 if q else 512, ranks="1,4" if q else "1,2,4", link_gbit="1",
                    packed_doc_lens="none,64" if q else "none,512,128,32", packed_seq_len=512 if q else 4096,
                    mask_windows="L/8", mask_seq_len=512 if q else 2048, mask_heads=4, mask_head_dim=16 if q else 64,
                    exchange_seq_len=512 if q else 4096)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.seq_len is None:
        args.seq_len = 8 * args.hidden_size if q else 32 * args.hidden_size
    args.ranks = sorted(int(r) for r in args.ranks.split(","))
    args.methods = (args.methods or ",".join(DEFAULT_METHODS)).split(",")
    args.link_gbit = [] if args.link_gbit.lower() == "none" else [float(g) for g in args.link_gbit.split(",")]
    args.link_ranks = args.link_ranks or max(args.ranks)
    args.packed_doc_lens = [] if args.packed_doc_lens == "skip" else [
        None if n.lower() == "none" else int(n) for n in args.packed_doc_lens.split(",")]
    if args.mask_windows == "skip":
        if args.masks_only:
            p.error("--masks-only with --mask-windows skip runs nothing")
        args.mask_windows = []
    else:
        from lss_plugin.bench.masks import parse_windows

        try:
            args.mask_windows = parse_windows(args.mask_windows, args.mask_seq_len)
        except ValueError as err:
            p.error(f"--mask-windows: {err}")
    return args


def strong_and_weak_cases(args, world: int, dims_for: dict) -> list[Case]:
    common = dict(batch_size=args.batch_size, warmup=args.warmup, steps=args.steps)
    cases = []
    for v in variants_for(args.methods, world, args.quick):
        for attention, dims in dims_for.items():
            if v.kernel == "unfused" and attention == "gqa":
                continue  # the dense kernel is an extra row, shown once
            cases.append(Case(v, dims, args.seq_len, sweep="strong", attention=attention, **common))
        weak_len = args.tokens_per_rank * world
        if not args.no_weak and v.kernel == "fused" and weak_len != args.seq_len:
            # (the weak point at seq_len is the strong MHA row, not run twice)
            cases.append(Case(v, dims_for["mha"], weak_len, sweep="weak", attention="mha", **common))
    return cases


def link_cases(args, world: int, dims_for: dict, link_gbit: float) -> list[Case]:
    """The cases behind a ``link_gbit`` Gbit/s link: the configured rate rides in each Case, so LSS's
    auto chunking runs with ``link_gbit`` set to it (``methods.lss_keywords``)."""
    common = dict(batch_size=args.batch_size, warmup=args.warmup, steps=args.steps, link_gbit=link_gbit)
    variants = [v for v in variants_for(args.methods, world, args.quick)
                if v.kernel == "fused" and (v.method != "lss" or v.name in LINK_LSS)]
    return [Case(v, dims, args.seq_len, sweep="strong", attention=attention, **common)
            for v in variants for attention, dims in dims_for.items()]


def budget_jobs_for(args, world: int, budget_dims: ModelDims, budget_bytes, unit: int, budget_max: int):
    jobs = []
    for v in variants_for(args.methods, world, args.quick):
        wanted = (v.name in (BUDGET_REFERENCE, "lss[regather,contiguous,chunk1]", LSS_DEFAULT_VARIANT.name)
                  or (v.method in BUDGET_METHODS and v.kernel == "fused"))
        if args.quick:
            wanted = v.name == BUDGET_REFERENCE or (v.method in ("single", "megatron_tp_sp") and v.kernel == "fused")
        # LSS replicates weights over SP: its reference also runs with the AdamW state sharded
        # over the grid (TP+SP here spans every rank with DP = 1, so it has nothing to shard).
        shard = [False, True] if world > 1 and v.name in (BUDGET_REFERENCE, LSS_DEFAULT_VARIANT.name) else [False]
        if wanted:
            jobs += [dict(variant=replace(v, shard_optimizer=s), dims=budget_dims, budget_bytes=budget_bytes,
                          unit=unit, max_len=budget_max, attention="mha", batch_size=args.batch_size)
                     for s in shard]
    if budget_bytes is None:
        # measure the budget first: LSS (regather) on one rank at the strong-scaling length
        ref = [j for j in jobs if j["variant"].name == BUDGET_REFERENCE]
        if not ref or world != 1:
            raise SystemExit(f"the default budget is measured with {BUDGET_REFERENCE} on 1 rank: "
                             "include lss and 1 in --ranks/--methods, or give --budget-mib")
        ref[0]["reference_len"] = args.seq_len
        jobs.sort(key=lambda j: j is not ref[0])
    return jobs


def packed_rows(args, common: dict) -> list[dict]:
    """Packed documents at the largest world size: LSS attention with and without boundaries."""
    if not args.packed_doc_lens:
        return []
    from lss_plugin.bench.launch import launch
    from lss_plugin.bench.packed import packed_worker, summarize, table

    world = max(args.ranks)
    heads, head_dim = (4, 16) if args.quick else (8, 64)
    print(f"--- {world} ranks: packed documents {args.packed_doc_lens} at L={args.packed_seq_len}", flush=True)
    per_rank = launch(packed_worker, world, args.packed_seq_len, heads, head_dim, args.packed_doc_lens,
                      timeout_s=common["timeout_s"], threads=common["threads"],
                      repetitions=common["repetitions"], steps=args.steps)
    rows = summarize(per_rank, args.packed_seq_len, heads, head_dim, "balanced")
    print("\n".join(table(rows)), flush=True)
    return rows


def mask_rows(args, common: dict) -> list[dict]:
    """Sliding windows at the largest world size: LSS attention full causal and with each window."""
    if not args.mask_windows:
        return []
    from lss_plugin.bench.launch import launch
    from lss_plugin.bench.masks import masks_worker, summarize, table

    world = max(args.ranks)
    print(f"--- {world} ranks: sliding windows {args.mask_windows} against full causal at L={args.mask_seq_len}, "
          f"{args.mask_heads} heads x {args.mask_head_dim}", flush=True)
    per_rank = launch(masks_worker, world, args.mask_seq_len, args.mask_heads, args.mask_head_dim, args.mask_windows,
                      timeout_s=common["timeout_s"], threads=common["threads"], warmup=args.warmup,
                      repetitions=common["repetitions"], steps=args.steps)
    rows = summarize(per_rank, args.mask_seq_len, args.mask_heads, args.mask_head_dim, "balanced")
    print("\n".join(table(rows)), flush=True)
    return rows


def exchange_rows_at(args, common: dict) -> list[dict]:
    """The sparse K/V exchange at the largest world size: gather, sparse and auto, paired per round."""
    if not args.exchange_seq_len:
        return []
    from lss_plugin.bench.exchange import exchange_rows, run, table

    world, seq_len = max(args.ranks), args.exchange_seq_len
    rows = exchange_rows(seq_len, args.mask_heads, [seq_len // 16], [128], None, None)
    print(f"--- {world} ranks: K/V exchange gather / sparse / auto at L={seq_len}, {args.mask_heads} heads x "
          f"{args.mask_head_dim}", flush=True)
    got = run(rows, world, seq_len, args.mask_heads, args.mask_head_dim, warmup=args.warmup, steps=args.steps,
              **common)
    print("\n".join(table(got)), flush=True)
    return got


def _tag(rank_outputs: list, link_gbit) -> list:
    for rank_out in rank_outputs:
        for c in rank_out["cases"]:
            c["link_gbit"] = link_gbit
    return rank_outputs


def main(argv=None) -> int:
    args = parse_args(argv)
    from lss_plugin.bench.launch import launch
    from lss_plugin.bench.netns import launch_with_link, link_unavailable
    from lss_plugin.bench.report import write_outputs

    os.makedirs(args.out, exist_ok=True)
    common = dict(timeout_s=args.timeout_s, threads=args.threads, repetitions=args.repetitions)
    if args.masks_only:
        from lss_plugin.bench.report import write_mask_outputs

        started = time.time()
        rows = mask_rows(args, common)
        meta = {"command": " ".join(["python -m lss_plugin.bench"] + (argv if argv is not None else sys.argv[1:])),
                "args": vars(args), "wall_clock_s": round(time.time() - started, 1), "load_average": os.getloadavg()}
        print("wrote " + ", ".join(write_mask_outputs(args.out, meta, rows)), flush=True)
        return 0
    max_len = max(args.seq_len, args.tokens_per_rank * max(args.ranks))
    # The search runs between `unit` and `budget_max` tokens (~log2(budget_max / unit) probes).
    budget_max = 8 * args.seq_len
    unit = (32 if args.quick else 16) * max(args.ranks)
    if args.seq_len % unit:
        raise SystemExit(f"--seq-len {args.seq_len} must be a multiple of {unit} (16 x max ranks)")
    # The learned position table is sized to the longest sequence of the sweep (it is a
    # parameter: a larger table would inflate every method's gradient all-reduce).
    dims_for = {
        "mha": ModelDims(args.num_layers, args.hidden_size, args.num_heads, args.num_heads, max_positions=max_len),
        "gqa": ModelDims(args.num_layers, args.hidden_size, args.num_heads, args.gqa_kv_heads,
                         max_positions=max_len),
    }
    budget_dims = dims_for["mha"]  # its position table is resized to each probe's length
    print(f"lss_plugin.bench: ranks {args.ranks}, methods {args.methods}, strong L={args.seq_len}, "
          f"weak {args.tokens_per_rank} tokens/rank, dims {dims_for['mha']}, GQA kv heads "
          f"{args.gqa_kv_heads}, {args.repetitions} rounds x {args.steps} timed steps, links "
          f"{args.link_gbit or 'none'} Gbit/s at {args.link_ranks} ranks, output {args.out}", flush=True)
    started = time.time()
    all_cases, all_budget, launches = [], [], []
    budget_bytes = int(args.budget_mib * 2**20) if args.budget_mib else None
    for world in args.ranks:
        cases = strong_and_weak_cases(args, world, dims_for)
        jobs = [] if args.no_budget else budget_jobs_for(args, world, budget_dims, budget_bytes, unit, budget_max)
        print(f"--- {world} rank(s): {len(cases)} cases, {len(jobs)} budget searches", flush=True)
        t0 = time.time()
        per_rank = launch(worker, world, cases, jobs, **common)
        launches.append({"world_size": world, "link_gbit": None, "wall_s": round(time.time() - t0, 1),
                         "load_average": per_rank[0]["load_average"]})
        for rank_out in _tag(per_rank, None):
            all_cases += rank_out["cases"]
        all_budget += per_rank[0]["budget"]
        if budget_bytes is None and per_rank[0].get("budget_reference_bytes"):
            budget_bytes = int(per_rank[0]["budget_reference_bytes"])
    packed = packed_rows(args, common)
    masks = mask_rows(args, common)
    exchange = exchange_rows_at(args, common)
    link_skipped = None
    if args.link_gbit:
        link_skipped = link_unavailable()
        if link_skipped:
            print(f"--- skipping the link-limited runs: {link_skipped}", flush=True)
    for gbit in ([] if link_skipped else args.link_gbit):
        world = args.link_ranks
        cases = link_cases(args, world, dims_for, gbit)
        print(f"--- {world} ranks behind a {gbit:g} Gbit/s link: {len(cases)} cases", flush=True)
        t0 = time.time()
        try:
            per_rank = launch_with_link(gbit, worker, world, cases, (), **common)
        except (RuntimeError, TimeoutError) as e:  # the other results are still worth writing
            link_skipped = f"the {gbit:g} Gbit/s launch failed: {str(e)[:300]}"
            print(f"--- {link_skipped}", flush=True)
            break
        launches.append({"world_size": world, "link_gbit": gbit, "wall_s": round(time.time() - t0, 1),
                         "load_average": per_rank[0]["load_average"]})
        for rank_out in _tag(per_rank, gbit):
            all_cases += rank_out["cases"]
    meta = {
        "command": " ".join(["python -m lss_plugin.bench"] + (argv if argv is not None else sys.argv[1:])),
        "args": {k: v for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "processor": platform.processor()},
        "wall_clock_s": round(time.time() - started, 1),
        "launches": launches,
        "link_skipped": link_skipped,
        "memory_tracker": "lss_plugin.bench.memory.LiveTensorTracker (TorchDispatchMode, storage-level)",
    }
    try:
        import torch

        meta["torch"] = torch.__version__
    except ImportError:
        pass
    paths = write_outputs(args.out, meta, all_cases, all_budget, budget_bytes, packed, masks, exchange)
    print(f"done in {meta['wall_clock_s']} s; wrote " + ", ".join(paths), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
