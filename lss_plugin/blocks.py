"""The blocks a rank's queries compute, and which of them need only the rank's own keys (pure).

A query segment (``documents.Segment``: consecutive local queries inside one document) attends to
key blocks ``[start, end)`` in global positions: without a window, its document's earlier keys and
its diagonal (causal) or the whole document (not causal); with a window, ``masks.key_blocks`` of the
layer's band. ``Piece`` is one kernel call of those: queries ``[q0, q1)`` of the segment against
keys ``[start, end)``.

Overlap (issue 31): a rank holds its own K, V before any collective, so the pieces whose keys are
all its own (``Piece.own``) run while the K/V gather (or the sparse exchange) is in flight, and in
backward while the dK/dV collective is. A piece is own when its keys lie in one run of the rank's
tokens; a full block (not causal, no band: every pair visible) that straddles the rank's tokens and
others' is cut at the boundary into own and remote pieces, merged by log-sum-exp like any two
blocks; so is a window's tile (each part keeps the window's band, shifted to its first key; parts
with no visible pair are dropped; a row may see no key in a part: the kernels return it as out 0,
lse -inf and the merge keeps such rows finite). A causal block never straddles: a causal chunk
whose whole prefix is its own stays ONE call when the kernel allows it (``one_call``: rounded
once, as on one device); otherwise prefix and diagonal are two calls, so the diagonal (always the
rank's own) runs early.

No tensors, no collectives: every function here is index arithmetic over ``sharding.Chunk``s.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from lss_plugin.documents import Segment
from lss_plugin.masks import Band, key_blocks
from lss_plugin.sharding import Chunk


@dataclass(frozen=True)
class Piece:
    """Queries ``[q0, q1)`` of segment ``segment`` (local to it) against keys ``[start, end)`` (global)."""

    segment: int  # index in the plan's query segments
    q0: int
    q1: int
    start: int
    end: int
    causal: bool  # bottom-right causal (the diagonal, or a one-call prefix and diagonal)
    band: Band | None  # block-local band (a window's tile), None without a window
    local_start: int | None  # where the keys start in this rank's local tokens when all are its own

    @property
    def own(self) -> bool:
        return self.local_start is not None

    def keys(self) -> slice:
        """The keys' slice in the rank's local tokens (own pieces) or in global positions (the others)."""
        if self.own:
            return slice(self.local_start, self.local_start + self.end - self.start)
        return slice(self.start, self.end)


def visible_blocks(seg: Segment, causal: bool, one_call: bool = False):
    """Key ranges a query segment attends to: (start, end, is_causal), all inside its document.

    Keys of other documents (and, causally, later keys) are never computed. ``one_call``: the kernel
    aligns a causal mask bottom-right, so the prefix and the diagonal block are one causal range
    [doc_start, end) (one call, no merge: the segment's out is rounded once, as on one device)."""
    end = seg.global_start + seg.length
    if not causal:
        return [(seg.doc_start, seg.doc_end, False)]
    if one_call:
        return [(seg.doc_start, end, True)]
    blocks = []
    if seg.global_start > seg.doc_start:
        blocks.append((seg.doc_start, seg.global_start, False))  # earlier positions of the document: all visible
    blocks.append((seg.global_start, end, True))
    return blocks


def segment_blocks(seg: Segment, causal: bool, band: Band | None, one_call: bool):
    """(q0, q1, start, end, causal, band) of a segment, in the order their results are merged.

    With a window (``band``): ``masks.key_blocks`` of the layer's band (query tiles, each ONE block whose
    band is the window's, or ``Band()`` when every pair is visible: passed anyway, so every block of the
    layer goes to the same kernel). Without: ``visible_blocks``."""
    if band is None:
        for start, end, is_causal in visible_blocks(seg, causal, one_call):
            yield 0, seg.length, start, end, is_causal, None
        return
    g0 = seg.global_start
    for blk in key_blocks(g0, g0 + seg.length, seg.doc_start, seg.doc_end, band):
        yield blk.q_start - g0, blk.q_end - g0, blk.k_start, blk.k_end, False, blk.band


def own_runs(chunks: list[Chunk]) -> list[Chunk]:
    """The rank's chunks sorted by position, neighbours merged when they are consecutive both
    globally and locally (one run of keys, one kernel call)."""
    runs: list[Chunk] = []
    for c in sorted(chunks, key=lambda c: c.global_start):
        last = runs[-1] if runs else None
        follows = last and last.global_start + last.length == c.global_start
        if follows and last.local_start + last.length == c.local_start:
            runs[-1] = Chunk(last.local_start, last.global_start, last.length + c.length)
        else:
            runs.append(c)
    return runs


def _own_offset(start: int, end: int, runs: list[Chunk]) -> int | None:
    """Local offset of keys [start, end) when one run of the rank's tokens holds them all."""
    for c in runs:
        if c.global_start <= start and end <= c.global_start + c.length:
            return c.local_start + start - c.global_start
    return None


def _cut(start: int, end: int, runs: list[Chunk]):
    """[start, end) cut at the edges of the rank's runs: (a, b, local offset or None)."""
    edges = sorted({start, end, *(e for c in runs for e in (c.global_start, c.global_start + c.length)
                                  if start < e < end)})
    for a, b in zip(edges[:-1], edges[1:]):
        yield a, b, _own_offset(a, b, runs)


def plan_pieces(segments, chunks, causal: bool, band: Band | None, one_call: bool) -> tuple[Piece, ...]:
    """Every kernel call of a rank's queries (``chunks``: the tokens it holds), own pieces marked.

    ``one_call``: the kernel takes a causal chunk's prefix and diagonal in one call; used for a segment
    only when its whole prefix is the rank's own (else the diagonal would wait for the gather).
    Cached: every head chunk of every layer, forward and backward, asks for the same pieces."""
    return _plan_pieces(tuple(segments), tuple(chunks), bool(causal), band, bool(one_call))


@functools.lru_cache(maxsize=256)
def _plan_pieces(segments: tuple[Segment, ...], chunks: tuple[Chunk, ...], causal: bool, band: Band | None,
                 one_call: bool) -> tuple[Piece, ...]:
    runs = own_runs(list(chunks))
    pieces = []
    for i, seg in enumerate(segments):
        one = one_call and _own_offset(seg.doc_start, seg.global_start + seg.length, runs) is not None
        for q0, q1, start, end, is_causal, blk_band in segment_blocks(seg, causal, band, one):
            offset = _own_offset(start, end, runs)
            if offset is not None or is_causal:  # all own; or a causal block (only ever straddles with one_call)
                pieces.append(Piece(i, q0, q1, start, end, is_causal, blk_band, offset))
                continue
            for a, b, local in _cut(start, end, runs):
                part = None if blk_band is None else blk_band.shifted(0, a - start)  # the same pairs, keys from a
                if part is None or part.rows_with_keys(q1 - q0, b - a):
                    pieces.append(Piece(i, q0, q1, a, b, False, part, local))
    return tuple(pieces)
