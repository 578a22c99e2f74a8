"""Small causal LMs of any transformers ``model_type``, built from a config (no download).

``small_causal_lm_config("llama", hidden_size=64, ...)`` goes through ``AutoConfig.for_model`` and
then sets the size fields every family spells differently (``n_embd``/``hidden_size`` are mapped by
transformers itself; the FFN width, KV heads and head dim are set here when the config has them).
Dropout is switched off everywhere: LSS has no attention dropout, and exact comparisons need none.
Family-specific ``overrides`` (``sliding_window=``, ``layer_types=``, ``use_sliding_window=``,
``attention_chunk_size=``, ...) reach the config's constructor too, so fields it derives from them
(``layer_types`` from ``use_sliding_window``/``max_window_layers``, ``sliding_window_pattern``, ...)
follow them.
"""
from __future__ import annotations

import copy

import torch

_FFN_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "intermediate_size_mlp")
# Mixture-of-experts sizes (gpt-oss has 128 experts, Llama 4 16): a few small experts are enough here.
_EXPERT_FIELDS = {"num_local_experts": 4, "num_experts": 4}
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def small_causal_lm_config(
    model_type: str,
    *,
    vocab_size: int = 256,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    ffn_hidden_size: int | None = None,
    max_positions: int = 1024,
    **overrides,
):
    """A small config for ``model_type`` with byte-level vocabulary and no dropout."""
    from transformers import AutoConfig

    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_positions,
        **{name: None for name in _TOKEN_ID_FIELDS},
        **overrides,
    )
    ffn = ffn_hidden_size or 4 * hidden_size
    for name in _FFN_FIELDS:
        if hasattr(config, name):
            setattr(config, name, ffn)
    for name, count in _EXPERT_FIELDS.items():
        if isinstance(getattr(config, name, None), int) and name not in overrides:
            setattr(config, name, min(getattr(config, name), count))
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = num_kv_heads
    elif num_kv_heads != num_heads:
        raise ValueError(f"model_type {model_type!r} has no num_key_value_heads: it cannot use num_kv_heads={num_kv_heads}")
    if hasattr(config, "head_dim"):
        config.head_dim = hidden_size // num_heads
    for name, value in list(config.to_dict().items()):
        if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop") or name == "layerdrop"):
            setattr(config, name, 0.0)
    config.use_cache = False
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def build_causal_lm(config, *, attn_implementation: str = "lss", seed: int = 0, dtype=torch.float32):
    """``AutoModelForCausalLM.from_config`` with a seeded init (same weights on every rank).

    The config is copied: transformers writes the attention implementation into the config it is
    given, so two models built from one config object would otherwise share it.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn_implementation, dtype=dtype)
