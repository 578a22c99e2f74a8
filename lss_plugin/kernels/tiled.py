"""The portable kernel: online softmax over tiles, never more than one tile of scores alive.

Queries and keys are cut into tiles of at most ``TILE_ELEMENTS`` scores over all batch rows and
heads together (``b * h * query_tile * key_tile``); the forward keeps a running row maximum, row sum
and an output accumulator (flash attention's online log-sum-exp), the backward recomputes each
tile's probabilities from the merged ``out`` and ``lse`` (``P = exp(S - lse)``, ``delta =
rowsum(dO * O)``) and accumulates dq, dk, dv. Memory per call: the accumulators, ``O(b*h*(sq+sk)*d)``
in the compute dtype, plus a few tiles of ``TILE_ELEMENTS``; never ``[b, h, sq, sk]``.
Exact in float64; for float16/bfloat16 inputs scores, statistics and accumulators are float32 and
out, dq, dk, dv are returned in float32 (``fp32_out``, ``fp32_grads``: the caller rounds once,
after its merges and sums). Tiles fully hidden by the causal mask are skipped; only tiles crossing the diagonal build a
mask. Any device, any floating dtype, bottom-right causal alignment. GQA-native: the g query heads
of a KV head are folded into one query tile of g * rows rows (``kernels.gqa.fold``; the causal mask
repeats per group), so K, V are never repeated and dk, dv sum the group in the matmul.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lss_plugin.kernels.base import Kernel, always_available, causal_hidden, compute_dtype
from lss_plugin.kernels.gqa import fold, unfold

TILE_ELEMENTS = 1 << 22  # scores per tile over batch and heads: 16 MiB in float32
KEY_TILE = 512  # keys per tile (fewer when batch * heads * KEY_TILE exceeds TILE_ELEMENTS)


@dataclass(frozen=True)
class Tile:
    rows: range  # query positions
    cols: range  # key positions
    masked: bool  # crosses the causal diagonal: needs a mask


def plan_tiles(batch_heads: int, sq: int, sk: int, causal: bool) -> list[list[Tile]]:
    """Tiles per query tile (outer list), in key order; ``batch_heads * rows * cols <= TILE_ELEMENTS``
    whenever ``batch_heads <= TILE_ELEMENTS``. Causal alignment is bottom-right (offset sk - sq)."""
    tile_elements, key_tile = TILE_ELEMENTS, KEY_TILE  # read at call time: tests shrink them
    cols_per_tile = max(1, min(key_tile, sk, tile_elements // batch_heads))
    rows_per_tile = max(1, min(sq, tile_elements // (batch_heads * cols_per_tile)))
    offset = sk - sq
    plan = []
    for r0 in range(0, sq, rows_per_tile):
        rows = range(r0, min(r0 + rows_per_tile, sq))
        row_tiles = []
        for c0 in range(0, sk, cols_per_tile):
            cols = range(c0, min(c0 + cols_per_tile, sk))
            if causal and cols.start > rows[-1] + offset:
                break  # this and every later key tile is hidden from every row
            row_tiles.append(Tile(rows, cols, masked=causal and cols[-1] > rows.start + offset))
        plan.append(row_tiles)
    return plan


def _tile_scores(q_t, k_t, tile: Tile, scale, offset, g):
    """[b, hkv, g*rows, cols] scores of one tile (q_t folded, q_t and k_t in the compute dtype),
    hidden entries -inf."""
    s = torch.matmul(q_t, k_t.transpose(-1, -2)).mul_(scale)
    if tile.masked:
        s.masked_fill_(causal_hidden(tile.rows, tile.cols, offset, s.device).repeat(g, 1), float("-inf"))
    return s


def forward(q, k, v, scale: float, causal: bool):
    """q [b, H, sq, d], k/v [b, Hkv, sk, d] -> out [b, H, sq, d] and lse [b, H, sq], compute dtype."""
    b, h, sq, d = q.shape
    sk, g = k.shape[2], h // k.shape[1]
    ct = compute_dtype(q.dtype)
    out = torch.empty(q.shape, dtype=ct, device=q.device)
    lse = torch.empty((b, h, sq), dtype=ct, device=q.device)
    for row_tiles in plan_tiles(b * h, sq, sk, causal):
        rows = slice(row_tiles[0].rows.start, row_tiles[0].rows.stop)
        q_t = fold(q[:, :, rows].to(ct), g)  # [b, hkv, g*n, d]
        acc = torch.zeros((*q_t.shape[:3], v.shape[3]), dtype=ct, device=q.device)
        row_max = torch.full(q_t.shape[:3], float("-inf"), dtype=ct, device=q.device)
        row_sum = torch.zeros_like(row_max)
        for tile in row_tiles:
            cols = slice(tile.cols.start, tile.cols.stop)
            s = _tile_scores(q_t, k[:, :, cols].to(ct), tile, scale, sk - sq, g)
            new_max = torch.maximum(row_max, s.amax(-1))
            shift = new_max.masked_fill(new_max == float("-inf"), 0.0)  # rows with nothing visible yet
            p = s.sub_(shift.unsqueeze(-1)).exp_()
            rescale = torch.exp(row_max - shift)
            row_sum.mul_(rescale).add_(p.sum(-1))
            acc.mul_(rescale.unsqueeze(-1)).add_(torch.matmul(p, v[:, :, cols].to(ct)))
            row_max = new_max
            del s, p
        out[:, :, rows] = unfold(acc / row_sum.unsqueeze(-1), g)
        lse[:, :, rows] = unfold(row_max + torch.log(row_sum), g)
    return out, lse


def backward(dout, q, k, v, out, lse, scale: float, causal: bool):
    """dq [b, H, sq, d], dk/dv [b, Hkv, sk, d] in the compute dtype."""
    b, h, sq, d = q.shape
    sk, g = k.shape[2], h // k.shape[1]
    ct = compute_dtype(q.dtype)
    dq = torch.empty(q.shape, dtype=ct, device=q.device)
    dk = torch.zeros(k.shape, dtype=ct, device=k.device)  # accumulated over query tiles
    dv = torch.zeros(v.shape, dtype=ct, device=v.device)
    for row_tiles in plan_tiles(b * h, sq, sk, causal):
        rows = slice(row_tiles[0].rows.start, row_tiles[0].rows.stop)
        q_t, do_t = fold(q[:, :, rows].to(ct), g), fold(dout[:, :, rows].to(ct), g)  # [b, hkv, g*n, d]
        lse_t = fold(lse[:, :, rows].to(ct), g).unsqueeze(-1)
        delta = (do_t * fold(out[:, :, rows].to(ct), g)).sum(-1, keepdim=True)  # rowsum(dO * O)
        dq_t = torch.zeros_like(q_t)
        for tile in row_tiles:
            cols = slice(tile.cols.start, tile.cols.stop)
            k_t, v_t = k[:, :, cols].to(ct), v[:, :, cols].to(ct)
            p = _tile_scores(q_t, k_t, tile, scale, sk - sq, g).sub_(lse_t).exp_()  # [b, hkv, g*rows, cols]
            dv[:, :, cols] += torch.matmul(p.transpose(-1, -2), do_t)
            ds = torch.matmul(do_t, v_t.transpose(-1, -2)).sub_(delta).mul_(p).mul_(scale)
            del p
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
                fp32_grads=True)
