"""Cross-rank agreement of an ``lss_attention`` call: the call signature, and where it is compared.

Every rank of a sequence-parallel group must call ``lss_attention`` with the same shapes and
settings; ranks that disagree either hang (different buffer sizes) or, worse, pair up same-sized
collectives and return wrong numbers without an error. ``CallSignature`` is what they must agree
on, packed into ``SIGNATURE_BYTES`` = 80 bytes (``to_bytes``; little-endian, no padding).

The rule (one collective schedule for every rank, whatever its history or environment):
1. The verdict (``lss_plugin.verdict``). EVERY forward and EVERY backward of an ``lss_attention``
   call over an SP group of N > 1 ranks starts with exactly ONE all-gather of 96 bytes per rank:
   the signature (gather "forward" or "backward") and a status word carrying this rank's local
   checks. It runs on every rank on every call; nothing a rank remembers or reads from its
   environment changes whether it runs, so every rank issues the same collectives in the same
   order. All rows are compared on every rank, so a disagreement in any field (sizes or not), a
   forward meeting a backward, or a rank's local refusal raises the same error on every rank before
   the first variable-size collective (a collective whose ranks pass buffers of different sizes
   cannot be survived: it hangs or corrupts memory).
2. In band (no extra collective). Each K/V all-gather, each sparse exchange (one row per peer,
   ``lss_plugin.exchange``) and the hybrid's all-to-all carries the
   signature bit-cast into the buffer's dtype (40 fp16/bf16, 20 fp32 or 10 fp64 elements appended
   to the rank's packed k, v), so the bits arrive exactly. The rows are compared on the device
   (no host read per gather) and a disagreement, which after an agreed verdict only collectives
   issued outside ``lss_attention`` on the same group can cause, is reported by the next verdict.
The reduce-scatter of dK, dV cannot carry a signature (its rows are summed); the backward's
verdict checked the call before it.

``LSS_CHECK_CONSISTENCY`` is retired with the size pre-check it used to steer: its ``first``
default cached verified sizes per process, so ranks with different histories disagreed about
whether to run the pre-check (one entered it, another the K/V gather). It is read once per process;
``always`` and ``first`` both mean the rule above; ``never`` would make the number of collectives
depend on one rank's environment and is refused, through the verdict, on every rank.

Hybrid LSS x Ulysses (``ulysses`` U > 1): the verdict runs over the whole SP group, so ranks with
different U, or different query heads, which size the all-to-all, raise by name before it.
"""
from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass, fields, replace

import torch

from lss_plugin.options import KV_BACKWARD_MODES, KV_GRAD_DTYPES, LAYOUTS

SIGNATURE_FORMAT = 1  # first byte of every row; a row from a foreign collective fails on it
GATHERS = ("forward", "regather", "backward")  # which gather of a call carries the row (backward: its verdict)
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
    ("masks", "H"),  # which mask fields are set: bit 0 window, 1 chunk, 2 softcap, 3 sinks
    ("exchange", "I"),  # how K, V move: 0 = the all-gather, else the sparse exchange's plan digest
    ("window_left", "Q"),  # window (left, right) of lss_plugin.masks; 0 when unset (bit 0 says which)
    ("window_right", "Q"),
    ("chunk", "Q"),  # chunked attention's C; 0 when unset
    ("softcap", "d"),  # the float64 bits of the cap; 0.0 when unset
)
_STRUCT = struct.Struct("<" + "".join(code for _, code in _LAYOUT))
SIGNATURE_BYTES = _STRUCT.size  # 80: a multiple of every float itemsize
# Settings that share one byte: (name, choices, bit shift); each code is 1..15.
_KV_MODES = (("kv_backward", KV_BACKWARD_MODES, 0), ("kv_grad_dtype", KV_GRAD_DTYPES, 4))
# The optional mask fields (lss_plugin.masks): bit in "masks", and the raw fields that carry the value.
_MASK_FIELDS = (("window", 0, ("window_left", "window_right")), ("chunk", 1, ("chunk",)),
                ("softcap", 2, ("softcap",)), ("sinks", 3, ()))
CHECK_ENV = "LSS_CHECK_CONSISTENCY"
CHECK_MODES = ("always", "first")  # both: the verdict on every call (the module doc)


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
    exchange: int = 0  # 0: all-gather; else lss_plugin.exchange.ExchangePlan.digest (sparse)
    window: tuple[int, int] | None = None  # masks: (left, right) keys around each query
    chunk: int | None = None  # C-aligned chunks of global positions
    softcap: float | None = None  # cap * tanh(s / cap) on the scaled scores
    sinks: bool = False  # a sink logit per query head (its values are weights, not compared)

    def at(self, gather: str, head_chunk_index: int) -> "CallSignature":
        """The signature a particular gather of this call carries."""
        return replace(self, gather=gather, head_chunk_index=head_chunk_index)

    def to_bytes(self) -> bytes:
        values = {
            "format": SIGNATURE_FORMAT,
            "dtype": _code(_DTYPES, self.dtype, "dtype"),
            "layout": _code(LAYOUTS, self.layout, "layout"),
            "causal": int(bool(self.causal)),
            "kv_modes": sum(_code(choices, getattr(self, name), name) << shift for name, choices, shift in _KV_MODES),
            "gather": _code(GATHERS, self.gather, "gather"),
            "masks": sum(1 << bit for name, bit, _ in _MASK_FIELDS if getattr(self, name) not in (None, False)),
            "window_left": self.window[0] if self.window is not None else 0,
            "window_right": self.window[1] if self.window is not None else 0,
            "chunk": self.chunk or 0,
            "softcap": float(self.softcap) if self.softcap is not None else 0.0,
            **{f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("dtype", "layout", "causal", "kv_backward", "kv_grad_dtype", "gather", "window",
                                 "chunk", "softcap", "sinks")},
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
    flags = values.pop("masks")
    raw_masks = {name: values.pop(name) for _, _, parts in _MASK_FIELDS for name in parts}
    values["window"] = (raw_masks["window_left"], raw_masks["window_right"]) if flags & 1 else None
    values["chunk"] = raw_masks["chunk"] if flags & 2 else None
    values["softcap"] = raw_masks["softcap"] if flags & 4 else None
    values["sinks"] = bool(flags & 8)
    for name, choices in (("dtype", _DTYPES), ("layout", LAYOUTS), ("gather", GATHERS),
                          *((mode, choices) for mode, choices, _ in _KV_MODES)):
        code = values[name]
        values[name] = choices[code - 1] if 1 <= code <= len(choices) else f"<code {code}>"
    values["causal"] = bool(values["causal"]) if values["causal"] in (0, 1) else f"<code {values['causal']}>"
    return values


def check_rows(rows: torch.Tensor, ranks=None, what="lss_attention call", group=None) -> None:
    """Raise RuntimeError naming every field on which the rows ``[N, n]`` differ, per rank.

    ``ranks`` (global rank of each row; else those of ``group``, else 0..N-1) only label the
    message. Deterministic in the rows: every rank holding the same rows reaches the same verdict.
    """
    raw = rows.detach().contiguous().view(torch.uint8).cpu()  # [N, SIGNATURE_BYTES]
    if bool((raw == raw[0]).all()):
        return
    decoded = [decode(r) for r in raw]
    diffs = {name: [d[name] for d in decoded] for name in decoded[0]
             if len({repr(d[name]) for d in decoded}) > 1}
    if ranks is None:
        ranks = torch.distributed.get_process_group_ranks(group) if group is not None else range(len(decoded))
    ranks = list(ranks)
    detail = "; ".join(f"{name}: " + ", ".join(f"rank {r}={v!r}" for r, v in zip(ranks, values))
                       for name, values in diffs.items())
    first = decoded[0]
    raise RuntimeError(
        f"the ranks of the sequence-parallel group disagree on this {what} "
        f"(rank {ranks[0]}: {first['gather']}, KV head chunk {first['head_chunk_index']}); every rank raises "
        f"this and no collective is left pending. Differing fields: {detail}"
    )


@functools.lru_cache(maxsize=1)
def check_mode() -> str:
    """``LSS_CHECK_CONSISTENCY``, read once per process (a refusal is not cached: it recurs on every call)."""
    mode = os.environ.get(CHECK_ENV, "").strip() or "always"
    if mode not in CHECK_MODES:
        raise ValueError(
            f"{CHECK_ENV}={mode!r}: lss_attention settles one 96-byte verdict over the sequence-parallel group on "
            f"every call and cannot skip it on one rank (its peers would pair their next collective with a "
            f"different one); accepted: {CHECK_MODES}, both meaning that, or unset")
    return mode


__all__ = ["CallSignature", "SIGNATURE_BYTES", "check_mode", "check_rows",
           "decode", "header_numel"]
