"""Half-precision error of ``lss_attention`` per rank beside single-device SDPA in the same dtype.

``python -m lss_plugin.bench.precision`` runs causal GQA attention (default L = 384, 8 query and 2
KV heads, head dim 64) on ``--ranks`` processes for bfloat16 and float16, both layouts and each
kernel in ``--kernels``, and prints one row per rank: for out, dq, dk, dv the error of LSS on this
rank's tokens and the error of ``F.scaled_dot_product_attention`` run on the whole sequence in one
process in the same dtype, on the SAME rows, both against a float64 reference, and their ratio.
Error = max |x - ref64| / max |ref64| over the rank's rows. The target is a ratio <= 1.2 on every
rank and tensor. ``--json PATH`` writes the table (default ``precision.json``).
``--kv-grad-dtype input`` measures the reduce-scatter of dK/dV in the input dtype.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from lss_plugin.options import KV_GRAD_DTYPES

NAMES = ("out", "dq", "dk", "dv")
TARGET = 1.2


def _single_device(q, k, v, dout):
    """out and dq, dk, dv of causal GQA attention on the whole sequence; tensors [b, L, heads, d]."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=True).transpose(1, 2)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (ref float64)."""
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


def rank_errors(seq_len, heads, kv_heads, head_dim, dtype_name, layout, kernel, kv_grad_dtype="fp32", seed=0,
                batch=1):
    """This rank's {name: (LSS error, SDPA error)} on its own rows (topology already registered)."""
    import torch.distributed as dist

    import lss_plugin
    from lss_plugin.sharding import local_token_indices

    if kernel:
        os.environ["LSS_ATTENTION_KERNEL"] = kernel
    dtype = getattr(torch, dtype_name)
    world, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(batch, seq_len, heads, head_dim, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(batch, seq_len, kv_heads, head_dim, generator=gen, dtype=torch.float64) for _ in range(2))
    ref = _single_device(q, k, v, dout)  # float64 [b, L, heads, d] each
    half = _single_device(*(t.to(dtype) for t in (q, k, v, dout)))
    idx = local_token_indices(seq_len, rank, world, layout)
    local = [t[:, idx].to(dtype).requires_grad_() for t in (q, k, v)]
    out = lss_plugin.lss_attention(*local, causal=True, layout=layout, kv_grad_dtype=kv_grad_dtype)
    out.backward(dout[:, idx].to(dtype))
    got = (out, *(t.grad for t in local))
    return {name: (max_error(x, r[:, idx]), max_error(s[:, idx], r[:, idx]))
            for name, x, s, r in zip(NAMES, got, half, ref)}


def _bench_rank(cases, seq_len, heads, kv_heads, head_dim, kv_grad_dtype):
    import torch.distributed as dist

    import lss_plugin

    lss_plugin.init_topology(dist.get_world_size())
    return [rank_errors(seq_len, heads, kv_heads, head_dim, dtype, layout, kernel, kv_grad_dtype)
            for dtype, layout, kernel in cases]


def table(rows: list[dict]) -> list[str]:
    """Markdown lines: one per (dtype, layout, kernel, rank), 'LSS / SDPA (ratio)' per tensor."""
    lines = ["| dtype | layout | kernel | rank | " + " | ".join(f"{n} LSS / SDPA (ratio)" for n in NAMES) + " |",
             "|---|---|---|---|" + "---|" * len(NAMES)]
    for r in rows:
        cells = [f"{r[n]['lss']:.2e} / {r[n]['sdpa']:.2e} ({r[n]['ratio']:.2f})" for n in NAMES]
        lines.append(f"| {r['dtype']} | {r['layout']} | {r['kernel']} | {r['rank']} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> None:
    from lss_plugin.bench.launch import launch

    p = argparse.ArgumentParser(prog="python -m lss_plugin.bench.precision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=384)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--kernels", default="cpu_flash,tiled")
    p.add_argument("--kv-grad-dtype", default="fp32", choices=KV_GRAD_DTYPES,
                   help="dtype of the dK/dV reduce-scatter (lss_attention's kv_grad_dtype)")
    p.add_argument("--json", default="precision.json", help="where to write the table")
    args = p.parse_args(argv)
    cases = [(dtype, layout, kernel) for dtype in ("float16", "bfloat16") for layout in ("balanced", "contiguous")
             for kernel in args.kernels.split(",")]
    per_rank = launch(_bench_rank, args.ranks, cases, args.seq_len, args.heads, args.kv_heads, args.head_dim,
                      args.kv_grad_dtype, timeout_s=1200.0)
    rows = []
    for i, (dtype, layout, kernel) in enumerate(cases):
        for rank, results in enumerate(per_rank):
            errors = results[i]
            rows.append({"dtype": dtype, "layout": layout, "kernel": kernel, "rank": rank,
                         **{n: {"lss": a, "sdpa": b, "ratio": a / b} for n, (a, b) in errors.items()}})
    worst = max(r[n]["ratio"] for r in rows for n in NAMES)
    meta = {"ranks": args.ranks, "seq_len": args.seq_len, "heads": args.heads, "kv_heads": args.kv_heads,
            "head_dim": args.head_dim, "kv_grad_dtype": args.kv_grad_dtype, "causal": True,
            "error": "max|x - ref64| / max|ref64| over the rank's rows", "target_ratio": TARGET, "worst_ratio": worst}
    print(f"causal GQA, L={args.seq_len}, heads {args.heads}/{args.kv_heads}, d={args.head_dim}, {args.ranks} ranks, "
          f"kv_grad_dtype={args.kv_grad_dtype}; error = max|x - ref64| / max|ref64| on each rank's rows")
    print("\n".join(table(rows)))
    print(f"worst ratio {worst:.2f} (target <= {TARGET})")
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
