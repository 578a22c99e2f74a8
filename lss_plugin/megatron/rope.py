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
"""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import (
    MultimodalRotaryEmbedding,
    RotaryEmbedding,
)
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

from lss_plugin.sharding import local_token_indices


def _rows_of_this_rank(emb: torch.Tensor, group, layout: str) -> torch.Tensor:
    """``emb`` [L, ...] for the whole sequence -> [L/N, ...], rows = this rank's global positions."""
    if group is None or group.size() == 1:
        return emb
    index = torch.as_tensor(local_token_indices(emb.shape[0], group.rank(), group.size(), layout),
                            dtype=torch.long, device=emb.device)
    return emb.index_select(0, index)


class _LSSRows:
    """Mixin: the layout these rows follow, and the group (the call's, else the module's CP group)."""

    lss_layout: str = "contiguous"

    def _group(self, cp_group):
        return cp_group if cp_group is not None else self.cp_group


class LSSRotaryEmbedding(_LSSRows, RotaryEmbedding):
    """``rope``: a ``RotaryEmbedding`` whose CP slicing follows ``lss_layout``."""

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
                cp_group: torch.distributed.ProcessGroup | None = None) -> torch.Tensor:
        if packed_seq:
            raise NotImplementedError("packed sequences (THD) are not supported with LSS yet")
        emb = self.get_emb(max_seq_len, offset)  # [L, 1, 1, d] for the whole sequence
        return _rows_of_this_rank(emb, self._group(cp_group), self.lss_layout)


class LSSYarnRotaryEmbedding(_LSSRows, YarnRotaryEmbedding):
    """``yarn``: the YaRN table and mscale of megatron-core, rows in ``lss_layout``."""

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
                cp_group: torch.distributed.ProcessGroup | None = None):
        if packed_seq:
            raise NotImplementedError("packed sequences (THD) are not supported with LSS yet")
        emb, mscale = self.get_emb(max_seq_len, offset)  # [L, 1, 1, d]
        return _rows_of_this_rank(emb, self._group(cp_group), self.lss_layout), mscale


class LSSMultimodalRotaryEmbedding(_LSSRows, MultimodalRotaryEmbedding):
    """``mrope``: megatron-core's 3-section table from ``position_ids`` [3, b, L], rows in ``lss_layout``."""

    def forward(self, position_ids: torch.Tensor, mrope_section, cp_group=None) -> torch.Tensor:
        group = self._group(cp_group)
        saved, self.cp_group = self.cp_group, None  # megatron-core's table without its CP slicing
        try:
            emb = super().forward(position_ids, mrope_section, cp_group=None)  # [L, b, 1, d]
        finally:
            self.cp_group = saved
        return _rows_of_this_rank(emb, group, self.lss_layout)


_LSS_CLASS = {
    RotaryEmbedding: LSSRotaryEmbedding,
    YarnRotaryEmbedding: LSSYarnRotaryEmbedding,
    MultimodalRotaryEmbedding: LSSMultimodalRotaryEmbedding,
}


def adopt_rotary(rotary: torch.nn.Module, layout: str) -> torch.nn.Module:
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
    return rotary


def use_lss_rotary_embedding(gpt_model, layout: str) -> None:
    """Make a megatron-core GPTModel's rotary embedding follow the LSS layout (no-op without one)."""
    model = getattr(gpt_model, "module", gpt_model)
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is not None:
        adopt_rotary(rotary, layout)
