"""The reference kernel: one block's whole score matrix ``[b, h, sq, sk]`` in the compute dtype.

Exact on any device and dtype, and the simplest thing that can be right, so every other backend
is tested against it in float64. Memory: about four ``[b, h, sq, sk]`` tensors alive in backward
(8.4 GiB for one 8192-token causal block with 8 heads in float32); never chosen automatically.
GQA by repeating K, V per query head (dk, dv summed back); results in the compute dtype.
"""
from __future__ import annotations

import torch

from lss_plugin.kernels.base import Kernel, always_available, causal_hidden, compute_dtype
from lss_plugin.kernels.gqa import repeat_heads, sum_head_groups


def _scores(q, k, scale, causal):
    ct = compute_dtype(q.dtype)
    scores = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale  # [b, h, sq, sk]
    if causal:
        sq, sk = scores.shape[-2:]
        scores = scores.masked_fill(causal_hidden(range(sq), range(sk), sk - sq, q.device), float("-inf"))
    return scores


def forward(q, k, v, scale: float, causal: bool):
    """q [b, H, sq, d], k/v [b, Hkv, sk, d] -> out [b, H, sq, d], lse [b, H, sq] (compute dtype)."""
    g = q.shape[1] // k.shape[1]
    k, v = repeat_heads(k, g), repeat_heads(v, g)
    scores = _scores(q, k, scale, causal)
    lse = torch.logsumexp(scores, dim=-1)  # [b, h, sq]
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.matmul(probs, v.to(probs.dtype))
    return out, lse


def backward(dout, q, k, v, out, lse, scale: float, causal: bool):
    """dq [b, H, sq, d], dk/dv [b, Hkv, sk, d] in the compute dtype."""
    ct = compute_dtype(q.dtype)
    g = q.shape[1] // k.shape[1]
    k, v = repeat_heads(k, g), repeat_heads(v, g)
    probs = torch.exp(_scores(q, k, scale, causal) - lse.to(ct).unsqueeze(-1))  # [b, h, sq, sk]
    dout_c = dout.to(ct)
    dv = torch.matmul(probs.transpose(-1, -2), dout_c)
    dprobs = torch.matmul(dout_c, v.to(ct).transpose(-1, -2))
    delta = (dout_c * out.to(ct)).sum(-1, keepdim=True)  # rowsum(dO * O), as in flash attention
    dscores = probs * (dprobs - delta) * scale
    dq = torch.matmul(dscores, k.to(ct))
    dk = torch.matmul(dscores.transpose(-1, -2), q.to(ct))
    return dq, sum_head_groups(dk, g), sum_head_groups(dv, g)


def _any_input(q) -> None:
    return None


KERNEL = Kernel(name="math", forward=forward, backward=backward, unavailable=always_available,
                unsupported=_any_input, bottom_right_causal=True, gqa_native=True, fp32_out=True,
                fp32_grads=True, auto=False)
