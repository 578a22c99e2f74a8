"""Byte-level (enwik8-style) text data: splits, training batches, evaluation windows, bits per character.

Two sources:
- a file the user names (``data_path``): the real enwik8 (10^8 bytes -> the standard
  90M / 5M / 5M train / validation / test split) or any other byte file (the same 90/5/5
  proportions). It is memory-mapped, not read. A ``.zip`` holding one member (``enwik8.zip`` as
  distributed) is unpacked once into the cache.
- by default, the English Wikipedia XML excerpt that the ``gensim==4.4.0`` wheel ships as test
  data (the same kind of dump enwik8 is cut from). It is fetched with ``pip download`` (the package
  index is the only network this needs), unpacked, checked against a SHA-256 recorded below and
  cached; a corrupted cache is detected and fetched again.

Tokens are bytes (vocabulary 256), so a model's mean cross entropy in nats converts directly to
bits per character.

Documents (for Megatron's ``--reset-attention-mask``/``--reset-position-ids``/``--eod-mask-loss``):
a Wikipedia XML dump ends every article with the line ``</page>``; ``with_document_ends`` replaces
the newline after it by ``EOD_BYTE`` (0x03, ASCII "end of text", which XML 1.0 forbids, so the dump
never holds it). That byte is the EOD token, the last token of its document as in megatron-core's GPT
dataset; lengths and offsets are unchanged. Any 0x03 already in a file counts as an EOD too. Where
documents are found by their start instead (transformers' packing, ``lss_plugin.hf.packing.pack_windows``,
and the Trainer example), one starts at every ``PAGE_SEPARATOR`` (``document_spans``; ``parse_separator``
reads another separator from the command line).
"""
from __future__ import annotations

import bz2
import contextlib
import dataclasses
import fcntl
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

VOCAB_SIZE = 256
EOD_BYTE = 0x03  # the EOD token of packed documents (ASCII "end of text")
DOCUMENT_END = b"</page>\n"  # how a Wikipedia XML dump ends each article
PAGE_SEPARATOR = b"<page>"  # how it starts one (the document starts of pack_windows / document_spans)
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)  # train / validation / test, as enwik8's 90M / 5M / 5M

GENSIM_REQUIREMENT = "gensim==4.4.0"
GENSIM_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
# The wheel differs per platform; the member inside does not. Pin the wheel anyway so every
# machine downloads the same file (no sdist build, no surprise).
GENSIM_WHEEL_PLATFORM = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                         "--implementation", "cp", "--abi", "cp311", "--only-binary=:all:")
GENSIM_MEMBER_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
GENSIM_TEXT_SHA256 = "34c1c63050c87cc8477b9ae36b1cb0edf372612c92938b742e579a7109c20fa4"
GENSIM_TEXT_BYTES = 6_089_746
GENSIM_CACHE_NAME = "enwiki-gensim-4.4.0-shortened.xml"


class DataUnavailableError(RuntimeError):
    """The default corpus could not be fetched or verified; the message says what to do."""


@dataclass(frozen=True)
class ByteSplits:
    """Train / validation / test bytes (np.uint8 arrays, possibly memory-mapped) and provenance."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    source: str  # the file the bytes came from
    sha256: str  # of the whole file: goes into checkpoint manifests and metrics

    @property
    def num_bytes(self) -> int:
        return len(self.train) + len(self.valid) + len(self.test)


# --------------------------------------------------------------------------------------------
# Loading

def default_cache_dir() -> str:
    return os.environ.get("LSS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lss_plugin")


def load_byte_splits(data_path: str | None = None, cache_dir: str | None = None) -> ByteSplits:
    """The byte corpus split 90/5/5; ``data_path=None`` fetches (once) the gensim excerpt.

    Safe to call from several processes at once: the cache is filled under a file lock and
    every file appears by atomic rename, so a reader never sees a half-written file.
    """
    cache_dir = cache_dir or default_cache_dir()
    if data_path is None:
        path = ensure_default_corpus(cache_dir)
        digest = GENSIM_TEXT_SHA256  # verified by ensure_default_corpus
    else:
        path = _resolve_user_file(data_path, cache_dir)
        digest = file_sha256(path)
    return split_bytes(np.memmap(path, dtype=np.uint8, mode="r"), source=path, sha256=digest)


def with_document_ends(splits: ByteSplits, end: bytes = DOCUMENT_END, eod: int = EOD_BYTE) -> ByteSplits:
    """``splits`` with each document's last byte (the newline ending a ``</page>`` line) set to the EOD byte.

    In-memory copies of the three parts (enwik8: 10^8 bytes). A separator cut by a split boundary
    is left as it is (its document runs on into the next one)."""
    return dataclasses.replace(splits, **{name: mark_document_ends(getattr(splits, name), end, eod)
                                          for name in ("train", "valid", "test")})


def mark_document_ends(tokens: np.ndarray, end: bytes, eod: int) -> np.ndarray:
    """A copy of ``tokens`` in which the last byte of every occurrence of ``end`` is ``eod``."""
    data = np.array(tokens, dtype=np.uint8)  # a copy (memory-maps stay untouched)
    n = len(end)
    last = np.flatnonzero(data[n - 1:] == end[-1]) + n - 1  # candidate positions of the final byte
    found = np.ones(len(last), dtype=bool)
    for i, byte in enumerate(end[:-1]):
        found &= data[last - (n - 1) + i] == byte
    data[last[found]] = eod
    return data


def parse_separator(text: str) -> bytes:
    """A command-line separator with Python escapes (``"<page>"``, ``"\\n"``) as the bytes it stands for."""
    separator = text.encode("utf-8").decode("unicode_escape").encode("latin-1")
    if not separator:
        raise ValueError("the document separator must not be empty")
    return separator


def document_spans(tokens, separator: bytes = PAGE_SEPARATOR, max_length: int | None = None) -> list[tuple[int, int]]:
    """``[start, end)`` of the documents of a byte stream (np.uint8 array): one starts at 0 and at every
    occurrence of ``separator``; each is cut into pieces of at most ``max_length`` bytes (training examples)."""
    data = tokens.tobytes()
    starts = [0] + [m.start() for m in re.finditer(re.escape(separator), data) if m.start() > 0]
    spans = []
    for start, end in zip(starts, starts[1:] + [len(data)]):
        step = max_length or end - start
        spans += [(a, min(a + step, end)) for a in range(start, end, step)]
    return spans


def split_bytes(data: np.ndarray, source: str = "<array>", sha256: str = "") -> ByteSplits:
    """Split by byte counts: 90% / 5% / 5% (exactly 90M / 5M / 5M for enwik8's 10^8 bytes)."""
    n = len(data)
    n_train = n * 90 // 100
    n_valid = n * 5 // 100
    if min(n_train, n_valid, n - n_train - n_valid) < 2:
        raise ValueError(f"{source}: {n} bytes are too few to split 90/5/5 into usable parts")
    return ByteSplits(
        train=data[:n_train],
        valid=data[n_train:n_train + n_valid],
        test=data[n_train + n_valid:],
        source=source,
        sha256=sha256,
    )


def file_sha256(path: str, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve_user_file(data_path: str, cache_dir: str) -> str:
    if not os.path.isfile(data_path):
        raise FileNotFoundError(
            f"--data-path {data_path!r} is not a file (give the enwik8 file, enwik8.zip, or any "
            "byte file; omit --data-path to use the gensim Wikipedia excerpt)"
        )
    if not zipfile.is_zipfile(data_path):
        return data_path
    with zipfile.ZipFile(data_path) as archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) != 1:
            raise ValueError(
                f"{data_path}: a zip archive must hold exactly one file (like enwik8.zip), "
                f"it holds {[m.filename for m in members]}"
            )
        member = members[0]
        # Key the unpacked copy by the archive's size and CRC so a different archive never reuses it.
        name = f"{os.path.basename(member.filename)}-{member.CRC:08x}-{member.file_size}"
        target = os.path.join(cache_dir, name)
        with _cache_lock(cache_dir):
            if not (os.path.exists(target) and os.path.getsize(target) == member.file_size):
                with archive.open(member) as src:
                    _write_atomically(target, lambda dst: _copy_stream(src, dst))
    return target


def ensure_default_corpus(cache_dir: str | None = None) -> str:
    """Path of the verified gensim excerpt in the cache, fetching it when absent or corrupted."""
    cache_dir = cache_dir or default_cache_dir()
    target = os.path.join(cache_dir, GENSIM_CACHE_NAME)
    if _is_verified(target):  # the common case: no lock needed to read a finished file
        return target
    with _cache_lock(cache_dir):
        if _is_verified(target):  # another process fetched it while we waited
            return target
        if os.path.exists(target):
            print(f"[lss_plugin.data] {target} fails its SHA-256 check; fetching it again", file=sys.stderr)
        _remove_debris(cache_dir)
        text = _fetch_gensim_text(cache_dir)
        _write_atomically(target, lambda dst: dst.write(text))
    if not _is_verified(target):
        raise DataUnavailableError(f"{target} was written but does not verify; is the disk full?")
    return target


def _remove_debris(cache_dir: str) -> None:
    """Scratch left by a process killed mid-fetch. Call under the lock: then nobody else is fetching."""
    for name in os.listdir(cache_dir):
        if name.startswith((".download-", ".tmp-")):
            path = os.path.join(cache_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


def _is_verified(path: str) -> bool:
    return (os.path.isfile(path) and os.path.getsize(path) == GENSIM_TEXT_BYTES
            and file_sha256(path) == GENSIM_TEXT_SHA256)


def _fetch_gensim_text(cache_dir: str) -> bytes:
    """``pip download`` the wheel into a scratch dir, return the verified decompressed member."""
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as scratch:
        # Few retries and a short timeout: an unreachable index should fail in a minute, not ten.
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--quiet", "--retries", "2", "--timeout", "20", "--dest", scratch,
                   *GENSIM_WHEEL_PLATFORM, GENSIM_REQUIREMENT]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _unavailable(f"running `{' '.join(command)}` failed: {exc}") from exc
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            raise _unavailable(f"`pip download {GENSIM_REQUIREMENT}` exited with {result.returncode}:\n  "
                               + "\n  ".join(tail))
        wheels = [f for f in os.listdir(scratch) if f.endswith(".whl")]
        if len(wheels) != 1:
            raise _unavailable(f"pip download produced {os.listdir(scratch)}, expected one gensim wheel")
        try:
            with zipfile.ZipFile(os.path.join(scratch, wheels[0])) as wheel:
                member = wheel.read(GENSIM_MEMBER)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise _unavailable(f"{wheels[0]} does not hold {GENSIM_MEMBER}: {exc}") from exc
    got = hashlib.sha256(member).hexdigest()
    if got != GENSIM_MEMBER_SHA256:
        raise _unavailable(f"{GENSIM_MEMBER} has SHA-256 {got}, expected {GENSIM_MEMBER_SHA256}")
    text = bz2.decompress(member)
    got = hashlib.sha256(text).hexdigest()
    if got != GENSIM_TEXT_SHA256:
        raise _unavailable(f"decompressed excerpt has SHA-256 {got}, expected {GENSIM_TEXT_SHA256}")
    return text


def _unavailable(what: str) -> DataUnavailableError:
    return DataUnavailableError(
        f"cannot get the default training text (the Wikipedia excerpt in {GENSIM_REQUIREMENT}): {what}\n"
        "It needs `pip download` to reach the package index. Without it, pass --data-path with the "
        "enwik8 file (or any byte file), or place a verified copy at "
        f"$LSS_CACHE_DIR/{GENSIM_CACHE_NAME}."
    )


@contextlib.contextmanager
def _cache_lock(cache_dir: str):
    """An exclusive lock across processes (ranks, parallel tests) on the cache directory."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        handle = open(os.path.join(cache_dir, ".lock"), "a")
    except OSError as exc:
        raise DataUnavailableError(
            f"cannot write to the data cache {cache_dir!r} ({exc}); set LSS_CACHE_DIR to a writable "
            "directory or pass --data-path"
        ) from exc
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomically(path: str, write) -> None:
    """Write to a temp file beside ``path``, fsync, rename over it: ``path`` is whole or absent."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as dst:
            os.fchmod(dst.fileno(), 0o644)  # mkstemp makes 0600; a shared cache must be readable
            write(dst)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _copy_stream(src, dst, chunk_bytes: int = 1 << 22) -> None:
    while chunk := src.read(chunk_bytes):
        dst.write(chunk)


# --------------------------------------------------------------------------------------------
# Batches

def _check_window(tokens: np.ndarray, batch_size: int, seq_length: int) -> None:
    for name, value in (("batch_size", batch_size), ("seq_length", seq_length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if len(tokens) < seq_length + 1:
        raise ValueError(
            f"a window of seq_length + 1 = {seq_length + 1} tokens does not fit in {len(tokens)} tokens"
        )


def sample_batch(tokens: np.ndarray, batch_size: int, seq_length: int, step: int, seed: int) -> torch.Tensor:
    """Random training windows, a function of ``(seed, step)`` only: the same on every rank.

    Returns LongTensor ``[batch_size, seq_length + 1]`` (inputs are ``[:, :-1]``, targets
    ``[:, 1:]``). Every rank builds the same global batch and takes its own rows (DP) and
    columns (SP), so no data is communicated and a resumed run draws what it would have drawn.
    """
    _check_window(tokens, batch_size, seq_length)
    rng = np.random.default_rng([int(seed), int(step)])  # a seed *sequence*: no (seed, step) collisions
    starts = rng.integers(0, len(tokens) - seq_length, size=batch_size)  # window [start, start + L]
    offsets = np.arange(seq_length + 1)
    return torch.from_numpy(np.asarray(tokens[starts[:, None] + offsets], dtype=np.int64))


def num_eval_windows(tokens: np.ndarray, seq_length: int) -> int:
    """How many windows of ``seq_length`` predicted tokens fit; each byte after the first is predicted once."""
    return (len(tokens) - 1) // seq_length


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_length: int, max_batches: int | None = None
) -> Iterator[torch.Tensor]:
    """Consecutive windows ``[batch_size, seq_length + 1]``; window i starts at ``i * seq_length``.

    Windows share one boundary byte (the last input of one is the first of the next), so every
    predicted byte is counted exactly once. Only full batches are yielded, so every rank sees
    the same shapes; the remainder (fewer than ``batch_size`` windows) is left out.
    """
    _check_window(tokens, batch_size, seq_length)
    total = num_eval_windows(tokens, seq_length) // batch_size
    if max_batches is not None:
        total = min(total, max_batches)
    offsets = np.arange(seq_length + 1)
    for b in range(total):
        starts = (b * batch_size + np.arange(batch_size)) * seq_length
        yield torch.from_numpy(np.asarray(tokens[starts[:, None] + offsets], dtype=np.int64))


def bits_per_character(loss_sum_nats: float, num_tokens: int) -> float:
    """Mean cross entropy in bits: sum of per-byte losses (nats) / count / ln 2."""
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    return float(loss_sum_nats) / float(num_tokens) / math.log(2.0)
