"""Which keys and values each rank's queries read: the plan of the sparse K/V exchange (pure).

LSS gathers the whole sequence's K, V on every rank. Under a mask most of it may never be read: a
sliding window of W keys reads a W-token halo before each of a rank's chunks, packed documents read
only the documents that overlap the rank's tokens, a causal mask in the contiguous layout gives
rank 0 nothing to read from the others. ``exchange_plan`` says, for every (source, destination)
pair of ranks, the source's token ranges that some query of the destination reads; the sparse
exchange (``lss_plugin.comm.start_exchange_kv``) sends exactly those in ONE ``all_to_all_single``
with split sizes, and the dK, dV go back along the reverse plan in one more.

What a destination reads, exactly: its queries are cut into segments at document (and chunk)
boundaries (``documents.query_segments``); a segment of consecutive queries ``[g0, g1)`` inside the
document ``[a, b)`` under a band ``lo <= k - q <= hi`` (causal: ``hi <= 0``; a window: both sides)
reads every key of ``[max(a, g0 + lo), min(b, g1 - 1 + hi + 1))`` and nothing else: each key in that
interval has a query of the segment at an offset inside the band. The union over segments, less the
destination's own tokens, is its *information floor*: what any scheme must move to it.

Everything is a function of values every rank shares (layout, ranks, local length, causal,
boundaries, window, chunk), so every rank computes the same plan with no collective; its
``digest`` rides in the call signature (``lss_plugin.signature``), so ranks that would disagree
raise by name before the exchange. Host-side index arithmetic only: no collective, no tensor.
"""
from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass

from lss_plugin.documents import query_segments
from lss_plugin.masks import MaskSpec, refine_bounds
from lss_plugin.options import AUTO, AUTO_SPARSE_FRACTION
from lss_plugin.sharding import rank_chunks

Ranges = tuple[tuple[int, int], ...]  # (local start, length) runs of a source's tokens


@dataclass(frozen=True)
class ExchangePlan:
    """``ranges[dst][src]``: the runs of ``src``'s local tokens that ``dst``'s queries read (``()``
    for ``src == dst``: a rank's own tokens never move), in increasing global position."""

    lss_size: int  # N: ranks of the group the exchange runs over
    local_len: int  # tokens per rank (the hybrid's LSS leg: U * s_local)
    layout: str
    ranges: tuple[tuple[Ranges, ...], ...]

    @property
    def seq_len(self) -> int:
        return self.local_len * self.lss_size

    def tokens(self, src: int, dst: int) -> int:
        """Tokens ``src`` sends to ``dst``."""
        return sum(n for _, n in self.ranges[dst][src])

    def received(self, dst: int) -> int:
        return sum(self.tokens(src, dst) for src in range(self.lss_size))

    def sent(self, src: int) -> int:
        return sum(self.tokens(src, dst) for dst in range(self.lss_size))

    @property
    def floor_tokens(self) -> int:
        """Tokens moved over the whole group: the sum over ranks of their information floor."""
        return sum(self.received(dst) for dst in range(self.lss_size))

    @property
    def busiest_tokens(self) -> int:
        """The most tokens one rank sends or receives (what sets an all-to-all's time on a link)."""
        return max(max(self.sent(r), self.received(r)) for r in range(self.lss_size))

    @property
    def gather_tokens_per_rank(self) -> int:
        """What the all-gather moves to each rank: every token but its own."""
        return self.seq_len - self.local_len

    def send_indices(self, src: int) -> list[int]:
        """``src``'s local token indices in the order it sends them: destination-major, then position."""
        indices = []
        for dst in range(self.lss_size):
            for start, n in self.ranges[dst][src]:
                indices.extend(range(start, start + n))
        return indices

    def receive_positions(self, dst: int) -> list[int]:
        """Global positions of the tokens ``dst`` receives, in arrival order: source-major, then position.
        (Each run lies inside one chunk of its source, so its positions are consecutive.)"""
        positions = []
        for src in range(self.lss_size):
            chunks = rank_chunks(self.local_len, src, self.lss_size, self.layout)
            for start, n in self.ranges[dst][src]:
                first = _global_position(chunks, start)
                positions.extend(range(first, first + n))
        return positions

    @functools.cached_property
    def digest(self) -> int:
        """A nonzero 32-bit digest of the whole plan (every rank's view of it), for the call signature."""
        h = hashlib.blake2b(digest_size=8)
        h.update(struct.pack("<IIB", self.lss_size, self.local_len, self.layout == "balanced"))
        for per_dst in self.ranges:
            for runs in per_dst:
                h.update(struct.pack("<I", len(runs)))
                for start, n in runs:
                    h.update(struct.pack("<II", start, n))
        return (int.from_bytes(h.digest()[:4], "little") | 1) & 0xFFFFFFFF

    def sparse_pays(self) -> bool:
        """``kv_exchange="auto"``: the sparse exchange's busiest rank moves at most
        ``AUTO_SPARSE_FRACTION`` of what the all-gather moves to each rank."""
        return self.busiest_tokens <= AUTO_SPARSE_FRACTION * self.gather_tokens_per_rank


def _global_position(chunks, local: int) -> int:
    for c in chunks:
        if c.local_start <= local < c.local_start + c.length:
            return c.global_start + local - c.local_start
    raise IndexError(local)


def read_intervals(bounds: tuple[int, ...], spec: MaskSpec, local_len: int, rank: int, lss_size: int,
                   layout: str) -> list[tuple[int, int]]:
    """The global key intervals ``[start, end)`` some query of ``rank`` reads, merged and sorted."""
    band = spec.band
    intervals = []
    for seg in query_segments(rank_chunks(local_len, rank, lss_size, layout), refine_bounds(bounds, spec.chunk)):
        g0, g1 = seg.global_start, seg.global_start + seg.length
        start = seg.doc_start if band.lo is None else max(seg.doc_start, g0 + band.lo)
        end = seg.doc_end if band.hi is None else min(seg.doc_end, g1 + band.hi)
        if start < end:
            intervals.append((start, end))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


@functools.lru_cache(maxsize=64)
def exchange_plan(layout: str, lss_size: int, local_len: int, causal: bool, bounds: tuple[int, ...],
                  window: tuple[int, int] | None = None, chunk: int | None = None) -> ExchangePlan:
    """The plan for a call: ``bounds`` are the document boundaries ``(0, ..., L)`` in global positions
    (``(0, L)``: one document), ``L = lss_size * local_len``; ``window`` and ``chunk`` as in
    ``lss_plugin.masks.MaskSpec``. Cached: every layer of a step asks for the same plan."""
    if bounds[0] != 0 or bounds[-1] != lss_size * local_len:
        raise ValueError(f"document bounds {bounds[0]}..{bounds[-1]} do not cover the sequence of "
                         f"{lss_size} x {local_len} = {lss_size * local_len} tokens")
    spec = MaskSpec(bool(causal), window, chunk)
    per_dst = []
    for dst in range(lss_size):
        reads = read_intervals(bounds, spec, local_len, dst, lss_size, layout)
        per_src = []
        for src in range(lss_size):
            runs = []
            if src != dst:
                for c in rank_chunks(local_len, src, lss_size, layout):
                    for start, end in reads:
                        lo, hi = max(start, c.global_start), min(end, c.global_start + c.length)
                        if lo < hi:
                            runs.append((c.local_start + lo - c.global_start, hi - lo))
                runs.sort()
            per_src.append(tuple(runs))
        per_dst.append(tuple(per_src))
    return ExchangePlan(lss_size, local_len, layout, tuple(per_dst))


def resolve_kv_exchange(setting: str, plan: ExchangePlan) -> str:
    """What a call runs: ``"gather"`` or ``"sparse"`` (``"auto"``: ``ExchangePlan.sparse_pays``).
    A group of one moves nothing either way: ``"gather"``."""
    if plan.lss_size == 1:
        return "gather"
    if setting == AUTO:
        return "sparse" if plan.sparse_pays() else "gather"
    return setting
