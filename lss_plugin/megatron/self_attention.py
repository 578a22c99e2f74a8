"""megatron-core's ``SelfAttention``, with the RoPE rows of packed documents chosen the LSS way.

For THD packed sequences megatron-core's ``Attention.forward`` applies RoPE through
``apply_rotary_pos_emb(..., cu_seqlens=cu_seqlens_q, cp_group=<CP group>)``, which reads the
boundaries as Megatron-CP's per-document partitioning (each document cut into 2N chunks, two per
rank). Under LSS they are global boundaries and a rank holds L/N tokens of the whole sequence in the
LSS layout, so those rows would be wrong. On an LSS group of more than one rank this class
1. picks this rank's rows of the RoPE table (``rope.packed_rope_rows``: the rows one CP rank uses), and
2. hands megatron-core's forward the same documents as "sbhd" with batch 1: the tensors are the same
   ``[t, 1, ...]`` ones, RoPE is then applied row by row (megatron-core's THD path does exactly that on
   one rank once it has picked the rows), and LSS core attention gets the same ``cu_seqlens``.
Everything else is megatron-core's own forward. On one rank, without RoPE or without packing,
nothing is changed. ``PackedSeqParams`` LSS cannot honour are refused here, by name, before the
layer computes anything.
"""
from __future__ import annotations

import dataclasses
import inspect

from megatron.core.transformer.attention import SelfAttention

from lss_plugin.megatron.attention import LSSDotProductAttention
from lss_plugin.megatron.packed import packed_format, read_packed_seq_params
from lss_plugin.megatron.rope import packed_rope_rows

_FORWARD = inspect.signature(SelfAttention.forward)


class LSSSelfAttention(SelfAttention):
    """``SelfAttention`` whose packed-document RoPE rows follow the LSS layout (module doc)."""

    # Read by ``rope.use_lss_rotary_embedding``: the rotary module may hand on megatron-core's whole THD
    # table, because this layer picks the rows.
    picks_packed_rope_rows = True

    def forward(self, *args, **kwargs):
        call = _FORWARD.bind(self, *args, **kwargs)
        if call.arguments.get("packed_seq_params") is not None and isinstance(self.core_attention,
                                                                               LSSDotProductAttention):
            self._packed_documents_the_lss_way(call.arguments)
        return super().forward(*call.args[1:], **call.kwargs)

    def _packed_documents_the_lss_way(self, arguments: dict) -> None:
        params = arguments["packed_seq_params"]
        core = self.core_attention
        group, layout = core.sp_group, core.lss_layout
        rows_of = core.sequence_group  # whose tokens: the CP group, or its Ulysses x LSS groups
        sp_size = group.size() if group is not None else 1
        hidden = arguments["hidden_states"]  # [s_local (/ TP with Megatron SP), b, hidden]
        s_local = hidden.shape[0] * (self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1)
        fmt = packed_format(params)
        documents = read_packed_seq_params(params, s_local * sp_size, 1 if fmt == "thd" else hidden.shape[1], group)
        rotary = arguments.get("rotary_pos_emb")
        if sp_size == 1 or rotary is None:
            return  # megatron-core's own path is right on one rank, and without RoPE
        if getattr(self.config, "mrope_section", None) is not None:
            raise NotImplementedError("packed sequences with multimodal RoPE (mrope) are not supported under LSS")
        if fmt != "thd":
            # megatron-core applies a table of max_seqlen rows to the whole sequence (no cu_seqlens),
            # which only broadcasts on one device when that is L: the LSS rotary module gave this
            # rank's rows of it.
            if documents.max_seqlen != documents.seq_len:
                raise ValueError(
                    f"packed_seq_params.max_seqlen_q/kv={documents.max_seqlen} with qkv_format={fmt!r} and RoPE: "
                    f"megatron-core applies that many RoPE rows to the whole sequence of {documents.seq_len}")
            return
        if isinstance(rotary, tuple):
            arguments["rotary_pos_emb"] = tuple(t if t is None else packed_rope_rows(t, documents, rows_of, layout)
                                                for t in rotary)
        else:
            arguments["rotary_pos_emb"] = packed_rope_rows(rotary, documents, rows_of, layout)  # [s_local, 1, 1, d]
        arguments["packed_seq_params"] = dataclasses.replace(params, qkv_format="sbhd")
