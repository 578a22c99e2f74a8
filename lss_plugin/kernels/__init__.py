"""Block attention kernels that also return the log-sum-exp, and their backward.

LSS attends local queries to key blocks and merges the blocks by log-sum-exp (as flash and ring
attention do), so a kernel must expose ``lse``; the backward recomputes probabilities from the
*merged* ``out`` and ``lse``, which makes block-wise gradients exact.

    block_forward(q, k, v, scale, causal, *, band=None, softcap=None) -> out [b, h, sq, d], lse [b, h, sq]
    block_backward(dout, q, k, v, out, lse, scale, causal, *, band=None, softcap=None) -> dq, dk, dv

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

Masks beyond causal (``lss_plugin.masks``): ``band`` is a ``masks.Band`` in block-local indices,
local key j visible to local query i iff ``band.lo <= j - i <= band.hi`` (None: unbounded);
``causal`` is ``Band(hi=sk - sq)`` and both together intersect. ``softcap``: scores
``cap * tanh(scale * q.k / cap)`` before masking (Gemma 2). Only kernels with ``takes_band`` /
``takes_softcap`` get them. A row that sees no key of the block comes back with out 0 and lse -inf
(zero gradients), never NaN. Merging by log-sum-exp keeps that finite as long as one of the two
merged rows has a finite lse (``logaddexp(-inf, x) = x``, weight ``exp(-inf - x) = 0``); two keyless
rows merge to NaN weights, so callers never merge two blocks that are both keyless in a row.
``masks.key_blocks`` never makes such a block: every band a ``MaskSpec`` describes contains the offset
0, each query tile's keys include every query's own position, so every row of every block it
returns sees at least one key. A backward given a merged lse of -inf (a row that sees no key at
all) returns zero gradients for it.

Backends (one module each, PyTorch ``_AttentionOp`` style; the registry below never branches on a
backend): ``flash_attn``, ``sdpa_flash``, ``sdpa_efficient``, ``sdpa_cudnn`` (``cuda_fused.py``),
``cpu_flash``, ``tiled``, ``math`` (the reference). The automatic choice takes the first kernel in
``KERNELS`` order that this machine can run and that takes the inputs (device, dtype, head size)
and the settings (band, softcap); ``LSS_ATTENTION_KERNEL=<name>`` forces one, and forcing one this
machine cannot run, or that cannot take the inputs or the settings, is a ``ValueError`` naming the
kernels that can. The choice reads only q's dtype, device and head size, whether a band and a
softcap are requested, the environment and this machine: values every rank of a group shares.
FlexAttention (``flex``, CUDA) serves band and softcap where flash-attn is missing.
"""
from __future__ import annotations

import functools
import os

import torch

from lss_plugin.kernels import cpu_flash, cuda_fused, flex, gqa, tiled
from lss_plugin.kernels import reference as math_kernel
from lss_plugin.kernels.base import Kernel
from lss_plugin.masks import Band, check_softcap

ENV_VAR = "LSS_ATTENTION_KERNEL"

# Preference order of the automatic choice (kernels with auto=False only when forced).
KERNELS: dict[str, Kernel] = {
    k.name: k for k in (*cuda_fused.KERNELS, flex.KERNEL, cpu_flash.KERNEL, tiled.KERNEL, math_kernel.KERNEL)
}


@functools.lru_cache(maxsize=None)
def unavailable_reason(name: str):
    """Why this machine cannot run kernel ``name`` (None when it can); probed once per process."""
    return KERNELS[name].unavailable()


def runnable_kernels() -> list[str]:
    return [name for name in KERNELS if unavailable_reason(name) is None]


def _settings(band: Band | None, softcap: float | None) -> tuple[str, ...]:
    """The settings beyond causal a kernel must take: ``band`` (any Band, even ``Band()``: a layer with
    a window sends every block, fully visible or not, to the same kernel), ``softcap``."""
    check_softcap(softcap)
    return (("band",) if band is not None else ()) + (("softcap",) if softcap is not None else ())


def _cannot_take(kernel: Kernel, settings: tuple[str, ...]):
    missing = [s for s in settings if not getattr(kernel, f"takes_{s}")]
    return f"it takes no {' and no '.join(missing)}" if missing else None


def select_kernel(q: torch.Tensor, *, band: Band | None = None, softcap: float | None = None) -> Kernel:
    """The kernel for inputs like ``q`` with these settings: ``LSS_ATTENTION_KERNEL`` if set, else the
    automatic choice. ``band``: blocks carry an explicit band (a window; only whether one is given
    matters, so the layer's band and each of its blocks' give the same choice); ``softcap``: a cap.
    Pure: raises ValueError, no collective."""
    settings = _settings(band, softcap)
    forced = os.environ.get(ENV_VAR)
    if forced:
        if forced not in KERNELS:
            raise ValueError(f"{ENV_VAR}={forced!r} is not a kernel; kernels: {list(KERNELS)}")
        kernel = KERNELS[forced]
        why = unavailable_reason(forced) or kernel.unsupported(q) or _cannot_take(kernel, settings)
        if why:
            able = [n for n in runnable_kernels()
                    if KERNELS[n].unsupported(q) is None and _cannot_take(KERNELS[n], settings) is None]
            wanted = f" with {' and '.join(settings)}" if settings else ""
            raise ValueError(
                f"{ENV_VAR}={forced!r} cannot run here: {why}. Kernels this machine can run for "
                f"{q.dtype} on {q.device.type} with head dim {q.shape[-1]}{wanted}: {able}"
            )
        return kernel
    for name in runnable_kernels():
        kernel = KERNELS[name]
        if kernel.auto and kernel.unsupported(q) is None and _cannot_take(kernel, settings) is None:
            return kernel
    raise ValueError(f"no attention kernel takes {q.dtype} on {q.device} with {settings}")  # tiled takes every float


def kernel_name(q: torch.Tensor, *, band: Band | None = None, softcap: float | None = None) -> str:
    return select_kernel(q, band=band, softcap=softcap).name


def causal_prefix_in_one_call(q: torch.Tensor, kv_heads: int | None = None, *, band: Band | None = None,
                              softcap: float | None = None) -> bool:
    """Whether the kernel chosen for ``q`` (and these settings) takes a query chunk against all its keys
    in one call with ``kv_heads`` KV heads (default: as many as q has) without repeating them: causal
    blocks with sq < sk (bottom-right aligned), or, with a band, blocks of any sq and sk under that
    band (``masks.key_blocks``' one block per query tile)."""
    kernel = select_kernel(q, band=band, softcap=softcap)
    gqa_ok = kv_heads is None or kv_heads == q.shape[1] or kernel.gqa_native
    if "band" in _settings(band, softcap):
        return kernel.takes_band and gqa_ok
    return kernel.bottom_right_causal and gqa_ok


def _check_shapes(kernel: Kernel, q, k, causal: bool, masked: bool = False) -> None:
    h, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    sq, sk = q.shape[2], k.shape[2]
    if causal and sq != sk and not masked:  # masked: the kernel takes causal as a band (keyless rows allowed)
        if sq > sk:
            raise ValueError(f"causal block with more queries ({sq}) than keys ({sk}): some rows see no key")
        if not kernel.bottom_right_causal:
            able = [n for n, kern in KERNELS.items() if kern.bottom_right_causal]
            raise ValueError(
                f"kernel {kernel.name!r} has no bottom-right causal alignment (queries {sq} < keys {sk}); "
                f"kernels that do: {able}"
            )


def _mask_keywords(kernel: Kernel, q, k, causal: bool, band: Band | None, softcap: float | None) -> dict:
    """The ``band=`` / ``softcap=`` keywords of this call ({} without them: the call is exactly the
    causal / full one every kernel takes)."""
    settings = _settings(band, softcap)
    _check_shapes(kernel, q, k, causal, masked=bool(settings))
    return {s: {"band": band, "softcap": softcap}[s] for s in settings}


def block_forward(q, k, v, scale: float, causal: bool, *, band: Band | None = None, softcap: float | None = None):
    """out [b, h, sq, d], lse [b, h, sq] of softmax(cap(q k^T * scale) [+ mask]) v; k, v [b, hkv, sk, d].
    The mask: ``causal`` (bottom-right) and ``band`` (block-local ``j - i``) intersected."""
    kernel = select_kernel(q, band=band, softcap=softcap)
    mask = _mask_keywords(kernel, q, k, causal, band, softcap)
    if q.shape[1] != k.shape[1] and not kernel.gqa_native:
        return gqa.forward(kernel, q, k, v, scale, causal, **mask)
    return kernel.forward(q, k, v, scale, causal, **mask)


def block_backward(dout, q, k, v, out, lse, scale: float, causal: bool, *, band: Band | None = None,
                   softcap: float | None = None):
    """dq [b, h, sq, d], dk, dv [b, hkv, sk, d] of one block, given the merged ``out`` and ``lse`` of
    the whole attention row (and the block's own ``causal``, ``band``, ``softcap``)."""
    kernel = select_kernel(q, band=band, softcap=softcap)
    mask = _mask_keywords(kernel, q, k, causal, band, softcap)
    if q.shape[1] != k.shape[1] and not kernel.gqa_native:
        return gqa.backward(kernel, dout, q, k, v, out, lse, scale, causal, **mask)
    return kernel.backward(dout, q, k, v, out, lse, scale, causal, **mask)


__all__ = ["ENV_VAR", "KERNELS", "Kernel", "block_backward", "block_forward", "causal_prefix_in_one_call",
           "kernel_name", "runnable_kernels", "select_kernel", "unavailable_reason"]
