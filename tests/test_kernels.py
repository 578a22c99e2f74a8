"""Block attention kernels (lss_plugin/kernels): exactness, selection, CUDA signatures, memory bound.

Tolerances: every backend this machine runs against ``math`` in float64 within 1e-10 (absolute;
values are O(1)), GQA included; in bfloat16/float16 each of out, dq, dk, dv within 2 eps of the dtype
(relative to the largest reference value) of the float64 math reference, and within 1.2x the error
of torch's single-device SDPA in the same dtype. CUDA ops are checked for signature and output
shapes with meta tensors here (flash-attn, not installed, through stand-ins with each version's
real signature and return tuple), for values by the ``gpu``-marked tests.
"""
from __future__ import annotations

import math
import os
import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lss_plugin import kernels
from lss_plugin.kernels import cuda_fused, gqa, tiled
from lss_plugin.kernels import reference as math_kernel
from lss_plugin.kernels.base import always_available
from tests.distributed import run_ranks

SCALE = 0.3
# (b, h, sq, sk, d, causal): a diagonal block, a bottom-right causal prefix+diagonal block, a
# non-causal prefix block, and head dims off the vector width.
SHAPES = [(2, 3, 37, 37, 8, True), (2, 3, 29, 70, 16, True), (1, 2, 33, 51, 12, False), (2, 2, 64, 64, 64, True)]
# GQA (h, hkv): a diagonal block, a prefix+diagonal block, a non-causal block
GQA_SHAPES = [(2, (6, 2), 37, 37, 8, True), (2, (4, 1), 29, 70, 16, True), (1, (4, 2), 33, 51, 12, False)]


def _inputs(b, h, sq, sk, d, dtype=torch.float64, device="cpu", seed=0):
    """q, k, v, dout [b, heads, s, d]; ``h`` is the head count or (query heads, KV heads)."""
    h, hkv = h if isinstance(h, tuple) else (h, h)
    gen = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(b, h, sq, d, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(b, hkv, sk, d, generator=gen, dtype=torch.float64) for _ in range(2))
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, dout)]


def _small_tiles(monkeypatch):
    """Several query and key tiles even at test sizes (and a key tile that does not divide sk)."""
    monkeypatch.setattr(tiled, "TILE_ELEMENTS", 2 * 3 * 16 * 7)
    monkeypatch.setattr(tiled, "KEY_TILE", 7)


def _bottom_right_ok(kernel, sq, sk, causal):
    return not causal or sq == sk or kernel.bottom_right_causal


@pytest.mark.parametrize("name", [n for n in kernels.runnable_kernels() if n != "math"])
def test_every_runnable_kernel_matches_math_in_float64(name, monkeypatch):
    _small_tiles(monkeypatch)
    kernel = kernels.KERNELS[name]
    device = "cpu" if kernel.unsupported(torch.empty(0, dtype=torch.float64)) is None else "cuda"
    if kernel.unsupported(torch.empty(1, 1, 1, 64, dtype=torch.float64, device=device)):
        pytest.skip(f"{name} takes no float64 (checked against SDPA by the gpu test)")
    checked = 0
    for b, h, sq, sk, d, causal in SHAPES + GQA_SHAPES:
        q, k, v, dout = _inputs(b, h, sq, sk, d, device=device)
        if kernel.unsupported(q) or not _bottom_right_ok(kernel, sq, sk, causal):
            continue
        # GQA shapes: natively, or (kernels without gqa_native) through kernels.gqa as block_forward does
        fwd, bwd = ((kernel.forward, kernel.backward) if kernel.gqa_native or q.shape[1] == k.shape[1] else
                    (lambda *a: gqa.forward(kernel, *a), lambda *a: gqa.backward(kernel, *a)))
        out_ref, lse_ref = math_kernel.forward(q, k, v, SCALE, causal)
        out, lse = fwd(q, k, v, SCALE, causal)
        grads_ref = math_kernel.backward(dout, q, k, v, out_ref, lse_ref, SCALE, causal)
        grads = bwd(dout, q, k, v, out_ref, lse_ref, SCALE, causal)
        assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float64
        for got, want, what in zip((out, lse, *grads), (out_ref, lse_ref, *grads_ref), ("out", "lse", "dq", "dk", "dv")):
            assert got.shape == want.shape, what
            assert (got - want).abs().max().item() < 1e-10, (name, (b, h, sq, sk, d, causal), what)
        checked += 1
    assert checked >= 4, f"{name} took too few of the shapes"


def test_math_kernel_gqa_is_the_repeated_heads_attention():
    """The reference's GQA: KV head j serves query heads [j*g, (j+1)*g); dk, dv sum over them."""
    q, k, v, dout = _inputs(2, (6, 2), 29, 70, 16)
    kr, vr = (t.repeat_interleave(3, dim=1).clone().requires_grad_() for t in (k, v))
    out_r, lse_r = math_kernel.forward(q, kr, vr, SCALE, True)
    dq_r, dk_r, dv_r = math_kernel.backward(dout, q, kr, vr, out_r, lse_r, SCALE, True)
    out, lse = math_kernel.forward(q, k, v, SCALE, True)
    dq, dk, dv = math_kernel.backward(dout, q, k, v, out, lse, SCALE, True)
    assert torch.equal(out, out_r) and torch.equal(dq, dq_r)
    for got, rep in ((dk, dk_r), (dv, dv_r)):
        assert (got - rep.view(2, 2, 3, 70, 16).sum(2)).abs().max().item() < 1e-12


def test_math_kernel_matches_autograd_with_bottom_right_mask():
    """The reference itself, against autograd through plain softmax attention (bottom-right mask)."""
    q, k, v, dout = _inputs(2, 3, 29, 70, 16)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    scores = ref_in[0] @ ref_in[1].transpose(-1, -2) * SCALE
    scores = scores.masked_fill(torch.ones(29, 70, dtype=torch.bool).triu(70 - 29 + 1), float("-inf"))
    ref_out = torch.softmax(scores, -1) @ ref_in[2]
    ref_out.backward(dout)
    out, lse = math_kernel.forward(q, k, v, SCALE, True)
    grads = math_kernel.backward(dout, q, k, v, out, lse, SCALE, True)
    for got, want in zip((out, *grads), (ref_out, *(t.grad for t in ref_in))):
        assert (got - want).abs().max().item() < 1e-10


# --- selection -------------------------------------------------------------------------------

def test_automatic_choice_on_cpu(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        assert kernels.kernel_name(torch.empty(1, 1, 4, 8, dtype=dtype)) == "cpu_flash"
    # Off CPU (a meta tensor stands for any device without a fused kernel): the tiled kernel.
    assert kernels.kernel_name(torch.empty(1, 1, 4, 8, device="meta")) == "tiled"
    q = torch.empty(1, 4, 4, 8)
    for forced in (None, "tiled", "math"):  # bottom-right causal and GQA-native: one call, GQA or not
        if forced:
            monkeypatch.setenv(kernels.ENV_VAR, forced)
        assert kernels.causal_prefix_in_one_call(q) and kernels.causal_prefix_in_one_call(q, 2)


def test_one_call_needs_bottom_right_causal_and_native_gqa(monkeypatch):
    """A kernel without gqa_native gets one call only without GQA (kernels.gqa would repeat the prefix's
    KV heads); one without bottom_right_causal never."""
    base = kernels.KERNELS["tiled"]
    monkeypatch.setitem(kernels.KERNELS, "no_gqa", replace(base, name="no_gqa", gqa_native=False))
    monkeypatch.setitem(kernels.KERNELS, "top_left", replace(base, name="top_left", bottom_right_causal=False))
    q = torch.empty(1, 4, 4, 8)
    monkeypatch.setenv(kernels.ENV_VAR, "no_gqa")
    assert kernels.causal_prefix_in_one_call(q, 4) and not kernels.causal_prefix_in_one_call(q, 2)
    monkeypatch.setenv(kernels.ENV_VAR, "top_left")
    assert not kernels.causal_prefix_in_one_call(q, 4)


def test_forcing_a_kernel_this_machine_cannot_run_is_an_error(monkeypatch):
    missing = [n for n in kernels.KERNELS if kernels.unavailable_reason(n)]
    if not missing:
        pytest.skip("this machine runs every kernel")
    monkeypatch.setenv(kernels.ENV_VAR, missing[0])
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match=missing[0]) as err:
        kernels.block_forward(q, q, q, 1.0, True)
    for name in kernels.runnable_kernels():  # the message lists what can run
        assert repr(name) in str(err.value)
    monkeypatch.setenv(kernels.ENV_VAR, "no_such_kernel")
    with pytest.raises(ValueError, match="no_such_kernel"):
        kernels.block_forward(q, q, q, 1.0, True)


def test_kernel_that_cannot_take_the_inputs_is_an_error(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "cpu_flash")
    meta = torch.empty(1, 1, 4, 8, device="meta")
    with pytest.raises(ValueError, match="CPU tensors only.*'tiled'"):
        kernels.block_forward(meta, meta, meta, 1.0, False)
    q, k = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 9, 8)  # causal with sq < sk: bottom-right
    top_left = replace(kernels.KERNELS["cpu_flash"], name="top_left", bottom_right_causal=False)
    monkeypatch.setitem(kernels.KERNELS, "top_left", top_left)
    monkeypatch.setenv(kernels.ENV_VAR, "top_left")
    with pytest.raises(ValueError, match="'top_left' has no bottom-right causal alignment.*'cpu_flash'"):
        kernels.block_forward(q, k, k, 1.0, True)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of key/value heads \(2\)"):
        kernels.block_forward(torch.zeros(1, 3, 4, 8), torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), 1.0, False)
    monkeypatch.setenv(kernels.ENV_VAR, "tiled")
    with pytest.raises(ValueError, match="more queries"):
        kernels.block_forward(k, q, q, 1.0, True)


# --- CUDA ops: signatures and output shapes on meta tensors --------------------------------------

@pytest.mark.parametrize("fused", ["sdpa_flash", "sdpa_efficient", "sdpa_cudnn"])
@pytest.mark.parametrize("sq,sk", [(100, 100), (96, 160)])
def test_cuda_op_signatures_and_shapes_on_meta(fused, sq, sk):
    b, h, d = 2, 4, 64
    fwd, bwd = getattr(cuda_fused, f"{fused}_forward"), getattr(cuda_fused, f"{fused}_backward")
    q, dout = (torch.empty(b, h, sq, d, device="meta", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.empty(b, h, sk, d, device="meta", dtype=torch.bfloat16) for _ in range(2))
    out, lse = fwd(q, k, v, SCALE, sq == sk)
    assert (out.shape, out.dtype) == (q.shape, q.dtype)
    assert (lse.shape, lse.dtype) == ((b, h, sq), torch.float32)
    dq, dk, dv = bwd(dout, q, k, v, out, lse, SCALE, sq == sk)
    assert [(g.shape, g.dtype) for g in (dq, dk, dv)] == [(q.shape, q.dtype), (k.shape, k.dtype), (v.shape, v.dtype)]


@pytest.mark.parametrize("fused", ["sdpa_flash", "sdpa_efficient", "sdpa_cudnn"])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_ops_take_gqa_through_the_adapter_on_meta(fused, causal):
    """sdpa_* kernels are not GQA-native: kernels.gqa repeats KV heads (causal) or folds the query
    groups into rows (not causal); dk, dv come back with the KV heads, summed in float32."""
    kernel = kernels.KERNELS[fused]
    assert not kernel.gqa_native
    b, h, hkv, s, d = 2, 8, 2, 96, 64
    q, dout = (torch.empty(b, h, s, d, device="meta", dtype=torch.float16) for _ in range(2))
    k, v = (torch.empty(b, hkv, s, d, device="meta", dtype=torch.float16) for _ in range(2))
    out, lse = gqa.forward(kernel, q, k, v, SCALE, causal)
    assert (out.shape, lse.shape, lse.dtype) == (q.shape, (b, h, s), torch.float32)
    dq, dk, dv = gqa.backward(kernel, dout, q, k, v, out, lse, SCALE, causal)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    if causal:
        assert dk.dtype == dv.dtype == torch.float32  # the group sums, before the caller's one rounding


def test_efficient_lse_padding_matches_its_forward():
    """The backward pads a merged lse to the row count the forward op itself returns."""
    for sq in (1, 31, 32, 33, 100):
        q = torch.empty(1, 2, sq, 64, device="meta", dtype=torch.float16)
        raw = torch.ops.aten._scaled_dot_product_efficient_attention(q, q, q, None, True, 0.0, False)[1]
        assert raw.shape[-1] == -(-sq // cuda_fused._EFFICIENT_LSE_ALIGN) * cuda_fused._EFFICIENT_LSE_ALIGN


def _fa_stand_in(version):
    """A stand-in flash-attn interface with the real signature of one version, computing through the
    math kernel in flash-attn's [b, s, h, d] layout (bottom-right causal, as flash-attn >= 2.1).
    Checks the adapter's argument mapping, layout and output indexing; not the CUDA kernel."""
    def fwd_math(q, k, v, softmax_scale, causal):
        out, lse = math_kernel.forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale, causal)
        return out.transpose(1, 2), lse

    def bwd_math(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal):
        grads = math_kernel.backward(*(t.transpose(1, 2) for t in (dout, q, k, v, out)), softmax_lse, softmax_scale, causal)
        for buf, g in zip((dq, dk, dv), grads):
            buf.copy_(g.transpose(1, 2))

    if version == "2.6":
        def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                return_softmax):
            assert dropout_p == 0.0 and window_size == (-1, -1) and not return_softmax
            out, lse = fwd_math(q, k, v, softmax_scale, causal)
            return out, q, k, v, out, lse, None, None

        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                 window_size, softcap, alibi_slopes, deterministic, rng_state=None):
            bwd_math(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)
    elif version == "2.7":
        def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                                softcap, alibi_slopes, return_softmax):
            assert (window_size_left, window_size_right) == (-1, -1)
            out, lse = fwd_math(q, k, v, softmax_scale, causal)
            return out, lse, None, None

        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                 window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                                 rng_state=None):
            bwd_math(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)
    else:  # FA3 (hopper/flash_attn_interface.py)
        def _flash_attn_forward(q, k, v, k_new, v_new, qv, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new,
                                seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx,
                                leftpad_k, rotary_cos, rotary_sin, seqlens_rotary, q_descale, k_descale,
                                v_descale, softmax_scale, causal, window_size=(-1, -1), attention_chunk=0,
                                softcap=0.0, rotary_interleaved=True, scheduler_metadata=None, num_splits=1,
                                pack_gqa=None, sm_margin=0):
            assert out is None and cu_seqlens_q is None
            out, lse = fwd_math(q, k, v, softmax_scale, causal)
            return out, lse, None, None

        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k,
                                 max_seqlen_q, max_seqlen_k, dq, dk, dv, softmax_scale, causal, window_size=(-1, -1),
                                 softcap=0.0, deterministic=False, sm_margin=0):
            bwd_math(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)
    return types.SimpleNamespace(__name__=f"flash_attn_{version}", _flash_attn_forward=_flash_attn_forward,
                                 _flash_attn_backward=_flash_attn_backward)


@pytest.mark.parametrize("version", ["2.6", "2.7", "3"])
@pytest.mark.parametrize("heads", [3, (6, 2)])
def test_flash_attn_adapter_against_each_interface_version(version, heads):
    module = _fa_stand_in(version)
    fwd_values, bwd_values = cuda_fused._fa_probe()
    assert not cuda_fused._missing_arguments(module._flash_attn_forward, fwd_values)
    assert not cuda_fused._missing_arguments(module._flash_attn_backward, bwd_values)
    q, k, v, dout = _inputs(2, heads, 29, 70, 16)  # prefix + diagonal in one call (GQA: KV heads as given)
    out_ref, lse_ref = math_kernel.forward(q, k, v, SCALE, True)
    grads_ref = math_kernel.backward(dout, q, k, v, out_ref, lse_ref, SCALE, True)
    out, lse = cuda_fused.flash_attn_forward(q, k, v, SCALE, True, module=module)
    grads = cuda_fused.flash_attn_backward(dout, q, k, v, out_ref, lse_ref, SCALE, True, module=module)
    for got, want in zip((out, lse, *grads), (out_ref, lse_ref, *grads_ref)):
        assert got.shape == want.shape and (got - want).abs().max().item() < 1e-10


def _fa_returns(version, b, h, hkv, sq, sk, d):
    """The tuple ``_flash_attn_forward`` returns in each flash-attn version (fabricated tensors, the
    real types and shapes); the lse is ones, everything else zeros."""
    f16, f32 = torch.float16, torch.float32
    q, out = torch.zeros(b, sq, h, d, dtype=f16), torch.zeros(b, sq, h, d, dtype=f16)
    k = torch.zeros(b, sk, hkv, d, dtype=f16)
    lse = torch.ones(b, h, sq, dtype=f32)
    rng_state = torch.zeros(2, dtype=torch.int64)
    if version in ("2.0", "2.6"):  # 2.0 - 2.6: out, q, k, v, out_padded, softmax_lse, S_dmask, rng_state
        return out, q, k, k, out, lse, None, rng_state
    if version == "2.7":  # >= 2.7: out, softmax_lse, S_dmask, rng_state
        return out, lse, None, rng_state
    # FA3: out, softmax_lse, out_accum, softmax_lse_accum (split-KV accumulators, float32)
    return out, lse, torch.zeros(2, b, h, sq, d, dtype=f32), torch.zeros(2, b, h, sq, dtype=f32)


@pytest.mark.parametrize("version", ["2.0", "2.6", "2.7", "3"])
def test_flash_attn_lse_is_picked_by_dtype_and_shape(version):
    for b, h, hkv, sq, sk, d in ((2, 4, 2, 16, 48, 64), (1, 2, 2, 2, 2, 2), (2, 64, 8, 2, 4, 64)):
        res = _fa_returns(version, b, h, hkv, sq, sk, d)
        lse = cuda_fused.pick_lse(res, b, h, sq, f"flash_attn {version}")
        assert lse.shape == (b, h, sq) and lse.dtype == torch.float32 and bool((lse == 1).all())


def test_flash_attn_lse_missing_names_the_version():
    out = torch.zeros(1, 8, 2, 64, dtype=torch.float16)
    for res in ((out, torch.ones(1, 2, 8, dtype=torch.float16)),  # a half lse: not flash-attn's
                (out, torch.ones(1, 8, 2, dtype=torch.float32)),  # [b, sq, h]: wrong order
                (out, None)):
        with pytest.raises(RuntimeError, match=r"flash_attn 9\.9\.9: .*float32 log-sum-exp of shape \[1, 2, 8\]"):
            cuda_fused.pick_lse(res, 1, 2, 8, "flash_attn 9.9.9")
    module = types.SimpleNamespace(__name__="flash_attn.flash_attn_interface")
    assert cuda_fused.flash_attn_version(module).startswith("flash_attn.flash_attn_interface ")


def _attention_through_flash_attn_stand_in():
    """lss_attention with the flash_attn kernel (its adapter, bottom-right causal, GQA-native) over a
    stand-in interface (flash-attn 2.7's signature) on CPU float64."""
    from tests.test_attention import _kernel_calls, _sweep

    module = _fa_stand_in("2.7")
    kernels.KERNELS["flash_attn"] = replace(
        kernels.KERNELS["flash_attn"], unavailable=always_available, unsupported=lambda q: None,
        forward=lambda *a: cuda_fused.flash_attn_forward(*a, module=module),
        backward=lambda *a: cuda_fused.flash_attn_backward(*a, module=module))
    kernels.unavailable_reason.cache_clear()  # probed for the real flash_attn already
    assert os.environ[kernels.ENV_VAR] == "flash_attn" and kernels.kernel_name(torch.empty(1, 1, 1, 8)) == "flash_attn"
    results = _sweep("float64")
    return results, {heads: _kernel_calls(True, heads) for heads in ("mha", "gqa", "mqa")}


def test_lss_attention_through_the_flash_attn_adapter_one_call_per_chunk():
    """Exact (float64, 1e-10) on 2 ranks, and a causal query chunk whose prefix is its rank's own is one
    call with GQA and MQA too: rank 0 (contiguous, queries [0, L/2)) one call over its L/2 keys; rank 1
    (queries [L/2, L)) its diagonal while the gather runs, then the prefix that arrived (two calls)."""
    from tests.test_attention import L

    env = {kernels.ENV_VAR: "flash_attn", "LSS_BACKEND": "gloo"}
    for rank, (results, calls) in enumerate(run_ranks(_attention_through_flash_attn_stand_in, 2, env=env)):
        for case, (errors, _, _) in results:
            assert max(errors.values()) < 1e-10, (case, errors)
        for heads in ("mha", "gqa", "mqa"):
            assert calls[heads] == ([L // 2] if rank == 0 else [L // 2, L // 2]), (heads, calls)


def test_flash_attn_adapter_refuses_an_unknown_signature():
    def _flash_attn_forward(q, k, v, some_new_required_argument):
        raise AssertionError("never called")
    assert cuda_fused._missing_arguments(_flash_attn_forward, cuda_fused._fa_probe()[0]) == ["some_new_required_argument"]


# --- tiled kernel: memory bound, structurally ----------------------------------------------------

def test_tile_plan_covers_exactly_the_visible_scores_within_the_budget(monkeypatch):
    monkeypatch.setattr(tiled, "TILE_ELEMENTS", 6 * 40)
    monkeypatch.setattr(tiled, "KEY_TILE", 8)
    for sq, sk, causal in ((50, 50, True), (23, 61, True), (37, 45, False)):
        seen = torch.zeros(sq, sk, dtype=torch.int64)
        for row_tiles in tiled.plan_tiles(6, sq, sk, causal):
            for t in row_tiles:
                assert 6 * len(t.rows) * len(t.cols) <= tiled.TILE_ELEMENTS
                seen[t.rows.start:t.rows.stop, t.cols.start:t.cols.stop] += 1
                block_hidden = torch.zeros(len(t.rows), len(t.cols), dtype=torch.bool)
                if causal:
                    block_hidden = torch.tensor([[j > i + sk - sq for j in t.cols] for i in t.rows])
                assert t.masked == bool(block_hidden.any())  # a mask exactly where the diagonal crosses
                assert not block_hidden.all()  # fully hidden tiles are skipped
        visible = torch.ones(sq, sk, dtype=torch.bool)
        if causal:
            visible = ~torch.ones(sq, sk, dtype=torch.bool).triu(sk - sq + 1)
        assert (seen[visible] == 1).all() and seen.max() == 1  # hidden cells only inside masked tiles


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (elements) any op produces: a kernel's transient footprint."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_tiled_kernel_never_materialises_more_than_a_tile(monkeypatch):
    b, h, s, d = 1, 2, 128, 8
    monkeypatch.setattr(tiled, "TILE_ELEMENTS", b * h * 16 * 16)
    monkeypatch.setattr(tiled, "KEY_TILE", 16)
    q, k, v, dout = _inputs(b, h, s, s, d, dtype=torch.float32)
    # Accumulators, inputs and outputs are [b, h, s, d]; a tile is TILE_ELEMENTS; scores are b*h*s*s.
    bound = max(tiled.TILE_ELEMENTS, b * h * s * d)
    footprints = {}
    for name, kernel in (("tiled", tiled), ("math", math_kernel)):
        with _LargestTensor() as mode:
            out, lse = kernel.forward(q, k, v, SCALE, True)
            kernel.backward(dout, q, k, v, out, lse, SCALE, True)
        footprints[name] = mode.largest
    assert footprints["tiled"] <= bound, footprints
    assert footprints["math"] >= b * h * s * s > bound  # the check sees a full score matrix


# --- half precision: kernel-level error against single-device SDPA ------------------------------

EPS_BOUND = 2  # half-precision error bound, in eps of the dtype, relative to max |reference|


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# a whole causal block without GQA; a query chunk's prefix + diagonal with GQA
@pytest.mark.parametrize("heads, sq", [((4, 4), 256), ((8, 2), 96)])
def test_half_precision_error_against_float64_math(dtype, heads, sq, monkeypatch):
    """Each CPU kernel in bfloat16/float16 against the float64 math kernel (a different computation:
    the whole score matrix in float64): out, dq, dk, dv within EPS_BOUND eps of the dtype and within
    1.2x of single-device SDPA's error (SDPA given the same bottom-right mask, same dtype). Kernels
    with fp32_out / fp32_grads return float32, the others the input dtype."""
    monkeypatch.setattr(tiled, "TILE_ELEMENTS", 2 * 8 * 64 * 64)  # several query and key tiles
    monkeypatch.setattr(tiled, "KEY_TILE", 64)
    b, s, d = 2, 256, 64
    scale = 1 / math.sqrt(d)
    q, k, v, dout = _inputs(b, heads, sq, s, d)
    ref_out, ref_lse = math_kernel.forward(q, k, v, scale, True)
    refs = (ref_out, *math_kernel.backward(dout, q, k, v, ref_out, ref_lse, scale, True))

    def errors(results):
        return [((r.double() - w).abs().max() / w.abs().max()).item() for r, w in zip(results, refs)]

    qh, kh, vh, doh = (t.to(dtype) for t in (q, k, v, dout))
    sdpa_in = [t.clone().requires_grad_() for t in (qh, kh, vh)]
    mask = ~torch.ones(sq, s, dtype=torch.bool).triu(s - sq + 1)  # True = visible, bottom-right
    sdpa_out = F.scaled_dot_product_attention(*sdpa_in, attn_mask=mask, scale=scale, enable_gqa=True)
    sdpa_out.backward(doh)
    sdpa_err = errors((sdpa_out, *(t.grad for t in sdpa_in)))
    bound = EPS_BOUND * torch.finfo(dtype).eps
    for name in ("tiled", "cpu_flash"):
        kernel = kernels.KERNELS[name]
        out, lse = kernel.forward(qh, kh, vh, scale, True)
        grads = kernel.backward(doh, qh, kh, vh, out.to(dtype), lse, scale, True)  # out as LSS keeps it
        assert lse.dtype == torch.float32
        assert out.dtype == (torch.float32 if kernel.fp32_out else dtype)
        assert {g.dtype for g in grads} == {torch.float32 if kernel.fp32_grads else dtype}
        err = errors((out.to(dtype), *(g.to(dtype) for g in grads)))  # rounded once, as lss_attention does
        for what, e, base in zip(("out", "dq", "dk", "dv"), err, sdpa_err):
            assert e <= bound, (name, dtype, what, e, bound)
            assert e <= 1.2 * base, (name, dtype, what, e, base)


# --- on a GPU --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernels_against_float64_math_and_sdpa(dtype):
    """Every CUDA kernel this machine runs, on whole causal blocks and bottom-right prefix blocks,
    with and without GQA (natively or through kernels.gqa): within 1.2x of single-device SDPA's
    error (same dtype, float64 math on the GPU as reference)."""
    ran = []
    for name in kernels.runnable_kernels():
        kernel = kernels.KERNELS[name]
        for b, h, sq, sk, d in ((2, 4, 512, 512, 64), (2, 4, 256, 768, 128), (2, (8, 2), 512, 512, 64),
                                (2, (8, 2), 256, 768, 128)):
            q, k, v, dout = _inputs(b, h, sq, sk, d, device="cuda")
            if kernel.unsupported(q.to(dtype)) or not _bottom_right_ok(kernel, sq, sk, True):
                continue
            fwd, bwd = ((kernel.forward, kernel.backward) if kernel.gqa_native or q.shape[1] == k.shape[1] else
                        (lambda *a: gqa.forward(kernel, *a), lambda *a: gqa.backward(kernel, *a)))
            scale = 1 / math.sqrt(d)
            ref_out, ref_lse = math_kernel.forward(q, k, v, scale, True)
            refs = (ref_out, *math_kernel.backward(dout, q, k, v, ref_out, ref_lse, scale, True))
            qh, kh, vh, doh = (t.to(dtype) for t in (q, k, v, dout))
            out, lse = fwd(qh, kh, vh, scale, True)
            got = (out.to(dtype), *(g.to(dtype) for g in bwd(doh, qh, kh, vh, out.to(dtype), lse, scale, True)))
            # SDPA's causal mask is top-left: give it the bottom-right mask explicitly.
            mask = ~torch.ones(sq, sk, dtype=torch.bool, device="cuda").triu(sk - sq + 1)
            s_in = [t.clone().requires_grad_() for t in (qh, kh, vh)]
            s_out = F.scaled_dot_product_attention(*s_in, attn_mask=mask, scale=scale, enable_gqa=True)
            s_out.backward(doh)
            base = (s_out, *(t.grad for t in s_in))
            for what, g, bl, r in zip(("out", "dq", "dk", "dv"), got, base, refs):
                e = ((g.double() - r).abs().max() / r.abs().max()).item()
                e_base = ((bl.double() - r).abs().max() / r.abs().max()).item()
                assert e <= 1.2 * e_base + 1e-6, (name, dtype, (sq, sk, d), what, e, e_base)
            ran.append(name)
    assert ran, "no kernel ran on this GPU"


# --- lss_attention through the tiled kernel ------------------------------------------------------

def _attention_sweep_on_small_tiles():
    from tests.test_attention import _sweep

    assert kernels.kernel_name(torch.empty(1, 1, 1, 8)) == "tiled"
    tiled.TILE_ELEMENTS, tiled.KEY_TILE = 2 * 4 * 4 * 5, 5  # several query and key tiles per block at L=24
    return _sweep("float64")


def test_lss_attention_exact_through_the_tiled_kernel():
    # The sweep's tensors are CPU tensors: gloo even where NCCL would be the default (make gpu-check).
    env = {kernels.ENV_VAR: "tiled", "LSS_BACKEND": "gloo"}
    for rank_results in run_ranks(_attention_sweep_on_small_tiles, 2, env=env):
        for case, (errors, _, _) in rank_results:
            assert max(errors.values()) < 1e-10, (case, errors)


def test_gpu_check_timing_table_rows():
    """The gpu-check table's code path, run on CPU at a toy size: one row per kernel that takes the
    inputs beside SDPA (timings are printed on a GPU, never asserted)."""
    from lss_plugin.bench.gpu_check import timing_table

    rows = timing_table([(1, 2, 64, 8, torch.float32), (1, (4, 2), 64, 8, torch.float32)], repeats=1, device="cpu")
    names = [row.split("|")[1].strip() for row in rows[2:]]
    assert names == ["SDPA (single device)", "cpu_flash", "tiled"] * 2
    assert "1 x 4/2 x 64 x 8" in rows[-1]
