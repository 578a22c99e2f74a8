"""What every block-attention backend provides, and the helpers the pure-torch ones share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lss_plugin.masks import Band

# (q, k, v, scale, causal[, band=, softcap=]) -> (out [b, h, sq, d], lse [b, h, sq])
ForwardFn = Callable[..., tuple]
# (dout, q, k, v, out, lse, scale, causal[, band=, softcap=]) -> (dq, dk, dv)
BackwardFn = Callable[..., tuple]


@dataclass(frozen=True)
class Kernel:
    """One backend of ``block_forward`` / ``block_backward``.

    ``unavailable()`` says why this machine cannot run the kernel at all (no CUDA, library not
    importable), ``None`` when it can; ``unsupported(q)`` says why it cannot take these inputs
    (device, dtype, head size), ``None`` when it can. ``bottom_right_causal``: with ``causal`` and
    fewer queries than keys (sq < sk) the mask is aligned to the last query and key, i.e. query i
    sees keys j <= i + sk - sq; a query chunk's prefix and diagonal block are then ONE call.
    ``gqa_native``: takes k, v with fewer heads than q (Hkv dividing H, query head i reading KV head
    i // (H / Hkv)) and returns dk, dv with Hkv heads, summed over each group inside the kernel;
    other kernels get GQA from ``kernels.gqa`` (folded queries, or repeated KV heads when causal).
    ``fp32_out`` / ``fp32_grads``: for float16/bfloat16 inputs, out / dq, dk, dv come back in the
    compute dtype (float32), so the caller rounds them once, after its merges and sums; otherwise
    in the input dtype.
    ``auto``: the automatic choice considers it (the registry's order is the preference).
    ``takes_band``: takes ``band=`` (an explicit band on ``j - i`` in block-local indices, any sq and
    sk, rows without a visible key returning out 0 and lse -inf); ``takes_softcap``: takes
    ``softcap=`` (``cap * tanh(s / cap)`` on the scaled scores, before masking). Kernels without them
    are only ever called as ``(q, k, v, scale, causal)``.
    """

    name: str
    forward: ForwardFn
    backward: BackwardFn
    unavailable: Callable[[], Optional[str]]
    unsupported: Callable[[torch.Tensor], Optional[str]]
    bottom_right_causal: bool
    gqa_native: bool = False
    fp32_out: bool = False
    fp32_grads: bool = False
    auto: bool = True
    takes_band: bool = False
    takes_softcap: bool = False


def always_available() -> Optional[str]:
    return None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores, softmax statistics and accumulators: float32 for half inputs, else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def causal_hidden(q_rows: range, k_cols: range, offset: int, device) -> torch.Tensor:
    """[len(q_rows), len(k_cols)] bool, True where key j is hidden from query i (j > i + offset).

    ``offset = sk - sq`` is the bottom-right alignment (0 for a square diagonal block)."""
    rows = torch.arange(q_rows.start, q_rows.stop, device=device).unsqueeze(1)
    cols = torch.arange(k_cols.start, k_cols.stop, device=device).unsqueeze(0)
    return cols > rows + offset


def effective_band(sq: int, sk: int, causal: bool, band: Band | None) -> Band | None:
    """The block's band in block-local indices: ``causal`` is ``Band(hi=sk - sq)`` (bottom-right
    aligned), intersected with ``band``; None when every pair is visible (no mask)."""
    if causal:
        band = Band(None, sk - sq) if band is None else band.intersect(Band(None, sk - sq))
    return None if band is None or band.unbounded else band


def keyless_rows_to_inf(lse: torch.Tensor) -> torch.Tensor:
    """The merged lse for a backward: rows that saw no key anywhere (lse -inf) become +inf, so that
    ``P = exp(S - lse)`` is 0 on them (zero gradients) instead of ``exp(-inf + inf)`` = NaN."""
    return lse.masked_fill(lse == float("-inf"), float("inf"))
