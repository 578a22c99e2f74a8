"""``make gpu-check``: on a CUDA machine, the GPU exactness tests and a kernel timing table.

1. Which kernels this machine runs (and why not the others).
2. ``pytest tests/test_kernels.py tests/test_kernel_masks.py tests/test_megatron_spec.py`` (CPU and
   ``gpu``-marked tests: every CUDA kernel against float64 math and within 1.2x of SDPA's error in
   float32/bfloat16/float16; flash_attn and FlexAttention with windows and softcap; the
   TransformerEngine spec), then every other ``gpu``-marked test.
3. Forward + backward of one whole causal block per LSS kernel beside single-device SDPA
   (``F.scaled_dot_product_attention(is_causal=True)``), median of a few CUDA-event-timed runs; GQA
   configurations go through ``kernels.block_forward`` / ``block_backward`` as LSS calls them
   (natively on GQA-native kernels such as flash-attn, else through ``kernels.gqa``).
A few minutes on one GPU. Without CUDA it says so and exits 0. Exit code 1 if a test failed.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OWN_TESTS = ["tests/test_kernels.py", "tests/test_kernel_masks.py", "tests/test_megatron_spec.py"]


def run_tests() -> bool:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    own = subprocess.run(base + OWN_TESTS, cwd=ROOT, env=env).returncode
    others = subprocess.run(base + ["tests", "-m", "gpu"] + [f"--ignore={t}" for t in OWN_TESTS],
                            cwd=ROOT, env=env).returncode
    return own == 0 and others in (0, 5)  # 5: no other gpu-marked tests exist


def _median_ms(fn, repeats: int, device: str) -> float:
    fn()  # warm-up: kernel selection, autotuning, allocator
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:  # CPU: only so the table's code path can be exercised without a GPU
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


@contextlib.contextmanager
def _forced(name: str):
    """LSS_ATTENTION_KERNEL=name inside the block (kernels.block_forward picks by it)."""
    from lss_plugin.kernels import ENV_VAR

    before = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV_VAR)
        else:
            os.environ[ENV_VAR] = before


def timing_table(configs, repeats: int, device: str = "cuda") -> list[str]:
    """Rows per config ``(b, heads or (heads, kv_heads), L, d, dtype)``."""
    from lss_plugin import kernels

    lines = ["| kernel | dtype | b x heads x L x d | fwd+bwd ms | x SDPA |", "|---|---|---|---|---|"]
    for b, heads, seq, d, dtype in configs:
        h, hkv = heads if isinstance(heads, tuple) else (heads, heads)
        gen = torch.Generator(device=device).manual_seed(0)
        q, dout = (torch.randn(b, h, seq, d, device=device, dtype=dtype, generator=gen) for _ in range(2))
        k, v = (torch.randn(b, hkv, seq, d, device=device, dtype=dtype, generator=gen) for _ in range(2))
        scale = d ** -0.5

        def sdpa():
            qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=hkv != h).backward(dout)

        base = _median_ms(sdpa, repeats, device)
        shape = f"{b} x {h}/{hkv} x {seq} x {d}"
        lines.append(f"| SDPA (single device) | {str(dtype)[6:]} | {shape} | {base:.2f} | 1.00 |")
        for name in kernels.runnable_kernels():
            kernel = kernels.KERNELS[name]
            if name == "math" or kernel.unsupported(q):  # math: the [b, h, L, L] reference, not a contender
                continue

            def lss_block(name=name):
                with _forced(name):
                    out, lse = kernels.block_forward(q, k, v, scale, True)
                    kernels.block_backward(dout, q, k, v, out.to(q.dtype), lse, scale, True)

            ms = _median_ms(lss_block, repeats, device)
            lines.append(f"| {name} | {str(dtype)[6:]} | {shape} | {ms:.2f} | {ms / base:.2f} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lss_plugin.bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-tests", action="store_true", help="only the timing table")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; nothing to check (the CPU suite is `make test`).")
        return 0
    from lss_plugin import kernels

    print(f"gpu-check on {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()}), "
          f"torch {torch.__version__}")
    for name in kernels.KERNELS:
        print(f"  {name:<15} {kernels.unavailable_reason(name) or 'runs here'}")
    ok = True if args.no_tests else run_tests()
    configs = [(1, 16, 4096, 128, torch.bfloat16), (1, 16, 16384, 128, torch.bfloat16),
               (1, 16, 4096, 64, torch.float16), (1, (32, 8), 4096, 128, torch.bfloat16),
               (1, 8, 4096, 64, torch.float32)]
    print("\n".join(timing_table(configs, args.repeats)))
    print("gpu-check: tests " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
