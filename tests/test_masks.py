"""Masks in global positions (windows, chunks, documents) and sinks: pure functions, one process.

Every block plan is checked pair by pair against the dense predicate; sinks and softcapping against
autograd on the dense float64 computation (within 1e-12)."""
import random

import pytest
import torch

from lss_plugin.masks import (
    Band, MaskSpec, apply_sinks, dense_hidden, key_blocks, refine_bounds, sinks_grad, softcap_grad,
    softcap_scores, visible,
)


def _random_bounds(rng, seq_len):
    cuts = sorted(rng.sample(range(1, seq_len), rng.randint(0, 4)))
    return (0, *cuts, seq_len)


SPECS = [
    MaskSpec(causal=True),
    MaskSpec(causal=False),
    MaskSpec.sliding(1),
    MaskSpec.sliding(7),
    MaskSpec.sliding(7, causal=False),
    MaskSpec(causal=False, window=(3, 9)),
    MaskSpec(causal=True, chunk=5),
    MaskSpec(causal=False, chunk=6),
    MaskSpec.sliding(4, chunk=9),
]


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_key_blocks_cover_exactly_the_visible_pairs(spec):
    rng = random.Random(0)
    for trial in range(20):
        seq_len = rng.randint(8, 60)
        bounds = _random_bounds(rng, seq_len)
        hidden = dense_hidden(seq_len, bounds, spec)
        # the dense mask is the scalar predicate
        assert all(bool(hidden[q, k]) != visible(q, k, bounds, spec) for q in range(seq_len) for k in range(seq_len))
        covered = torch.zeros(seq_len, seq_len, dtype=torch.int64)
        cut = refine_bounds(bounds, spec.chunk)
        tile = rng.choice([None, 1, 3, 64])
        for d0, d1 in zip(cut[:-1], cut[1:]):
            q0 = rng.randint(d0, d1 - 1)  # a query segment inside the piece, as a rank holds one
            for q_lo, q_hi in ((d0, q0), (q0, d1)):
                for blk in key_blocks(q_lo, q_hi, d0, d1, spec.band, tile):
                    local = ~blk.band.hidden(range(blk.q_end - blk.q_start), range(blk.k_end - blk.k_start))
                    covered[blk.q_start:blk.q_end, blk.k_start:blk.k_end] += local.long()
                    assert blk.pairs() == int(local.sum())
        assert covered.max() <= 1, "a pair computed twice"
        assert torch.equal(covered.bool(), ~hidden), f"{spec} bounds={bounds} tile={tile}"


def test_windows_compute_about_two_windows_per_query():
    spec = MaskSpec.sliding(64)
    blocks = key_blocks(0, 4096, 0, 4096, spec.band)
    computed = sum((b.q_end - b.q_start) * (b.k_end - b.k_start) for b in blocks)
    assert computed <= 2 * 64 * 4096  # not the 4096^2 / 2 of full causal
    assert sum(b.pairs() for b in blocks) == sum(min(64, q + 1) for q in range(4096))


def test_semantics_match_the_frameworks():
    # transformers' sliding_window W keeps W keys including the current one: flash-attn (W - 1, 0)
    assert MaskSpec.sliding(4).window == (3, 0)
    assert MaskSpec.sliding(4).band == Band(-3, 0)
    assert [k for k in range(10) if visible(6, k, (0, 10), MaskSpec.sliding(4))] == [3, 4, 5, 6]
    # chunked: the C-aligned chunk of global positions
    assert [k for k in range(12) if visible(9, k, (0, 12), MaskSpec(causal=True, chunk=4))] == [8, 9]
    assert refine_bounds((0, 6, 12), 4) == (0, 4, 6, 8, 12)
    with pytest.raises(ValueError, match=r"window must be a \(left, right\) pair"):
        MaskSpec(window=(3, -1))
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        MaskSpec(chunk=0)


def _dense_attention(q, k, v, hidden, scale, softcap=None, sinks=None):
    """q, k, v [b, h, L, d] float64; the sink joins the softmax as one more logit per head."""
    s = softcap_scores(torch.einsum("bhqd,bhkd->bhqk", q, k) * scale, softcap).masked_fill(hidden, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.view(1, -1, 1, 1).expand(*s.shape[:3], 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", p[..., : k.shape[2]], v)


def test_sinks_rescale_by_the_row_lse_and_their_gradient_is_exact():
    torch.manual_seed(0)
    b, h, L, d = 2, 3, 11, 4
    q, k, v = (torch.randn(b, h, L, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sinks = torch.randn(h, dtype=torch.float64, requires_grad=True)
    hidden = dense_hidden(L, (0, 5, L), MaskSpec.sliding(3))
    ref = _dense_attention(q, k, v, hidden, 0.5, sinks=sinks)
    dout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v, sinks), dout)

    scores = (torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.5).masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.einsum("bhqk,bhkd->bhqd", torch.exp(scores - lse.unsqueeze(-1)), v)
    out_s, lse_s = apply_sinks(out.detach(), lse.detach(), sinks.detach())
    torch.testing.assert_close(out_s, ref.detach(), atol=1e-12, rtol=0)
    # the blocks' backward, unchanged, on (out', lse'): P = exp(S - lse'), delta = rowsum(dO * O')
    with torch.no_grad():
        p = torch.exp(scores - lse_s.unsqueeze(-1))
        dv = torch.einsum("bhqk,bhqd->bhkd", p, dout)
        ds = p * (torch.einsum("bhqd,bhkd->bhqk", dout, v) - (dout * out_s).sum(-1, keepdim=True)) * 0.5
        dq, dk = torch.einsum("bhqk,bhkd->bhqd", ds, k), torch.einsum("bhqk,bhqd->bhkd", ds, q)
    for got, want in zip((dq, dk, dv, sinks_grad(dout, out_s, lse_s, sinks.detach())), ref_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_softcap_gradient_from_the_capped_scores():
    s = torch.randn(50, dtype=torch.float64, requires_grad=True) * 30
    capped = softcap_scores(s, 20.0)
    (grad,) = torch.autograd.grad(capped.sum(), s)
    torch.testing.assert_close(softcap_grad(capped.detach(), 20.0), grad, atol=1e-12, rtol=0)
    assert float(capped.abs().max()) < 20.0
