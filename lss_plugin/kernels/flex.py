"""FlexAttention (``torch.nn.attention.flex_attention``) for bands and softcapping on CUDA.

The band becomes a ``BlockMask`` built from block arithmetic (``BlockMask.from_kv_blocks``: per
``BLOCK`` x ``BLOCK`` tile, skipped / partial / full, ``O(sq/BLOCK * sk/BLOCK)``, never the dense
``[sq, sk]`` mask) with a ``mask_mod`` for the partial tiles; softcapping is a ``score_mod``. The band
edges and the cap enter the mods as 0-d tensors, not Python constants, so a compiled flex_attention
is not recompiled for every block's band (block sizes: torch.compile's automatic dynamic shapes).
The log-sum-exp comes through ``return_aux=AuxRequest(lse=True)`` (natural log; FlexAttention's log2 statistics are
converted by torch). Rows without a visible key: out 0, lse -inf.

Backward. LSS's block backward needs the gradient of the whole row's loss restricted to the block,
``P = exp(S - lse_merged)``, ``delta = rowsum(dO * O_merged)``; FlexAttention's backward only knows
the block's own ``(out_b, lse_b)``. With ``w = exp(lse_b - lse_merged)`` per row,
``P_merged = w * P_b``, and autograd through the block's own forward with incoming gradients
``(w * dO)`` on ``out_b`` and ``w * (rowsum(dO * out_b) - delta)`` on ``lse_b`` gives exactly
``dS = w P_b (dO V^T - delta)`` (``d out_b / dS = P_b (v_j - out_b)``, ``d lse_b / dS = P_b``), and
``dV = (w P_b)^T dO``: the LSS gradients, softcap's chain rule included, for the price of one more
block forward (``grads_for_merged_rows``; no approximation, no internal FlexAttention API). Rows the
block does not reach (``lse_b = -inf``) get ``w = 0``.

torch 2.13 runs FlexAttention's forward on CPU (unfused, eager) but has no backward there, so the
kernel is CUDA-only; on CPU tests check the block mask, the mods and the forward against the math
kernel, and ``grads_for_merged_rows`` on a dense differentiable stand-in; ``make gpu-check`` runs it.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from lss_plugin.kernels.base import Kernel, compute_dtype, effective_band
from lss_plugin.masks import Band

BLOCK = 128  # FlexAttention's default tile, rows and keys
HALF = (torch.float16, torch.bfloat16)


def _flex():
    from torch.nn.attention import flex_attention as fa

    return fa


def band_mask_mod(lo: torch.Tensor, hi: torch.Tensor):
    """mask_mod: key ``k_idx`` visible to query ``q_idx`` iff ``lo <= k_idx - q_idx <= hi`` (0-d tensors)."""
    def mask_mod(b, h, q_idx, k_idx):
        offset = k_idx - q_idx
        return (offset >= lo) & (offset <= hi)
    return mask_mod


def softcap_score_mod(cap: torch.Tensor):
    """score_mod: ``cap * tanh(s / cap)`` on the scaled score (Gemma 2), ``cap`` a 0-d tensor."""
    def score_mod(score, b, h, q_idx, k_idx):
        return torch.tanh(score / cap) * cap
    return score_mod


def tile_kinds(band: Band, sq: int, sk: int, block: int, device=None):
    """(partial, full): [ceil(sq/block), ceil(sk/block)] bool, tiles crossing a band edge and tiles
    every pair of which is visible; the rest is skipped."""
    r0 = torch.arange(0, sq, block, device=device)
    c0 = torch.arange(0, sk, block, device=device)
    r1, c1 = (r0 + block).clamp(max=sq) - 1, (c0 + block).clamp(max=sk) - 1
    low = c0.unsqueeze(0) - r1.unsqueeze(1)  # smallest j - i in the tile
    high = c1.unsqueeze(0) - r0.unsqueeze(1)  # largest
    none = torch.zeros(low.shape, dtype=torch.bool, device=device)
    outside = ((high < band.lo) if band.lo is not None else none) | ((low > band.hi) if band.hi is not None else none)
    crossing = ((low < band.lo) if band.lo is not None else none) | ((high > band.hi) if band.hi is not None else none)
    return ~outside & crossing, ~outside & ~crossing


def _ordered(kinds: torch.Tensor):
    """(num_blocks [1, 1, nq], indices [1, 1, nq, nk]) of the True tiles per row of tiles, first."""
    num = kinds.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~kinds).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num[None, None], idx[None, None]


def block_mask(band: Band, sq: int, sk: int, device, block: int | None = None):
    """The ``BlockMask`` of ``band`` on an sq x sk block (band edges as 0-d tensors on ``device``)."""
    block = block or BLOCK
    span = sq + sk + 1  # an unbounded side: an edge no offset reaches
    lo = torch.tensor(-span if band.lo is None else band.lo, device=device)
    hi = torch.tensor(span if band.hi is None else band.hi, device=device)
    partial, full = tile_kinds(band, sq, sk, block, device)
    (num, idx), (full_num, full_idx) = _ordered(partial), _ordered(full)
    return _flex().BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=block,
                                            mask_mod=band_mask_mod(lo, hi), seq_lengths=(sq, sk))


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(_flex().flex_attention)  # automatic dynamic shapes after a first recompile


def _attend(q, k, v, scale, band: Band | None, softcap):
    """FlexAttention's own (out [b, H, sq, d], lse [b, H, sq]) of one block; differentiable on CUDA."""
    fa = _flex()
    sq, sk = q.shape[2], k.shape[2]
    mask = None if band is None else block_mask(band, sq, sk, q.device)
    score_mod = None if softcap is None else softcap_score_mod(torch.tensor(float(softcap), device=q.device))
    fn = _compiled() if q.device.type == "cuda" else fa.flex_attention  # CPU: eager, forward only (tests)
    out, aux = fn(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
                  return_aux=fa.AuxRequest(lse=True))
    return out, aux.lse.to(compute_dtype(q.dtype))


def forward(q, k, v, scale: float, causal: bool, band: Band | None = None, softcap: float | None = None):
    """q [b, H, sq, d], k/v [b, Hkv, sk, d] (GQA-native) -> out [b, H, sq, d] (input dtype), lse [b, H, sq]."""
    return _attend(q, k, v, scale, effective_band(q.shape[2], k.shape[2], causal, band), softcap)


def grads_for_merged_rows(out_b, lse_b, inputs, dout, out, lse):
    """dq, dk, dv for the merged rows ``(out, lse)`` through autograd of a block's own differentiable
    ``(out_b, lse_b)`` (module docstring: ``w = exp(lse_b - lse)``)."""
    acc = lse_b.dtype
    keyless = lse_b == float("-inf")
    w = torch.exp(lse_b.detach() - lse.to(acc)).masked_fill(keyless, 0.0)  # [b, h, sq]
    dout_c = dout.to(acc)
    delta = (dout_c * out.to(acc)).sum(-1)
    delta_b = (dout_c * out_b.detach().to(acc)).sum(-1)
    grad_out = (w.unsqueeze(-1) * dout_c).to(out_b.dtype)
    grad_lse = w * (delta_b - delta)
    return torch.autograd.grad((out_b, lse_b), inputs, (grad_out, grad_lse.to(lse_b.dtype)))


def backward(dout, q, k, v, out, lse, scale: float, causal: bool, band: Band | None = None,
             softcap: float | None = None):
    """dq [b, H, sq, d], dk/dv [b, Hkv, sk, d] (input dtype), given the merged out and lse."""
    inputs = tuple(t.detach().requires_grad_() for t in (q, k, v))
    with torch.enable_grad():
        out_b, lse_b = forward(*inputs, scale, causal, band, softcap)
    return grads_for_merged_rows(out_b, lse_b, inputs, dout, out, lse)


def unavailable() -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA device (torch 2.13 has no FlexAttention backward on CPU)"
    try:
        fa = _flex()
        fa.AuxRequest, fa.BlockMask.from_kv_blocks  # noqa: B018 - the API this module uses
    except (ImportError, AttributeError) as exc:
        return f"this torch has no usable FlexAttention ({exc})"
    return None


def unsupported(q) -> Optional[str]:
    d = q.shape[-1]
    if q.device.type != "cuda":
        return f"runs on CUDA tensors only, got {q.device}"
    if q.dtype not in (torch.float32, *HALF):
        return f"dtype {q.dtype} is not one of {(torch.float32, *HALF)}"
    if d % 8 or d > 256:
        return f"head dim {d} is not a multiple of 8 up to 256"
    return None


# After the fused kernels in the automatic order: for causal / full calls sdpa_efficient takes every
# input flex does, so flex only ever serves bands and softcapping.
KERNEL = Kernel(name="flex", forward=forward, backward=backward, unavailable=unavailable, unsupported=unsupported,
                bottom_right_causal=True, gqa_native=True, takes_band=True, takes_softcap=True)
