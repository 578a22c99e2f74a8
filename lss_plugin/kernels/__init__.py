"""Block attention kernels that also return the log-sum-exp, and their backward.

LSS attends local queries to key blocks and merges the blocks by log-sum-exp (as flash and ring
attention do), so a kernel must expose ``lse``; the backward recomputes probabilities from the
*merged* ``out`` and ``lse``, which makes block-wise gradients exact.

    block_forward(q, k, v, scale, causal) -> out [b, h, sq, d], lse [b, h, sq]
    block_backward(dout, q, k, v, out, lse, scale, causal) -> dq, dk, dv

Tensors are ``[b, h, s, d]``; k, v may have fewer heads than q (GQA: Hkv dividing H, dk and dv
come back with Hkv heads): kernels with ``gqa_native`` take them as they are, the others through
``kernels.gqa``. ``lse`` is float32 for float32/half inputs, float64 for float64; out and the
gradients are in the input dtype or in float32 for half inputs (``Kernel.fp32_out``,
``fp32_grads``): callers round.
``causal`` with sq == sk is the plain lower triangle (a diagonal block). With sq < sk it is
bottom-right aligned (query i sees keys j <= i + sk - sq): a query chunk at global positions
``[p, p+n)`` against keys ``[0, p+n)`` is its prefix and its diagonal block in ONE call. Only kernels
with ``bottom_right_causal`` accept that; ``causal_prefix_in_one_call(q, kv_heads)`` says whether the
kernel chosen for ``q`` does (with GQA: natively, so no KV head is repeated); attention.py then makes
one call per query chunk (else: two calls and a log-sum-exp merge).

Backends (one module each, PyTorch ``_AttentionOp`` style; the registry below never branches on a
backend): ``flash_attn``, ``sdpa_flash``, ``sdpa_efficient``, ``sdpa_cudnn`` (``cuda_fused.py``),
``cpu_flash``, ``tiled``, ``math`` (the reference). The automatic choice takes the first kernel in
``KERNELS`` order that this machine can run and that takes the inputs (device, dtype, head size);
``LSS_ATTENTION_KERNEL=<name>`` forces one, and forcing one this machine cannot run, or that cannot
take the inputs, is a ``ValueError`` naming the kernels that can.
"""
from __future__ import annotations

import functools
import os

import torch

from lss_plugin.kernels import cpu_flash, cuda_fused, gqa, tiled
from lss_plugin.kernels import reference as math_kernel
from lss_plugin.kernels.base import Kernel

ENV_VAR = "LSS_ATTENTION_KERNEL"

# Preference order of the automatic choice (kernels with auto=False only when forced).
KERNELS: dict[str, Kernel] = {
    k.name: k for k in (*cuda_fused.KERNELS, cpu_flash.KERNEL, tiled.KERNEL, math_kernel.KERNEL)
}


@functools.lru_cache(maxsize=None)
def unavailable_reason(name: str):
    """Why this machine cannot run kernel ``name`` (None when it can); probed once per process."""
    return KERNELS[name].unavailable()


def runnable_kernels() -> list[str]:
    return [name for name in KERNELS if unavailable_reason(name) is None]


def select_kernel(q: torch.Tensor) -> Kernel:
    """The kernel for inputs like ``q``: ``LSS_ATTENTION_KERNEL`` if set, else the automatic choice."""
    forced = os.environ.get(ENV_VAR)
    if forced:
        if forced not in KERNELS:
            raise ValueError(f"{ENV_VAR}={forced!r} is not a kernel; kernels: {list(KERNELS)}")
        why = unavailable_reason(forced) or KERNELS[forced].unsupported(q)
        if why:
            able = [n for n in runnable_kernels() if KERNELS[n].unsupported(q) is None]
            raise ValueError(
                f"{ENV_VAR}={forced!r} cannot run here: {why}. Kernels this machine can run for "
                f"{q.dtype} on {q.device.type} with head dim {q.shape[-1]}: {able}"
            )
        return KERNELS[forced]
    for name in runnable_kernels():
        kernel = KERNELS[name]
        if kernel.auto and kernel.unsupported(q) is None:
            return kernel
    raise ValueError(f"no attention kernel takes {q.dtype} on {q.device}")  # tiled takes every float


def kernel_name(q: torch.Tensor) -> str:
    return select_kernel(q).name


def causal_prefix_in_one_call(q: torch.Tensor, kv_heads: int | None = None) -> bool:
    """Whether the kernel chosen for ``q`` takes causal blocks with sq < sk (bottom-right aligned)
    against ``kv_heads`` KV heads (default: as many as q has) without repeating them."""
    kernel = select_kernel(q)
    gqa_ok = kv_heads is None or kv_heads == q.shape[1] or kernel.gqa_native
    return kernel.bottom_right_causal and gqa_ok


def _check_shapes(kernel: Kernel, q, k, causal: bool) -> None:
    h, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    sq, sk = q.shape[2], k.shape[2]
    if causal and sq != sk:
        if sq > sk:
            raise ValueError(f"causal block with more queries ({sq}) than keys ({sk}): some rows see no key")
        if not kernel.bottom_right_causal:
            able = [n for n, kern in KERNELS.items() if kern.bottom_right_causal]
            raise ValueError(
                f"kernel {kernel.name!r} has no bottom-right causal alignment (queries {sq} < keys {sk}); "
                f"kernels that do: {able}"
            )


def block_forward(q, k, v, scale: float, causal: bool):
    """out [b, h, sq, d], lse [b, h, sq] of softmax(q k^T * scale [+ causal mask]) v; k, v [b, hkv, sk, d]."""
    kernel = select_kernel(q)
    _check_shapes(kernel, q, k, causal)
    if q.shape[1] != k.shape[1] and not kernel.gqa_native:
        return gqa.forward(kernel, q, k, v, scale, causal)
    return kernel.forward(q, k, v, scale, causal)


def block_backward(dout, q, k, v, out, lse, scale: float, causal: bool):
    """dq [b, h, sq, d], dk, dv [b, hkv, sk, d] of one block, given the merged ``out`` and ``lse`` of
    the whole attention row."""
    kernel = select_kernel(q)
    _check_shapes(kernel, q, k, causal)
    if q.shape[1] != k.shape[1] and not kernel.gqa_native:
        return gqa.backward(kernel, dout, q, k, v, out, lse, scale, causal)
    return kernel.backward(dout, q, k, v, out, lse, scale, causal)


__all__ = ["ENV_VAR", "KERNELS", "Kernel", "block_backward", "block_forward", "causal_prefix_in_one_call",
           "kernel_name", "runnable_kernels", "select_kernel", "unavailable_reason"]
