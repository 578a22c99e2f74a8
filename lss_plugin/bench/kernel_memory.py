"""Peak memory of one block-attention kernel call, forward + backward, on one rank.

``python -m lss_plugin.bench.kernel_memory`` runs a whole-sequence causal block (by default
L = 8192, 8 heads, head dim 64, batch 1, float32: the last rank's largest block at N = 1) through
``lss_plugin.kernels.block_forward`` + ``block_backward`` with each kernel named in ``--kernels``,
each in a fresh process with ``LSS_ATTENTION_KERNEL`` set, and prints two figures per kernel:

- peak live tensor bytes above the inputs (``LiveTensorTracker``: every storage the dispatcher
  allocates, until it is freed; exact, independent of the allocator);
- peak RSS growth: ``VmHWM`` after the call minus ``VmRSS`` before it, with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns large freed blocks to the system and RSS
  follows live tensors (includes allocator and library overhead).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MiB = 1 << 20


def measure(seq_len: int, heads: int, head_dim: int, batch: int, dtype_name: str) -> dict:
    """In this process: one forward + backward through the kernel LSS_ATTENTION_KERNEL names."""
    import torch

    from lss_plugin import kernels
    from lss_plugin.bench.memory import (LiveTensorTracker, current_rss_bytes, peak_rss_bytes,
                                         release_free_heap, reset_peak_rss)

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(batch, heads, seq_len, head_dim, generator=gen).to(dtype) for _ in range(4))
    scale = head_dim ** -0.5
    warm = [t[:, :1, :64] for t in (q, k, v, dout)]  # first calls initialise thread pools and libraries
    kernels.block_backward(*warm[3:], *warm[:3], *kernels.block_forward(*warm[:3], scale, True), scale, True)
    release_free_heap()
    rss_before = current_rss_bytes()
    exact_peak = reset_peak_rss()
    tracker = LiveTensorTracker()
    tracker.register_static([q, k, v, dout])
    with tracker:
        out, lse = kernels.block_forward(q, k, v, scale, True)  # [b, h, L, d], [b, h, L]
        tracker.mark_forward_end()
        grads = kernels.block_backward(dout, q, k, v, out, lse, scale, True)
        tracker.mark_backward_end()
    report = tracker.report()
    del grads, out, lse
    return {
        "kernel": kernels.kernel_name(q),
        "live_peak_bytes": report.peak_activation_bytes,
        "rss_growth_bytes": peak_rss_bytes() - rss_before,
        "rss_peak_is_exact": exact_peak,  # False: VmHWM could not be reset, growth includes setup
        "input_bytes": 4 * q.numel() * q.element_size(),
    }


def run_kernel(name: str, args) -> dict:
    env = dict(os.environ, LSS_ATTENTION_KERNEL=name, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "lss_plugin.bench.kernel_memory", "--one", "--seq-len", str(args.seq_len),
           "--heads", str(args.heads), "--head-dim", str(args.head_dim), "--batch", str(args.batch),
           "--dtype", args.dtype]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"kernel {name!r} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m lss_plugin.bench.kernel_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="tiled,math", help="comma-separated kernel names")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the measured child process
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.seq_len, args.heads, args.head_dim, args.batch, args.dtype)))
        return
    print(f"causal block, forward + backward: L={args.seq_len}, heads={args.heads}, head dim={args.head_dim}, "
          f"batch={args.batch}, {args.dtype}; one process per kernel, MALLOC_MMAP_THRESHOLD_=65536")
    print(f"{'kernel':<10} {'peak live tensors MiB':>22} {'peak RSS growth MiB':>20}")
    for name in args.kernels.split(","):
        r = run_kernel(name, args)
        note = "" if r["rss_peak_is_exact"] else "  (VmHWM not resettable: includes setup)"
        print(f"{r['kernel']:<10} {r['live_peak_bytes'] / MiB:>22.1f} {r['rss_growth_bytes'] / MiB:>20.1f}{note}")


if __name__ == "__main__":
    main()
