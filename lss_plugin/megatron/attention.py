"""LSS core attention for megatron-core: a drop-in for the local ``DotProductAttention``.

Same constructor and ``forward`` signature, same ``[s, b, h, d]`` tensors, so a layer spec swaps it
in through ``SelfAttentionSubmodules(core_attention=...)``. Each rank holds ``s_local = L / N`` of
the tokens; ``lss_attention`` gathers K, V over the SP group (Megatron's CP group) and returns
the complete output for the local queries. With the hybrid LSS x Ulysses (``--lss-ulysses-size`` U > 1)
it passes the CP group's registered ``SequenceGroups`` instead: an all-to-all over heads inside
the Ulysses group, then LSS's gather across the LSS group. No TransformerEngine, no apex.

Masks. LSS applies one mask itself, the causal one in global positions (or none). An
``attention_mask`` (Megatron's convention: bool, True = hidden; this rank's queries against keys
in global positions, ``[b, 1, s_local or 1, L]``, as ``get_batch_on_this_lss_rank`` slices it)
is accepted only when it hides nothing that mask type does not already hide: a causal mask passed
along with ``causal``/``padding_causal``, an all-visible mask with ``no_mask``/``padding``.
Padding and document masks are refused with ``NotImplementedError``, never dropped, on every
rank of the SP group: a padding mask usually changes the rows of some ranks only, so each rank's
count of pairs the mask would add goes into the verdict of the ``lss_attention`` call that follows
(``lss_plugin.verdict``), which raises on every rank naming each rank's count. Pass ``attention_mask=None`` (Megatron-LM: ``--no-create-attention-mask-in-dataloader``)
to skip the check.

Sliding windows and softmax types: megatron-core's ``window_size`` on the layers
``window_attn_skip_freq`` picks, and ``softmax_type`` "off-by-one" / "learnable" (the parameter
``softmax_offset``, megatron-core's name and shape), go to ``lss_attention(window=, sinks=)``
(``lss_plugin.megatron.masks``).

Packed documents: ``packed_seq_params`` ("thd", or "sbhd"/"bshd" with batch 1) whose ``cu_seqlens``
are **global** boundaries of the whole sequence LSS shards in its layout, not Megatron-CP's
per-document THD partitioning (``lss_plugin.megatron.packed``). They go to
``lss_attention(cu_seqlens=...)``: no token attends outside its document, and the communication stays
one K/V all-gather and one dK/dV reduce-scatter. RoPE rows for packed tokens: ``LSSSelfAttention``.
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
from lss_plugin.runtime import default_device
from lss_plugin.options import AttentionSettings, check_ulysses_heads, settings_from_keywords
from lss_plugin.megatron.masks import add_softmax_offset, check_causal_window, layer_window, lss_window
from lss_plugin.megatron.packed import packed_format, read_packed_seq_params
from lss_plugin.megatron.parallel import lss_group_for
from lss_plugin.sharding import local_positions
from lss_plugin.verdict import defer

# Mask types LSS reproduces -> whether its own mask is causal. The padding variants are exact
# only while their mask pads nothing (checked per call).
_CAUSAL_BY_MASK_TYPE = {
    AttnMaskType.causal: True,
    AttnMaskType.padding_causal: True,
    AttnMaskType.no_mask: False,
    AttnMaskType.padding: False,
}
# The causal ones, for code that stands in for this module's attention (lss_plugin.baselines.megatron).
CAUSAL_MASK_TYPES = tuple(t for t, causal in _CAUSAL_BY_MASK_TYPE.items() if causal)
# cp_comm_type picks the communication of Megatron's context-parallel attention, which LSS
# replaces: only "unset" or "lss" are honest values (see lss_plugin.megatron.megatron_lm).
CP_COMM_TYPES = (None, "lss")


class LSSDotProductAttention(MegatronModule):
    """Core attention over a sequence split across the LSS (= Megatron CP) group.

    Options travel on the class (``lss_settings``, the ``AttentionSettings`` every call hands
    ``lss_attention`` unchanged, and ``lss_ulysses_size``): ``get_gpt_layer_lss_spec`` makes a configured
    subclass, because megatron-core builds modules from a spec with a fixed set of constructor arguments.
    ``lss_ulysses_size`` None follows the registered topology; a value must match it
    (``lss_plugin.megatron.parallel.lss_group_for``).
    """

    lss_settings: AttentionSettings = AttentionSettings()
    lss_ulysses_size: Optional[int] = None

    @property
    def lss_layout(self) -> str:
        """The settings' layout (RoPE rows and packed documents read it)."""
        return self.lss_settings.layout

    @property
    def lss_attention_settings(self) -> AttentionSettings:
        """What this module's ``lss_attention`` calls run with (read by ``lss_plugin.model_settings``)."""
        return self.lss_settings

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
        # What lss_attention runs over: the CP group (pure LSS), or its Ulysses x LSS SequenceGroups.
        self.sequence_group, self.ulysses_size = lss_group_for(self.sp_group, self.lss_ulysses_size)

        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        unsupported = []
        if dropout and dropout > 0:
            unsupported.append(f"attention dropout {dropout} (set attention_dropout=0)")
        if attention_type != "self":
            unsupported.append(f"attention_type={attention_type!r} (self-attention only)")
        if cp_comm_type not in CP_COMM_TYPES:
            unsupported.append(
                f"cp_comm_type={cp_comm_type!r} (it selects the communication of Megatron's context-parallel "
                "attention; LSS always communicates with one K/V all-gather and one dK/dV reduce-scatter: "
                "leave it unset or 'lss')"
            )
        if unsupported:
            raise ValueError("LSSDotProductAttention does not support " + ", ".join(unsupported))
        self._check_mask_type(attn_mask_type)
        # This layer's sliding window (megatron-core's rule for which layers have one; lss_plugin.megatron.masks).
        self.window_size = layer_window(config, layer_number)
        check_causal_window(self.window_size, _CAUSAL_BY_MASK_TYPE[attn_mask_type], attn_mask_type.name)

        tp_size = self.tp_group.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp_size)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp_size)
        if self.ulysses_size > 1:  # the heads this TP rank attends are split over the Ulysses group
            heads, kv_heads = self.num_attention_heads_per_partition, self.num_query_groups_per_partition
            try:
                check_ulysses_heads(heads, kv_heads, self.ulysses_size)
            except ValueError as err:
                raise ValueError(f"LSSDotProductAttention with {heads} query and {kv_heads} key/value heads per "
                                 f"tensor-parallel rank: {err}") from None
        # off-by-one / learnable softmax: megatron-core's softmax_offset, [heads of this TP rank] (the sinks).
        add_softmax_offset(self, config, self.num_attention_heads_per_partition, default_device())
        # DotProductAttention divides by layer_number for query-key layer scaling and multiplies
        # it back inside its fp32 softmax: the net scale is the plain one.
        self.softmax_scale = (
            1.0 / math.sqrt(self.hidden_size_per_attention_head) if softmax_scale is None
            else softmax_scale
        )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """megatron-core's own (``DotProductAttention``'s): a learnable ``softmax_offset`` split over TP
        along dim 0, so distributed checkpoints of either module load into the other."""
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        return DotProductAttention.sharded_state_dict(self, prefix, sharded_offsets, metadata)

    @staticmethod
    def _check_mask_type(mask_type: AttnMaskType) -> None:
        if mask_type not in _CAUSAL_BY_MASK_TYPE:
            raise ValueError(
                f"LSSDotProductAttention supports attn_mask_type causal, padding_causal, no_mask and padding "
                f"(the padding ones without padding), got {mask_type}; arbitrary masks are not supported yet"
            )

    def _check_attention_mask(self, mask: torch.Tensor, mask_type: AttnMaskType, s_local: int) -> None:
        """Refuse a mask that hides anything beyond what LSS applies itself (see the module doc)."""
        group = self.sp_group
        size = group.size() if group is not None else 1
        seq_len = s_local * size
        if mask.dim() != 4 or mask.shape[-1] != seq_len or mask.shape[-2] not in (1, s_local):
            raise ValueError(
                f"attention_mask of shape {tuple(mask.shape)} with {mask_type}: LSSDotProductAttention reads masks "
                f"as [b, 1, s_local={s_local} or 1, L={seq_len}] (this rank's queries, keys in global positions, "
                "True = hidden), as lss_plugin.megatron.get_batch_on_this_lss_rank slices them"
            )
        hidden = mask.bool()  # [b, 1, s_local or 1, L]
        causal = _CAUSAL_BY_MASK_TYPE[mask_type]
        if causal:
            positions = (torch.arange(seq_len, device=mask.device) if group is None else  # [s_local]
                         local_positions(seq_len, self.sequence_group, self.lss_layout, device=mask.device))
            future = torch.arange(seq_len, device=mask.device)[None, :] > positions[:, None]  # [s_local, L]
            hidden = hidden & ~future
        extra = int(hidden.sum(dtype=torch.int64))  # this rank's rows only: forward() defers the refusal
        if extra:
            raise NotImplementedError(
                f"attn_mask_type={mask_type.name} with an attention_mask that hides {extra} (query, key) pairs "
                f"{'a causal mask shows' if causal else 'of an unmasked attention'} in this rank's rows: LSS applies "
                f"{'only the causal mask (global positions)' if causal else 'no mask'} and would drop them. Padding "
                "and document masks are not supported: right-pad and drop padded tokens from the loss (loss_mask), "
                "or pass attention_mask=None"
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

        Packed documents (``packed_seq_params``, see ``lss_plugin.megatron.packed``): "thd" tensors
        ``[t_local, heads, hn]`` -> ``[t_local, np*hn]``; "bshd" ``[1, s_local, heads, hn]`` ->
        ``[1, s_local, np*hn]``; "sbhd" as unpacked, batch 1. Their ``cu_seqlens`` are global boundaries.
        The causal mask is built from global positions inside ``lss_attention``; ``attention_mask``
        is checked to add nothing to it (module doc), never silently dropped.
        """
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by LSSDotProductAttention")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        self._check_mask_type(mask_type)
        causal = _CAUSAL_BY_MASK_TYPE[mask_type]
        check_causal_window(self.window_size, causal, mask_type.name)
        qkv_format = "sbhd" if packed_seq_params is None else packed_format(packed_seq_params)
        q, k, v = (self._to_bshd(t, qkv_format, name) for t, name in ((query, "query"), (key, "key"),
                                                                      (value, "value")))
        batch, s_local = q.shape[0], q.shape[1]
        try:  # this rank's data: refused by lss_attention's verdict on every rank, not here alone
            cu_seqlens = self._documents(packed_seq_params, attention_mask, mask_type, batch, s_local)
        except (ValueError, NotImplementedError) as err:
            defer(err)
            cu_seqlens = None

        sp_size = self.sp_group.size() if self.sp_group is not None else 1
        # K, V keep their ng (GQA) heads so only ng heads travel over the SP group.
        out = lss_attention(
            q, k, v,
            group=self.sequence_group,
            causal=causal,
            softmax_scale=self.softmax_scale,
            cu_seqlens=cu_seqlens,
            window=lss_window(self.window_size, s_local * sp_size),
            sinks=self.softmax_offset,  # [np] or None
            settings=self.lss_settings,
        )  # [b, s_local, np, hn]
        if qkv_format == "thd":
            return out[0].reshape(s_local, self.hidden_size_per_partition)
        if qkv_format == "bshd":
            return out.reshape(batch, s_local, self.hidden_size_per_partition)
        return out.transpose(0, 1).reshape(s_local, batch, self.hidden_size_per_partition)

    def _documents(self, packed_seq_params, attention_mask, mask_type, batch: int, s_local: int):
        """The global document boundaries (or None), after checking the mask and packing this rank was given."""
        if packed_seq_params is not None:
            sp_size = self.sp_group.size() if self.sp_group is not None else 1
            documents = read_packed_seq_params(packed_seq_params, s_local * sp_size, batch, self.sp_group)
            if attention_mask is not None:
                raise NotImplementedError(
                    "attention_mask together with packed_seq_params: LSS takes the documents from cu_seqlens "
                    "and applies only its own (causal) mask inside them; pass attention_mask=None")
            return documents.cu_seqlens
        if attention_mask is not None:
            self._check_attention_mask(attention_mask, mask_type, s_local)
        return None

    @staticmethod
    def _to_bshd(t: torch.Tensor, qkv_format: str, name: str) -> torch.Tensor:
        """Megatron's tensor layouts -> lss_attention's ``[b, s, heads, d]`` (views, no copies)."""
        expected = 3 if qkv_format == "thd" else 4
        if t.dim() != expected:
            raise ValueError(f"{name} of shape {tuple(t.shape)} with qkv_format={qkv_format!r}: expected "
                             f"{expected} dims ({'[t, heads, d]' if expected == 3 else qkv_format})")
        if qkv_format == "thd":
            return t.unsqueeze(0)  # batch 1 implied
        if qkv_format == "bshd":
            return t
        return t.transpose(0, 1)  # sbhd


def configured_lss_attention(settings: Optional[AttentionSettings] = None, ulysses_size: Optional[int] = None,
                             **setting_keywords) -> type:
    """A subclass of LSSDotProductAttention carrying these settings (specs pass classes): ``settings``
    or its keywords (``layout=``, ...)."""
    settings = settings_from_keywords(settings, setting_keywords, "configured_lss_attention")
    return type(
        "LSSDotProductAttention",
        (LSSDotProductAttention,),
        {"lss_settings": settings, "lss_ulysses_size": ulysses_size, "__module__": __name__},
    )
