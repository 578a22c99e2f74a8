"""A transformers attention layer's mask, read from the module, its config and the arguments it passes.

transformers builds one mask per layer *type* (``config.layer_types``: ``"full_attention"``,
``"sliding_attention"``, ``"chunked_attention"``) from the local tokens; under LSS those masks are
never built (``lss_plugin.hf.attention.lss_attention_mask`` returns None), so each attention call
states its own mask to ``lss_attention`` in global positions:

- ``window``: the ``sliding_window = W`` the module passes (Mistral on every layer; Gemma 2/3, gpt-oss,
  Qwen3, Cohere 2, ... only on their sliding layers), or ``config.sliding_window`` on a
  ``"sliding_attention"`` layer that passes none: ``(W - 1, 0)``, W keys including the query's own
  (transformers' ``sliding_window_overlay``: ``kv > q - W``);
- ``chunk``: ``config.attention_chunk_size`` on a ``"chunked_attention"`` layer (Llama 4): the attention
  function receives no chunk argument, so it comes from ``config.layer_types[module.layer_idx]``.
  transformers aligns chunks to each packed document's start (the chunked overlay runs on the
  per-document positions); with packed documents the chunks are therefore given to ``lss_attention``
  as more document boundaries (``chunked_documents``) instead of ``chunk=``, which aligns to global
  positions;
- a window or chunk covering the whole sequence changes nothing and is dropped (today's causal call).

Pure functions of this rank's arguments: the caller defers their errors to the call's verdict.
"""
from __future__ import annotations

import torch

from lss_plugin.masks import MaskSpec

LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def layer_type(module, config) -> str | None:
    """``config.layer_types[module.layer_idx]``, or None when the model has no per-layer types."""
    types = getattr(config, "layer_types", None)
    index = getattr(module, "layer_idx", None)
    if types is None or index is None:
        return None
    if not 0 <= index < len(types):
        raise ValueError(f"{type(config).__name__}.layer_types has {len(types)} entries, but the attention "
                         f"module's layer_idx is {index}")
    return types[index]


def layer_mask(module, config, sliding_window, causal: bool, seq_len: int) -> MaskSpec:
    """The layer's mask (window / chunk) in global positions of a sequence of ``seq_len`` tokens."""
    model = type(config).__name__ if config is not None else type(module).__name__
    kind = layer_type(module, config)
    if kind is not None and kind not in LAYER_TYPES:
        raise ValueError(f"attn_implementation='lss' does not implement {model} layer type {kind!r} "
                         f"(layer {module.layer_idx}); it reproduces {list(LAYER_TYPES)}")
    if sliding_window is None and kind == "sliding_attention":
        sliding_window = getattr(config, "sliding_window", None)
        if sliding_window is None:
            raise ValueError(f"{model}.layer_types[{module.layer_idx}] is 'sliding_attention' but "
                             f"{model}.sliding_window is None")
    chunk = None
    if kind == "chunked_attention":
        chunk = getattr(config, "attention_chunk_size", None)
        if chunk is None:
            raise ValueError(f"{model}.layer_types[{module.layer_idx}] is 'chunked_attention' but "
                             f"{model}.attention_chunk_size is None")
        if sliding_window is not None:
            raise ValueError(f"{model} layer {module.layer_idx} asks for both a sliding window ({sliding_window}) "
                             f"and chunked attention ({chunk}); transformers builds only the chunked mask")
    window = None
    if sliding_window is not None and sliding_window < seq_len:  # W >= L keeps every causal key
        window = MaskSpec.sliding(int(sliding_window), causal=causal).window
    if chunk is not None and chunk >= seq_len:  # one chunk holds the whole sequence
        chunk = None
    return MaskSpec(causal=causal, window=window, chunk=chunk)


def chunked_documents(cu_seqlens: torch.Tensor, bounds: tuple[int, ...], chunk: int) -> torch.Tensor:
    """Document boundaries ``bounds`` cut again every ``chunk`` tokens from each document's start
    (transformers' chunked mask on packed documents), as a tensor like ``cu_seqlens``."""
    cuts = set(bounds)
    for start, end in zip(bounds[:-1], bounds[1:]):
        cuts.update(range(start + chunk, end, chunk))
    return torch.tensor(sorted(cuts), dtype=cu_seqlens.dtype, device=cu_seqlens.device)


def check_sinks(sinks, num_heads: int, model: str) -> None:
    """gpt-oss's ``s_aux``: one logit per query head, ``[H]``."""
    if not isinstance(sinks, torch.Tensor) or sinks.dim() != 1 or sinks.shape[0] != num_heads:
        shape = list(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise ValueError(f"attn_implementation='lss' takes attention sinks (s_aux) as one logit per query head "
                         f"[{num_heads}]; {model} passed {shape}")


def check_temperature_tuning(module, seq_len: int, model: str) -> None:
    """Llama 4's query temperature tuning on NoPE layers scales queries by a function of
    ``arange(s_local)`` - this rank's *local* indices. The scale is exactly 1 while
    ``(position + 1) // floor_scale == 0``, i.e. for every position when ``seq_len < floor_scale``; beyond
    that it is refused."""
    if not getattr(module, "attn_temperature_tuning", False) or getattr(module, "use_rope", True):
        return
    floor_scale = getattr(module, "floor_scale", None)
    if floor_scale is None or seq_len >= floor_scale:
        raise ValueError(
            f"attn_implementation='lss' cannot reproduce {model}'s attn_temperature_tuning on the NoPE layer "
            f"{getattr(module, 'layer_idx', '?')} for a sequence of {seq_len} tokens (floor_scale={floor_scale}): "
            "the module scales queries by their local indices, not their global positions. Set "
            "config.attn_temperature_tuning=False, or train on sequences shorter than floor_scale")
