"""The one-rank vs LSS exactness check, as a torchrun worker (across simulated nodes, or any launch).

    python -m lss_plugin.cluster run --nodes 2 -- -m lss_plugin.cluster.check OUT.json

Every rank draws the same float64 q, k, v and output gradient, computes full causal attention in one
process (the reference), then LSS attention on its shard of the sequence over the world group, and
compares its output rows and q/k/v gradient rows with the reference's. Rank 0 writes every rank's
largest error (relative to the reference's largest magnitude) and where it ran to OUT.json.
"""
from __future__ import annotations

import json
import os
import socket
import sys

import torch
import torch.distributed as dist


def reference_attention(q, k, v, causal: bool = True):
    """[b, L, H, d] attention in one process; KV heads repeated for GQA."""
    rep = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(rep, dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if causal:
        L = q.shape[1]
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def check(batch: int = 2, length: int = 64, heads: int = 4, kv_heads: int = 2, dim: int = 16,
          layout: str = "balanced") -> dict:
    import lss_plugin
    from lss_plugin.sharding import local_token_indices

    rank, world = dist.get_rank(), dist.get_world_size()
    lss_plugin.init_topology(world)
    gen = torch.Generator().manual_seed(1234)  # the same full tensors on every rank
    q = torch.randn(batch, length, heads, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, length, kv_heads, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, length, kv_heads, dim, generator=gen, dtype=torch.float64)
    dout = torch.randn(batch, length, heads, dim, generator=gen, dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = reference_attention(*ref_in)
    ref_out.backward(dout)

    idx = local_token_indices(length, rank, world, layout)
    local = [t[:, idx].clone().requires_grad_() for t in (q, k, v)]  # [b, L/N, H(kv), d]
    out = lss_plugin.lss_attention(*local, causal=True, layout=layout)
    out.backward(dout[:, idx])
    pairs = {"out": (out, ref_out[:, idx]), "dq": (local[0].grad, ref_in[0].grad[:, idx]),
             "dk": (local[1].grad, ref_in[1].grad[:, idx]), "dv": (local[2].grad, ref_in[2].grad[:, idx])}
    errors = {n: ((a - b).abs().max() / b.abs().max()).item() for n, (a, b) in pairs.items()}
    mine = {"rank": rank, "errors": errors, "pid": os.getpid(), "host": socket.gethostname(),
            "ifname": os.environ.get("GLOO_SOCKET_IFNAME"), "node_rank": int(os.environ.get("GROUP_RANK", "0"))}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    lss_plugin.destroy_topology()
    return {"world_size": world, "ranks": everyone,
            "max_error": max(e for r in everyone for e in r["errors"].values())}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from lss_plugin.runtime import init_distributed

    init_distributed(timeout_s=120)
    result = check()
    if dist.get_rank() == 0:
        with open(argv[0], "w") as f:
            json.dump(result, f, indent=1)
        print(f"lss_plugin.cluster.check: {result['world_size']} ranks, largest relative error "
              f"{result['max_error']:.3e}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
