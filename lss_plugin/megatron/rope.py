"""Rotary embeddings for this rank's tokens, in the LSS layout in use.

megatron-core's rotary modules (``RotaryEmbedding`` for ``rope``, ``YarnRotaryEmbedding`` for
``yarn``, ``MultimodalRotaryEmbedding`` for ``mrope``) compute the table for the whole sequence
and, when the CP group has more than one rank, keep the rows of the balanced 2N-chunk layout
(``get_pos_emb_on_this_cp_rank``, which also moves indices with ``.cuda()``). Under LSS the rows
must be the global positions of the tokens this rank actually holds, in whichever layout the
batch was split with: wrong rows under the contiguous layout, without any error, if left alone.
Each module is therefore swapped for a subclass that computes the whole table exactly as
megatron-core does (CP slicing off) and keeps this rank's rows; a rotary module of any other
class is refused by name. ``mrope`` takes Megatron's CP convention: ``position_ids`` for the whole
sequence, ``[3, b, L]``.

Packed documents (THD): megatron-core builds a table of ``max(max_seqlen_q, max_seqlen_kv)`` rows
without CP slicing (``packed_seq=True``), and ``_apply_rotary_pos_emb_thd`` picks each token's row
from ``cu_seqlens``, read as Megatron-CP's per-document partitioning. Under LSS the boundaries are
global, so these modules hand on megatron-core's whole table and ``LSSSelfAttention`` picks this
rank's rows with ``packed_rope_rows`` (the rows one CP rank would use). With more than one rank a
rotary module refuses packed sequences unless every layer it feeds is an ``LSSSelfAttention``.
"""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import (
    MultimodalRotaryEmbedding,
    RotaryEmbedding,
)
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

from lss_plugin.megatron.parallel import lss_group_for
from lss_plugin.options import DEFAULT_LAYOUT
from lss_plugin.sharding import local_positions


def _rows_of_this_rank(emb: torch.Tensor, group, layout: str, ulysses_size=None) -> torch.Tensor:
    """``emb`` [L, ...] for the whole sequence -> [L/N, ...], rows = this rank's global positions
    (``group`` Megatron's CP group; with the hybrid, ``ulysses_size`` > 1, its Ulysses x LSS layout)."""
    if group is None or group.size() == 1:
        return emb
    groups, _ = lss_group_for(group, ulysses_size)
    return emb.index_select(0, local_positions(emb.shape[0], groups, layout, device=emb.device))


def packed_rope_rows(table: torch.Tensor, documents, group, layout: str) -> torch.Tensor:
    """This rank's rows of megatron-core's THD RoPE table, for packed documents under LSS.

    ``table`` [M, 1, 1, d] (positions 0..M-1), ``documents`` a ``PackedDocuments`` (global
    boundaries, L = ``cu[-1]``), ``group`` the CP group or its Ulysses x LSS ``SequenceGroups``
    -> [L/N, 1, 1, d]. The rows are those megatron-core's
    ``_apply_rotary_pos_emb_thd`` gives the same tokens on one CP rank (0.16.1 and 0.19.x alike,
    ``lss_plugin.megatron.compat``): a table of exactly L rows is read at each token's position in
    the whole sequence; any other table at its position inside its document (so M must cover the
    longest document).
    """
    seq_len, rows = documents.seq_len, table.shape[0]
    if rows == seq_len:
        positions = local_positions(seq_len, group, layout, device=table.device)
    elif rows < documents.longest:
        raise ValueError(f"the RoPE table has {rows} rows (max_seqlen_q/kv) but a packed document has "
                         f"{documents.longest} tokens")
    else:
        positions = local_positions(seq_len, group, layout, device=table.device, cu_seqlens=documents.cu_seqlens)
    return table.index_select(0, positions)


class _LSSRows:
    """Mixin: the layout these rows follow, and the group (the call's, else the module's CP group)."""

    lss_layout: str = DEFAULT_LAYOUT
    lss_ulysses_size = None  # the hybrid's U (None: the registered topology's)
    lss_rows_in_attention: bool = False  # every layer fed is an LSSSelfAttention (packed rows)

    def _group(self, cp_group):
        return cp_group if cp_group is not None else self.cp_group

    def _packed_table(self, cp_group) -> None:
        """Packed sequences: megatron-core's whole table goes on, if LSSSelfAttention picks the rows."""
        group = self._group(cp_group)
        if group is not None and group.size() > 1 and not self.lss_rows_in_attention:
            raise NotImplementedError(
                "packed sequences (THD) with RoPE under LSS need LSSSelfAttention in every layer (the spec "
                "from lss_plugin.megatron.get_gpt_layer_lss_spec): megatron-core's SelfAttention would read "
                "the global cu_seqlens as Megatron-CP's per-document partitioning")


class LSSRotaryEmbedding(_LSSRows, RotaryEmbedding):
    """``rope``: a ``RotaryEmbedding`` whose CP slicing follows ``lss_layout``."""

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
                cp_group: torch.distributed.ProcessGroup | None = None) -> torch.Tensor:
        if packed_seq:  # megatron-core's whole table [max_seqlen, 1, 1, d]: LSSSelfAttention picks the rows
            self._packed_table(cp_group)
            return self.get_emb(max_seq_len, offset)
        emb = self.get_emb(max_seq_len, offset)  # [L, 1, 1, d] for the whole sequence
        return _rows_of_this_rank(emb, self._group(cp_group), self.lss_layout, self.lss_ulysses_size)


class LSSYarnRotaryEmbedding(_LSSRows, YarnRotaryEmbedding):
    """``yarn``: the YaRN table and mscale of megatron-core, rows in ``lss_layout``."""

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
                cp_group: torch.distributed.ProcessGroup | None = None):
        if packed_seq:
            self._packed_table(cp_group)
            return self.get_emb(max_seq_len, offset)  # whole table and mscale
        emb, mscale = self.get_emb(max_seq_len, offset)  # [L, 1, 1, d]
        return _rows_of_this_rank(emb, self._group(cp_group), self.lss_layout, self.lss_ulysses_size), mscale


class LSSMultimodalRotaryEmbedding(_LSSRows, MultimodalRotaryEmbedding):
    """``mrope``: megatron-core's 3-section table from ``position_ids`` [3, b, L], rows in ``lss_layout``."""

    def forward(self, position_ids: torch.Tensor, mrope_section, cp_group=None) -> torch.Tensor:
        group = self._group(cp_group)
        saved, self.cp_group = self.cp_group, None  # megatron-core's table without its CP slicing
        try:
            emb = super().forward(position_ids, mrope_section, cp_group=None)  # [L, b, 1, d]
        finally:
            self.cp_group = saved
        return _rows_of_this_rank(emb, group, self.lss_layout, self.lss_ulysses_size)


_LSS_CLASS = {
    RotaryEmbedding: LSSRotaryEmbedding,
    YarnRotaryEmbedding: LSSYarnRotaryEmbedding,
    MultimodalRotaryEmbedding: LSSMultimodalRotaryEmbedding,
}


def adopt_rotary(rotary: torch.nn.Module, layout: str, rows_in_attention: bool = False,
                 ulysses_size: int | None = None) -> torch.nn.Module:
    """Turn a megatron-core rotary module (inside a GPTModel) into its LSS class, in place.

    In place because GPTModel owns the instance; these modules hold no parameters or buffers
    (``inv_freq`` is a plain attribute), so checkpoints are unaffected. Refuses any other class.
    """
    base = next((b for b, lss in _LSS_CLASS.items() if type(rotary) in (b, lss)), None)
    if base is None:
        raise TypeError(
            f"LSS cannot place the rows of a {type(rotary).__name__} rotary embedding for its layout "
            f"(supported: {', '.join(b.__name__ for b in _LSS_CLASS)}); it would slice positions for "
            "Megatron's balanced CP layout"
        )
    rotary.__class__ = _LSS_CLASS[base]
    rotary.lss_layout = layout
    rotary.lss_rows_in_attention = rows_in_attention
    rotary.lss_ulysses_size = ulysses_size
    return rotary


def use_lss_rotary_embedding(gpt_model, layout: str, ulysses_size: int | None = None) -> None:
    """Make a megatron-core GPTModel's rotary embedding follow the LSS layout (no-op without one);
    ``ulysses_size``: the hybrid's U (None: the registered topology's)."""
    model = getattr(gpt_model, "module", gpt_model)
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is not None:
        decoder = getattr(model, "decoder", None)
        layers = list(decoder.layers) if decoder is not None else []
        # LSSSelfAttention says so by a class attribute (it imports this module, so not by isinstance)
        rows_in_attention = all(getattr(getattr(layer, "self_attention", None), "picks_packed_rope_rows", False)
                                for layer in layers)
        adopt_rotary(rotary, layout, rows_in_attention, ulysses_size)
