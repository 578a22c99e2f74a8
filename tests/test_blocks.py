"""``lss_plugin.blocks``: the pieces a rank's queries compute, in one process (no collectives).

For random documents, windows, chunks, both layouts and N = 1..4, every rank's pieces together
cover each (query, key) pair its queries see under the dense mask exactly once (pairs a piece's
causal flag or band hides are not covered), never a hidden pair; own pieces read only the rank's
own tokens, at the right local offsets; and a plain causal chunk whose prefix is all its own stays
one call.
"""
import itertools
import random

import torch

from lss_plugin.blocks import plan_pieces
from lss_plugin.documents import query_segments
from lss_plugin.masks import Band, MaskSpec, dense_hidden, refine_bounds
from lss_plugin.sharding import local_token_indices, rank_chunks

L = 48


def _covered(pieces, segments, seq_len):
    """[L, L] int: how many pieces compute each (query, key) pair (global positions)."""
    count = torch.zeros(seq_len, seq_len, dtype=torch.int64)
    for p in pieces:
        seg = segments[p.segment]
        rows = torch.arange(seg.global_start + p.q0, seg.global_start + p.q1)
        cols = torch.arange(p.start, p.end)
        nq, nk = len(rows), len(cols)
        seen = torch.ones(nq, nk, dtype=torch.bool)
        if p.causal:  # bottom-right aligned: local key j visible to local query i iff j <= i + nk - nq
            seen &= ~Band(None, nk - nq).hidden(range(nq), range(nk))
        if p.band is not None:
            seen &= ~p.band.hidden(range(nq), range(nk))
        count[rows.unsqueeze(1), cols.unsqueeze(0)] += seen.long()
    return count


def test_pieces_cover_every_visible_pair_once_and_own_pieces_read_own_keys():
    rng = random.Random(3)
    for trial in range(40):
        cuts = sorted(rng.sample(range(1, L), rng.randint(0, 5)))
        bounds = (0, *cuts, L)
        causal = rng.random() < 0.7
        window = (rng.choice([0, 3, 7, 20]), 0 if causal else rng.choice([0, 4])) if rng.random() < 0.6 else None
        chunk = rng.choice([None, None, 5, 12])
        spec = MaskSpec(causal, window, chunk)
        band = spec.band if window is not None else None
        hidden = dense_hidden(L, bounds, spec)
        for world, layout, one_call in itertools.product((1, 2, 3, 4), ("contiguous", "balanced"), (True, False)):
            for rank in range(world):
                chunks = rank_chunks(L // world, rank, world, layout)
                segments = query_segments(chunks, refine_bounds(bounds, chunk))
                pieces = plan_pieces(segments, chunks, causal, band, one_call)
                mine = local_token_indices(L, rank, world, layout)
                count = _covered(pieces, segments, L)
                assert (count[mine] == (~hidden[mine]).long()).all(), (trial, world, layout, rank, one_call)
                for p in pieces:
                    if p.own:  # the local slice holds exactly these global keys
                        assert mine[p.keys()].tolist() == list(range(p.start, p.end)), p
                if world == 1:
                    assert all(p.own for p in pieces)  # nothing waits for a collective


def test_a_causal_chunk_stays_one_call_only_when_its_prefix_is_its_own():
    chunks = rank_chunks(L // 4, 1, 4, "contiguous")  # rank 1 holds [12, 24)
    segments = query_segments(chunks, (0, 18, L))  # a document starts inside the rank's tokens
    pieces = plan_pieces(segments, chunks, True, None, True)
    # [12, 18) reads [0, 18): its prefix [0, 12) is another rank's, so prefix and diagonal are two calls
    # (the diagonal runs before the gather); [18, 24) opens a document: one call on own keys
    assert [(p.start, p.end, p.causal, p.own) for p in pieces] == [
        (0, 12, False, False), (12, 18, True, True), (18, 24, True, True)]
    balanced = rank_chunks(L // 4, 3, 4, "balanced")  # rank 3 holds chunks 3 and 4: [18, 30), adjacent
    segs = query_segments(balanced, (0, 18, L))
    own_prefix = plan_pieces(segs, balanced, True, None, True)
    assert [(p.start, p.end, p.causal, p.own) for p in own_prefix] == [(18, 24, True, True), (18, 30, True, True)]
