"""Packed documents in megatron-core terms: ``PackedSeqParams`` as LSS reads them, and built from EOD tokens.

Under LSS the ``cu_seqlens`` of a ``PackedSeqParams`` are **global** document boundaries of the
whole packed sequence (``0 = cu[0] < ... < cu[-1] = L``, L = s_local x SP size), the same on every
rank: the sequence is sharded by LSS in its own layout (contiguous or balanced), every rank holding
``L / N`` tokens, and the boundaries say where documents start in the *unsharded* sequence. This is
not Megatron-CP's THD convention, where each document is cut into 2N chunks (padded to a multiple of
2N: ``cu_seqlens_*_padded``) and every rank holds two chunks of every document.

What LSS honours: ``qkv_format`` "thd" (tensors ``[t, h, d]``, batch 1 implied) or "sbhd"/"bshd"
with batch 1; ``cu_seqlens_q == cu_seqlens_kv`` (self-attention documents); padded boundaries absent
or equal to the unpadded ones; ``max_seqlen_q``/``max_seqlen_kv`` absent or at least the longest
document. Anything else is refused by name (``read_packed_seq_params``), before any collective.
Every rank checks the same parameters (they describe the whole sequence), so every rank refuses;
boundaries that differ between ranks are caught by ``lss_attention``'s call signature.

The builders (``ltor_masks``, ``packed_seq_params_from_eod``) follow megatron-core's GPT dataset:
the EOD token is the last token of its document, masks and positions come from megatron-core's own
``_get_ltor_masks_and_position_ids``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lss_plugin.documents import check_cu_seqlens, cu_seqlens_from_eod, host_bounds

PACKED_FORMATS = ("thd", "sbhd", "bshd")


@dataclass(frozen=True)
class PackedDocuments:
    """The documents a ``PackedSeqParams`` describes, checked for LSS."""

    qkv_format: str
    cu_seqlens: torch.Tensor  # [num_docs + 1], global boundaries
    bounds: tuple[int, ...]  # the same, on the host
    max_seqlen: Optional[int]  # max(max_seqlen_q, max_seqlen_kv): the RoPE table megatron-core builds

    @property
    def seq_len(self) -> int:
        return self.bounds[-1]

    @property
    def longest(self) -> int:
        return max(b - a for a, b in zip(self.bounds[:-1], self.bounds[1:]))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal boundaries, from the host copies every layer shares (``host_bounds``: no device read per layer)."""
    if a is b:
        return True
    if a.shape != b.shape:
        return False
    return host_bounds(a) == host_bounds(b) if a.dim() == 1 else bool(torch.equal(a.cpu().long(), b.cpu().long()))


def packed_format(params) -> str:
    """``params.qkv_format``, refused unless LSS reads it."""
    fmt = getattr(params, "qkv_format", None)
    if fmt not in PACKED_FORMATS:
        raise NotImplementedError(f"packed_seq_params.qkv_format={fmt!r}: LSS reads packed documents in "
                                  f"{PACKED_FORMATS} ('sbhd'/'bshd' with batch 1)")
    return fmt


def read_packed_seq_params(params, seq_len: int, batch: int, sp_group=None) -> PackedDocuments:
    """Check ``params`` (a megatron-core ``PackedSeqParams``) for LSS; its documents.

    ``seq_len``: the global length L; ``batch``: the batch size of the tensors (1 for "thd").
    ``sp_group``: the LSS group; a ``cp_group`` in ``params`` must be it. Raises NotImplementedError
    for what LSS cannot honour, ValueError for malformed values, naming the field and its value.
    """
    fmt = packed_format(params)
    if fmt != "thd" and batch != 1:
        raise NotImplementedError(
            f"packed_seq_params with qkv_format={fmt!r} and batch {batch}: LSS packs documents into one "
            "sequence whose boundaries every batch row would share; use batch 1 (or 'thd')")
    cu_q, cu_kv = params.cu_seqlens_q, params.cu_seqlens_kv
    if cu_q is None:
        raise ValueError("packed_seq_params.cu_seqlens_q is None: LSS needs the documents' global boundaries")
    problems = []
    if cu_kv is not None and not _same(cu_kv, cu_q):
        problems.append("cu_seqlens_kv differs from cu_seqlens_q (LSS attends within self-attention "
                        "documents: queries and keys share boundaries)")
    for name, unpadded in (("cu_seqlens_q_padded", cu_q), ("cu_seqlens_kv_padded", cu_q)):
        padded = getattr(params, name, None)
        if padded is not None and not _same(padded, unpadded):
            problems.append(f"{name} differs from cu_seqlens_q (per-document padding is Megatron-CP's THD "
                            "partitioning; LSS shards the packed sequence in its own layout, give unpadded "
                            "global boundaries)")
    if getattr(params, "pad_between_seqs", None):
        problems.append("pad_between_seqs=True (padding between documents)")
    if getattr(params, "local_cp_size", None) is not None:
        problems.append(f"local_cp_size={params.local_cp_size} (Megatron's hybrid context parallelism)")
    if getattr(params, "tokens_per_sample", None) is not None:
        problems.append(f"tokens_per_sample={params.tokens_per_sample} (per-sample reshaping of a packed batch)")
    cp_group = getattr(params, "cp_group", None)
    if cp_group is not None and cp_group is not sp_group and cp_group.size() > 1:
        problems.append("cp_group is not the LSS sequence-parallel group (the rotary embedding would slice "
                        "rows for another group)")
    if problems:
        raise NotImplementedError("LSS cannot honour packed_seq_params: " + "; ".join(problems))

    bounds = check_cu_seqlens(cu_q, seq_len)
    max_q, max_kv = params.max_seqlen_q, params.max_seqlen_kv
    given = [m for m in (max_q, max_kv) if m is not None]
    documents = PackedDocuments(fmt, cu_q, bounds, max(int(m) for m in given) if given else None)
    if max_q is not None and max_kv is not None and int(max_q) != int(max_kv):
        raise ValueError(f"packed_seq_params.max_seqlen_q={max_q} != max_seqlen_kv={max_kv} with identical "
                         "boundaries")
    if documents.max_seqlen is not None and documents.max_seqlen < documents.longest:
        raise ValueError(f"packed_seq_params.max_seqlen_q/kv={documents.max_seqlen} is shorter than the longest "
                         f"document ({documents.longest} tokens in cu_seqlens_q)")
    return documents


# ---------------------------------------------------------------------------------------------
# Built from EOD tokens, as megatron-core's GPT dataset does.

def ltor_masks(tokens: torch.Tensor, eod_token: int, reset_position_ids: bool, reset_attention_mask: bool,
               eod_mask_loss: bool, create_attention_mask: bool):
    """megatron-core's ``_get_ltor_masks_and_position_ids`` row by row: tokens ``[b, L]`` ->
    attention_mask ``[b, 1, L, L]`` (True = hidden; None unless ``create_attention_mask``),
    loss_mask ``[b, L]`` (0 where the *input* token is EOD with ``eod_mask_loss``), position_ids
    ``[b, L]`` (restarting after each EOD with ``reset_position_ids``)."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    rows = [_get_ltor_masks_and_position_ids(row, eod_token, reset_position_ids, reset_attention_mask,
                                             eod_mask_loss, create_attention_mask) for row in tokens]
    attention_mask = torch.stack([r[0] for r in rows]) if create_attention_mask else None  # [b, 1, L, L]
    return attention_mask, torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows])


def packed_seq_params_from_eod(tokens: torch.Tensor, eod_token: int, reset_position_ids: bool):
    """THD ``PackedSeqParams`` of one packed row ``[1, L]`` (or ``[L]``): documents end at EOD tokens.

    ``max_seqlen`` picks megatron-core's THD RoPE rows: the longest document restarts RoPE positions
    in every document (``reset_position_ids``); L keeps the positions of the whole sequence
    (``_apply_rotary_pos_emb_thd`` reads a table of exactly ``cu_seqlens[-1]`` rows that way), as
    attention masks without position resets do.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens_from_eod(tokens, eod_token).to(tokens.device)  # [num_docs + 1], int32
    longest = int((cu[1:] - cu[:-1]).max())
    max_seqlen = longest if reset_position_ids else int(cu[-1])
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
