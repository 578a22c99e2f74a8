"""The portable kernel: online softmax over tiles, never more than one tile of scores alive.

Queries and keys are cut into tiles of at most ``TILE_ELEMENTS`` scores over all batch rows and
heads together (``b * h * query_tile * key_tile``); the forward keeps a running row maximum, row sum
and an output accumulator (flash attention's online log-sum-exp), the backward recomputes each
tile's probabilities from the merged ``out`` and ``lse`` (``P = exp(S - lse)``, ``delta =
rowsum(dO * O)``) and accumulates dq, dk, dv. Memory per call: the accumulators, ``O(b*h*(sq+sk)*d)``
in the compute dtype, plus a few tiles of ``TILE_ELEMENTS``; never ``[b, h, sq, sk]``.
Exact in float64; for float16/bfloat16 inputs scores, statistics and accumulators are float32 and
out, dq, dk, dv are returned in float32 (``fp32_out``, ``fp32_grads``: the caller rounds once,
after its merges and sums). Tiles fully hidden by the causal mask or outside an explicit band (on
either side) are skipped, never visited; only tiles crossing a band edge build a mask. Softcapping
caps each tile's scores before its mask. Any device, any floating dtype, bottom-right causal
alignment. GQA-native: the g query heads of a KV head are folded into one query tile of g * rows
rows (``kernels.gqa.fold``; the mask repeats per group), so K, V are never repeated and dk, dv sum
the group in the matmul.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lss_plugin.kernels.base import Kernel, always_available, compute_dtype, effective_band, keyless_rows_to_inf
from lss_plugin.kernels.gqa import fold, unfold
from lss_plugin.masks import Band, softcap_grad

TILE_ELEMENTS = 1 << 22  # scores per tile over batch and heads: 16 MiB in float32
KEY_TILE = 512  # keys per tile (fewer when batch * heads * KEY_TILE exceeds TILE_ELEMENTS)


@dataclass(frozen=True)
class Tile:
    rows: range  # query positions
    cols: range  # key positions
    masked: bool  # crosses a band edge (the causal diagonal): needs a mask


def plan_tiles(batch_heads: int, sq: int, sk: int, causal: bool, band: Band | None = None) -> list[list[Tile]]:
    """Tiles per query tile (outer list), in key order; ``batch_heads * rows * cols <= TILE_ELEMENTS``
    whenever ``batch_heads <= TILE_ELEMENTS``. Causal alignment is bottom-right (offset sk - sq),
    intersected with ``band`` (block-local ``j - i``). Key tiles outside every row's band are never
    visited; query tiles whose rows see no key have no entry (their rows: out 0, lse -inf)."""
    tile_elements, key_tile = TILE_ELEMENTS, KEY_TILE  # read at call time: tests shrink them
    cols_per_tile = max(1, min(key_tile, sk, tile_elements // batch_heads))
    rows_per_tile = max(1, min(sq, tile_elements // (batch_heads * cols_per_tile)))
    band = effective_band(sq, sk, causal, band) or Band()
    if band.lo is not None and band.hi is not None and band.lo > band.hi:
        return []  # no pair at all (e.g. causal with more queries than a window reaches)
    plan = []
    for r0 in range(0, sq, rows_per_tile):
        rows = range(r0, min(r0 + rows_per_tile, sq))
        # keys some row of the tile sees: [rows.start + lo, rows[-1] + hi]; the key tiles (on the grid)
        # meeting that range each hold a visible pair, the others are never visited
        first = 0 if band.lo is None else max(0, rows.start + band.lo)
        stop = sk if band.hi is None else min(sk, rows[-1] + band.hi + 1)
        row_tiles = []
        for c0 in range(first - first % cols_per_tile, stop, cols_per_tile):
            cols = range(c0, min(c0 + cols_per_tile, sk))
            low, high = cols.start - rows[-1], cols[-1] - rows.start  # the tile's extreme offsets j - i
            masked = (band.lo is not None and low < band.lo) or (band.hi is not None and high > band.hi)
            row_tiles.append(Tile(rows, cols, masked=masked))
        if row_tiles:
            plan.append(row_tiles)
    return plan


def _tile_scores(q_t, k_t, tile: Tile, scale, band, g, softcap=None, with_grad=False):
    """[b, hkv, g*rows, cols] scores of one tile (q_t folded, q_t and k_t in the compute dtype),
    capped, hidden entries -inf; and (``with_grad``) d capped / d scores (1 without softcap)."""
    s = torch.matmul(q_t, k_t.transpose(-1, -2)).mul_(scale)
    if softcap is not None:
        s.div_(softcap).tanh_().mul_(softcap)
    cap_grad = softcap_grad(s, softcap) if with_grad else None  # before -inf enters
    if tile.masked:
        s.masked_fill_(band.hidden(tile.rows, tile.cols, s.device).repeat(g, 1), float("-inf"))
    return s, cap_grad


def forward(q, k, v, scale: float, causal: bool, band: Band | None = None, softcap: float | None = None):
    """q [b, H, sq, d], k/v [b, Hkv, sk, d] -> out [b, H, sq, d] and lse [b, H, sq], compute dtype;
    rows without a visible key: out 0, lse -inf."""
    b, h, sq, d = q.shape
    sk, g = k.shape[2], h // k.shape[1]
    ct = compute_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=ct, device=q.device)
    lse = torch.full((b, h, sq), float("-inf"), dtype=ct, device=q.device)
    mask_band = effective_band(sq, sk, causal, band)
    for row_tiles in plan_tiles(b * h, sq, sk, causal, band):
        rows = slice(row_tiles[0].rows.start, row_tiles[0].rows.stop)
        q_t = fold(q[:, :, rows].to(ct), g)  # [b, hkv, g*n, d]
        acc = torch.zeros((*q_t.shape[:3], v.shape[3]), dtype=ct, device=q.device)
        row_max = torch.full(q_t.shape[:3], float("-inf"), dtype=ct, device=q.device)
        row_sum = torch.zeros_like(row_max)
        for tile in row_tiles:
            cols = slice(tile.cols.start, tile.cols.stop)
            s, _ = _tile_scores(q_t, k[:, :, cols].to(ct), tile, scale, mask_band, g, softcap)
            new_max = torch.maximum(row_max, s.amax(-1))
            shift = new_max.masked_fill(new_max == float("-inf"), 0.0)  # rows with nothing visible yet
            p = s.sub_(shift.unsqueeze(-1)).exp_()
            rescale = torch.exp(row_max - shift)
            row_sum.mul_(rescale).add_(p.sum(-1))
            acc.mul_(rescale.unsqueeze(-1)).add_(torch.matmul(p, v[:, :, cols].to(ct)))
            row_max = new_max
            del s, p
        out[:, :, rows] = unfold(acc / row_sum.masked_fill(row_sum == 0, 1.0).unsqueeze(-1), g)  # keyless rows: 0
        lse[:, :, rows] = unfold(row_max + torch.log(row_sum), g)
    return out, lse


def backward(dout, q, k, v, out, lse, scale: float, causal: bool, band: Band | None = None,
             softcap: float | None = None):
    """dq [b, H, sq, d], dk/dv [b, Hkv, sk, d] in the compute dtype."""
    b, h, sq, d = q.shape
    sk, g = k.shape[2], h // k.shape[1]
    ct = compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=ct, device=q.device)  # rows of query tiles without a key stay 0
    dk = torch.zeros(k.shape, dtype=ct, device=k.device)  # accumulated over query tiles
    dv = torch.zeros(v.shape, dtype=ct, device=v.device)
    mask_band = effective_band(sq, sk, causal, band)
    for row_tiles in plan_tiles(b * h, sq, sk, causal, band):
        rows = slice(row_tiles[0].rows.start, row_tiles[0].rows.stop)
        q_t, do_t = fold(q[:, :, rows].to(ct), g), fold(dout[:, :, rows].to(ct), g)  # [b, hkv, g*n, d]
        lse_t = keyless_rows_to_inf(fold(lse[:, :, rows].to(ct), g)).unsqueeze(-1)
        delta = (do_t * fold(out[:, :, rows].to(ct), g)).sum(-1, keepdim=True)  # rowsum(dO * O)
        dq_t = torch.zeros_like(q_t)
        for tile in row_tiles:
            cols = slice(tile.cols.start, tile.cols.stop)
            k_t, v_t = k[:, :, cols].to(ct), v[:, :, cols].to(ct)
            s, cap_grad = _tile_scores(q_t, k_t, tile, scale, mask_band, g, softcap, with_grad=True)
            p = s.sub_(lse_t).exp_()  # [b, hkv, g*rows, cols]
            dv[:, :, cols] += torch.matmul(p.transpose(-1, -2), do_t)
            ds = torch.matmul(do_t, v_t.transpose(-1, -2)).sub_(delta).mul_(p).mul_(scale)
            if softcap is not None:
                ds.mul_(cap_grad)
            del p, s, cap_grad
            dq_t += torch.matmul(ds, k_t)
            dk[:, :, cols] += torch.matmul(ds.transpose(-1, -2), q_t)
            del ds
        dq[:, :, rows] = unfold(dq_t, g)
    return dq, dk, dv


def unsupported(q):
    if not q.dtype.is_floating_point:
        return f"needs a floating-point dtype, got {q.dtype}"
    return None


KERNEL = Kernel(name="tiled", forward=forward, backward=backward, unavailable=always_available,
                unsupported=unsupported, bottom_right_causal=True, gqa_native=True, fp32_out=True,
                fp32_grads=True, takes_band=True, takes_softcap=True)
