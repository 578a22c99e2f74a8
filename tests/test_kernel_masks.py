"""Block kernels with an explicit band and softcapping (issue 28, kernel layer).

Reference: the dense float64 computation (scaled scores, ``cap * tanh(s / cap)``, the band as a
``[sq, sk]`` mask, softmax, autograd), in one function; keyless rows are out 0 / lse -inf with zero
gradients. Tolerances: float64 within 1e-12 absolute (values O(1)); float32 (cpu_flash, flex forward)
within 1e-5; bfloat16/float16 of tiled and math with band + softcap within the bound test_kernels.py
holds plain causal to (2 eps of the dtype, relative to max |reference|) and within 1.5x of the same
kernel's own plain-causal error on the same inputs. FlexAttention and flash-attn run on a GPU
(``gpu`` tests, ``make gpu-check``); here flash-attn through a stand-in with its real 2.7 signature
and window semantics, FlexAttention's forward eagerly on CPU (torch 2.13 has no CPU backward).
"""
from __future__ import annotations

import math
import types

import pytest
import torch

from lss_plugin import kernels
from lss_plugin.kernels import cpu_flash, cuda_fused, flex, tiled
from lss_plugin.kernels import reference as math_kernel
from lss_plugin.kernels.base import effective_band
from lss_plugin.masks import Band, MaskSpec, key_blocks, softcap_scores

SCALE = 0.3
NEG = float("-inf")

# (name, heads (H, Hkv), sq, sk, causal, band, softcap)
CASES = [
    ("causal as a band", (3, 3), 21, 21, True, Band(), None),
    ("window left, square", (3, 3), 23, 23, True, Band(lo=-5), None),
    ("window left, prefix", (3, 3), 13, 37, True, Band(lo=-9), None),
    ("window left+right", (2, 2), 19, 19, False, Band(-4, 3), None),
    ("both sides off the diagonal", (2, 2), 17, 29, False, Band(2, 9), None),
    ("keyless leading rows", (2, 2), 15, 15, False, Band(-3, -1), None),
    ("keyless trailing rows", (2, 2), 20, 12, False, Band(5, 8), None),
    ("causal sq > sk with a window", (2, 2), 20, 12, True, Band(lo=-12), None),
    ("GQA window", (6, 2), 25, 40, True, Band(lo=-7), None),
    ("MQA window", (4, 1), 18, 18, False, Band(-2, 6), None),
    ("softcap alone", (3, 3), 16, 33, True, None, 2.5),
    ("softcap, GQA, window", (6, 3), 22, 22, True, Band(lo=-6), 2.5),
    ("softcap, non-causal band", (4, 1), 14, 30, False, Band(3, 12), 1.5),
]


def _inputs(h, hkv, sq, sk, d=8, dtype=torch.float64, seed=0, b=2):
    gen = torch.Generator().manual_seed(seed)
    # large enough scores (x3) that softcapping matters
    q, dout = (torch.randn(b, h, sq, d, generator=gen, dtype=torch.float64) * s for s in (3.0, 1.0))
    k, v = (torch.randn(b, hkv, sk, d, generator=gen, dtype=torch.float64) for _ in range(2))
    return [t.to(dtype) for t in (q, k, v, dout)]


def _hidden(sq, sk, causal, band):
    """[sq, sk] True where key j is hidden from query i, written out directly (not via Band.hidden)."""
    i = torch.arange(sq).unsqueeze(1)
    j = torch.arange(sk).unsqueeze(0)
    hidden = torch.zeros(sq, sk, dtype=torch.bool)
    if causal:
        hidden |= j > i + sk - sq
    if band is not None and band.lo is not None:
        hidden |= j - i < band.lo
    if band is not None and band.hi is not None:
        hidden |= j - i > band.hi
    return hidden


def _dense(q, k, v, hidden, softcap):
    """The dense reference (autograd-able): out [b, H, sq, d], lse [b, H, sq]; keyless rows 0 / -inf."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = softcap_scores(q @ k.transpose(-1, -2) * SCALE, softcap).masked_fill(hidden, NEG)
    keyless = hidden.all(-1)  # [sq]
    lse = torch.logsumexp(s.masked_fill(keyless.unsqueeze(-1), 0.0), -1).masked_fill(keyless, NEG)
    p = torch.softmax(s.masked_fill(keyless.unsqueeze(-1), 0.0), -1) * (~keyless).unsqueeze(-1)
    return p @ v, lse


def _reference(q, k, v, dout, causal, band, softcap):
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = _dense(*ins, _hidden(q.shape[2], k.shape[2], causal, band), softcap)
    grads = torch.autograd.grad(out, ins, dout)
    return out.detach(), lse.detach(), grads


def _small_tiles(monkeypatch):
    monkeypatch.setattr(tiled, "TILE_ELEMENTS", 2 * 6 * 5 * 4)  # b * H * rows * cols: tiles of 4-5 keys
    monkeypatch.setattr(tiled, "KEY_TILE", 4)


def _kw(band, softcap):
    return {k: v for k, v in (("band", band), ("softcap", softcap)) if v is not None}


@pytest.mark.parametrize("name", ["math", "tiled", "cpu_flash"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernels_with_band_and_softcap_against_dense_float64(name, case, monkeypatch):
    _small_tiles(monkeypatch)
    _, (h, hkv), sq, sk, causal, band, softcap = case
    kernel = kernels.KERNELS[name]
    if softcap is not None and not kernel.takes_softcap:
        pytest.skip(f"{name} takes no softcap (selection refuses it: test_selection_*)")
    q, k, v, dout = _inputs(h, hkv, sq, sk)
    out_ref, lse_ref, grads_ref = _reference(q, k, v, dout, causal, band, softcap)
    out, lse = kernel.forward(q, k, v, SCALE, causal, **_kw(band, softcap))
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)), "keyless rows: lse -inf exactly there"
    grads = kernel.backward(dout, q, k, v, out_ref, lse_ref, SCALE, causal, **_kw(band, softcap))
    for got, want, what in zip((out, lse, *grads), (out_ref, lse_ref, *grads_ref), ("out", "lse", "dq", "dk", "dv")):
        assert got.shape == want.shape and not got.isnan().any(), what
        fin = torch.isfinite(want)
        assert (got[fin] - want[fin]).abs().max().item() < 1e-12, (name, case[0], what)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_block_forward_dispatches_bands_like_the_kernels(case, monkeypatch):
    """Through kernels.block_forward/backward (the automatic choice on CPU: cpu_flash for bands,
    tiled with softcap), float32 within 1e-5 of the float64 reference."""
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    _, (h, hkv), sq, sk, causal, band, softcap = case
    q, k, v, dout = _inputs(h, hkv, sq, sk)
    out_ref, lse_ref, grads_ref = _reference(q, k, v, dout, causal, band, softcap)
    f32 = [t.float() for t in (q, k, v, dout)]
    out, lse = kernels.block_forward(*f32[:3], SCALE, causal, band=band, softcap=softcap)
    grads = kernels.block_backward(f32[3], *f32[:3], out_ref.float(), lse_ref.float(), SCALE, causal, band=band,
                                   softcap=softcap)
    for got, want in zip((out, lse, *grads), (out_ref, lse_ref, *grads_ref)):
        fin = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), fin)
        assert ((got.double()[fin] - want[fin]).abs().max() / want[fin].abs().max()).item() < 1e-5


def test_cpu_flash_band_in_float32_and_in_row_slices(monkeypatch):
    """The band mask cut into row slices (MASK_ELEMENTS) gives the same rows as one slice."""
    monkeypatch.setattr(cpu_flash, "MASK_ELEMENTS", 5 * 29)
    q, k, v, dout = _inputs(2, 2, 17, 29)
    band = Band(2, 9)
    out_ref, lse_ref, grads_ref = _reference(q, k, v, dout, False, band, None)
    f32 = [t.float() for t in (q, k, v, dout)]
    out, lse = cpu_flash.forward(*f32[:3], SCALE, False, band=band)
    grads = cpu_flash.backward(f32[3], *f32[:3], out_ref.float(), lse_ref.float(), SCALE, False, band=band)
    for got, want in zip((out, lse, *grads), (out_ref, lse_ref, *grads_ref)):
        assert got.dtype == torch.float32
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5


def test_a_row_keyless_everywhere_gets_zero_gradients():
    """A merged lse of -inf (the row sees no key in any block): zero gradients, never NaN."""
    q, k, v, dout = _inputs(2, 2, 15, 15)
    band = Band(-3, -1)  # row 0 sees nothing
    out, lse = math_kernel.forward(q, k, v, SCALE, False, band=band)
    assert lse[:, :, 0].eq(NEG).all() and out[:, :, 0].eq(0).all()
    for name in ("math", "tiled", "cpu_flash"):
        dq, dk, dv = kernels.KERNELS[name].backward(dout, q, k, v, out, lse, SCALE, False, band=band)
        assert dq[:, :, 0].eq(0).all() and not any(g.isnan().any() for g in (dq, dk, dv)), name


def test_merging_a_keyless_row_stays_finite():
    """The documented merge contract: logaddexp(-inf, x) = x, weight exp(-inf - x) = 0."""
    from lss_plugin.attention import _merge

    q, k, v, _ = _inputs(1, 1, 10, 20)
    left = math_kernel.forward(q, k[:, :, :10], v[:, :, :10], SCALE, False, band=Band(-3, 3))
    right = math_kernel.forward(q, k[:, :, 10:], v[:, :, 10:], SCALE, False, band=Band(-13, -7))  # rows 0-2 keyless
    assert right[1][:, :, :3].eq(NEG).all()
    out, lse = _merge(*left, *right)
    want_out, want_lse = math_kernel.forward(q, k, v, SCALE, False, band=Band(-3, 3))
    assert (out - want_out).abs().max() < 1e-12 and (lse - want_lse).abs().max() < 1e-12


@pytest.mark.parametrize("spec", [MaskSpec.sliding(1), MaskSpec.sliding(7), MaskSpec.sliding(5, causal=False),
                                  MaskSpec(causal=False, window=(3, 9)), MaskSpec(causal=True)], ids=repr)
def test_key_blocks_never_give_a_kernel_a_keyless_row(spec):
    """Every band a MaskSpec describes contains offset 0 and each block holds its queries' own keys:
    masks.key_blocks' blocks have no keyless row (so LSS never merges two keyless rows)."""
    for doc, (q0, q1), tile in (((0, 50), (0, 50), None), ((10, 70), (31, 55), 3), ((0, 40), (5, 40), 64)):
        for blk in key_blocks(q0, q1, *doc, spec.band, tile):
            sq, sk = blk.q_end - blk.q_start, blk.k_end - blk.k_start
            assert blk.band.rows_with_keys(sq, sk) == range(sq), (spec, blk)


# --- tiled: tiles outside the band are never visited ---------------------------------------------

def test_tiled_skips_tiles_outside_a_narrow_band(monkeypatch):
    monkeypatch.setattr(tiled, "TILE_ELEMENTS", 4 * 16 * 16)
    monkeypatch.setattr(tiled, "KEY_TILE", 16)
    sq = sk = 512
    assert tiled.plan_tiles(4, 40, 20, True, Band(lo=-10)) == []  # causal hi = -20 < lo: no pair
    for causal, band in ((True, Band(lo=-8)), (False, Band(-8, 8)), (False, Band(40, 60))):
        plan = tiled.plan_tiles(4, sq, sk, causal, band)
        full = tiled.plan_tiles(4, sq, sk, False)
        seen = torch.zeros(sq, sk, dtype=torch.int64)
        hidden = _hidden(sq, sk, causal, band)
        for row_tiles in plan:
            for t in row_tiles:
                block = hidden[t.rows.start:t.rows.stop, t.cols.start:t.cols.stop]
                assert not block.all() and t.masked == bool(block.any())  # a mask only across a band edge
                seen[t.rows.start:t.rows.stop, t.cols.start:t.cols.stop] += 1
        assert seen.max() == 1 and bool((seen.bool() | hidden).all())  # every visible pair, once
        n_tiles, n_full = sum(map(len, plan)), sum(map(len, full))
        assert n_tiles <= 3 * (sq // 16), (band, n_tiles)  # about 2-3 tiles per query tile...
        assert n_full == (sq // 16) * (sk // 16)  # ...of the 32 x 32 the full block has


# --- half precision -------------------------------------------------------------------------------

EPS_BOUND = 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_band_and_softcap_like_plain_causal(dtype, monkeypatch):
    monkeypatch.setattr(tiled, "TILE_ELEMENTS", 2 * 8 * 64 * 64)
    monkeypatch.setattr(tiled, "KEY_TILE", 64)
    d, sq, sk = 64, 96, 256
    scale = 1 / math.sqrt(d)
    gen = torch.Generator().manual_seed(1)
    q, dout = (torch.randn(2, 8, sq, d, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, 2, sk, d, generator=gen, dtype=torch.float64) for _ in range(2))
    half = [t.to(dtype) for t in (q, k, v, dout)]

    def errors(kernel, **kw):
        ref_out, ref_lse = math_kernel.forward(q, k, v, scale, True, **kw)
        refs = (ref_out, *math_kernel.backward(dout, q, k, v, ref_out, ref_lse, scale, True, **kw))
        out, lse = kernel.forward(*half[:3], scale, True, **kw)
        got = (out, *kernel.backward(half[3], *half[:3], out.to(dtype), lse, scale, True, **kw))
        return [((g.to(dtype).double() - r).abs().max() / r.abs().max()).item() for g, r in zip(got, refs)]

    bound = EPS_BOUND * torch.finfo(dtype).eps
    for kernel in (tiled, math_kernel):
        plain = errors(kernel)
        masked = errors(kernel, band=Band(lo=-40), softcap=0.5)  # cap 0.5 < the scores' spread: it bites
        for what, e, base in zip(("out", "dq", "dk", "dv"), masked, plain):
            assert e <= bound, (kernel.__name__, dtype, what, e, bound)
            assert e <= 1.5 * base, (kernel.__name__, dtype, what, e, base)


# --- selection ------------------------------------------------------------------------------------

def test_selection_skips_and_refuses_kernels_by_setting(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    q = torch.empty(1, 4, 8, 8)
    assert kernels.kernel_name(q) == "cpu_flash"
    assert kernels.kernel_name(q, band=Band(lo=-3)) == "cpu_flash"  # an explicit mask
    assert kernels.kernel_name(q, softcap=30.0) == "tiled"  # cpu_flash has no score hook
    assert kernels.kernel_name(q, band=Band(lo=-3), softcap=30.0) == "tiled"
    assert kernels.causal_prefix_in_one_call(q, 2, band=Band(lo=-3))
    with pytest.raises(ValueError, match="softcap must be a positive finite number"):
        kernels.select_kernel(q, softcap=0.0)
    monkeypatch.setenv(kernels.ENV_VAR, "cpu_flash")
    assert kernels.kernel_name(q, band=Band(-3, 3)) == "cpu_flash"
    with pytest.raises(ValueError, match=r"'cpu_flash' cannot run here: it takes no softcap\. .*with softcap: "
                                         r"\['tiled', 'math'\]"):
        kernels.block_forward(q, q, q, 1.0, True, softcap=30.0)
    with pytest.raises(ValueError, match=r"it takes no softcap.*with band and softcap: \['tiled', 'math'\]"):
        kernels.block_backward(q, q, q, q, q, q[..., 0], 1.0, True, band=Band(lo=-2), softcap=30.0)
    for sdpa in ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn"):  # causal / full only
        assert not kernels.KERNELS[sdpa].takes_band and not kernels.KERNELS[sdpa].takes_softcap
    monkeypatch.setenv(kernels.ENV_VAR, "flex")
    if kernels.unavailable_reason("flex"):
        with pytest.raises(ValueError, match="'flex' cannot run here: no CUDA device"):
            kernels.select_kernel(q, band=Band(lo=-3))


def test_plain_calls_never_reach_the_masked_paths(monkeypatch):
    """Without band and softcap every kernel is called as (q, k, v, scale, causal), as before."""
    calls = []
    fake = types.SimpleNamespace(**{f.name: getattr(kernels.KERNELS["tiled"], f.name)
                                    for f in kernels.Kernel.__dataclass_fields__.values()})
    fake.forward = lambda *a, **kw: calls.append(kw) or tiled.forward(*a, **kw)
    monkeypatch.setitem(kernels.KERNELS, "spy", kernels.Kernel(**vars(fake) | {"name": "spy"}))
    monkeypatch.setenv(kernels.ENV_VAR, "spy")
    q = torch.randn(1, 2, 6, 8)
    kernels.block_forward(q, q, q, 1.0, True)
    kernels.block_forward(q, q, q, 1.0, True, band=Band(lo=-2), softcap=5.0)
    assert calls == [{}, {"band": Band(lo=-2), "softcap": 5.0}]


# --- flash-attn: window_size and softcap through a stand-in ----------------------------------------

def _fa_window_stand_in():
    """flash-attn 2.7's signature; window (bottom-right relative, -1 unbounded) and softcap computed by
    the math kernel; keyless rows' lse +inf as flash-attn returns it."""
    def band_of(sq, sk, left, right):
        off = sk - sq
        return Band(None if left < 0 else off - left, None if right < 0 else off + right)

    def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                            softcap, alibi_slopes, return_softmax):
        assert not causal  # the adapter passes the causal part as the window
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        band = band_of(q.shape[2], k.shape[2], window_size_left, window_size_right)
        out, lse = math_kernel.forward(q, k, v, softmax_scale, False, band=band, softcap=softcap or None)
        return out.transpose(1, 2), lse.masked_fill(lse == NEG, float("inf")), None, None

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                             window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                             rng_state=None):
        assert not causal and not (softmax_lse == NEG).any()  # flash-attn's keyless value is +inf
        dout, q, k, v, out = (t.transpose(1, 2) for t in (dout, q, k, v, out))
        band = band_of(q.shape[2], k.shape[2], window_size_left, window_size_right)
        grads = math_kernel.backward(dout, q, k, v, out, softmax_lse, softmax_scale, False, band=band,
                                     softcap=softcap or None)
        for buf, g in zip((dq, dk, dv), grads):
            buf.copy_(g.transpose(1, 2))

    return types.SimpleNamespace(__name__="flash_attn_2.7", _flash_attn_forward=_flash_attn_forward,
                                 _flash_attn_backward=_flash_attn_backward)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_flash_attn_window_and_softcap_mapping(case):
    """Every band becomes a flash-attn window after trimming (keyless rows: out 0, lse -inf)."""
    module = _fa_window_stand_in()
    _, (h, hkv), sq, sk, causal, band, softcap = case
    q, k, v, dout = _inputs(h, hkv, sq, sk)
    out_ref, lse_ref, grads_ref = _reference(q, k, v, dout, causal, band, softcap)
    out, lse = cuda_fused.flash_attn_forward(q, k, v, SCALE, causal, module=module, band=band, softcap=softcap)
    grads = cuda_fused.flash_attn_backward(dout, q, k, v, out_ref, lse_ref, SCALE, causal, module=module,
                                           band=band, softcap=softcap)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)) and not (lse == float("inf")).any()
    for got, want in zip((out, lse, *grads), (out_ref, lse_ref, *grads_ref)):
        fin = torch.isfinite(want)
        assert (got[fin] - want[fin]).abs().max().item() < 1e-12


def test_flash_attn_window_is_relative_to_the_bottom_right():
    assert cuda_fused.fa_window(Band(lo=-4, hi=0), 8, 8) == (4, 0)  # sliding window 5, causal
    assert cuda_fused.fa_window(Band(lo=-4, hi=24), 8, 32) == (28, 0)  # prefix + diagonal: left counts the prefix
    assert cuda_fused.fa_window(Band(), 8, 32) == (-1, -1)
    assert cuda_fused.fa_trim(Band(5, 8), 20, 12) == (7, 12)  # queries 7.. see no key
    assert cuda_fused.fa_trim(Band(-3, 0), 10, 30) == (10, 10)  # keys 10.. are nobody's
    with pytest.raises(ValueError, match="does not contain its bottom-right offset 4"):
        cuda_fused.fa_window(Band(lo=5), 8, 12)


# --- FlexAttention: block mask, mods, CPU forward, the merged-row backward -------------------------

@pytest.mark.parametrize("band", [Band(lo=-5, hi=0), Band(-20, 9), Band(3, 40), Band(hi=-10), Band(lo=30)])
def test_flex_tile_kinds_match_the_dense_band(band):
    sq, sk, block = 45, 70, 8
    partial, full = flex.tile_kinds(band, sq, sk, block)
    visible = ~_hidden(sq, sk, False, band)
    for r in range(partial.shape[0]):
        for c in range(partial.shape[1]):
            tile = visible[r * block:(r + 1) * block, c * block:(c + 1) * block]
            assert bool(full[r, c]) == bool(tile.all()) and bool(partial[r, c]) == bool(tile.any() and not tile.all())


def test_flex_mods_on_plain_tensors():
    q_idx, k_idx = torch.arange(6).view(-1, 1), torch.arange(9).view(1, -1)
    mod = flex.band_mask_mod(torch.tensor(-2), torch.tensor(1))
    assert torch.equal(mod(0, 0, q_idx, k_idx), ~_hidden(6, 9, False, Band(-2, 1)))
    s = torch.linspace(-50, 50, 11, dtype=torch.float64)
    assert torch.equal(flex.softcap_score_mod(torch.tensor(5.0, dtype=torch.float64))(s, 0, 0, 0, 0),
                       softcap_scores(s, 5.0))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_flex_forward_on_cpu_against_dense(case, monkeypatch):
    monkeypatch.setattr(flex, "BLOCK", 8)  # several tiles: skipped, partial and full ones
    _, (h, hkv), sq, sk, causal, band, softcap = case
    q, k, v, dout = _inputs(h, hkv, sq, sk)
    out_ref, lse_ref, _ = _reference(q, k, v, dout, causal, band, softcap)
    out, lse = flex.forward(q, k, v, SCALE, causal, band=band, softcap=softcap)
    fin = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), fin)
    assert (out - out_ref).abs().max() < 1e-12 and (lse[fin] - lse_ref[fin]).abs().max() < 1e-12


def test_flex_backward_identity_gives_the_merged_row_gradients():
    """grads_for_merged_rows on a dense differentiable block (the role flex's autograd plays on CUDA):
    a block of keys [0, 20) of rows whose merged lse also counts keys [20, 41)."""
    q, k, v, dout = _inputs(4, 2, 18, 41)
    band, softcap = Band(lo=5, hi=30), 2.5  # rows 15.. see no key below 20
    hidden = _hidden(18, 41, False, band)
    out_all, lse_all, _ = _reference(q, k, v, dout, False, band, softcap)  # the merged rows
    ins = tuple(t.clone().requires_grad_() for t in (q, k[:, :, :20], v[:, :, :20]))
    out_b, lse_b = _dense(*ins, hidden[:, :20], softcap)  # the block's own, differentiable
    assert (lse_b == NEG).any()  # some rows see none of these keys
    got = flex.grads_for_merged_rows(out_b, lse_b, ins, dout, out_all, lse_all)
    want = math_kernel.backward(dout, q, k[:, :, :20], v[:, :, :20], out_all, lse_all, SCALE, False,
                                band=band, softcap=softcap)
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-12


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_band_and_softcap_kernels_against_float64_math(dtype):
    """flash_attn and flex with windows and softcap against float64 math on the GPU: the error of the
    kernel within 1.5x of the same kernel's plain causal error plus 1e-6 (forward and backward)."""
    ran = []
    d, sq, sk = 64, 256, 768
    scale = 1 / math.sqrt(d)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, dout = (torch.randn(2, 8, sq, d, device="cuda", dtype=torch.float64, generator=gen) for _ in range(2))
    k, v = (torch.randn(2, 2, sk, d, device="cuda", dtype=torch.float64, generator=gen) for _ in range(2))
    half = [t.to(dtype) for t in (q, k, v, dout)]
    for name in ("flash_attn", "flex"):
        kernel = kernels.KERNELS[name]
        if kernels.unavailable_reason(name) or kernel.unsupported(half[0]):
            continue

        def errors(**kw):
            ref_out, ref_lse = math_kernel.forward(q, k, v, scale, True, **kw)
            refs = (ref_out, *math_kernel.backward(dout, q, k, v, ref_out, ref_lse, scale, True, **kw))
            out, lse = kernel.forward(*half[:3], scale, True, **kw)
            got = (out, *kernel.backward(half[3], *half[:3], out.to(dtype), lse, scale, True, **kw))
            return [((g.double() - r).abs().max() / r.abs().max()).item() for g, r in zip(got, refs)]

        plain = errors(band=Band())
        for kw in ({"band": Band(lo=-127)}, {"softcap": 0.5}, {"band": Band(lo=-100, hi=300), "softcap": 0.5}):
            for what, e, base in zip(("out", "dq", "dk", "dv"), errors(**kw), plain):
                assert e <= 1.5 * base + 1e-6, (name, dtype, kw, what, e, base)
        ran.append(name)
    if not ran:
        pytest.skip("neither flash_attn nor flex runs here")


def test_effective_band_is_causal_intersected():
    assert effective_band(8, 8, True, None) == Band(None, 0)
    assert effective_band(8, 20, True, Band(lo=-3)) == Band(-3, 12)
    assert effective_band(8, 20, True, Band(-3, 30)) == Band(-3, 12)
    assert effective_band(8, 20, False, Band()) is None
    assert Band(-5, 3).rows_with_keys(10, 4) == range(0, 9) and Band(-5, -2).rows_with_keys(6, 6) == range(2, 6)


def test_band_rows_with_keys_and_keys_seen_match_the_dense_mask():
    for band in (Band(), Band(lo=-3), Band(hi=-2), Band(-4, 2), Band(3, 7), Band(-9, -6), Band(5, 4)):
        for sq, sk in ((1, 1), (6, 6), (4, 11), (11, 4), (0, 3), (3, 0)):
            visible = ~_hidden(sq, sk, False, band)
            rows = [i for i in range(sq) if visible[i].any()]
            assert list(band.rows_with_keys(sq, sk)) == rows, (band, sq, sk)
            cols = [j for j in range(sk) if visible[:, j].any()]
            assert list(band.keys_seen(sq, sk)) == cols, (band, sq, sk)
            other = Band(-2, None)
            both = band.intersect(other)
            assert torch.equal(_hidden(sq, sk, False, both), _hidden(sq, sk, False, band) | _hidden(sq, sk, False, other))
