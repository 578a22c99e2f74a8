"""torch's fused CPU flash-attention kernel (``aten._scaled_dot_product_flash_attention_for_cpu``).

Tiles queries and keys inside ATen, returns the log-sum-exp and takes it back in its backward op.
Its causal mask is top-left aligned (query i sees keys j <= i), so it only serves square causal
blocks: no prefix + diagonal in one call.
"""
from __future__ import annotations

import torch

from lss_plugin.kernels.base import Kernel, always_available

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def forward(q, k, v, scale: float, causal: bool):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.contiguous(), k.contiguous(), v.contiguous(), 0.0, causal, attn_mask=None, scale=scale
    )
    return out, lse  # [b, h, sq, d], [b, h, sq]


def backward(dout, q, k, v, out, lse, scale: float, causal: bool):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
        lse.contiguous(), 0.0, causal, attn_mask=None, scale=scale,
    )


def unsupported(q):
    if q.device.type != "cpu":
        return f"runs on CPU tensors only, got {q.device}"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} is not one of {DTYPES}"
    return None


KERNEL = Kernel(name="cpu_flash", forward=forward, backward=backward, unavailable=always_available,
                unsupported=unsupported, bottom_right_causal=False)
