"""One verdict per ``lss_attention`` forward and backward: every rank's local checks, decided together.

A check that reads only this rank's data (shapes, ``cu_seqlens``, position ids, a padding mask,
``LSS_KV_BUFFER_MIB``, ``LSS_ATTENTION_KERNEL``, ...) must not raise on this rank alone: its peers
would walk into the next collective and wait for the group's timeout. So a check does not raise;
it leaves this rank's first error in a ``LocalVerdict``, and ``settle`` combines every rank's
verdict in ONE fixed-size all-gather over the sequence-parallel group, before any variable-size
collective of the call:

    row per rank, ROW_BYTES = 96:  [call signature (80 bytes) | status (16 bytes)]
    status = (error kind u8, 0 = ok | reserved u8 | reserved u16 | in-band flag u32 | reserved u64)

Every rank then holds the same N rows and reaches the same decision:
- some rank failed: ONE more fixed-size all-gather (``MESSAGE_BYTES`` per rank, only on this
  path, which every rank takes because every rank sees the failure) carries each rank's message and
  a description of its inputs and settings; every rank raises the same error naming each rank's
  values, with the failing ranks' common exception type (ValueError, ...; RuntimeError if mixed);
- all ok, signatures differ (shapes, settings, or a forward meeting a backward): RuntimeError
  naming each differing field and every rank's value (``signature.check_rows``);
- an earlier call's in-band signature rows differed (``note_in_band``): RuntimeError.
No collective is left pending on any of these paths, so the group stays usable (gloo; on NCCL
see docs/reliability.md). One host read per settle: the gathered rows (``N x 96`` bytes).

Errors found outside a call (the transformers mask function, an adapter's own checks) are
``defer``-red: recorded here and folded into the next settle on this process, which the adapter
reaches next on every rank.
"""
from __future__ import annotations

import os
import struct
import threading

import torch
import torch.distributed as dist

from lss_plugin.comm import all_gather_flat
from lss_plugin.signature import SIGNATURE_BYTES, check_rows

_STATUS = struct.Struct("<BBHIQ")
ROW_BYTES = SIGNATURE_BYTES + _STATUS.size  # 96
MESSAGE_BYTES = 1024  # per rank, only after a refusal
NAME, MESSAGE_NAME = "verdict", "verdict_messages"  # collective counter names
# error kind codes <-> exception types raised on every rank (0 = ok)
_KINDS = (ValueError, NotImplementedError, TypeError, RuntimeError)


class LocalVerdict:
    """This rank's first local error of one call (None: ok), and what to say about its inputs."""

    def __init__(self, context=None):
        self.error: BaseException | None = None
        self._context = context  # () -> str, built only on the error path

    def attempt(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, or None with its error kept (the first one wins)."""
        if self.error is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any local failure must become everyone's verdict
            self.error = exc
            return None

    def context(self) -> str:
        try:
            return self._context() if self._context is not None else ""
        except Exception as exc:  # noqa: BLE001 - describing the inputs must not hide the error
            return f"<inputs not describable: {exc}>"


# Rank-local settings every refusal names, per rank (read from the environment on each call).
SETTINGS_ENV = ("LSS_ATTENTION_KERNEL", "LSS_KV_BUFFER_MIB", "LSS_CHECK_CONSISTENCY")


def _shape(t) -> str:
    return f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}" if isinstance(t, torch.Tensor) else type(t).__name__


def describe_inputs(q, k, v, cu_seqlens=None) -> str:
    """This rank's inputs and environment settings, for a refusal's message (error path only)."""
    parts = [f"q {_shape(q)}, k {_shape(k)}, v {_shape(v)}"]
    if cu_seqlens is not None:
        if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1:
            vals = cu_seqlens.tolist()
            parts.append(f"cu_seqlens {vals if len(vals) <= 8 else vals[:3] + ['...'] + vals[-3:]}")
        else:
            parts.append(f"cu_seqlens {_shape(cu_seqlens)}")
    parts += [f"{name}={os.environ[name]!r}" if name in os.environ else f"{name} unset" for name in SETTINGS_ENV]
    return ", ".join(parts)


# Errors recorded outside a call and in-band disagreements, folded into this process's next settle.
_DEFERRED: list[BaseException] = []
_IN_BAND: list[torch.Tensor] = []  # device bools: an earlier gather's signature rows differed
_LOCK = threading.Lock()


def defer(error: BaseException) -> None:
    """Record a local error for the next ``settle`` (which then fails on every rank) instead of raising."""
    with _LOCK:
        _DEFERRED.append(error)


_INTEGER_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def note_in_band(rows: torch.Tensor) -> None:
    """Compare signature rows ``[N, n]`` that arrived with a gather ON THE DEVICE (no host read);
    a disagreement is reported by the next settle, before that call's first variable-size collective.

    Compared as bits, not floats: a digest's bytes bit-cast to a float dtype can spell a NaN, which
    never equals itself."""
    bits = rows.view(_INTEGER_OF_SIZE[rows.element_size()])
    differ = (bits != bits[:1]).any()
    with _LOCK:
        if _IN_BAND:
            _IN_BAND[0] = _IN_BAND[0] | differ.to(_IN_BAND[0].device)
        else:
            _IN_BAND.append(differ)


def _take_pending():
    with _LOCK:
        deferred, in_band = list(_DEFERRED), (_IN_BAND[0] if _IN_BAND else None)
        _DEFERRED.clear()
        _IN_BAND.clear()
    return deferred, in_band


def verdict_device(group) -> torch.device:
    """Where the verdict rows live: NCCL takes device tensors only; gloo, CPU ones (no copy)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _kind(error: BaseException) -> int:
    return next((i + 1 for i, cls in enumerate(_KINDS) if isinstance(error, cls)), len(_KINDS))


def encode_row(signature_bytes: bytes | None, error: BaseException | None, in_band: int = 0) -> bytes:
    """This rank's ``ROW_BYTES`` row (a failed rank may have no signature yet: zeros)."""
    sig = signature_bytes if signature_bytes is not None else bytes(SIGNATURE_BYTES)
    if len(sig) != SIGNATURE_BYTES:
        raise ValueError(f"a signature has {SIGNATURE_BYTES} bytes, got {len(sig)}")
    return sig + _STATUS.pack(0 if error is None else _kind(error), 0, 0, in_band, 0)


def decode_status(row: bytes) -> tuple[int, int]:
    """(error kind, in-band flag) of one row."""
    kind, _, _, in_band, _ = _STATUS.unpack(row[SIGNATURE_BYTES:ROW_BYTES])
    return kind, in_band


def encode_message(text: str) -> bytes:
    raw = text.encode("utf-8")[:MESSAGE_BYTES]
    return raw.decode("utf-8", "ignore").encode("utf-8").ljust(MESSAGE_BYTES, b"\0")


def decode_message(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def refusal(kinds, messages, ranks) -> BaseException:
    """The error every rank raises: ``kinds[i]`` (0 = ok) and ``messages[i]`` of rank ``ranks[i]``."""
    failed = [i for i, kind in enumerate(kinds) if kind]
    types = {_KINDS[kinds[i] - 1] for i in failed}
    cls = types.pop() if len(types) == 1 else RuntimeError
    head = (f"lss_attention refused this call on rank{'s' if len(failed) > 1 else ''} "
            f"{', '.join(str(ranks[i]) for i in failed)} of the sequence-parallel group {list(ranks)}; every rank "
            "raises this error and no collective is left pending.")
    lines = [f"rank {r}: {'REFUSED: ' if kind else 'ok; '}{message}" for r, kind, message in zip(ranks, kinds, messages)]
    return cls(head + "\n" + "\n".join(lines))


def _describe(local: LocalVerdict, deferred) -> str:
    errors = ([local.error] if local.error is not None else []) + list(deferred)
    said = " | ".join(f"{type(e).__name__}: {e}" for e in errors)
    context = local.context()
    return f"{said} [{context}]" if said else f"[{context}]"


def settle(local: LocalVerdict, group, signature_bytes: bytes | None, what: str = "lss_attention call") -> None:
    """Raise the same error on every rank of ``group`` unless every rank's verdict is ok and every
    rank's signature is the same. ONE all-gather of ``ROW_BYTES`` per rank (+ the messages' one on
    refusal); nothing for a group of one, which raises its own error as it is."""
    deferred, in_band = _take_pending()
    error = local.error or (deferred[0] if deferred else None)
    size = dist.get_world_size(group)
    if size == 1:
        if error is not None:
            raise error
        if in_band is not None and bool(in_band):
            raise RuntimeError("lss_plugin: an earlier lss_attention gather carried differing signature rows")
        return
    device = verdict_device(group)
    row = torch.frombuffer(bytearray(encode_row(signature_bytes, error)), dtype=torch.uint8).to(device)
    if in_band is not None:  # device flag -> the row's in-band word, without reading it here
        row[SIGNATURE_BYTES + 4] = in_band.to(device, torch.uint8)
    rows = row.new_empty((size * ROW_BYTES,))
    all_gather_flat(rows, row, group, name=NAME)
    raw = rows.cpu().numpy().tobytes()  # the one host read of this call: [N x ROW_BYTES]
    rows_bytes = [raw[i * ROW_BYTES:(i + 1) * ROW_BYTES] for i in range(size)]
    status = [decode_status(r) for r in rows_bytes]
    ranks = dist.get_process_group_ranks(group)
    if any(kind for kind, _ in status):
        mine = torch.frombuffer(bytearray(encode_message(_describe(local, deferred))), dtype=torch.uint8).to(device)
        texts = mine.new_empty((size * MESSAGE_BYTES,))
        all_gather_flat(texts, mine, group, name=MESSAGE_NAME)
        raw = texts.cpu().numpy().tobytes()
        messages = [decode_message(raw[i * MESSAGE_BYTES:(i + 1) * MESSAGE_BYTES]) for i in range(size)]
        err = refusal([kind for kind, _ in status], messages, ranks)
        if error is not None:
            raise err from error
        raise err
    signatures = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(size, ROW_BYTES)[:, :SIGNATURE_BYTES]
    check_rows(signatures, ranks=ranks, what=what)
    if any(flag for _, flag in status):
        flagged = [r for r, (_, flag) in zip(ranks, status) if flag]
        raise RuntimeError(
            f"lss_plugin: an earlier lss_attention K/V gather or all-to-all on ranks {flagged} carried signature rows "
            "that differed across its group although the call's verdict had agreed: the group's collectives were "
            "misaligned by something outside lss_attention (another thread on the same process group?). Every rank "
            "raises this; no collective is left pending.")


__all__ = ["LocalVerdict", "MESSAGE_BYTES", "NAME", "ROW_BYTES", "decode_status", "defer", "describe_inputs", "encode_row",
           "note_in_band", "refusal", "settle", "verdict_device"]
