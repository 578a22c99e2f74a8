"""Fused CUDA kernels that return the log-sum-exp and take it (with ``out``) back in backward.

- ``flash_attn``: the flash-attn library when importable (FA3's ``flash_attn_interface`` on Hopper,
  else FA2's ``flash_attn.flash_attn_interface``); ``_flash_attn_forward`` returns ``softmax_lse``,
  ``_flash_attn_backward`` takes ``out`` and ``softmax_lse``. Its causal mask is bottom-right
  aligned when sq < sk and it takes fewer KV heads than query heads (GQA), so a query chunk's prefix
  and diagonal are one call, GQA or not. Layout ``[b, s, h, d]``. The lse is found in the returned
  tuple by what it is (float32, ``[b, h, sq]``), not by position: versions order the tuple differently.
  Bands and softcapping natively (flash-attn >= 2.6): its ``window_size=(left, right)`` is relative
  to the bottom-right alignment (query i sees keys ``i + sk - sq - left <= j <= i + sk - sq + right``,
  -1 unbounded), so a band ``lo <= j - i <= hi`` is ``(sk - sq - lo, hi - sk + sq)`` once the block
  is trimmed to its last query that sees a key and its last key some query sees (then ``lo <=
  sk - sq <= hi``, both sides non-negative: every band is expressible); trimmed rows get out 0 and
  lse -inf, trimmed keys zero gradients. Its keyless rows' lse (+inf) becomes -inf.
- ``sdpa_flash`` / ``sdpa_efficient`` / ``sdpa_cudnn``: torch's own SDPA ops
  (``aten._scaled_dot_product_{flash,efficient,cudnn}_attention`` and their ``_backward`` ops).
  Their causal mask is only used on square blocks here (alignment then does not matter).

The backward ops are called with the *merged* ``out`` and ``lse`` of the whole attention row (what
makes block-wise gradients exact), not those of the block's own forward. Dropout is always 0, so
the RNG state arguments are placeholders of the forward's shapes. Head dims must be multiples of 8
(the kernels' vector width); other shapes fall back to ``tiled``. Signatures and output shapes are
checked on CPU with meta tensors (tests/test_kernels.py); values on a GPU by ``make gpu-check``.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import sys
from typing import Optional

import torch

from lss_plugin.kernels.base import Kernel, compute_dtype, effective_band, keyless_rows_to_inf
from lss_plugin.masks import Band

HALF = (torch.float16, torch.bfloat16)
_EFFICIENT_LSE_ALIGN = 32  # the memory-efficient kernel pads its lse rows to a multiple of this


def _cuda_unavailable(min_capability=(0, 0), backend_present=None, backend="") -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA device"
    cap = torch.cuda.get_device_capability()
    if cap < min_capability:
        return f"needs compute capability >= {min_capability}, this GPU has {cap}"
    if backend_present is not None and not backend_present():
        return f"this torch build has no {backend}"
    return None


def _unsupported(q, dtypes, max_head_dim) -> Optional[str]:
    d = q.shape[-1]
    if q.device.type != "cuda":
        return f"runs on CUDA tensors only, got {q.device}"
    if q.dtype not in dtypes:
        return f"dtype {q.dtype} is not one of {dtypes}"
    if d % 8 or d > max_head_dim:
        return f"head dim {d} is not a multiple of 8 up to {max_head_dim}"
    return None


def _philox_placeholders(device):
    """(seed, offset) as the efficient/cuDNN forward ops return them; unused without dropout."""
    return torch.zeros((), dtype=torch.int64, device=device), torch.zeros((), dtype=torch.int64, device=device)


# --- torch SDPA: flash -----------------------------------------------------------------------

def sdpa_flash_forward(q, k, v, scale: float, causal: bool):
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), 0.0, causal, False, scale=scale
    )
    return out, lse  # [b, h, sq, d], [b, h, sq] float32


def sdpa_flash_backward(dout, q, k, v, out, lse, scale: float, causal: bool):
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)  # forward's (seed, offset): unused without dropout
    unused = torch.zeros((), dtype=torch.uint64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
        lse.float().contiguous(), None, None, q.shape[2], k.shape[2], 0.0, causal, rng_state, unused,
        scale=scale,
    )
    return dq, dk, dv



# --- torch SDPA: memory-efficient --------------------------------------------------------------

def sdpa_efficient_forward(q, k, v, scale: float, causal: bool):
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), None, True, 0.0, causal, scale=scale
    )
    return out, lse[:, :, :q.shape[2]]  # lse rows come padded to a multiple of 32


def sdpa_efficient_backward(dout, q, k, v, out, lse, scale: float, causal: bool):
    b, h, sq = lse.shape
    padded = lse.new_zeros((b, h, -(-sq // _EFFICIENT_LSE_ALIGN) * _EFFICIENT_LSE_ALIGN), dtype=torch.float32)
    padded[:, :, :sq] = lse  # the layout its forward returns and its backward reads
    seed, offset = _philox_placeholders(q.device)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), None, out.contiguous(),
        padded, seed, offset, 0.0, [True, True, True, False], causal, scale=scale,
    )
    return dq, dk, dv


# --- torch SDPA: cuDNN -------------------------------------------------------------------------

def sdpa_cudnn_forward(q, k, v, scale: float, causal: bool):
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), None, True, 0.0, causal, False, scale=scale
    )
    return out, lse.squeeze(-1)  # cuDNN's lse is [b, h, sq, 1]


def sdpa_cudnn_backward(dout, q, k, v, out, lse, scale: float, causal: bool):
    seed, offset = _philox_placeholders(q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
        lse.float().unsqueeze(-1).contiguous(), seed, offset, None, None, None, q.shape[2], k.shape[2],
        0.0, causal, scale=scale,
    )
    return dq, dk, dv



# --- flash-attn (FA2 / FA3) --------------------------------------------------------------------

def _parameters(fn):
    # flash-attn >= 2.7 wraps these in torch.library.custom_op, whose own signature is (*args, **kwargs).
    return inspect.signature(getattr(fn, "_init_fn", fn)).parameters


def _call_by_name(fn, values: dict):
    """Call ``fn`` with the entries of ``values`` its signature names; versions differ in names
    (FA2 2.6 ``window_size`` vs 2.7 ``window_size_left/right``, FA3's varlen arguments)."""
    return fn(**{name: values[name] for name in _parameters(fn) if name in values})


def _missing_arguments(fn, values: dict) -> list[str]:
    return [name for name, p in _parameters(fn).items()
            if p.default is inspect.Parameter.empty and name not in values]


# Arguments that are None in a dense (non-varlen, non-paged, no-rotary) call of any FA version.
_FA_NONE = ("alibi_slopes", "rng_state", "cu_seqlens_q", "cu_seqlens_k", "cu_seqlens_k_new",
            "seqused_q", "seqused_k", "sequed_q", "sequed_k", "max_seqlen_q", "max_seqlen_k",
            "k_new", "v_new", "qv", "page_table", "kv_batch_idx", "leftpad_k", "rotary_cos",
            "rotary_sin", "seqlens_rotary", "q_descale", "k_descale", "v_descale")
_FA_FIXED = {"dropout_p": 0.0, "window_size": (-1, -1), "window_size_left": -1, "window_size_right": -1,
             "softcap": 0.0, "return_softmax": False, "deterministic": False}


def _fa_forward_values(q, k, v, scale, causal):
    values = dict.fromkeys(_FA_NONE)
    values.update(_FA_FIXED, q=q, k=k, v=v, out=None, softmax_scale=scale, causal=causal)
    return values


def _fa_backward_values(dout, q, k, v, out, lse, scale, causal):
    values = dict.fromkeys(_FA_NONE)
    values.update(_FA_FIXED, dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse, dq=torch.empty_like(q),
                  dk=torch.empty_like(k), dv=torch.empty_like(v), softmax_scale=scale, causal=causal)
    return values


@functools.lru_cache(maxsize=None)
def flash_attn_module():
    """(module, major version) of the flash-attn interface to use, or (None, reason)."""
    candidates = []
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
        candidates.append(("flash_attn_interface", 3))  # FA3 (Hopper build)
    candidates.append(("flash_attn.flash_attn_interface", 2))
    reasons = []
    for name, version in candidates:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            reasons.append(f"{name}: {exc}")
            continue
        return module, version
    return None, "; ".join(reasons)


def _fa_probe():
    b, h, s, d = 1, 1, 1, 8
    t = torch.empty(b, s, h, d, device="meta")
    return _fa_forward_values(t, t, t, 1.0, True), _fa_backward_values(t, t, t, t, t, t, 1.0, True)


def _flash_attn_unavailable():
    why = _cuda_unavailable((8, 0))
    if why:
        return why
    module, version = flash_attn_module()
    if module is None:
        return f"flash-attn is not importable ({version})"
    fwd_values, bwd_values = _fa_probe()
    missing = (_missing_arguments(module._flash_attn_forward, fwd_values)
               + _missing_arguments(module._flash_attn_backward, bwd_values))
    if missing:
        return f"{module.__name__} (FA{version}) wants arguments this adapter does not know: {missing}"
    return None


def flash_attn_version(module) -> str:
    """The installed flash-attn's version as its package says it (for error messages)."""
    top = sys.modules.get(module.__name__.partition(".")[0], module)  # the package, imported with module
    return f"{module.__name__} {getattr(top, '__version__', 'of unknown version')}"


def pick_lse(res, batch: int, heads: int, sq: int, version: str, dtype=torch.float32) -> torch.Tensor:
    """The softmax log-sum-exp in ``_flash_attn_forward``'s returned tuple: the ``dtype`` (float32
    for flash-attn's half inputs) tensor of shape [b, h, sq] after ``out``. FA2 <= 2.6 returns (out,
    q, k, v, out_padded, softmax_lse, S_dmask, rng_state), FA2 >= 2.7 (out, softmax_lse, S_dmask,
    rng_state), FA3 (out, softmax_lse, out_accum, softmax_lse_accum); q, k, v are half and 4-D, the
    accumulators have a splits dim."""
    want = (batch, heads, sq)
    for t in res[1:]:
        if isinstance(t, torch.Tensor) and t.dtype == dtype and tuple(t.shape) == want:
            return t
    got = [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__ for t in res]
    name = str(dtype).removeprefix("torch.")
    raise RuntimeError(f"{version}: _flash_attn_forward returned no {name} log-sum-exp of shape {list(want)} "
                       f"[b, h, sq]; it returned {got}. This flash-attn version is not supported by "
                       "lss_plugin.kernels.cuda_fused (set LSS_ATTENTION_KERNEL to another kernel)")


def fa_window(band: Band, sq: int, sk: int) -> tuple[int, int]:
    """flash-attn's ``(left, right)`` for ``band`` on an sq x sk block (-1: unbounded); the block must
    contain its band's bottom-right offset (``fa_trim``)."""
    off = sk - sq
    left = -1 if band.lo is None else off - band.lo
    right = -1 if band.hi is None else band.hi - off
    if (band.lo is not None and left < 0) or (band.hi is not None and right < 0):
        raise ValueError(f"band {band} of a {sq} x {sk} block does not contain its bottom-right offset {off}")
    return left, right


def fa_trim(band: Band, sq: int, sk: int) -> tuple[int, int]:
    """(rows, keys): the leading queries up to the last one that sees a key, the leading keys up to
    the last one some of them sees. Inside, ``band.lo <= keys - rows <= band.hi``."""
    rows = band.rows_with_keys(sq, sk).stop
    return rows, band.keys_seen(rows, sk).stop


def _fa_mask_values(values: dict, module, fn, band: Band, rows: int, keys: int, softcap) -> dict:
    left, right = fa_window(band, rows, keys)
    names = _parameters(fn)
    wanted = (("window_size" in names or "window_size_left" in names) and
              (softcap is None or "softcap" in names))
    if not wanted:
        raise RuntimeError(f"{flash_attn_version(module)} takes no window_size/softcap: flash-attn >= 2.6 "
                           "does; set LSS_ATTENTION_KERNEL to 'flex' or 'tiled'")
    values.update(causal=False, window_size=(left, right), window_size_left=left, window_size_right=right,
                  softcap=0.0 if softcap is None else float(softcap))
    return values


def flash_attn_forward(q, k, v, scale: float, causal: bool, module=None, *, band: Band | None = None,
                       softcap: float | None = None):
    """q [b, H, sq, d], k/v [b, Hkv, sk, d] (GQA-native) -> out [b, H, sq, d], lse [b, H, sq] float32."""
    module = module or flash_attn_module()[0]
    if band is not None or softcap is not None:
        return _flash_attn_masked_forward(q, k, v, scale, causal, module, band, softcap)
    # flash-attn's layout is [b, s, h, d]; a transposed view costs one copy each way.
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    res = _call_by_name(module._flash_attn_forward, _fa_forward_values(qs, ks, vs, scale, causal))
    b, h, sq = q.shape[:3]
    lse = pick_lse(res, b, h, sq, flash_attn_version(module), compute_dtype(q.dtype))
    return res[0].transpose(1, 2), lse


def _flash_attn_masked_forward(q, k, v, scale, causal, module, band, softcap):
    b, h, sq = q.shape[:3]
    mask = effective_band(sq, k.shape[2], causal, band) or Band()
    rows, keys = fa_trim(mask, sq, k.shape[2])
    out = q.new_zeros(q.shape)
    lse = torch.full((b, h, sq), float("-inf"), dtype=compute_dtype(q.dtype), device=q.device)
    if rows == 0:
        return out, lse
    qs, ks, vs = (t[:, :, :n].transpose(1, 2).contiguous() for t, n in ((q, rows), (k, keys), (v, keys)))
    fn = module._flash_attn_forward
    values = _fa_mask_values(_fa_forward_values(qs, ks, vs, scale, False), module, fn, mask, rows, keys, softcap)
    res = _call_by_name(fn, values)
    out[:, :, :rows] = res[0].transpose(1, 2)
    own = pick_lse(res, b, h, rows, flash_attn_version(module), compute_dtype(q.dtype))
    lse[:, :, :rows] = own.masked_fill(own == float("inf"), float("-inf"))  # its keyless rows: +inf
    return out, lse


def _flash_attn_masked_backward(dout, q, k, v, out, lse, scale, causal, module, band, softcap):
    sq = q.shape[2]
    mask = effective_band(sq, k.shape[2], causal, band) or Band()
    rows, keys = fa_trim(mask, sq, k.shape[2])
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if rows == 0:
        return dq, dk, dv
    dos, qs, os_ = (t[:, :, :rows].transpose(1, 2).contiguous() for t in (dout, q, out))
    ks, vs = (t[:, :, :keys].transpose(1, 2).contiguous() for t in (k, v))
    fn = module._flash_attn_backward
    lse_t = keyless_rows_to_inf(lse[:, :, :rows]).contiguous()  # flash-attn's own keyless-row value
    values = _fa_mask_values(_fa_backward_values(dos, qs, ks, vs, os_, lse_t, scale, False), module, fn,
                             mask, rows, keys, softcap)
    _call_by_name(fn, values)  # writes dq, dk, dv in place
    dq[:, :, :rows] = values["dq"].transpose(1, 2)
    dk[:, :, :keys] = values["dk"].transpose(1, 2)
    dv[:, :, :keys] = values["dv"].transpose(1, 2)
    return dq, dk, dv


def flash_attn_backward(dout, q, k, v, out, lse, scale: float, causal: bool, module=None, *,
                        band: Band | None = None, softcap: float | None = None):
    module = module or flash_attn_module()[0]
    if band is not None or softcap is not None:
        return _flash_attn_masked_backward(dout, q, k, v, out, lse, scale, causal, module, band, softcap)
    dos, qs, ks, vs, os_ = (t.transpose(1, 2).contiguous() for t in (dout, q, k, v, out))
    values = _fa_backward_values(dos, qs, ks, vs, os_, lse.contiguous(), scale, causal)  # lse: float32
    _call_by_name(module._flash_attn_backward, values)  # writes dq, dk, dv in place
    return tuple(values[name].transpose(1, 2) for name in ("dq", "dk", "dv"))


KERNELS = (
    Kernel(name="flash_attn", forward=flash_attn_forward, backward=flash_attn_backward,
           unavailable=_flash_attn_unavailable, unsupported=lambda q: _unsupported(q, HALF, 256),
           bottom_right_causal=True, gqa_native=True, takes_band=True, takes_softcap=True),
    Kernel(name="sdpa_flash", forward=sdpa_flash_forward, backward=sdpa_flash_backward,
           unavailable=lambda: _cuda_unavailable((8, 0), torch.backends.cuda.is_flash_attention_available,
                                                 "flash attention"),
           unsupported=lambda q: _unsupported(q, HALF, 256), bottom_right_causal=False),
    Kernel(name="sdpa_efficient", forward=sdpa_efficient_forward, backward=sdpa_efficient_backward,
           unavailable=_cuda_unavailable, unsupported=lambda q: _unsupported(q, (torch.float32, *HALF), 512),
           bottom_right_causal=False),
    # Only on request: the cuDNN ops' stride and layout demands vary across cuDNN versions.
    Kernel(name="sdpa_cudnn", forward=sdpa_cudnn_forward, backward=sdpa_cudnn_backward,
           unavailable=lambda: _cuda_unavailable((8, 0), torch.backends.cudnn.is_available, "cuDNN"),
           unsupported=lambda q: _unsupported(q, HALF, 128), bottom_right_causal=False, auto=False),
)
