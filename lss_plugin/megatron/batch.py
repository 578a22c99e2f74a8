"""This rank's part of a batch (tokens, labels, loss mask, position ids) in the LSS layout.

Megatron-LM's ``get_batch_on_this_cp_rank`` keeps the balanced 2N-chunk layout only. This does
the same job for either layout, using the index list every other part of the plugin uses
(``lss_plugin.sharding.local_token_indices``, with the hybrid's Ulysses size), so tokens, positions,
RoPE rows and the causal mask inside ``lss_attention`` always agree. No communication: every rank
holds the whole batch.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from lss_plugin.megatron.parallel import registered_ulysses_size
from lss_plugin.sharding import local_token_indices


def lss_token_index(seq_len: int, sp_rank: int, sp_size: int, layout: str,
                    device: Optional[torch.device] = None, ulysses_size: int = 1) -> torch.Tensor:
    """Global positions of this rank's tokens, a LongTensor ``[seq_len / sp_size]``."""
    index = local_token_indices(seq_len, sp_rank, sp_size, layout, ulysses_size=ulysses_size)
    return torch.as_tensor(index, dtype=torch.long, device=device)


def get_batch_on_this_lss_rank(
    batch: Mapping[str, Optional[torch.Tensor]],
    layout: str,
    sp_rank: Optional[int] = None,
    sp_size: Optional[int] = None,
    ulysses_size: Optional[int] = None,
) -> dict:
    """Slice every sequence tensor of ``batch`` to this rank's tokens.

    ``batch`` maps names to ``[b, L]`` tensors (tokens, labels, loss_mask, position_ids; a 1-D
    ``[L]`` tensor is sliced on its only dim) or ``attention_mask`` ``[b, 1, L, L]`` (its query
    dim is sliced, as Megatron does). ``None`` values pass through. ``sp_rank``/``sp_size``
    default to megatron-core's context-parallel rank and size (where LSS is registered),
    ``ulysses_size`` (the hybrid's U) to the registered topology's.
    """
    if sp_rank is None or sp_size is None:
        from megatron.core import parallel_state

        sp_rank = parallel_state.get_context_parallel_rank() if sp_rank is None else sp_rank
        sp_size = parallel_state.get_context_parallel_world_size() if sp_size is None else sp_size
    if ulysses_size is None:
        ulysses_size = registered_ulysses_size()
    seq_lens = {
        name: (t.shape[2] if name == "attention_mask" else t.shape[-1] if t.dim() == 1 else t.shape[1])
        for name, t in batch.items() if t is not None
    }
    if len(set(seq_lens.values())) > 1:
        raise ValueError(f"batch tensors disagree on the sequence length: {seq_lens}")
    out = dict(batch)
    if not seq_lens or sp_size == 1:
        return out
    seq_len = next(iter(seq_lens.values()))
    index = None
    for name, tensor in batch.items():
        if tensor is None:
            continue
        if index is None or index.device != tensor.device:
            index = lss_token_index(seq_len, sp_rank, sp_size, layout, device=tensor.device,
                                    ulysses_size=ulysses_size)
        dim = 2 if name == "attention_mask" else (0 if tensor.dim() == 1 else 1)
        out[name] = tensor.index_select(dim, index).contiguous()
    return out
