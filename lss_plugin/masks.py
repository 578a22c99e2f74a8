"""Masks in global positions: causal, sliding windows, chunked attention; and attention sinks.

A mask decides, for a query at global position ``q`` and a key at global position ``k`` of the same
document, whether the pair is computed:

- causal: ``k <= q``;
- window ``(left, right)``: ``q - left <= k <= q + right``. transformers' ``sliding_window = W`` keeps W
  keys including the current one, i.e. ``(W - 1, 0)`` (flash-attn ``window_size=(W - 1, 0)``);
  megatron-core's ``window_size`` is ``(left, right)`` as here;
- chunked ``C``: ``k // C == q // C`` (Llama 4's ``attention_chunk_size``): attention stays inside the
  C-aligned chunks of *global* positions.

Causal and windows are both a band on the offset ``k - q`` (``Band``); documents and chunks are both a
partition of positions, so chunked attention is packed documents with more boundaries
(``refine_bounds``). A mask is therefore (boundaries) x (a band), and a block of queries against keys
needs only the band, shifted to the block's start positions, never a dense mask.

Sinks (gpt-oss ``s_aux``) add one logit per head to every row's softmax denominator and carry no value.
They need no kernel: with the merged row log-sum-exp ``lse`` and the head's sink ``s``,
``lse' = logaddexp(lse, s)`` and ``out' = out * exp(lse - lse')``; every block's backward then runs
unchanged on ``(out', lse')``, and the sink's gradient is ``-sum_rows exp(s - lse') <dout, out'>``.

Pure index arithmetic and small tensor functions: no collectives, no kernel choice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Band:
    """Keys at offsets ``k - q`` in ``[lo, hi]``; ``None`` = unbounded on that side."""

    lo: int | None = None
    hi: int | None = None

    @property
    def unbounded(self) -> bool:
        return self.lo is None and self.hi is None

    def shifted(self, q_start: int, k_start: int) -> "Band":
        """The band in block-local indices: local key j is visible to local query i iff
        ``lo <= j - i <= hi`` of the result (global k - q = (k_start + j) - (q_start + i))."""
        d = q_start - k_start
        return Band(None if self.lo is None else self.lo + d, None if self.hi is None else self.hi + d)

    def intersect(self, other: "Band") -> "Band":
        """Pairs both bands keep."""
        los = [x for x in (self.lo, other.lo) if x is not None]
        his = [x for x in (self.hi, other.hi) if x is not None]
        return Band(max(los) if los else None, min(his) if his else None)

    def rows_with_keys(self, sq: int, sk: int) -> range:
        """Local queries of an ``sq x sk`` block that see at least one key (the others are a prefix
        ``i < -hi`` and a suffix ``i > sk - 1 - lo``; none when ``lo > hi``)."""
        if sk == 0 or (self.lo is not None and self.hi is not None and self.lo > self.hi):
            return range(0)
        start = 0 if self.hi is None else min(sq, max(0, -self.hi))
        stop = sq if self.lo is None else max(start, min(sq, sk - self.lo))
        return range(start, stop)

    def keys_seen(self, sq: int, sk: int) -> range:
        """Local keys of an ``sq x sk`` block that at least one query sees."""
        if not self.rows_with_keys(sq, sk):
            return range(0)
        start = 0 if self.lo is None else min(sk, max(0, self.lo))
        stop = sk if self.hi is None else max(start, min(sk, sq + self.hi))
        return range(start, stop)

    def hidden(self, rows: range, cols: range, device=None) -> torch.Tensor:
        """[len(rows), len(cols)] bool, True where local key j is hidden from local query i."""
        offset = (torch.arange(cols.start, cols.stop, device=device).unsqueeze(0)
                  - torch.arange(rows.start, rows.stop, device=device).unsqueeze(1))  # j - i
        hidden = torch.zeros(offset.shape, dtype=torch.bool, device=device)
        if self.lo is not None:
            hidden |= offset < self.lo
        if self.hi is not None:
            hidden |= offset > self.hi
        return hidden


@dataclass(frozen=True)
class MaskSpec:
    """What a layer's attention masks, besides documents. See the module docstring for semantics."""

    causal: bool = True
    window: tuple[int, int] | None = None  # (left, right) keys around the query
    chunk: int | None = None  # C-aligned chunks of global positions

    def __post_init__(self) -> None:
        if self.window is not None:
            w = self.window
            if (not isinstance(w, tuple) or len(w) != 2
                    or any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in w)):
                raise ValueError(f"window must be a (left, right) pair of non-negative integers, got {w!r}")
        if self.chunk is not None and (not isinstance(self.chunk, int) or isinstance(self.chunk, bool)
                                       or self.chunk < 1):
            raise ValueError(f"chunk must be a positive integer (C-aligned chunks of positions), got {self.chunk!r}")

    @classmethod
    def sliding(cls, window: int, causal: bool = True, chunk: int | None = None) -> "MaskSpec":
        """transformers' ``sliding_window = W``: W keys including the query's own, ``(W - 1, 0)`` when causal."""
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"sliding_window must be a positive integer, got {window!r}")
        return cls(causal=causal, window=(window - 1, 0 if causal else window - 1), chunk=chunk)

    @property
    def band(self) -> Band:
        lo = -self.window[0] if self.window is not None else None
        his = [h for h in ((0 if self.causal else None), (self.window[1] if self.window is not None else None))
               if h is not None]
        return Band(lo, min(his) if his else None)

    @property
    def plain(self) -> bool:
        """Nothing beyond causal / full (what lss_attention knew before windows and chunks)."""
        return self.window is None and self.chunk is None


def refine_bounds(bounds: tuple[int, ...], chunk: int | None) -> tuple[int, ...]:
    """Document boundaries ``(0, ..., L)`` cut again at every multiple of ``chunk``: a chunked mask is
    a document mask with these boundaries (RoPE positions still follow the real documents)."""
    if chunk is None:
        return tuple(bounds)
    seq_len = bounds[-1]
    return tuple(sorted(set(bounds) | set(range(chunk, seq_len, chunk))))


@dataclass(frozen=True)
class KeyBlock:
    """Queries ``[q_start, q_end)`` against keys ``[k_start, k_end)`` (global positions) under
    ``band`` in block-local indices (``Band()`` = every pair visible, no mask needed)."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    band: Band

    def pairs(self) -> int:
        """Visible (query, key) pairs of the block."""
        return sum(_visible_count(i, self.k_end - self.k_start, self.band) for i in range(self.q_end - self.q_start))


def _visible_count(i: int, n_keys: int, band: Band) -> int:
    lo = 0 if band.lo is None else max(0, i + band.lo)
    hi = n_keys - 1 if band.hi is None else min(n_keys - 1, i + band.hi)
    return max(0, hi - lo + 1)


def key_blocks(q_start: int, q_end: int, doc_start: int, doc_end: int, band: Band,
               query_tile: int | None = None) -> list[KeyBlock]:
    """The blocks the queries ``[q_start, q_end)`` of document ``[doc_start, doc_end)`` compute.

    Keys outside the document or outside every query's band are never in a block. Queries are cut
    into tiles of ``query_tile`` (default: the band's width, at least 64) when the band is bounded on
    both sides, so a window W computes about ``2 W`` keys per query instead of ``n + W``. A block whose
    pairs are all visible carries ``Band()``. Blocks with no visible pair are dropped."""
    if q_start >= q_end:
        return []
    if query_tile is None:
        query_tile = max(64, band.hi - band.lo + 1) if band.lo is not None and band.hi is not None else q_end - q_start
    blocks = []
    for t0 in range(q_start, q_end, query_tile):
        t1 = min(q_end, t0 + query_tile)
        k0 = doc_start if band.lo is None else max(doc_start, t0 + band.lo)
        k1 = doc_end if band.hi is None else min(doc_end, t1 - 1 + band.hi + 1)
        if k0 >= k1:
            continue
        every_pair = ((band.lo is None or k0 - (t1 - 1) >= band.lo) and (band.hi is None or (k1 - 1) - t0 <= band.hi))
        blocks.append(KeyBlock(t0, t1, k0, k1, Band() if every_pair else band.shifted(t0, k0)))
    return blocks


def _band_pairs(n: int, band: Band) -> int:
    """Pairs (q, k) of one segment of n positions with ``k - q`` in the band: sum over offsets t of n - |t|."""
    a = -(n - 1) if band.lo is None else max(band.lo, -(n - 1))
    b = n - 1 if band.hi is None else min(band.hi, n - 1)
    if a > b:
        return 0

    def abs_sum(lo, hi):  # sum of |t| for t in [lo, hi], lo <= hi
        if lo >= 0:
            return (lo + hi) * (hi - lo + 1) // 2
        if hi <= 0:
            return abs_sum(-hi, -lo)
        return abs_sum(0, -lo) + abs_sum(0, hi)

    return (b - a + 1) * n - abs_sum(a, b)


def mask_pairs(bounds: tuple[int, ...], spec: MaskSpec) -> int:
    """(query, key) pairs a mask keeps over documents ``bounds`` (the pairs attention needs; the
    benchmark's measure of work). ``MaskSpec(causal)`` alone: n(n+1)/2 or n^2 per document."""
    cut = refine_bounds(bounds, spec.chunk)
    return sum(_band_pairs(b - a, spec.band) for a, b in zip(cut[:-1], cut[1:]))


def visible(q: int, k: int, bounds: tuple[int, ...], spec: MaskSpec) -> bool:
    """The predicate itself, one pair at a time (for tests and documentation)."""
    import bisect

    cut = refine_bounds(bounds, spec.chunk)
    if bisect.bisect_right(cut, q) != bisect.bisect_right(cut, k):
        return False
    band = spec.band
    return (band.lo is None or k - q >= band.lo) and (band.hi is None or k - q <= band.hi)


def dense_hidden(seq_len: int, bounds: tuple[int, ...], spec: MaskSpec, device=None) -> torch.Tensor:
    """[L, L] bool, True where key k is hidden from query q (the one-device reference's mask)."""
    cut = torch.tensor(refine_bounds(bounds, spec.chunk), device=device)
    pos = torch.arange(seq_len, device=device)
    doc = torch.searchsorted(cut, pos, right=True)
    hidden = doc.unsqueeze(1) != doc.unsqueeze(0)
    return hidden | spec.band.hidden(range(seq_len), range(seq_len), device)


# ---------------------------------------------------------------------------------------------
# Softcapping and sinks: score and row transforms that every kernel / the merge applies alike.
# ---------------------------------------------------------------------------------------------

def check_softcap(softcap) -> None:
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be a positive finite number (or None), got {softcap!r}")


def softcap_scores(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``cap * tanh(s / cap)`` on scaled scores, before masking (Gemma 2's attn_logit_softcapping)."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def softcap_grad(capped: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """d capped / d scores from the capped scores themselves: ``1 - tanh^2 = 1 - (capped / cap)^2``."""
    return 1.0 if softcap is None else 1.0 - (capped / softcap) ** 2


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor):
    """out [b, h, s, d], lse [b, h, s] of the keys; sinks [h] logits -> (out', lse') with each row's
    softmax denominator including ``exp(sink)``. Computed in lse's dtype (float32 for half inputs)."""
    s = sinks.to(lse.dtype).view(1, -1, 1)
    lse_sink = torch.logaddexp(lse, s)
    return out.to(lse.dtype) * torch.exp(lse - lse_sink).unsqueeze(-1), lse_sink


def sinks_grad(dout: torch.Tensor, out_sink: torch.Tensor, lse_sink: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """d loss / d sinks [h] = ``-sum over batch and rows of exp(s - lse') <dout, out'>``."""
    acc = lse_sink.dtype
    row = (dout.to(acc) * out_sink.to(acc)).sum(-1)  # [b, h, s]
    weight = torch.exp(sinks.to(acc).view(1, -1, 1) - lse_sink)
    return -(weight * row).sum(dim=(0, 2)).to(sinks.dtype)


__all__ = ["Band", "KeyBlock", "MaskSpec", "apply_sinks", "check_softcap", "dense_hidden", "key_blocks",
           "mask_pairs", "refine_bounds", "sinks_grad", "softcap_grad", "softcap_scores", "visible"]
