"""torch's fused CPU flash-attention kernel (``aten._scaled_dot_product_flash_attention_for_cpu``).

Tiles queries and keys inside ATen, returns the log-sum-exp and takes it back in its backward op.
It is GQA-native (k, v with Hkv heads dividing H; dk, dv summed over each group inside the op).
Its own causal flag is top-left aligned (query i sees keys j <= i): it serves square causal blocks.
A causal block with fewer queries than keys (a query chunk's prefix and diagonal together) gets an
explicit additive bottom-right mask instead, so a chunk is one call and its out is rounded once.
The mask is ``[rows, sk]`` in the compute dtype; queries go in slices of at most ``MASK_ELEMENTS``
mask entries (each slice's rows are complete: no merge; dk, dv of the slices are summed).
An explicit band (windows) goes the same way, as an additive mask of the band; rows that see no key
(the op returns out 0, lse 0 for them) are set to lse -inf. No softcapping: the op has no score hook.

Backward of float16/bfloat16 inputs runs the op in float32 (``fp32_grads``): its half version
accumulates dk, dv in the input dtype over its own query blocks, whose size depends on the number
of queries per call, so an LSS query chunk (fewer queries than the whole sequence) would round
more often than single-device SDPA. The float32 op rounds nothing before LSS's one rounding.
Cost (this 2-core AVX512-BF16 host, one thread, 8/2 heads, 512 x 1024, d = 64, forward +
backward): float32 0.35 s, bfloat16 0.11 s, float16 0.60 s; the float32 backward makes bfloat16
slower and float16 faster.
"""
from __future__ import annotations

import torch

from lss_plugin.kernels.base import Kernel, always_available, compute_dtype, effective_band, keyless_rows_to_inf
from lss_plugin.masks import Band

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
MASK_ELEMENTS = 1 << 24  # bottom-right mask entries per call: 64 MiB in float32

_forward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_backward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _row_slices(sq: int, sk: int):
    """Query row ranges of the masked calls: [rows, sk] masks of at most MASK_ELEMENTS entries."""
    rows = max(1, MASK_ELEMENTS // sk)
    return [range(r0, min(r0 + rows, sq)) for r0 in range(0, sq, rows)]


def _band_mask(rows: range, sk: int, band: Band, dtype, device) -> torch.Tensor:
    """[len(rows), sk] additive mask: -inf where key j is hidden from query i (bottom-right causal:
    the band ``j - i <= sk - sq``)."""
    hidden = band.hidden(rows, range(sk), device)
    return torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))


def forward(q, k, v, scale: float, causal: bool, band: Band | None = None):
    """q [b, H, sq, d], k/v [b, Hkv, sk, d] -> out [b, H, sq, d], lse [b, H, sq] (compute dtype)."""
    q, k, v = (t.to(compute_dtype(t.dtype)).contiguous() for t in (q, k, v))
    sq, sk = q.shape[2], k.shape[2]
    mask_band = effective_band(sq, sk, causal, band)
    if mask_band is None or (band is None and sq == sk):  # full, or square causal: the op's own flag
        return _forward_op(q, k, v, 0.0, causal, attn_mask=None, scale=scale)
    outs, lses = [], []
    for rows in _row_slices(sq, sk):
        mask = _band_mask(rows, sk, mask_band, compute_dtype(q.dtype), q.device)
        o, lse = _forward_op(q[:, :, rows.start:rows.stop], k, v, 0.0, False, attn_mask=mask, scale=scale)
        outs.append(o)
        lses.append(lse)
    out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
    seen = mask_band.rows_with_keys(sq, sk)
    if len(seen) < sq:  # the op gives keyless rows lse 0 (and out 0): the contract is -inf
        keyless = torch.ones(sq, dtype=torch.bool, device=q.device)
        keyless[seen.start:seen.stop] = False
        lse = lse.masked_fill(keyless, float("-inf"))
    return out, lse


def backward(dout, q, k, v, out, lse, scale: float, causal: bool, band: Band | None = None):
    """dq [b, H, sq, d], dk/dv [b, Hkv, sk, d] in the compute dtype (float32 for half inputs)."""
    ct = compute_dtype(q.dtype)
    dout, q, k, v, out = (t.to(ct).contiguous() for t in (dout, q, k, v, out))
    lse = keyless_rows_to_inf(lse.to(ct)).contiguous()
    sq, sk = q.shape[2], k.shape[2]
    mask_band = effective_band(sq, sk, causal, band)
    if mask_band is None or (band is None and sq == sk):
        return _backward_op(dout, q, k, v, out, lse, 0.0, causal, attn_mask=None, scale=scale)
    dqs, dk, dv = [], 0, 0
    for rows in _row_slices(sq, sk):
        r = slice(rows.start, rows.stop)
        mask = _band_mask(rows, sk, mask_band, ct, q.device)
        dq_s, dk_s, dv_s = _backward_op(dout[:, :, r], q[:, :, r], k, v, out[:, :, r], lse[:, :, r], 0.0, False,
                                        attn_mask=mask, scale=scale)
        dqs.append(dq_s)
        dk, dv = dk + dk_s, dv + dv_s
    return torch.cat(dqs, dim=2), dk, dv


def unsupported(q):
    if q.device.type != "cpu":
        return f"runs on CPU tensors only, got {q.device}"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} is not one of {DTYPES}"
    return None


KERNEL = Kernel(name="cpu_flash", forward=forward, backward=backward, unavailable=always_available,
                unsupported=unsupported, bottom_right_causal=True, gqa_native=True, fp32_out=True,
                fp32_grads=True, takes_band=True)
