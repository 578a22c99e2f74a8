"""The GPT layer spec with LSS core attention: megatron-core's local spec, one submodule swapped."""
from __future__ import annotations

import copy
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from lss_plugin.megatron.args import KV_BACKWARD_MODES, LAYOUTS
from lss_plugin.megatron.attention import configured_lss_attention


def get_gpt_layer_lss_spec(
    num_experts: Optional[int] = None,
    moe_grouped_gemm: Optional[bool] = False,
    qk_layernorm: Optional[bool] = False,
    normalization: Optional[str] = None,
    qk_l2_norm: Optional[bool] = False,
    *,
    layout: str = "contiguous",
    kv_backward: str = "keep",
    kv_head_chunk: Optional[int] = None,
) -> ModuleSpec:
    """``get_gpt_layer_local_spec(...)`` with ``LSSDotProductAttention`` as core attention.

    The first arguments are those of ``get_gpt_layer_local_spec``; the keyword-only ones choose
    the LSS layout (must match the batch split), the K/V backward mode and head chunking.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    if kv_backward not in KV_BACKWARD_MODES:
        raise ValueError(f"kv_backward {kv_backward!r} is not one of {KV_BACKWARD_MODES}")
    spec = copy.deepcopy(get_gpt_layer_local_spec(
        num_experts=num_experts,
        moe_grouped_gemm=moe_grouped_gemm,
        qk_layernorm=qk_layernorm,
        normalization=normalization,
        qk_l2_norm=qk_l2_norm,
    ))
    spec.submodules.self_attention.submodules.core_attention = configured_lss_attention(
        layout=layout, kv_backward=kv_backward, kv_head_chunk=kv_head_chunk
    )
    return spec


def get_gpt_layer_lss_spec_from_args(args) -> ModuleSpec:
    """The spec for a parsed Megatron-style namespace (what the Megatron-LM patch calls)."""
    return get_gpt_layer_lss_spec(
        num_experts=getattr(args, "num_experts", None),
        moe_grouped_gemm=getattr(args, "moe_grouped_gemm", False),
        qk_layernorm=getattr(args, "qk_layernorm", False),
        normalization=getattr(args, "normalization", None),
        qk_l2_norm=getattr(args, "qk_l2_norm", False),
        layout=args.lss_layout,
        kv_backward=args.lss_kv_backward,
    )
