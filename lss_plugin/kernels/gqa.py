"""Grouped-query attention for kernels that need as many KV heads as query heads.

q has H heads, k and v have Hkv (H = g * Hkv); query head i reads KV head i // g. Without a causal
mask the g query heads of a KV head become extra query rows (``fold``: no copy of K, V). With one
the rows' positions matter, so K, V are repeated to H heads and dk, dv summed back over each group
in the compute dtype (float32 for half inputs; the caller rounds once). The same with an explicit
band or softcap (``mask``: the kernel's ``band=`` / ``softcap=`` keywords). Kernels with
``gqa_native`` never come here.
"""
from __future__ import annotations

import torch

from lss_plugin.kernels.base import compute_dtype


def fold(x: torch.Tensor, g: int) -> torch.Tensor:
    """[b, hkv*g, n, ...] -> [b, hkv, g*n, ...]: GQA query groups become extra query rows."""
    if g == 1:
        return x
    b, h, n = x.shape[:3]
    return x.reshape(b, h // g, g * n, *x.shape[3:])


def unfold(x: torch.Tensor, g: int) -> torch.Tensor:
    """[b, hkv, g*n, ...] -> [b, hkv*g, n, ...] (inverse of ``fold``)."""
    if g == 1:
        return x
    b, hkv, gn = x.shape[:3]
    return x.reshape(b, hkv * g, gn // g, *x.shape[3:])


def repeat_heads(x: torch.Tensor, g: int) -> torch.Tensor:
    """[b, hkv, m, d] -> [b, hkv*g, m, d]."""
    return x if g == 1 else x.repeat_interleave(g, dim=1)


def sum_head_groups(x: torch.Tensor, g: int) -> torch.Tensor:
    """[b, hkv*g, m, d] -> [b, hkv, m, d] in the compute dtype."""
    x = x.to(compute_dtype(x.dtype))
    if g == 1:
        return x
    b, h, m, d = x.shape
    return x.view(b, h // g, g, m, d).sum(2)


def forward(kernel, q, k, v, scale: float, causal: bool, **mask):
    """``kernel.forward`` for q [b, H, sq, d], k/v [b, Hkv, sk, d]: out [b, H, sq, d], lse [b, H, sq]."""
    g = q.shape[1] // k.shape[1]
    if causal or mask:
        return kernel.forward(q, repeat_heads(k, g), repeat_heads(v, g), scale, causal, **mask)
    out, lse = kernel.forward(fold(q, g), k, v, scale, False)
    return unfold(out, g), unfold(lse, g)


def backward(kernel, dout, q, k, v, out, lse, scale: float, causal: bool, **mask):
    """``kernel.backward`` for GQA shapes: dq [b, H, sq, d], dk/dv [b, Hkv, sk, d]."""
    g = q.shape[1] // k.shape[1]
    if causal or mask:
        dq, dk, dv = kernel.backward(dout, q, repeat_heads(k, g), repeat_heads(v, g), out, lse, scale, causal,
                                     **mask)
        return dq, sum_head_groups(dk, g), sum_head_groups(dv, g)
    dq, dk, dv = kernel.backward(fold(dout, g), fold(q, g), k, v, fold(out, g), fold(lse, g), scale, False)
    return unfold(dq, g), dk, dv
