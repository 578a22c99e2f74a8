"""The GPT layer spec with LSS core attention: megatron-core's own spec, one submodule swapped.

With TransformerEngine importable the base is ``get_gpt_layer_with_transformer_engine_spec`` (TE
linears with fused input norms, TE norms, TE MLP); without it, ``get_gpt_layer_local_spec``. Either
way only ``self_attention.submodules.core_attention`` changes, to ``LSSDotProductAttention``: LSS
replaces Megatron's context parallelism inside attention, everything around it stays the
framework's own (so fp8 and fused TE kernels keep working around LSS attention). The one other
change: ``self_attention.module`` becomes ``LSSSelfAttention``, megatron-core's ``SelfAttention``
that picks the RoPE rows of packed (THD) documents for the LSS layout and is otherwise unchanged.
"""
from __future__ import annotations

import copy
from typing import Optional

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from lss_plugin.options import AttentionSettings, settings_from_keywords
from lss_plugin.megatron.args import attention_settings_from_args
from lss_plugin.megatron.attention import configured_lss_attention
from lss_plugin.megatron.self_attention import LSSSelfAttention

TRANSFORMER_IMPLS = ("transformer_engine", "local")


def transformer_engine_available() -> bool:
    """What megatron-core itself found at import (``import transformer_engine`` and its extensions)."""
    return bool(getattr(gpt_layer_specs, "HAVE_TE", False))


def _resolve_impl(transformer_impl: Optional[str]) -> str:
    if transformer_impl is None:
        return "transformer_engine" if transformer_engine_available() else "local"
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"transformer_impl {transformer_impl!r} is not one of {TRANSFORMER_IMPLS}")
    if transformer_impl == "transformer_engine" and not transformer_engine_available():
        raise ValueError("transformer_impl 'transformer_engine' needs TransformerEngine, which megatron-core "
                         "could not import here; use transformer_impl='local'")
    return transformer_impl


def get_gpt_layer_lss_spec(
    num_experts: Optional[int] = None,
    moe_grouped_gemm: Optional[bool] = False,
    qk_layernorm: Optional[bool] = False,
    normalization: Optional[str] = None,
    qk_l2_norm: Optional[bool] = False,
    *,
    settings: Optional[AttentionSettings] = None,
    transformer_impl: Optional[str] = None,
    ulysses_size: Optional[int] = None,
    **setting_keywords,
) -> ModuleSpec:
    """megatron-core's GPT layer spec with ``LSSDotProductAttention`` as core attention.

    The first arguments are those of ``get_gpt_layer_local_spec`` (the TE spec takes the norm kind
    from ``TransformerConfig.normalization`` instead of ``normalization``). ``transformer_impl``:
    ``"transformer_engine"`` (TE spec), ``"local"`` (local spec) or None (TE when importable).
    ``settings`` (an ``AttentionSettings``; the layout must match the batch split) or its keywords
    (``layout=``, ``kv_backward=``, ``kv_head_chunk=``, ``kv_buffer_mib=``, ``kv_grad_dtype=``): what
    every layer's ``lss_attention`` runs with. ``ulysses_size``: the hybrid's Ulysses size (None: the
    registered topology's; a value must match it when the layers are built).
    """
    settings = settings_from_keywords(settings, setting_keywords, "get_gpt_layer_lss_spec")
    common = dict(num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=qk_layernorm,
                  qk_l2_norm=qk_l2_norm)
    if _resolve_impl(transformer_impl) == "transformer_engine":
        base = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**common)
    else:
        base = gpt_layer_specs.get_gpt_layer_local_spec(normalization=normalization, **common)
    spec = copy.deepcopy(base)
    attention = spec.submodules.self_attention
    if attention.module is not SelfAttention:
        raise ValueError(f"megatron-core's GPT layer spec builds self-attention as {attention.module}, not "
                         "SelfAttention: LSS cannot place its packed-document RoPE rows there")
    attention.module = LSSSelfAttention
    attention.submodules.core_attention = configured_lss_attention(settings, ulysses_size=ulysses_size)
    return spec


def get_gpt_layer_lss_spec_from_args(args) -> ModuleSpec:
    """The spec for a parsed Megatron-style namespace (what the Megatron-LM patch calls).

    ``args.transformer_impl`` (Megatron-LM's ``--transformer-impl``) picks the base spec; a
    namespace without it (the bundled ``pretrain.py``, whose baseline is the local spec) gets the
    local spec.
    """
    return get_gpt_layer_lss_spec(
        num_experts=getattr(args, "num_experts", None),
        moe_grouped_gemm=getattr(args, "moe_grouped_gemm", False),
        qk_layernorm=getattr(args, "qk_layernorm", False),
        normalization=getattr(args, "normalization", None),
        qk_l2_norm=getattr(args, "qk_l2_norm", False),
        settings=attention_settings_from_args(args),
        transformer_impl=getattr(args, "transformer_impl", "local"),
        ulysses_size=getattr(args, "lss_ulysses_size", 1),
    )
