"""Packed documents (``cu_seqlens``): LSS on 1-4 ranks against per-document attention in one process.

The reference attends each document on its own (``reference_attention`` on its slice) and
concatenates: no cross-document attention by construction. Tolerance: float64 outputs and
gradients within 1e-10 relative to the largest reference magnitude, absolute where that is below 1.
"""
import itertools
import re

import pytest
import torch
import torch.distributed as dist

import lss_plugin
from lss_plugin.documents import (
    check_cu_seqlens, cu_seqlens_from_eod, cu_seqlens_from_position_ids, query_segments, visible_pairs,
)
from lss_plugin.sharding import Chunk, local_token_indices
from tests.distributed import run_ranks
from tests.reference import reference_attention
from tests.test_attention import DKV, HEADS, _expected_comm

B, L, D = 2, 24, 8  # L divisible by 2N for N = 1..4; both batch rows share the boundaries


def _random_bounds(seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(L - 1, generator=gen)[: 1 + seed % 6].add(1).tolist())
    return [0, *cuts, L]


BOUNDS = {
    "random_a": _random_bounds(3),
    "random_b": _random_bounds(8),
    "short_and_spanning": [0, 1, 2, 22, 23, L],  # length-1 documents and one that spans every rank
    "one_document": [0, L],  # the same as no packing
    "every_token": list(range(L + 1)),  # L documents of one token
}


def _reference(q, k, v, bounds, causal):
    return torch.cat([reference_attention(q[:, a:b], k[:, a:b], v[:, a:b], causal=causal)
                      for a, b in zip(bounds[:-1], bounds[1:])], dim=1)


def _rel(a, b):
    # relative to the largest reference value, or absolute below 1 (one-token documents: dq = 0)
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1.0)


COUNTED = ("all_gather_into_tensor", DKV, "verdict")


def _one_case(causal, layout, heads, kv_backward, head_chunk, bounds_name, dtype=torch.float64, ulysses_size=1,
              counted=COUNTED):
    """Relative errors of this rank's out, dq, dk, dv and (calls, bytes) of the ``counted`` collectives.

    ``heads``: a name of ``HEADS`` or (heads, kv_heads); ``bounds_name`` None: no ``cu_seqlens``;
    ``ulysses_size``: tokens laid out for the hybrid over the registered topology."""
    rank, world = dist.get_rank(), dist.get_world_size()
    h, hkv = HEADS[heads] if isinstance(heads, str) else heads
    bounds = BOUNDS[bounds_name or "one_document"]
    gen = torch.Generator().manual_seed(99)  # same full tensors on every rank
    q = torch.randn(B, L, h, D, generator=gen, dtype=dtype)
    k = torch.randn(B, L, hkv, D, generator=gen, dtype=dtype)
    v = torch.randn(B, L, hkv, D, generator=gen, dtype=dtype)
    dout = torch.randn(B, L, h, D, generator=gen, dtype=dtype)

    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = _reference(*ref_in, bounds, causal)
    ref_out.backward(dout)

    idx = local_token_indices(L, rank, world, layout, ulysses_size=ulysses_size)
    local = [t[:, idx].clone().requires_grad_() for t in (q, k, v)]
    cu = torch.tensor(bounds, dtype=torch.int32) if bounds_name else None
    with lss_plugin.record_collectives() as rec:
        # the all-gather: packing changes what it computes, never what it sends (the sparse exchange,
        # which sends only what the documents read: tests/test_exchange.py)
        out = lss_plugin.lss_attention(*local, causal=causal, layout=layout, kv_backward=kv_backward,
                                       kv_head_chunk=head_chunk, cu_seqlens=cu, kv_exchange="gather")
        out.backward(dout[:, idx])
    errors = {"out": _rel(out, ref_out[:, idx])}
    for name, mine, ref in zip(("dq", "dk", "dv"), local, ref_in):
        errors[name] = _rel(mine.grad, ref.grad[:, idx])
    return errors, {n: rec.calls[n] for n in counted}, {n: rec.bytes[n] for n in counted}


# Every setting is crossed with causal x layout; the boundaries cycle through BOUNDS so each set of
# boundaries meets several head layouts and backward modes without multiplying the case count.
SETTINGS = list(itertools.product(tuple(HEADS), ("keep", "regather"), (None, 1)))
CASES = [(causal, layout, *setting, list(BOUNDS)[i % len(BOUNDS)])
         for i, (setting, causal, layout) in enumerate(
             itertools.product(SETTINGS, (True, False), ("contiguous", "balanced")))]


def _sweep(cases=CASES):
    lss_plugin.init_topology(dist.get_world_size())
    return [(case, _one_case(*case)) for case in cases]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_packed_float64_exact_against_per_document_attention(world):
    for rank_results in run_ranks(_sweep, world):
        for case, (errors, calls, nbytes) in rank_results:
            assert max(errors.values()) < 1e-10, (case, errors)
            # packing changes what is computed, never what is sent
            exp_calls, exp_bytes = _expected_comm(world, case[2], case[3], case[4], itemsize=8)
            assert calls == exp_calls, (case, calls)
            assert nbytes == exp_bytes, (case, nbytes)


KERNEL_CASES = [(causal, layout, heads, "keep", None, name) for causal, layout, heads, name in itertools.product(
    (True, False), ("contiguous", "balanced"), ("mha", "gqa"), ("random_a", "short_and_spanning"))]


@pytest.mark.parametrize("kernel", ["math", "tiled"])
def test_packed_exact_with_other_kernels(kernel):
    """The bottom-right causal kernels make prefix + diagonal of a segment one call from its document start."""
    for rank_results in run_ranks(_sweep, 2, KERNEL_CASES, env={"LSS_ATTENTION_KERNEL": kernel}):
        for case, (errors, _, _) in rank_results:
            assert max(errors.values()) < 1e-10, (kernel, case, errors)


def _mismatched_boundaries():
    lss_plugin.init_topology(dist.get_world_size())
    rank = dist.get_rank()
    x = torch.randn(1, L // 2, 2, D, dtype=torch.float64)
    cu = torch.tensor([0, 5, L] if rank == 0 else [0, 7, L])
    try:
        lss_plugin.lss_attention(x, x, x, causal=True, cu_seqlens=cu)
    except RuntimeError as exc:
        return str(exc)
    return None


def test_boundaries_that_differ_between_ranks_raise_on_every_rank():
    for message in run_ranks(_mismatched_boundaries, 2):
        assert message is not None and "documents" in message, message


def _packed_positions(layout):
    lss_plugin.init_topology(dist.get_world_size())
    cu = torch.tensor(BOUNDS["short_and_spanning"])
    return lss_plugin.local_positions(L, layout=layout, cu_seqlens=cu).tolist()


@pytest.mark.parametrize("layout", ["contiguous", "balanced"])
def test_local_positions_restart_in_each_document(layout):
    bounds = BOUNDS["short_and_spanning"]
    full = torch.cat([torch.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:])])
    for rank, positions in enumerate(run_ranks(_packed_positions, 3, layout)):
        assert positions == full[local_token_indices(L, rank, 3, layout)].tolist()


BAD_BOUNDARIES = [
    (torch.tensor([0, 5, 5, L]), "strictly increasing"),
    (torch.tensor([0, 9, 4, L]), "strictly increasing"),
    (torch.tensor([1, 5, L]), "start at 0"),
    (torch.tensor([0, 5, L - 1]), "end at the global sequence length 24"),
    (torch.tensor([0.0, 5.0, L]), "integer"),
    (torch.tensor([[0, 5, L]]), "1-D"),
    ([0, 5, L], "tensor"),
]


@pytest.mark.parametrize("bad, match", BAD_BOUNDARIES)
def test_bad_boundaries_name_the_values(bad, match):
    with pytest.raises(ValueError, match=match):
        check_cu_seqlens(bad, L)


def _bad_boundaries_on_every_rank():
    """Each call must be refused by the verdict alone (its two fixed-size all-gathers), before any K/V
    gather; a call that reached one would fail this test (the counts) or hang it until the group timeout."""
    lss_plugin.init_topology(dist.get_world_size())
    x = torch.randn(1, L // 2, 2, D)
    messages = []
    for bad, _ in BAD_BOUNDARIES:
        with lss_plugin.record_collectives() as rec:
            try:
                lss_plugin.lss_attention(x, x, x, causal=True, cu_seqlens=bad)
                messages.append(None)
            except ValueError as exc:
                messages.append(str(exc))
        assert dict(rec.calls) == {"verdict": 1, "verdict_messages": 1}, rec.calls
    return messages


def test_bad_boundaries_raise_before_any_collective():
    for messages in run_ranks(_bad_boundaries_on_every_rank, 2):
        for message, (_, match) in zip(messages, BAD_BOUNDARIES):
            assert message is not None and re.search(match, message), (match, message)


def test_segments_cut_chunks_at_boundaries():
    chunks = [Chunk(0, 4, 4), Chunk(4, 16, 4)]  # a balanced rank: global [4, 8) then [16, 20)
    segments = query_segments(chunks, (0, 6, 17, L))
    assert [(s.local_start, s.global_start, s.length, s.doc_start, s.doc_end) for s in segments] == [
        (0, 4, 2, 0, 6), (2, 6, 2, 6, 17), (4, 16, 1, 6, 17), (5, 17, 3, 17, L)]


def test_visible_pairs_count_what_packing_skips():
    assert visible_pairs((0, L), causal=True) == L * (L + 1) // 2
    assert visible_pairs((0, 4, L), causal=False) == 16 + 400
    assert visible_pairs(tuple(range(L + 1)), causal=True) == L


def test_boundaries_from_restarting_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3]])
    assert cu_seqlens_from_position_ids(pos).tolist() == [0, 3, 4, 8]
    assert cu_seqlens_from_position_ids(torch.arange(8)).tolist() == [0, 8]
    with pytest.raises(ValueError, match=r"position_ids\[2\] = 5 after 1"):
        cu_seqlens_from_position_ids(torch.tensor([0, 1, 5, 6]))
    with pytest.raises(ValueError, match="differ between batch rows"):
        cu_seqlens_from_position_ids(torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]]))
    with pytest.raises(ValueError, match="start at 0"):
        cu_seqlens_from_position_ids(torch.tensor([3, 4, 5]))


def test_boundaries_from_eod_tokens():
    eod = 7
    tokens = torch.tensor([[5, 6, eod, 1, eod, 2, 3, eod]])  # the EOD closes its document
    assert cu_seqlens_from_eod(tokens, eod).tolist() == [0, 3, 5, 8]
    assert cu_seqlens_from_eod(torch.tensor([eod, 1, 2]), eod).tolist() == [0, 1, 3]
    assert cu_seqlens_from_eod(torch.tensor([1, 2, 3]), eod).tolist() == [0, 3]


def test_host_copies_are_reused_per_tensor_version():
    """Every layer of a forward passes the same boundaries: read once, again only after an in-place change."""
    from lss_plugin.documents import host_bounds

    cu = torch.tensor([0, 5, L], dtype=torch.int32)
    first = host_bounds(cu)
    assert first == (0, 5, L) and host_bounds(cu) is first  # the cached tuple, no second read
    cu[1] = 7  # bumps the version counter
    assert host_bounds(cu) == (0, 7, L)
    assert host_bounds(torch.tensor([0, 3, L])) == (0, 3, L)  # another tensor: its own values
