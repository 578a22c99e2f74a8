"""Causal-LM batches split over the sequence-parallel ranks, and a loss that is exact over the shards.

Every SP rank of one sequence receives the same global batch (``[b, L]``) and keeps its own tokens.
The labels are shifted on the *global* sequence, before sharding: the last token of segment ``s``
must predict the first token of segment ``s + 1``, which lives on another rank. Each rank then gets

    input_ids     [b, L/N]  its tokens
    position_ids  [b, L/N]  their global positions (RoPE, learned position tables)
    attention_mask[b, L/N]  all ones (see ``ShardedBatch.attention_mask``)
    shift_labels  [b, L/N]  the next global token for each of its tokens, or ``ignore_index``

Which tokens a rank holds is the core's layout for the groups in use (``lss_plugin.sharding``): under a
hybrid LSS x Ulysses topology each Ulysses group holds the layout's share of one LSS position, cut into
U consecutive pieces, so ``shard_causal_lm_batch`` and ``local_positions`` take the groups unresolved.

Right padding is exact without any padding mask: under a causal mask no real token ever sees a
later (padded) one, so the padded positions only need their labels ignored. Left or interior
padding would need a padding mask inside LSS and is refused.

Packed documents (``DataCollatorWithFlattening``: one row of documents whose ``position_ids``
restart at 0) are split the same way: the global boundaries come from the *whole* row's
``position_ids`` (or the collator's ``cu_seq_lens_*``), every rank gets them unchanged (the model
forwards them to the attention as ``cu_seq_lens_q``/``cu_seq_lens_k``) and its own tokens' positions
inside their documents; no target crosses a document boundary (``lss_plugin.hf.packing``).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lss_plugin.hf.packing import (
    FLASH_ATTN_KWARGS, flash_attn_kwargs, ignore_cross_document_targets, packed_boundaries,
)
from lss_plugin.hf.registry import lss_options, parts_per_sequence
from lss_plugin.sharding import check_seq_len, local_positions, shard_sequence
from lss_plugin.topology import resolve_sequence_groups, resolve_sp_group

IGNORE_INDEX = -100


@dataclass
class ShardedBatch:
    """This rank's share of a global causal-LM batch. Tensors ``[b, s_local]``."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    # All ones, and passed anyway: with the balanced layout a rank's positions jump between its two
    # chunks, and transformers reads a jump in position_ids *without* a mask as packed sequences.
    attention_mask: torch.Tensor
    shift_labels: torch.Tensor
    num_tokens: int  # labels on this rank that count in the loss
    layout: str
    # Packed documents: global boundaries [n_docs + 1] (the same on every rank), else None.
    cu_seqlens: torch.Tensor | None = None

    def model_inputs(self) -> dict:
        """Keyword arguments for ``model(**batch.model_inputs())`` (no labels: see ``causal_lm_loss``).
        Packed batches add the global boundaries as transformers' FlashAttentionKwargs."""
        inputs = {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "attention_mask": self.attention_mask,
            "use_cache": False,
        }
        if self.cu_seqlens is not None:
            inputs.update(flash_attn_kwargs(self.cu_seqlens))
        return inputs

    def to(self, device) -> "ShardedBatch":
        return ShardedBatch(
            input_ids=self.input_ids.to(device), position_ids=self.position_ids.to(device),
            attention_mask=self.attention_mask.to(device), shift_labels=self.shift_labels.to(device),
            num_tokens=self.num_tokens, layout=self.layout,
            cu_seqlens=None if self.cu_seqlens is None else self.cu_seqlens.to(device),
        )


def shift_labels_for_causal_lm(
    labels: torch.Tensor, attention_mask: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """[b, L] -> [b, L]: position p is labelled with token p+1; the last position and padding are ignored."""
    labels = labels.clone()
    if attention_mask is not None:
        labels[attention_mask == 0] = ignore_index
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def _check_right_padding(attention_mask: torch.Tensor) -> None:
    m = attention_mask.to(torch.int64)
    if bool(((m != 0) & (m != 1)).any()):
        raise ValueError("attention_mask must hold only 0 and 1")
    bad = (m[:, 1:] > m[:, :-1]).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"rows {bad[:8]} of attention_mask have a real token after padding (left or interior padding): "
            "LSS is exact with right padding only (pad at the end of each row)"
        )


def shard_causal_lm_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    group=None,
    layout: str | None = None,
    attn_implementation: str = "lss",
    ignore_index: int = IGNORE_INDEX,
) -> ShardedBatch:
    """Split a global batch ``input_ids [b, L]`` for this SP rank (no communication).

    ``labels`` defaults to ``input_ids`` (unshifted, like transformers' ``labels``); entries equal to
    ``ignore_index`` and padded positions are ignored. ``shift_labels`` [b, L] instead gives the
    target of every position directly (e.g. the windows ``tokens[:, 1:]`` of a length L+1 sample). ``layout``/``group`` default to those
    registered for ``attn_implementation`` (``register_lss_attention``), so data and attention agree;
    ``group=None`` is the registered topology's ``SequenceGroups``, so under a hybrid LSS x Ulysses
    topology the tokens follow the hybrid's layout (``lss_plugin.sharding.local_token_indices``).

    Packed documents: ``position_ids`` [b, L] restarting at 0 for each document and/or the
    FlashAttentionKwargs ``cu_seq_lens_q``/``cu_seq_lens_k``/``max_length_q``/``max_length_k`` - the keys
    ``DataCollatorWithFlattening`` returns, so ``shard_causal_lm_batch(**collated)`` works. Position ids
    that are not packing (offsets, jumps) and disagreeing boundaries are refused by name.
    """
    options = lss_options(attn_implementation)
    layout = options.layout if layout is None else layout
    if layout != options.layout:
        raise ValueError(
            f"layout {layout!r} differs from the layout {options.layout!r} registered for attention "
            f"{attn_implementation!r}: the attention would mask the wrong positions"
        )
    # None: the registered topology's groups, so the tokens follow the hybrid's layout when it has one
    groups = resolve_sequence_groups(options.group if group is None else group)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a 2-D tensor [batch, seq_len], got {getattr(input_ids, 'shape', input_ids)}")
    if labels is not None and shift_labels is not None:
        raise ValueError("pass labels (shifted here) or shift_labels (already shifted), not both")
    for name, t in (("attention_mask", attention_mask), ("labels", labels), ("shift_labels", shift_labels)):
        if t is not None and tuple(t.shape) != tuple(input_ids.shape):
            raise ValueError(f"{name} shape {tuple(t.shape)} differs from input_ids shape {tuple(input_ids.shape)}")
    seq_len = input_ids.shape[1]
    check_seq_len(seq_len, groups.sp_size, layout, groups.ulysses_size)
    if attention_mask is not None:
        _check_right_padding(attention_mask)

    if position_ids is not None and tuple(position_ids.shape) not in (tuple(input_ids.shape), (1, seq_len)):
        raise ValueError(f"position_ids shape {tuple(position_ids.shape)} differs from input_ids shape "
                         f"{tuple(input_ids.shape)}")
    cu_seqlens = packed_boundaries(seq_len, position_ids, cu_seq_lens_q=cu_seq_lens_q, cu_seq_lens_k=cu_seq_lens_k,
                                   max_length_q=max_length_q, max_length_k=max_length_k)  # [n_docs + 1] or None

    if shift_labels is None:
        shifted = shift_labels_for_causal_lm(input_ids if labels is None else labels, attention_mask, ignore_index)
    else:
        shifted = shift_labels.clone()
        if attention_mask is not None:
            shifted[attention_mask == 0] = ignore_index
    if cu_seqlens is not None:
        shifted = ignore_cross_document_targets(shifted, cu_seqlens, ignore_index)
    local_ids = shard_sequence(input_ids, 1, groups, layout)  # [b, L/N]
    local_labels = shard_sequence(shifted, 1, groups, layout)  # [b, L/N]
    # [L/N]: global positions, or positions inside each token's document when packed (RoPE, learned tables)
    positions = local_positions(seq_len, groups, layout, device=input_ids.device, cu_seqlens=cu_seqlens)
    return ShardedBatch(
        input_ids=local_ids,
        position_ids=positions.unsqueeze(0).expand(input_ids.shape[0], -1).contiguous(),
        attention_mask=torch.ones_like(local_ids),
        shift_labels=local_labels,
        num_tokens=int((local_labels != ignore_index).sum()),
        layout=layout,
        cu_seqlens=cu_seqlens,
    )


def pad_for_layout(inputs: Mapping, parts: int | None = None, *, attn_implementation: str = "lss",
                   pad_token_id: int = 0, ignore_index: int = IGNORE_INDEX) -> dict:
    """Right-pad a global batch ``{input_ids [b, L], ...}`` to a multiple of ``parts`` (default: what the
    registered attention's layout and SP group need, N or 2N).

    Exact: under a causal mask no real token sees the padding, and its labels are ignored
    (``attention_mask`` 0). In a packed batch the padding becomes a document of its own (its
    ``position_ids`` restart at 0, ``cu_seq_lens_*`` gain its end), so it joins no real document.
    """
    if parts is None:
        options = lss_options(attn_implementation)
        parts = parts_per_sequence(dist.get_world_size(resolve_sp_group(options.group)), options.layout)
    input_ids = inputs["input_ids"]  # [b, L]
    pad = (-input_ids.shape[1]) % parts
    out = dict(inputs)
    if not pad:
        return out
    mask = inputs.get("attention_mask")
    out["attention_mask"] = F.pad(torch.ones_like(input_ids) if mask is None else mask, (0, pad), value=0)
    out["input_ids"] = F.pad(input_ids, (0, pad), value=pad_token_id)
    for key in ("labels", "shift_labels"):
        if inputs.get(key) is not None:
            out[key] = F.pad(inputs[key], (0, pad), value=ignore_index)
    if inputs.get("position_ids") is not None:
        positions = inputs["position_ids"]
        tail = torch.arange(pad, dtype=positions.dtype, device=positions.device).expand(positions.shape[0], -1)
        out["position_ids"] = torch.cat([positions, tail], dim=1)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if inputs.get(key) is not None:
            cu = inputs[key]
            out[key] = torch.cat([cu, cu.new_tensor([int(cu[-1]) + pad])])
    for key in ("max_length_q", "max_length_k"):
        if inputs.get(key) is not None:
            out[key] = max(int(inputs[key]), pad)
    return out


def packing_inputs(batch: Mapping) -> dict:
    """The packed-document keys of a collated batch (``position_ids`` and FlashAttentionKwargs) that it has."""
    return {key: batch[key] for key in ("position_ids", *FLASH_ATTN_KWARGS) if batch.get(key) is not None}


def causal_lm_loss(logits: torch.Tensor, shift_labels: torch.Tensor, group=None, ignore_index: int = IGNORE_INDEX):
    """Cross entropy of this rank's logits [b, s_local, V] against ``shift_labels`` [b, s_local].

    Returns ``lss_plugin.loss.ShardedLoss``: call backward on ``.loss``; ``.local_mean`` and
    ``.num_tokens`` feed ``lss_plugin.grads.reduce_loss`` for logging. ``group`` is the set of
    ranks whose gradients the trainer then averages *plainly*: the loss is weighted by token counts
    over it (one scalar all-reduce), so that average is the gradient of the global token mean.
      - ``None`` (default): every rank, the SP x DP grid - what ``lss_plugin.deepspeed`` engines
        average over. Exact even when ranks hold different numbers of counted tokens.
      - ``topology.sp_group``: then call ``lss_plugin.average_gradients(params,
        num_tokens=loss.num_tokens)``, which weights the DP stage itself.
    """
    from lss_plugin.loss import sharded_cross_entropy

    if group is None:
        group = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
    return sharded_cross_entropy(logits, shift_labels, group=group, ignore_index=ignore_index)


def data_parallel_rows(batch: torch.Tensor, topology=None) -> torch.Tensor:
    """This DP rank's rows of a global batch [B, ...] (every SP rank of the shard gets the same rows)."""
    from lss_plugin.topology import get_topology

    topology = topology or get_topology()
    if batch.shape[0] % topology.dp_size != 0:
        raise ValueError(f"global batch of {batch.shape[0]} rows does not split over dp_size={topology.dp_size} ranks")
    rows = batch.shape[0] // topology.dp_size
    return batch[topology.dp_rank * rows:(topology.dp_rank + 1) * rows]


class LSSCausalLMCollator:
    """A ``DataLoader`` ``collate_fn``: examples -> right-padded global batch -> this rank's ``ShardedBatch``.

    Each example is a mapping with ``input_ids`` (list or 1-D tensor) and optionally ``labels`` and
    ``attention_mask``. Rows are right-padded with ``pad_token_id`` to the longest row, rounded up
    to a length the layout can split (a multiple of N, or 2N for the balanced layout).
    Every SP rank of a sequence must collate the same examples: see ``sequence_parallel_sampler``.
    """

    def __init__(self, *, group=None, attn_implementation: str = "lss", pad_token_id: int = 0,
                 ignore_index: int = IGNORE_INDEX, max_length: int | None = None):
        self.group = group
        self.attn_implementation = attn_implementation
        self.pad_token_id = pad_token_id
        self.ignore_index = ignore_index
        self.max_length = max_length

    def __call__(self, examples: Sequence[Mapping]) -> ShardedBatch:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        options = lss_options(self.attn_implementation)
        group = options.group if self.group is None else self.group  # None: the registered topology's groups
        parts = parts_per_sequence(dist.get_world_size(resolve_sp_group(group)), options.layout)
        rows = [torch.as_tensor(e["input_ids"], dtype=torch.long).flatten() for e in examples]
        longest = max(r.numel() for r in rows)
        if self.max_length is not None and longest > self.max_length:
            raise ValueError(f"an example has {longest} tokens, more than max_length={self.max_length}")
        seq_len = -(-longest // parts) * parts
        input_ids = torch.full((len(rows), seq_len), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, self.ignore_index)
        for i, (row, ex) in enumerate(zip(rows, examples)):
            n = row.numel()
            input_ids[i, :n] = row
            mask[i, :n] = torch.as_tensor(ex["attention_mask"]).flatten() if "attention_mask" in ex else 1
            labels[i, :n] = torch.as_tensor(ex["labels"], dtype=torch.long).flatten() if "labels" in ex else row
        return shard_causal_lm_batch(input_ids, mask, labels, group=group,
                                     attn_implementation=self.attn_implementation, ignore_index=self.ignore_index)


class LSSBatchLoader:
    """Wrap any iterable of global batches (mappings with ``input_ids [b, L]``, optionally
    ``attention_mask``/``labels`` and the packing keys ``position_ids``/``cu_seq_lens_*``/``max_length_*``,
    or bare tensors) so it yields this rank's ``ShardedBatch``es."""

    def __init__(self, batches: Iterable, *, group=None, attn_implementation: str = "lss",
                 ignore_index: int = IGNORE_INDEX, device=None):
        self.batches = batches
        self.group = group
        self.attn_implementation = attn_implementation
        self.ignore_index = ignore_index
        self.device = device

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[ShardedBatch]:
        for batch in self.batches:
            if isinstance(batch, torch.Tensor):
                batch = {"input_ids": batch}
            sharded = shard_causal_lm_batch(
                batch["input_ids"], batch.get("attention_mask"), batch.get("labels"), group=self.group,
                attn_implementation=self.attn_implementation, ignore_index=self.ignore_index,
                **packing_inputs(batch),
            )
            yield sharded if self.device is None else sharded.to(self.device)


def sequence_parallel_sampler(dataset, topology=None, *, shuffle: bool = True, seed: int = 0, drop_last: bool = True):
    """A ``DistributedSampler`` over the *data-parallel* ranks: the SP ranks of one sequence read the same examples."""
    from torch.utils.data.distributed import DistributedSampler

    from lss_plugin.topology import get_topology

    topology = topology or get_topology()
    return DistributedSampler(dataset, num_replicas=topology.dp_size, rank=topology.dp_rank,
                              shuffle=shuffle, seed=seed, drop_last=drop_last)
