"""megatron-core's sliding windows and softmax types, as ``lss_attention``'s ``window=`` and ``sinks=``.

megatron-core (0.16.1 to 0.19.x, the same fields and rules) sets them on ``TransformerConfig``:

- ``window_size = (left, right)``: a query at position q sees keys ``q - left <= k <= q + right``;
  -1 is an unbounded side. Which layers: ``is_layer_window_attention(window_size,
  window_attn_skip_freq, layer_number)`` (megatron.core.transformer.utils, read by the local and the
  TransformerEngine attention alike), ``layer_number`` counted from 1 over the whole model (pipeline
  stages included): ``window_attn_skip_freq`` None = every layer; an int N = every layer but those
  with ``layer_number % N == 0`` ((N - 1) windowed : 1 full); a list = entry ``layer_number - 1``
  is 1 for a windowed layer, 0 for a full one.
- ``softmax_type``: ``"vanilla"``; ``"off-by-one"`` = a zero logit added to every row's softmax
  denominator (no value); ``"learnable"`` = one learned logit per head, the parameter
  ``softmax_offset`` of shape ``[heads of this TP rank]``, initialised with ``config.init_method``.
  In LSS both are ``sinks`` (``lss_plugin.masks``): off-by-one a zeros tensor without gradient.

With a causal mask type megatron-core's local attention replaces its causal mask by the band (so
``right > 0`` shows future keys) while TransformerEngine clips ``right`` to 0: the two disagree,
so LSS refuses a causal window whose ``right`` is not 0, by name.
"""
from __future__ import annotations

import argparse
import re
from typing import Optional

import torch

SOFTMAX_TYPES = ("vanilla", "off-by-one", "learnable")
UNBOUNDED = -1  # megatron-core's "infinite" side of a window


def parse_window_size(text: str) -> tuple[int, ...]:
    """Megatron-LM's ``--window-size`` spelling: ``"128,0"`` or ``"(128,0)"`` -> ``(128, 0)``."""
    try:
        return tuple(int(x) for x in text.strip().strip("()").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--window-size {text!r}: expected LEFT,RIGHT integers (-1: unbounded), e.g. 128,0") from None


def parse_layer_pattern(text: str):
    """Megatron-LM's ``--window-attn-skip-freq`` spelling: ``"4"`` -> 4, or a list expression of 0/1
    per layer built from digits, commas, brackets, ``+`` and ``*`` (``"([1]*3+[0])*2"``)."""
    text = text.strip()
    if "[" not in text:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--window-attn-skip-freq {text!r}: expected an integer N or a list such as "
                             "'([1]*3+[0])*2'") from None
    if re.search(r"[^\d,\[\]()+* ]", text):
        raise argparse.ArgumentTypeError(f"--window-attn-skip-freq {text!r}: a pattern may hold only digits, ',', '[', ']', "
                         "'(', ')', '+' and '*' (Megatron-LM's rule)")
    try:
        pattern = eval(text, {"__builtins__": {}}, {})  # noqa: S307 - characters checked above, as Megatron-LM does
    except Exception as err:  # noqa: BLE001 - a malformed expression: name it
        raise argparse.ArgumentTypeError(f"--window-attn-skip-freq {text!r} is not a list expression: {err}") from None
    if not isinstance(pattern, list):
        raise argparse.ArgumentTypeError(f"--window-attn-skip-freq {text!r} evaluates to {pattern!r}, not a list")
    return pattern


def check_window_config(window_size, skip_freq, num_layers: Optional[int]) -> None:
    """``window_size`` and ``window_attn_skip_freq`` as megatron-core reads them; ValueError naming them.

    megatron-core itself checks neither: a short pattern list fails with an IndexError deep in a
    layer's constructor, and a window side below -1 masks every key."""
    if window_size is not None:
        pair = tuple(window_size) if isinstance(window_size, (tuple, list)) else None
        if (pair is None or len(pair) != 2
                or any(not isinstance(x, int) or isinstance(x, bool) or x < UNBOUNDED for x in pair)):
            raise ValueError(f"window_size must be (left, right) integers >= -1 (-1: unbounded), got {window_size!r}")
    if skip_freq is None:
        return
    if window_size is None:
        raise ValueError(f"window_attn_skip_freq={skip_freq!r} without window_size: it says which layers skip "
                         "the sliding window, and there is none")
    if isinstance(skip_freq, bool) or not isinstance(skip_freq, (int, list)):
        raise ValueError(f"window_attn_skip_freq must be an int or a list of 0/1 per layer, got {skip_freq!r}")
    if isinstance(skip_freq, int) and skip_freq < 1:
        raise ValueError(f"window_attn_skip_freq must be >= 1 (every N-th layer attends fully), got {skip_freq}")
    if isinstance(skip_freq, list):
        if any(x not in (0, 1) or isinstance(x, bool) for x in skip_freq):
            raise ValueError(f"window_attn_skip_freq as a list holds 1 (window) or 0 (full) per layer, got {skip_freq}")
        if num_layers is not None and len(skip_freq) != num_layers:
            raise ValueError(f"window_attn_skip_freq has {len(skip_freq)} entries for num_layers={num_layers} "
                             "(one per layer: 1 = window, 0 = full attention)")


def layer_window(config, layer_number: int) -> Optional[tuple[int, int]]:
    """This layer's megatron-core ``(left, right)`` window, or None (full attention)."""
    from megatron.core.transformer.utils import is_layer_window_attention

    window_size = getattr(config, "window_size", None)
    skip_freq = getattr(config, "window_attn_skip_freq", None)
    check_window_config(window_size, skip_freq, getattr(config, "num_layers", None))
    if not is_layer_window_attention(window_size, skip_freq, layer_number):
        return None
    return tuple(window_size)


def check_causal_window(window: Optional[tuple[int, int]], causal: bool, mask_type_name: str) -> None:
    """Refuse a causal layer whose window reaches ``right`` keys ahead (see the module doc)."""
    if window is not None and causal and window[1] != 0:
        raise ValueError(
            f"window_size={window} with attn_mask_type={mask_type_name}: a causal window must have right = 0. "
            f"megatron-core's local attention would show {window[1] if window[1] >= 0 else 'every'} future key(s) "
            "(its band replaces the causal mask) while TransformerEngine sets right to 0; say which: "
            f"window_size=({window[0]}, 0), or a non-causal mask type")


def lss_window(window: Optional[tuple[int, int]], seq_len: int) -> Optional[tuple[int, int]]:
    """megatron-core's window -> ``lss_attention``'s (non-negative sides; None when unbounded on both).

    An unbounded side becomes ``seq_len``: no key of the sequence is farther than ``seq_len - 1``."""
    if window is None or window == (UNBOUNDED, UNBOUNDED):
        return None
    return tuple(seq_len if side == UNBOUNDED else side for side in window)


def add_softmax_offset(module: torch.nn.Module, config, heads: int, device) -> None:
    """Give ``module`` megatron-core's ``softmax_offset`` for ``config.softmax_type``, as its
    ``DotProductAttention`` does (same name, shape ``[heads]`` of this TP rank, dtype, init), so
    checkpoints map: None (vanilla), a zeros buffer kept out of the state dict (off-by-one, a
    plain attribute there), or a parameter (learnable). The learnable one is marked as split over
    tensor-parallel ranks along dim 0, which it is (megatron-core's ``sharded_state_dict`` shards
    it so): gathering a full state and the gradient norm then count every rank's heads."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    softmax_type = getattr(config, "softmax_type", "vanilla")
    if softmax_type not in SOFTMAX_TYPES:
        raise ValueError(f"softmax_type={softmax_type!r} is not one of {SOFTMAX_TYPES}")
    if softmax_type == "vanilla":
        module.softmax_offset = None
    elif softmax_type == "off-by-one":
        module.register_buffer("softmax_offset", torch.zeros(heads, device=device, dtype=config.params_dtype),
                               persistent=False)
    else:
        module.softmax_offset = torch.nn.Parameter(torch.empty(heads, device=device, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(module.softmax_offset, is_parallel=True, dim=0, stride=1)
        if config.perform_initialization:
            config.init_method(module.softmax_offset)
