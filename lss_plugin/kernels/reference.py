"""The reference kernel: one block's whole score matrix ``[b, h, sq, sk]`` in the compute dtype.

Exact on any device and dtype, and the simplest thing that can be right, so every other backend
is tested against it in float64. Memory: about four ``[b, h, sq, sk]`` tensors alive in backward
(8.4 GiB for one 8192-token causal block with 8 heads in float32); never chosen automatically.
GQA by repeating K, V per query head (dk, dv summed back); results in the compute dtype.
Takes an explicit band and softcapping (scores, cap and softmax in the compute dtype).
"""
from __future__ import annotations

import torch

from lss_plugin.kernels.base import (
    Kernel, always_available, causal_hidden, compute_dtype, effective_band, keyless_rows_to_inf,
)
from lss_plugin.kernels.gqa import repeat_heads, sum_head_groups
from lss_plugin.masks import Band, softcap_grad, softcap_scores


def _scores(q, k, scale, causal, band=None, softcap=None):
    """Masked (capped) scores [b, h, sq, sk] and d capped / d scores (1 without softcap)."""
    ct = compute_dtype(q.dtype)
    scores = softcap_scores(torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale, softcap)  # [b, h, sq, sk]
    cap_grad = softcap_grad(scores, softcap)  # from the capped scores, before -inf enters
    sq, sk = scores.shape[-2:]
    if band is None:  # causal / full exactly as before bands existed
        if causal:
            scores = scores.masked_fill(causal_hidden(range(sq), range(sk), sk - sq, q.device), float("-inf"))
        return scores, cap_grad
    eff = effective_band(sq, sk, causal, band)
    if eff is not None:
        scores = scores.masked_fill(eff.hidden(range(sq), range(sk), q.device), float("-inf"))
    return scores, cap_grad


def forward(q, k, v, scale: float, causal: bool, band: Band | None = None, softcap: float | None = None):
    """q [b, H, sq, d], k/v [b, Hkv, sk, d] -> out [b, H, sq, d], lse [b, H, sq] (compute dtype);
    rows without a visible key: out 0, lse -inf."""
    g = q.shape[1] // k.shape[1]
    k, v = repeat_heads(k, g), repeat_heads(v, g)
    scores, _ = _scores(q, k, scale, causal, band, softcap)
    lse = torch.logsumexp(scores, dim=-1)  # [b, h, sq]
    probs = torch.exp(scores - keyless_rows_to_inf(lse).unsqueeze(-1))
    out = torch.matmul(probs, v.to(probs.dtype))
    return out, lse


def backward(dout, q, k, v, out, lse, scale: float, causal: bool, band: Band | None = None,
             softcap: float | None = None):
    """dq [b, H, sq, d], dk/dv [b, Hkv, sk, d] in the compute dtype."""
    ct = compute_dtype(q.dtype)
    g = q.shape[1] // k.shape[1]
    k, v = repeat_heads(k, g), repeat_heads(v, g)
    scores, cap_grad = _scores(q, k, scale, causal, band, softcap)
    probs = torch.exp(scores - keyless_rows_to_inf(lse.to(ct)).unsqueeze(-1))  # [b, h, sq, sk]
    dout_c = dout.to(ct)
    dv = torch.matmul(probs.transpose(-1, -2), dout_c)
    dprobs = torch.matmul(dout_c, v.to(ct).transpose(-1, -2))
    delta = (dout_c * out.to(ct)).sum(-1, keepdim=True)  # rowsum(dO * O), as in flash attention
    dscores = probs * (dprobs - delta) * cap_grad * scale
    dq = torch.matmul(dscores, k.to(ct))
    dk = torch.matmul(dscores.transpose(-1, -2), q.to(ct))
    return dq, sum_head_groups(dk, g), sum_head_groups(dv, g)


def _any_input(q) -> None:
    return None


KERNEL = Kernel(name="math", forward=forward, backward=backward, unavailable=always_available,
                unsupported=_any_input, bottom_right_causal=True, gqa_native=True, fp32_out=True,
                fp32_grads=True, auto=False, takes_band=True, takes_softcap=True)
