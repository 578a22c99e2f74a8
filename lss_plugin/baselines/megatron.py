"""Megatron-core core-attention modules for the baselines, drop-ins for ``DotProductAttention``.

- ``SDPADotProductAttention``: one device's (or one TP rank's) attention on torch's fused
  ``scaled_dot_product_attention`` with causal masking (flash kernel on CPU and GPU), the fair
  kernel for ``single`` and Megatron TP+SP (whose local ``DotProductAttention`` fills a dense
  ``[b * heads, L, L]`` buffer and computes the masked half too).
- ``sp_core_attention(kind, ...)``: ring, Ulysses, USP or all-gather CP attention over the
  sequence-parallel group registered as Megatron's context-parallel group.

They share ``LSSDotProductAttention``'s constructor: the same signature, and the same refusal,
by name, of what they do not implement (attention dropout, windows, other softmax types,
masks other than causal / none).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lss_plugin.megatron.attention import CAUSAL_MASK_TYPES, LSSDotProductAttention


class _BaselineCoreAttention(LSSDotProductAttention):
    """``[s, b, heads, d]`` in, ``[s, b, heads * d]`` out; subclasses implement ``attend``."""

    def __init__(self, config, layer_number, attn_mask_type, *args, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, *args, **kwargs)
        # LSSDotProductAttention takes these (lss_plugin.megatron.masks); the baselines' attend does not.
        unsupported = [f"window_size={self.window_size}"] if self.window_size is not None else []
        if self.softmax_offset is not None:
            unsupported.append(f"softmax_type={config.softmax_type!r}")
        if unsupported:
            raise ValueError(f"{type(self).__name__} does not support " + ", ".join(unsupported))

    def attend(self, q, k, v, causal: bool) -> torch.Tensor:  # [b, s, H, d] -> [b, s, H, d]
        raise NotImplementedError

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params: Optional[object] = None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError(f"{type(self).__name__}: packed sequences and attention_bias "
                                      "are not supported")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        self._check_mask_type(mask_type)
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s, heads, d]
        out = self.attend(q, k, v, mask_type in CAUSAL_MASK_TYPES)
        s, b = query.shape[0], query.shape[1]
        return out.transpose(0, 1).reshape(s, b, self.hidden_size_per_partition)


class SDPADotProductAttention(_BaselineCoreAttention):
    """Attention over the whole local sequence with ``F.scaled_dot_product_attention``.

    K/V keep their (GQA) heads: ``enable_gqa`` lets the fused kernel read them un-repeated.
    """

    kernel = "torch.nn.functional.scaled_dot_product_attention"

    def attend(self, q, k, v, causal):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, d]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.softmax_scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2)


def sp_core_attention(kind: str, layout: str = "balanced", ulysses_groups=None) -> type:
    """A core-attention class running ``kind`` over the CP group: ring | ulysses | usp | allgather_cp.

    ``ulysses_groups``: (ulysses_group, ring_group) of this rank, for ``usp``.
    """
    if kind not in ("ring", "ulysses", "usp", "allgather_cp"):
        raise ValueError(f"unknown sequence-parallel baseline {kind!r}")
    if kind == "usp" and ulysses_groups is None:
        raise ValueError("usp needs its (ulysses_group, ring_group) pair")

    class SPCoreAttention(_BaselineCoreAttention):
        def attend(self, q, k, v, causal):
            if kind == "ring":
                from lss_plugin.baselines.ring import ring_attention

                return ring_attention(q, k, v, group=self.sp_group, causal=causal,
                                      softmax_scale=self.softmax_scale, layout=layout)
            if kind == "allgather_cp":
                from lss_plugin.baselines.allgather_cp import allgather_cp_attention

                return allgather_cp_attention(q, k, v, group=self.sp_group, causal=causal,
                                              softmax_scale=self.softmax_scale, layout=layout)
            if kind == "usp":
                from lss_plugin.baselines.usp import usp_attention

                return usp_attention(q, k, v, ulysses_group=ulysses_groups[0],
                                     ring_group=ulysses_groups[1], causal=causal,
                                     softmax_scale=self.softmax_scale)
            if not hasattr(self, "_ulysses"):
                from lss_plugin.baselines.ulysses import UlyssesAttention

                self._ulysses = UlyssesAttention(self.sp_group, causal=causal,
                                                 softmax_scale=self.softmax_scale)
            return self._ulysses(q.contiguous(), k.contiguous(), v.contiguous())

    SPCoreAttention.__name__ = f"{kind.capitalize()}CoreAttention"
    return SPCoreAttention
