"""Cross-rank agreement of an ``lss_attention`` call: the call signature and its two guards.

Every rank of a sequence-parallel group must call ``lss_attention`` with the same shapes and
settings; ranks that disagree either hang (different buffer sizes) or, worse, pair up same-sized
collectives and return wrong numbers without an error. Two guards:

1. In band, on every call (no extra collective). Each K/V all-gather carries the caller's
   signature, ``SIGNATURE_BYTES`` = 48 bytes bit-cast into the buffer's dtype (24 fp16/bf16, 12
   fp32 or 6 fp64 elements appended to the rank's packed k, v), so the bits arrive exactly. Every
   rank decodes all N rows and compares them before the gathered K, V are used; all ranks hold
   the same rows, so all reach the same verdict and raise together, with no collective left
   pending: the group stays usable. This catches every field below, on every call, forward
   gathers and backward regathers alike, as long as the ranks' buffers have the same size.
2. Before the first gather (``LSS_CHECK_CONSISTENCY``): a separate 48-byte all-gather of the
   signature that compares the fields which set the sizes and number of the K/V collectives
   (``SIZE_FIELDS``). A collective whose ranks pass buffers of different sizes cannot be
   survived (it hangs or corrupts memory), so this must happen before it. ``first`` (default):
   once per group and size key seen by this rank; ``always``: every call; ``never``: off.
   Under ``first``, a size mismatch on a later call between size keys that every rank has
   already used is not caught here; it ends in the group's timeout (``CollectiveError``) or a
   backend error instead of a wrong result. ``always`` closes that gap at one tiny collective
   per call.

The reduce-scatter of dK, dV cannot carry a signature (its rows are summed); it replays the plan
that the forward gather already checked.

Hybrid LSS x Ulysses (``ulysses`` U > 1): the pre-check runs over the whole SP group (so ranks with
different U, or different query heads, which size the all-to-all, raise by name before it); the
forward all-to-all carries every rank's row to its Ulysses group, and each rank's gather row
carries ``ulysses_peers``: 0 when the U rows it received agree, else a nonzero digest of them.
Every LSS group holds one rank of each Ulysses group, so a disagreement anywhere in the SP group
reaches every gather and every rank raises (with a single LSS rank, R = 1, the U rows are compared
right after the all-to-all, which every rank of the group then holds).
"""
from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, fields, replace

import torch

from lss_plugin.comm import all_gather_flat
from lss_plugin.options import KV_BACKWARD_MODES, KV_GRAD_DTYPES, LAYOUTS

SIGNATURE_FORMAT = 1  # first byte of every row; a row from a foreign collective fails on it
GATHERS = ("forward", "regather")  # which gather of a call carries the row
_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

# (field, struct code): little-endian, no padding. Widths bound the values; encode() refuses
# a value that does not fit rather than letting two different values collide.
_LAYOUT = (
    ("format", "B"),
    ("dtype", "B"),
    ("layout", "B"),
    ("causal", "B"),
    ("kv_modes", "B"),  # kv_backward code | kv_grad_dtype code << 4 (two settings, one byte)
    ("gather", "B"),
    ("heads", "H"),
    ("kv_heads", "H"),
    ("head_dim", "H"),
    ("kv_head_chunk", "H"),
    ("head_chunk_index", "H"),
    ("batch", "I"),
    ("s_local", "I"),
    ("softmax_scale", "d"),  # the float64 bits: exact equality, no tolerance
    ("documents", "Q"),  # digest of cu_seqlens (lss_plugin.documents.digest); 0 = one document
    ("ulysses", "H"),  # Ulysses degree U of the hybrid (1 = pure LSS)
    ("reserved", "H"),  # 0; keeps the row a multiple of 8 bytes and leaves a slot
    ("ulysses_peers", "I"),  # 0 = the rank's Ulysses group agreed on the call, else a digest of its rows
)
_STRUCT = struct.Struct("<" + "".join(code for _, code in _LAYOUT))
SIGNATURE_BYTES = _STRUCT.size  # 48: a multiple of every float itemsize
# Settings that share one byte: (name, choices, bit shift); each code is 1..15.
_KV_MODES = (("kv_backward", KV_BACKWARD_MODES, 0), ("kv_grad_dtype", KV_GRAD_DTYPES, 4))
# kv_grad_dtype sets the reduce-scatter's size but not the gathers': the forward gather, which
# carries it in band, always runs before that reduce-scatter, so it need not be a size field.
SIZE_FIELDS = ("batch", "s_local", "kv_heads", "head_dim", "dtype", "kv_head_chunk", "ulysses")
# The hybrid's all-to-all also carries the query heads.
HYBRID_SIZE_FIELDS = SIZE_FIELDS + ("heads",)
CHECK_MODES = ("first", "always", "never")


@dataclass(frozen=True)
class CallSignature:
    """What all ranks of the group must agree on for one gather of one call."""

    batch: int
    s_local: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    layout: str
    causal: bool
    kv_backward: str
    kv_head_chunk: int  # KV heads per gather, as run (None and kv_heads are the same call)
    softmax_scale: float
    kv_grad_dtype: str = "fp32"
    documents: int = 0
    gather: str = "forward"
    head_chunk_index: int = 0
    ulysses: int = 1
    ulysses_peers: int = 0

    @property
    def size_fields(self) -> tuple:
        """The fields that size this call's collectives (the same tuple on ranks that agree on U)."""
        return HYBRID_SIZE_FIELDS if self.ulysses > 1 else SIZE_FIELDS

    def at(self, gather: str, head_chunk_index: int) -> "CallSignature":
        """The signature a particular gather of this call carries."""
        return replace(self, gather=gather, head_chunk_index=head_chunk_index)

    def size_key(self) -> tuple:
        return tuple(getattr(self, name) for name in self.size_fields)

    def to_bytes(self) -> bytes:
        values = {
            "format": SIGNATURE_FORMAT,
            "dtype": _code(_DTYPES, self.dtype, "dtype"),
            "layout": _code(LAYOUTS, self.layout, "layout"),
            "causal": int(bool(self.causal)),
            "kv_modes": sum(_code(choices, getattr(self, name), name) << shift for name, choices, shift in _KV_MODES),
            "gather": _code(GATHERS, self.gather, "gather"),
            "reserved": 0,
            **{f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("dtype", "layout", "causal", "kv_backward", "kv_grad_dtype", "gather")},
        }
        for name, code in _LAYOUT:
            if code != "d" and not 0 <= values[name] < 2 ** (8 * struct.calcsize(code)):
                raise ValueError(f"{name}={values[name]} does not fit the {8 * struct.calcsize(code)}-bit "
                                 f"field of the lss_attention call signature")
        return _STRUCT.pack(*(values[name] for name, _ in _LAYOUT))

    def encode(self, dtype: torch.dtype, device=None) -> torch.Tensor:
        """The signature bit-cast into ``dtype``: ``[SIGNATURE_BYTES // itemsize]``, exact for any float."""
        raw = torch.frombuffer(bytearray(self.to_bytes()), dtype=torch.uint8)
        return raw.view(dtype).to(device)


def _code(choices, value, name) -> int:
    if value not in choices:
        raise ValueError(f"lss_attention supports {name} in {tuple(map(str, choices))}, got {value!r}")
    return choices.index(value) + 1  # 0 never appears in a real row


def header_numel(dtype: torch.dtype) -> int:
    """Elements of ``dtype`` a signature takes in the gather buffer."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return SIGNATURE_BYTES // itemsize


def decode(row: torch.Tensor) -> dict:
    """The fields of one gathered row (any dtype, ``SIGNATURE_BYTES`` long), readable values."""
    raw = row.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()
    if len(raw) != SIGNATURE_BYTES:
        raise ValueError(f"a signature row has {SIGNATURE_BYTES} bytes, got {len(raw)}")
    values = {}
    for (name, _), value in zip(_LAYOUT, _STRUCT.unpack(raw)):
        if name == "kv_modes":
            values.update({mode: (value >> shift) & 0xF for mode, _, shift in _KV_MODES})
        else:
            values[name] = value
    for name, choices in (("dtype", _DTYPES), ("layout", LAYOUTS), ("gather", GATHERS),
                          *((mode, choices) for mode, choices, _ in _KV_MODES)):
        code = values[name]
        values[name] = choices[code - 1] if 1 <= code <= len(choices) else f"<code {code}>"
    values["causal"] = bool(values["causal"]) if values["causal"] in (0, 1) else f"<code {values['causal']}>"
    return values


def check_rows(rows: torch.Tensor, fields_to_compare=None, ranks=None, what="lss_attention call",
               group=None) -> None:
    """Raise RuntimeError naming every field on which the rows ``[N, n]`` differ, per rank.

    ``ranks`` (global rank of each row; else those of ``group``, else 0..N-1) only label the
    message. Deterministic in the rows: every rank holding the same rows reaches the same verdict.
    """
    raw = rows.detach().contiguous().view(torch.uint8).cpu()  # [N, SIGNATURE_BYTES]
    if bool((raw == raw[0]).all()):
        return
    decoded = [decode(r) for r in raw]
    names = fields_to_compare or list(decoded[0])
    diffs = {name: [d[name] for d in decoded] for name in names
             if len({repr(d[name]) for d in decoded}) > 1}
    if not diffs:  # the rows differ only in fields this guard does not own
        return
    if ranks is None:
        ranks = torch.distributed.get_process_group_ranks(group) if group is not None else range(len(decoded))
    ranks = list(ranks)
    detail = "; ".join(f"{name}: " + ", ".join(f"rank {r}={v!r}" for r, v in zip(ranks, values))
                       for name, values in diffs.items())
    first = decoded[0]
    raise RuntimeError(
        f"the ranks of the sequence-parallel group disagree on this {what} "
        f"({first['gather']} gather, KV head chunk {first['head_chunk_index']}); every rank raises "
        f"this and no collective is left pending. Differing fields: {detail}"
    )


# ---------------------------------------------------------------------------------------------
# Guard 2: the size pre-check.
# ---------------------------------------------------------------------------------------------

_VERIFIED_SIZES: set = set()


def check_mode() -> str:
    mode = os.environ.get("LSS_CHECK_CONSISTENCY", "first")
    if mode not in CHECK_MODES:
        raise ValueError(f"LSS_CHECK_CONSISTENCY must be one of {CHECK_MODES}, got {mode!r}")
    return mode


def precheck_sizes(group, signature: CallSignature, device) -> None:
    """Raise on every rank of ``group`` unless all agree on ``SIZE_FIELDS`` (one small all-gather).

    Skipped under ``first`` when this rank already verified the size key on this group: the
    group's name (public, the same on every rank, never reused) and the size fields.
    """
    mode = check_mode()
    key = (group.group_name, signature.size_key())
    if mode == "never" or (mode == "first" and key in _VERIFIED_SIZES):
        return
    size = group.size()
    if size > 1:
        mine = signature.encode(torch.uint8, device)  # [SIGNATURE_BYTES]
        everyone = mine.new_empty((size * SIGNATURE_BYTES,))
        all_gather_flat(everyone, mine, group, name="consistency_check")
        check_rows(everyone.view(size, SIGNATURE_BYTES), signature.size_fields, group=group,
                   what="lss_attention call's buffer sizes (LSS_CHECK_CONSISTENCY pre-check)")
    _VERIFIED_SIZES.add(key)


def check_gathered(rows: torch.Tensor, group) -> None:
    """Guard 1: compare the signature rows ``[N, header_numel]`` that arrived with a K/V gather."""
    check_rows(rows, group=group)
    peers = decode(rows[0])["ulysses_peers"]  # the rows are equal here
    if peers != 0:
        raise RuntimeError(
            "the ranks of the sequence-parallel group disagree on this lss_attention call: the Ulysses group "
            f"of every rank of LSS group {torch.distributed.get_process_group_ranks(group)} reported rows that "
            f"differ (ulysses_peers digest {peers:#x}); every rank raises this and no collective is left "
            "pending. Compare the calls' shapes and settings across the sequence-parallel ranks.")


def ulysses_peers(rows: torch.Tensor, group=None) -> int:
    """``ulysses_peers`` of a rank that received its Ulysses group's rows ``[U, n]``: 0 when they
    agree, else a nonzero 32-bit digest. ``group`` given (no LSS gather follows, R = 1): raise now,
    naming the fields; every rank of the Ulysses group holds the same rows."""
    raw = rows.detach().contiguous().view(torch.uint8).cpu()
    if bool((raw == raw[0]).all()):
        return 0
    if group is not None:
        check_rows(rows, group=group)
    return (zlib.crc32(raw.numpy().tobytes()) | 1) & 0xFFFFFFFF


__all__ = ["CallSignature", "HYBRID_SIZE_FIELDS", "SIGNATURE_BYTES", "SIZE_FIELDS", "check_gathered", "check_rows",
           "decode", "header_numel", "precheck_sizes", "ulysses_peers"]
