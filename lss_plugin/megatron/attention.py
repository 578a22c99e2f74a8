"""LSS core attention for megatron-core: a drop-in for the local ``DotProductAttention``.

Same constructor and ``forward`` signature, same ``[s, b, h, d]`` tensors, so a layer spec swaps it
in through ``SelfAttentionSubmodules(core_attention=...)``. Each rank holds ``s_local = L / N`` of
the tokens; ``lss_attention`` gathers K, V over the SP group (Megatron's CP group) and returns
the complete output for the local queries. No TransformerEngine, no apex.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from lss_plugin import lss_attention

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)
_UNMASKED = (AttnMaskType.no_mask,)


class LSSDotProductAttention(MegatronModule):
    """Core attention over a sequence split across the LSS (= Megatron CP) group.

    Options travel on the class (``lss_layout``, ``lss_kv_backward``, ``lss_kv_head_chunk``):
    ``get_gpt_layer_lss_spec`` makes a configured subclass, because megatron-core builds
    modules from a spec with a fixed set of constructor arguments.
    """

    lss_layout: str = "contiguous"
    lss_kv_backward: str = "keep"
    lss_kv_head_chunk: Optional[int] = None

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        self.config: TransformerConfig = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        # The SP group is wherever Megatron keeps its CP group (lss_plugin.megatron.parallel).
        self.sp_group = getattr(pg_collection, "cp", None)

        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        unsupported = []
        if dropout and dropout > 0:
            unsupported.append(f"attention dropout {dropout} (set attention_dropout=0)")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            unsupported.append(f"softmax_type={config.softmax_type!r}")
        if getattr(config, "window_size", None) is not None:
            unsupported.append(f"window_size={config.window_size}")
        if attention_type != "self":
            unsupported.append(f"attention_type={attention_type!r} (self-attention only)")
        if unsupported:
            raise ValueError("LSSDotProductAttention does not support " + ", ".join(unsupported))
        self._check_mask_type(attn_mask_type)

        tp_size = self.tp_group.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp_size)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp_size)
        # DotProductAttention divides by layer_number for query-key layer scaling and multiplies
        # it back inside its fp32 softmax: the net scale is the plain one.
        self.softmax_scale = (
            1.0 / math.sqrt(self.hidden_size_per_attention_head) if softmax_scale is None
            else softmax_scale
        )

    @staticmethod
    def _check_mask_type(mask_type: AttnMaskType) -> None:
        if mask_type not in _CAUSAL + _UNMASKED:
            raise ValueError(
                f"LSSDotProductAttention supports causal and no_mask attention, got {mask_type}; "
                "arbitrary/padding masks are not supported yet"
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        """query ``[s_local, b, np, hn]``, key/value ``[s_local, b, ng, hn]`` -> ``[s_local, b, np*hn]``.

        ``attention_mask`` is ignored for causal mask types, as TEDotProductAttention does: the
        causal mask is built from global positions inside ``lss_attention``.
        """
        if packed_seq_params is not None:
            raise NotImplementedError(
                "packed_seq_params (THD packed sequences) are not supported by "
                "LSSDotProductAttention yet; use unpacked [s, b, h, d] batches"
            )
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by LSSDotProductAttention")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        self._check_mask_type(mask_type)

        # [s, b, h, d] -> [b, s, h, d]: lss_attention's layout. K, V keep their ng (GQA) heads
        # so only ng heads travel over the SP group.
        q = query.transpose(0, 1)
        k = key.transpose(0, 1)
        v = value.transpose(0, 1)
        out = lss_attention(
            q, k, v,
            group=self.sp_group,
            causal=mask_type in _CAUSAL,
            softmax_scale=self.softmax_scale,
            layout=self.lss_layout,
            kv_backward=self.lss_kv_backward,
            kv_head_chunk=self.lss_kv_head_chunk,
        )  # [b, s_local, np, hn]
        s_local, batch = query.shape[0], query.shape[1]
        return out.transpose(0, 1).reshape(s_local, batch, self.hidden_size_per_partition)


def configured_lss_attention(layout: str = "contiguous", kv_backward: str = "keep",
                             kv_head_chunk: Optional[int] = None) -> type:
    """A subclass of LSSDotProductAttention carrying these options (specs pass classes)."""
    return type(
        "LSSDotProductAttention",
        (LSSDotProductAttention,),
        {"lss_layout": layout, "lss_kv_backward": kv_backward, "lss_kv_head_chunk": kv_head_chunk,
         "__module__": __name__},
    )
