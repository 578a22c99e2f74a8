"""``python -m lss_plugin.plan``: the cost model's command line.

Without ``--ranks`` it prints ``lss_plugin.plan``'s memory and communication tables (the paper's setups, a
modern 1M-token setting, or ``--layers/--hidden/...``); with ``--ranks N`` it asks ``lss_plugin.plan_links``
which scheme is fastest over node groups of ``--ulysses`` ranks. It lives apart from both, so that
``plan_links`` imports ``plan`` and ``plan`` imports neither (``tests/test_structure.py``: no import cycles).
"""
from __future__ import annotations

import argparse
import math

import lss_plugin.plan as cost_model
from lss_plugin.plan import (PAPER_MODEL, PAPER_SEQ_LEN, GPTSpec, Setup, floor_table, paper_tables, setups_table,
                             tp_x_lss_view)
from lss_plugin.plan_links import Links, report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lss_plugin.plan", description=cost_model.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper", action="store_true",
                   help="only the paper's setups (its GPU counts and length; assumptions labelled)")
    p.add_argument("--floor", action="store_true",
                   help="only the K,V bytes of each scheme against the information floor of a window and of "
                        "packed documents (L = 4096 on 4 ranks, and the paper's setting)")
    p.add_argument("--layers", type=int, help="plan a custom model instead of the built-in settings")
    p.add_argument("--hidden", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--ffn", type=int)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--sp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype-bytes", type=int, default=2)
    links = p.add_argument_group(
        "which scheme? (--ranks): attention bytes inside / across node groups of --ulysses consecutive "
        "ranks and the fastest scheme, for --heads, --kv-heads, --head-dim, --seq-len (lss_plugin.plan_links)")
    links.add_argument("--ranks", type=int, help="N, the sequence-parallel ranks")
    links.add_argument("--ulysses", type=int, default=1, help="U, ranks per node group / Ulysses group")
    links.add_argument("--head-dim", type=int)
    links.add_argument("--batch", type=int, default=1)
    links.add_argument("--intra-gbit", type=float, default=100.0, help="per-rank Gbit/s inside a node group")
    links.add_argument("--inter-gbit", type=float, default=10.0, help="per-rank Gbit/s across node groups")
    links.add_argument("--kv-grad-dtype", default="fp32", help="LSS's dK,dV reduce-scatter items: fp32 | input")
    links.add_argument("--backend", default="nccl",
                       help="nccl | gloo (gloo's reduce-scatter sends as much as an all-reduce; LSS sends dK,dV with an "
                            "all-to-all there)")
    links.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    if args.ranks is not None:
        return _which_scheme(p, args)
    if args.paper:
        print(paper_tables())
        return 0
    if args.floor:
        print(floor_tables())
        return 0
    if args.layers:
        spec = GPTSpec(args.layers, args.hidden, args.heads, args.kv_heads, args.ffn, args.vocab)
        world = args.sp * args.dp * args.tp
        sp, dt = world // args.dp, args.dtype_bytes
        setups = [Setup("lss", sp=sp, dp=args.dp, dtype_bytes=dt),
                  Setup("lss", sp=sp, dp=args.dp, kv_backward="regather", dtype_bytes=dt),
                  Setup("allgather_cp", sp=sp, dp=args.dp, dtype_bytes=dt),
                  Setup("megatron_tp_sp", tp=sp, dp=args.dp, dtype_bytes=dt),
                  Setup("ulysses", sp=sp, dp=args.dp, dtype_bytes=dt),
                  Setup("ring", sp=sp, dp=args.dp, dtype_bytes=dt)]
        u = math.gcd(sp, math.gcd(spec.num_heads, spec.hkv))  # the largest Ulysses group the heads allow
        if 1 < u < sp:
            setups.append(Setup("usp", sp=sp, dp=args.dp, ulysses=u, dtype_bytes=dt))
        print(setups_table("custom", spec, args.seq_len, setups))
        return 0
    print(paper_tables())
    print()
    modern = GPTSpec(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, ffn_hidden_size=4 * 4096,
                     vocab_size=128_256, max_positions=1)  # RoPE: no position table
    M = 1_048_576
    print(setups_table("modern setting: 8B-class GQA model (32 layers, hidden 4096, 32/8 heads), bf16, "
                 "L = 1,048,576 on 1,024 GPUs", modern, M, [
                     Setup("lss", sp=1024, dtype_bytes=2), Setup("lss", sp=1024, kv_backward="regather", dtype_bytes=2),
                     Setup("lss", sp=1024, kv_backward="regather", kv_head_chunk=1, dtype_bytes=2),
                     Setup("allgather_cp", sp=1024, dtype_bytes=2),
                     Setup("ring", sp=1024, dtype_bytes=2),
                     Setup("usp", sp=1024, ulysses=8, dtype_bytes=2),
                     Setup("ulysses", sp=8, dp=128, dtype_bytes=2),
                     Setup("megatron_tp_sp", tp=8, dp=128, dtype_bytes=2)]))
    print()
    print(tp_x_lss_view(modern, 131_072, 8))
    print()
    print(tp_x_lss_view(PAPER_MODEL, 16_384, 8, dtype_bytes=4))
    print()
    print(floor_tables())
    print("\nAll figures above are PREDICTIONS of lss_plugin.plan (no optimizer sharding, no activation "
          "recomputation; fused attention kernels unless marked [unfused]).")
    return 0


def floor_tables() -> str:
    """Issue 29's rows: a sliding window of L/16 and packed documents of about 128 tokens (lengths drawn as
    the benchmark draws them, ``bench.packed.packed_boundaries``), at L = 4096 on 4 ranks with head dim 64
    (hidden 256, 4 heads, bf16) and in the paper's setting (L = 50,112 on 144 ranks, fp32)."""
    from lss_plugin.bench.packed import packed_boundaries

    out = []
    for title, spec, seq_len, sp, dt in (
            ("L = 4096, 4 ranks, hidden 256 / 4 heads", GPTSpec(1, 256, 4), 4096, 4, 2),
            ("the paper's setting (assumed model, fp32)", PAPER_MODEL, PAPER_SEQ_LEN, 144, 4)):
        documents = tuple(packed_boundaries(seq_len, 128).tolist())
        for masks in ({"window": (seq_len // 16 - 1, 0)}, {"documents": documents}):
            setup = Setup("lss", sp=sp, dtype_bytes=dt, kv_exchange="auto", **masks)
            what = f"window of L/16 = {seq_len // 16} keys" if "window" in masks else "documents of ~128 tokens"
            out.append(floor_table(f"{title}, {what}", spec, seq_len, setup))
    return "\n\n".join(out)


def _which_scheme(parser: argparse.ArgumentParser, args) -> int:
    missing = [flag for flag, value in (("--heads", args.heads), ("--head-dim", args.head_dim),
                                        ("--seq-len", args.seq_len)) if value is None]
    if missing:
        parser.error(f"--ranks needs {', '.join(missing)}")
    spec = GPTSpec(args.layers or 1, args.heads * args.head_dim, args.heads, args.kv_heads, vocab_size=args.vocab)
    try:
        links = Links(args.ranks, args.ulysses, args.intra_gbit, args.inter_gbit, args.backend)
        print(report(spec, args.seq_len, links, as_json=args.json, dtype_bytes=args.dtype_bytes,
                     batch_size=args.batch, kv_grad_dtype=args.kv_grad_dtype))
    except ValueError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
