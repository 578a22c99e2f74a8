"""``python -m lss_plugin.bench.verdict``: what the per-call verdict costs (issue 27).

On N ranks of this host (gloo on CPU, NCCL on GPU): the verdict's bytes per call from the collective
counters (``record_collectives``, its own name ``verdict``), the time of one ``settle`` alone (the
fixed-size all-gather plus its one host read; median over ``--iters`` calls, each rank's median, the
slowest rank reported), and beside it one ``lss_attention`` forward + backward of a small layer
(``--seq-len``, ``--heads``, ``--head-dim``, float32) with its verdicts included, so the share is
visible. Prints a table and writes ``verdict.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lss_plugin.bench.verdict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/verdict")
    p.add_argument("--ranks", default="2,4", help="comma-separated world sizes")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    return p.parse_args(argv)


def _median_s(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rank(iters: int, seq_len: int, heads: int, head_dim: int) -> dict:
    import torch
    import torch.distributed as dist

    import lss_plugin
    from lss_plugin.comm import REDUCE_SCATTER, REDUCE_SCATTER_A2A
    from lss_plugin.runtime import default_device
    from lss_plugin.signature import SIGNATURE_BYTES
    from lss_plugin.verdict import NAME, LocalVerdict, settle

    world = dist.get_world_size()
    topo = lss_plugin.init_topology(world)
    device = default_device()
    q = torch.randn(1, seq_len // world, heads, head_dim, device=device, requires_grad=True)
    row = b"\1" + bytes(SIGNATURE_BYTES - 1)  # any signature, the same on every rank

    def step():
        out = lss_plugin.lss_attention(q, q, q, causal=True, kv_head_chunk=None)
        out.sum().backward()

    step()  # warm-up (kernel choice, allocator)
    with lss_plugin.record_collectives() as rec:
        step()
    dist.barrier()
    settle_s = _median_s(lambda: settle(LocalVerdict(), topo.sp_group, row), iters)
    dist.barrier()
    step_s = _median_s(step, max(3, iters // 20))
    return {"verdict_calls": rec.calls[NAME], "verdict_bytes": rec.bytes[NAME],
            "kv_bytes": rec.bytes["all_gather_into_tensor"] + rec.bytes[REDUCE_SCATTER] + rec.bytes[REDUCE_SCATTER_A2A],
            "settle_s": settle_s, "step_s": step_s, "backend": dist.get_backend()}


def main(argv=None) -> None:
    from lss_plugin.bench.launch import launch

    args = parse_args(argv)
    rows = []
    for world in (int(r) for r in args.ranks.split(",")):
        per_rank = launch(_rank, world, args.iters, args.seq_len, args.heads, args.head_dim, timeout_s=900)
        first = per_rank[0]
        rows.append({"ranks": world, "backend": first["backend"], "verdict_calls_per_step": first["verdict_calls"],
                     "verdict_bytes_per_step": first["verdict_bytes"], "kv_bytes_per_step": first["kv_bytes"],
                     "settle_ms": 1e3 * max(r["settle_s"] for r in per_rank),
                     "step_ms": 1e3 * max(r["step_s"] for r in per_rank)})
    header = ("ranks", "backend", "verdicts/step", "verdict B/step", "K/V B/step", "one verdict ms",
              "fwd+bwd ms", "verdicts/step share")
    print(" | ".join(header))
    for r in rows:
        share = r["verdict_calls_per_step"] * r["settle_ms"] / r["step_ms"]
        print(" | ".join(str(x) for x in (r["ranks"], r["backend"], r["verdict_calls_per_step"],
                                          r["verdict_bytes_per_step"], r["kv_bytes_per_step"],
                                          f"{r['settle_ms']:.3f}", f"{r['step_ms']:.2f}", f"{100 * share:.2f}%")))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "verdict.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows, "load_avg": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
    main()
