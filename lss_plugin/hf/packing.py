"""Packed documents in transformers' conventions: restarting ``position_ids`` and FlashAttentionKwargs.

transformers packs a batch into one row (``DataCollatorWithFlattening``: ``input_ids``/``labels``/
``position_ids`` ``[1, L]``, positions restarting at 0 for each document, labels ``-100`` at each
document's first token) and optionally adds the boundaries flash-attn takes
(``return_flash_attn_kwargs=True``): ``cu_seq_lens_q``/``cu_seq_lens_k`` ``[n_docs + 1]`` int32 and
``max_length_q``/``max_length_k`` (python ints). A model forwards these through ``**kwargs`` to its
attention function. Under LSS the boundaries must be *global* (the whole packed sequence), because a
rank cannot see where documents start on the other ranks; ``shard_causal_lm_batch`` computes them from
the full batch and hands every rank the same ``cu_seq_lens_*`` plus its local per-document positions.

Everything here is host-side checking (no communication): LSS is self-attention over one packed
sequence, so query and key boundaries must be the same, and every source of boundaries given must agree.
"""
from __future__ import annotations

import torch

from lss_plugin.data import PAGE_SEPARATOR
from lss_plugin.documents import check_cu_seqlens, cu_seqlens_from_position_ids

# transformers' FlashAttentionKwargs (modeling_flash_attention_utils), the names models forward.
FLASH_ATTN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def boundaries_from_flash_kwargs(seq_len: int, cu_seq_lens_q=None, cu_seq_lens_k=None,
                                 max_length_q=None, max_length_k=None) -> torch.Tensor | None:
    """Global boundaries ``[n_docs + 1]`` from FlashAttentionKwargs, or ``None`` when none are given.

    Refused by name: only one of ``cu_seq_lens_q``/``cu_seq_lens_k``, or different ones (cross-attention,
    KV caches); boundaries that do not cover ``seq_len``; ``max_length_*`` without boundaries or not the
    longest document (flash-attn would size its work by it)."""
    if cu_seq_lens_q is None and cu_seq_lens_k is None:
        given = {n: v for n, v in (("max_length_q", max_length_q), ("max_length_k", max_length_k)) if v is not None}
        if given:
            raise ValueError(f"packed documents: {given} given without cu_seq_lens_q/cu_seq_lens_k")
        return None
    if cu_seq_lens_q is None or cu_seq_lens_k is None:
        missing = "cu_seq_lens_k" if cu_seq_lens_k is None else "cu_seq_lens_q"
        raise ValueError(f"packed documents: {missing} is missing; LSS needs cu_seq_lens_q == cu_seq_lens_k "
                         "(self-attention over one packed sequence)")
    bounds_q = check_cu_seqlens(cu_seq_lens_q, seq_len)
    bounds_k = check_cu_seqlens(cu_seq_lens_k, seq_len)
    if bounds_q != bounds_k:
        raise ValueError(f"packed documents: cu_seq_lens_q {_head(bounds_q)} differs from cu_seq_lens_k "
                         f"{_head(bounds_k)}; LSS attends each document to itself and needs equal query and key "
                         "boundaries (no cross-attention, no KV cache)")
    longest = max(b - a for a, b in zip(bounds_q[:-1], bounds_q[1:]))
    for name, value in (("max_length_q", max_length_q), ("max_length_k", max_length_k)):
        if value is not None and int(value) != longest:
            raise ValueError(f"packed documents: {name} = {int(value)} but the longest document of cu_seq_lens_q is "
                             f"{longest} tokens")
    return cu_seq_lens_q  # checked as is; every layer then reuses its host copy (documents.host_bounds)


def packed_boundaries(seq_len: int, position_ids: torch.Tensor | None = None, **flash_kwargs) -> torch.Tensor | None:
    """Global boundaries of a whole (unsharded) batch ``[b, seq_len]``, or ``None`` for one document per row.

    ``position_ids`` ``[b, L]`` restart at 0 for each document (identical rows: documents share
    boundaries); positions that neither restart nor count up by one are refused by
    ``cu_seqlens_from_position_ids``. ``flash_kwargs`` are ``FLASH_ATTN_KWARGS`` as the collator returns
    them. When both are given they must describe the same documents."""
    unknown = sorted(set(flash_kwargs) - set(FLASH_ATTN_KWARGS))
    if unknown:
        raise TypeError(f"unexpected packing arguments {unknown} (known: {list(FLASH_ATTN_KWARGS)})")
    from_flash = boundaries_from_flash_kwargs(seq_len, **flash_kwargs)
    if position_ids is None:
        return from_flash
    if position_ids.shape[-1] != seq_len:
        raise ValueError(f"position_ids cover {position_ids.shape[-1]} positions, the batch {seq_len}")
    from_positions = cu_seqlens_from_position_ids(position_ids)
    if from_flash is not None and from_flash.tolist() != from_positions.tolist():
        raise ValueError(f"packed documents: cu_seq_lens_q {_head(from_flash.tolist())} and the documents of "
                         f"position_ids {_head(from_positions.tolist())} disagree")
    return from_positions.to(position_ids.device) if from_positions.numel() > 2 else None


def flash_attn_kwargs(cu_seqlens: torch.Tensor) -> dict:
    """The FlashAttentionKwargs for global boundaries ``cu_seqlens``, as DataCollatorWithFlattening spells them."""
    cu = cu_seqlens.to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def ignore_cross_document_targets(shift_labels: torch.Tensor, cu_seqlens: torch.Tensor,
                                  ignore_index: int) -> torch.Tensor:
    """[b, L] targets with the last token of every document but the last ignored: its next token is another
    document's first (DataCollatorWithFlattening's -100 at document starts does the same for ``labels``)."""
    ends = cu_seqlens[1:-1].to(device=shift_labels.device, dtype=torch.long) - 1
    out = shift_labels.clone()
    out[:, ends] = ignore_index
    return out


def pack_windows(windows: torch.Tensor, separator: bytes = PAGE_SEPARATOR, ignore_index: int = -100) -> dict:
    """Byte windows ``[b, L + 1]`` (inputs and their next byte, as ``lss_plugin.data.sample_batch`` gives
    them) -> one packed row, as ``DataCollatorWithFlattening`` would pack the documents in them.

    Every window starts a document, and so does every occurrence of ``separator`` inside it. Returns
    ``input_ids``, ``shift_labels`` and ``position_ids`` (restarting at 0 per document), each ``[1, b * L]``,
    for ``shard_causal_lm_batch(**packed)`` (which ignores every target that crosses a document). A
    window's last token gets no target (``ignore_index``), as the last token of every example packed by
    ``DataCollatorWithFlattening``: so the loss does not depend on how many windows share one row."""
    rows, length = windows.shape[0], windows.shape[1] - 1
    inputs = windows[:, :-1]  # [b, L]
    starts = torch.zeros(rows, length, dtype=torch.bool, device=windows.device)
    starts[:, 0] = True
    width = len(separator)
    if 0 < width <= length:
        pattern = torch.tensor(list(separator), dtype=windows.dtype, device=windows.device)
        starts[:, : length - width + 1] |= (inputs.unfold(1, width, 1) == pattern).all(-1)
    index = torch.arange(rows * length, device=windows.device)
    doc_start = torch.cummax(torch.where(starts.reshape(-1), index, torch.zeros_like(index)), 0).values
    targets = windows[:, 1:].clone()
    targets[:, -1] = ignore_index
    return {"input_ids": inputs.reshape(1, -1), "shift_labels": targets.reshape(1, -1),
            "position_ids": (index - doc_start).unsqueeze(0)}


def _head(bounds) -> str:
    bounds = list(bounds)
    return str(bounds if len(bounds) <= 6 else bounds[:3] + ["..."] + bounds[-2:])


__all__ = ["FLASH_ATTN_KWARGS", "boundaries_from_flash_kwargs", "flash_attn_kwargs", "ignore_cross_document_targets",
           "pack_windows", "packed_boundaries"]
