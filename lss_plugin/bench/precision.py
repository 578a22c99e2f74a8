"""Half-precision error of ``lss_attention`` on N ranks beside single-device SDPA in the same dtype.

``python -m lss_plugin.bench.precision`` runs causal GQA attention (default L = 768, 8 query and 2
KV heads, head dim 64) on ``--ranks`` processes for bfloat16 and float16, both layouts and each
kernel in ``--kernels``, and prints, for out, dq, dk, dv, the error of LSS and of
``F.scaled_dot_product_attention`` on the whole sequence in one process, both against a float64
reference (max abs error / max abs reference value), and their ratio. The issue's target is a ratio
<= 1.2 on 3 ranks. ``--kv-grad-dtype input`` measures the reduce-scatter of dK/dV in the input dtype.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from lss_plugin.options import KV_GRAD_DTYPES

NAMES = ("out", "dq", "dk", "dv")


def _single_device(q, k, v, dout):
    """out and dq, dk, dv of causal GQA attention on the whole sequence; tensors [b, L, heads, d]."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=True).transpose(1, 2)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _rank_errors(seq_len, heads, kv_heads, head_dim, dtype_name, layout, kernel, kv_grad_dtype="fp32"):
    import torch.distributed as dist

    import lss_plugin
    from lss_plugin.sharding import local_token_indices

    os.environ["LSS_ATTENTION_KERNEL"] = kernel
    dtype = getattr(torch, dtype_name)
    world, rank = dist.get_world_size(), dist.get_rank()
    lss_plugin.init_topology(world)
    gen = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(1, seq_len, heads, head_dim, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, seq_len, kv_heads, head_dim, generator=gen, dtype=torch.float64) for _ in range(2))
    ref = _single_device(q, k, v, dout)
    scale = [r.abs().max().item() for r in ref]
    idx = local_token_indices(seq_len, rank, world, layout)
    local = [t[:, idx].to(dtype).requires_grad_() for t in (q, k, v)]
    out = lss_plugin.lss_attention(*local, causal=True, layout=layout, kv_grad_dtype=kv_grad_dtype)
    out.backward(dout[:, idx].to(dtype))
    lss = [(got.double() - want[:, idx]).abs().max().item() / s
           for got, want, s in zip((out, *(t.grad for t in local)), ref, scale)]
    sdpa = None
    if rank == 0:
        half = _single_device(*(t.to(dtype) for t in (q, k, v, dout)))
        sdpa = [(got.double() - want).abs().max().item() / s for got, want, s in zip(half, ref, scale)]
    return lss, sdpa


def main(argv=None) -> None:
    from lss_plugin.bench.launch import launch

    p = argparse.ArgumentParser(prog="python -m lss_plugin.bench.precision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=768)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--kernels", default="cpu_flash,tiled")
    p.add_argument("--kv-grad-dtype", default="fp32", choices=KV_GRAD_DTYPES,
                   help="dtype of the dK/dV reduce-scatter (lss_attention's kv_grad_dtype)")
    args = p.parse_args(argv)
    print(f"causal GQA, L={args.seq_len}, heads {args.heads}/{args.kv_heads}, d={args.head_dim}, "
          f"{args.ranks} ranks, kv_grad_dtype={args.kv_grad_dtype}; error = max|x - ref64| / max|ref64|")
    print("| dtype | layout | kernel | " + " | ".join(f"{n} LSS / SDPA (ratio)" for n in NAMES) + " |")
    print("|---|---|---|" + "---|" * len(NAMES))
    for dtype in ("bfloat16", "float16"):
        for layout in ("contiguous", "balanced"):
            for kernel in args.kernels.split(","):
                per_rank = launch(_rank_errors, args.ranks, args.seq_len, args.heads, args.kv_heads,
                                  args.head_dim, dtype, layout, kernel, args.kv_grad_dtype, timeout_s=1200.0)
                lss = [max(r[0][i] for r in per_rank) for i in range(len(NAMES))]
                sdpa = per_rank[0][1]
                cells = [f"{a:.2e} / {b:.2e} ({a / b:.2f})" for a, b in zip(lss, sdpa)]
                print(f"| {dtype} | {layout} | {kernel} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
