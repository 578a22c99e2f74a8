"""Block attention kernels that also return the log-sum-exp, and their backward.

LSS attends local queries to key blocks and merges the blocks by log-sum-exp (as flash and ring
attention do), so a kernel must expose ``lse``; the backward recomputes probabilities from the
*merged* ``out`` and ``lse``, which makes block-wise gradients exact.

Tensors are ``[b, h, s, d]``; ``lse`` is ``[b, h, s]``. With ``causal=True`` the key block and the
query block cover the same positions (the diagonal block), so the mask is the plain lower triangle.

Backends: torch's fused CPU flash kernel on CPU tensors; a pure-torch "math" kernel elsewhere
(materialises one block's scores; exact, any device and dtype). ``LSS_ATTENTION_KERNEL=math``
forces the math kernel, which tests use to check the two against each other.
"""
from __future__ import annotations

import os

import torch

_CPU_FLASH_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def kernel_name(q: torch.Tensor) -> str:
    forced = os.environ.get("LSS_ATTENTION_KERNEL")
    if forced:
        if forced not in ("math", "cpu_flash"):
            raise ValueError(f"LSS_ATTENTION_KERNEL must be 'math' or 'cpu_flash', got {forced!r}")
        return forced
    if q.device.type == "cpu" and q.dtype in _CPU_FLASH_DTYPES:
        return "cpu_flash"
    return "math"


def block_forward(q, k, v, scale: float, causal: bool):
    """out [b, h, sq, d], lse [b, h, sq] of softmax(q k^T * scale [+ causal mask]) v."""
    if kernel_name(q) == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.contiguous(), k.contiguous(), v.contiguous(), 0.0, causal, attn_mask=None, scale=scale
        )
        return out, lse
    return _math_forward(q, k, v, scale, causal)


def block_backward(dout, q, k, v, out, lse, scale: float, causal: bool):
    """dq, dk, dv of one block, given the merged ``out`` and ``lse`` of the whole attention row."""
    if kernel_name(q) == "cpu_flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
            lse.contiguous(), 0.0, causal, attn_mask=None, scale=scale,
        )
    return _math_backward(dout, q, k, v, out, lse, scale, causal)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _scores(q, k, scale, causal):
    ct = _compute_dtype(q.dtype)
    scores = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale  # [b, h, sq, sk]
    if causal:
        sq, sk = scores.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu_(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores


def _math_forward(q, k, v, scale, causal):
    scores = _scores(q, k, scale, causal)
    lse = torch.logsumexp(scores, dim=-1)  # [b, h, sq]
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.matmul(probs, v.to(probs.dtype)).to(q.dtype)
    return out, lse


def _math_backward(dout, q, k, v, out, lse, scale, causal):
    ct = _compute_dtype(q.dtype)
    probs = torch.exp(_scores(q, k, scale, causal) - lse.to(ct).unsqueeze(-1))  # [b, h, sq, sk]
    dout_c = dout.to(ct)
    dv = torch.matmul(probs.transpose(-1, -2), dout_c)
    dprobs = torch.matmul(dout_c, v.to(ct).transpose(-1, -2))
    delta = (dout_c * out.to(ct)).sum(-1, keepdim=True)  # rowsum(dO * O), as in flash attention
    dscores = probs * (dprobs - delta) * scale
    dq = torch.matmul(dscores, k.to(ct))
    dk = torch.matmul(dscores.transpose(-1, -2), q.to(ct))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
