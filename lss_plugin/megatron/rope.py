"""RoPE frequencies for this rank's tokens, in the LSS layout in use.

megatron-core's ``RotaryEmbedding.forward`` computes the table for the whole sequence and, when
the CP group has more than one rank, keeps the rows of the balanced 2N-chunk layout
(``get_pos_emb_on_this_cp_rank``, which also moves indices with ``.cuda()``). Under LSS the rows
must be the global positions of the tokens this rank actually holds, in whichever layout the
batch was split with.
"""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from lss_plugin.sharding import local_token_indices


class LSSRotaryEmbedding(RotaryEmbedding):
    """A ``RotaryEmbedding`` whose CP slicing follows ``lss_layout`` (contiguous or balanced)."""

    lss_layout: str = "contiguous"

    @classmethod
    def adopt(cls, rotary: RotaryEmbedding, layout: str) -> "LSSRotaryEmbedding":
        """Turn an existing RotaryEmbedding (inside a GPTModel) into this class, in place.

        In place because GPTModel owns the instance; RotaryEmbedding holds no parameters or
        buffers (``inv_freq`` is a plain attribute), so checkpoints are unaffected.
        """
        if type(rotary) is not RotaryEmbedding and not isinstance(rotary, cls):
            raise TypeError(f"expected megatron-core RotaryEmbedding, got {type(rotary).__name__}")
        rotary.__class__ = cls
        rotary.lss_layout = layout
        return rotary

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
                cp_group: torch.distributed.ProcessGroup | None = None) -> torch.Tensor:
        if packed_seq:
            raise NotImplementedError("packed sequences (THD) are not supported with LSS yet")
        emb = self.get_emb(max_seq_len, offset)  # [L, 1, 1, d] for the whole sequence
        group = cp_group if cp_group is not None else self.cp_group
        if group is None or group.size() == 1:
            return emb
        index = torch.as_tensor(
            local_token_indices(max_seq_len, group.rank(), group.size(), self.lss_layout),
            dtype=torch.long, device=emb.device,
        )
        return emb.index_select(0, index)  # [L/N, 1, 1, d], rows = this rank's global positions


def use_lss_rotary_embedding(gpt_model, layout: str) -> None:
    """Make a megatron-core GPTModel's RoPE follow the LSS layout (no-op without RoPE)."""
    model = getattr(gpt_model, "module", gpt_model)
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is not None and getattr(model, "position_embedding_type", None) == "rope":
        LSSRotaryEmbedding.adopt(rotary, layout)
