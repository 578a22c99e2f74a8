"""Atomic, self-checking training checkpoints.

Layout of ``directory``::

    latest                  name of the newest complete checkpoint (replaced atomically)
    iter_0000100/
        state.pt            the replicated state (model, optimizer, ...), written by rank 0
        rank_00000.pt ...   optional per-rank state (tensor-parallel shards, per-rank RNG)
        manifest.json       format, iteration, topology/settings/model as the caller gives them,
                            and the size and SHA-256 of every file above

A checkpoint is built in a temporary directory, fsynced, and renamed into place; only then does
``latest`` move to it. A save that fails or is killed half way therefore leaves the previous
checkpoint as ``latest``, whole and loadable. Loading checks sizes and checksums before
unpickling, and compares the model section of the manifest with what the caller expects.

LSS parameters are replicated over the SP x DP grid, so the replicated state does not depend on
the SP or DP size: a checkpoint written with SP=4 loads with SP=2. Those sizes are recorded in the
manifest for information, not compared.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil

import torch
import torch.distributed as dist

FORMAT = "lss_plugin.checkpoint/1"
LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
STATE_FILE = "state.pt"
RANK_STATE_KEY = "rank_state"  # where load_checkpoint puts this rank's per-rank state
_RESERVED_MANIFEST_KEYS = ("format", "iteration", "saved_at", "torch_version", "world_size", "files")
_NAME = re.compile(r"^iter_(\d{7,})(?:\.(\d+))?$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or belongs to a different model."""


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


# --------------------------------------------------------------------------------------------
# Save

def save_checkpoint(
    directory: str,
    iteration: int,
    state: dict,
    manifest: dict,
    *,
    rank_state: dict | None = None,
    group: dist.ProcessGroup | None = None,
    keep_last: int | None = None,
) -> str:
    """Write checkpoint ``iteration`` and point ``latest`` at it; returns its path.

    Collective over ``group`` (default: the world) when torch.distributed is initialised: every
    rank calls it with the same ``iteration``; rank 0 writes ``state`` and the manifest, every
    rank writes its ``rank_state`` if given. All ranks return together, or all raise.
    ``keep_last``: delete all but the newest ``keep_last`` checkpoints after a successful save.
    """
    # Validate locally, before any collective, so a bad call fails on every rank alike.
    if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
        raise ValueError(f"iteration must be a non-negative integer, got {iteration!r}")
    for name, value in (("state", state), ("manifest", manifest)):
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a dict, got {type(value).__name__}")
    clash = sorted(set(manifest) & set(_RESERVED_MANIFEST_KEYS))
    if clash:
        raise ValueError(f"manifest keys {clash} are reserved (set by save_checkpoint itself)")
    try:
        json.dumps(manifest)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"manifest must be JSON-serialisable: {exc}") from exc
    if rank_state is not None and RANK_STATE_KEY in state:
        raise ValueError(f"state key {RANK_STATE_KEY!r} is reserved when rank_state is given")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    rank = dist.get_rank(group) if distributed else 0
    world_size = dist.get_world_size(group) if distributed else 1
    # Same name on every rank, so per-rank files land in the one being built.
    tmp = os.path.join(directory, f".tmp-{checkpoint_name(iteration)}")

    def on_rank0_prepare():
        os.makedirs(directory, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that crashed
        os.makedirs(tmp)
        _write_file(os.path.join(tmp, STATE_FILE), lambda f: torch.save(state, f))

    _run_agreed(on_rank0_prepare if rank == 0 else None, "writing the replicated state", tmp, distributed, group)
    if rank_state is not None:
        _run_agreed(lambda: _write_file(os.path.join(tmp, rank_file(rank)), lambda f: torch.save(rank_state, f)),
                    "writing per-rank state", tmp, distributed, group)

    final = os.path.join(directory, checkpoint_name(iteration))

    def on_rank0_commit():
        nonlocal final
        expected = [STATE_FILE] + ([rank_file(r) for r in range(world_size)] if rank_state is not None else [])
        full = {
            "format": FORMAT,
            "iteration": iteration,
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
            "world_size": world_size,
            "files": {name: _describe(os.path.join(tmp, name)) for name in expected},
            **manifest,
        }
        _write_file(os.path.join(tmp, MANIFEST_FILE), lambda f: f.write(json.dumps(full, indent=2).encode()))
        _fsync_dir(tmp)
        # Re-saving an iteration (after a resume) must not touch the good copy until ``latest``
        # has moved: build under a fresh name, remove the old one afterwards.
        final = _free_name(directory, iteration)
        os.rename(tmp, final)
        _fsync_dir(directory)
        pointer = os.path.basename(final).encode() + b"\n"
        _write_file(os.path.join(directory, LATEST_FILE), lambda f: f.write(pointer), atomic_in=directory)
        _remove_superseded(directory, os.path.basename(final), iteration, keep_last)

    _run_agreed(on_rank0_commit if rank == 0 else None, "committing the checkpoint", tmp, distributed, group)
    if distributed:  # other ranks learn the final name (it may carry a suffix)
        names = [os.path.basename(final)]
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast_object_list(names, src=src, group=group)
        final = os.path.join(directory, names[0])
    return final


def _run_agreed(action, what: str, tmp: str, distributed: bool, group) -> None:
    """Run ``action`` (None: nothing on this rank), then agree over the group that all succeeded."""
    error = None
    if action is not None:
        try:
            action()
        except BaseException as exc:  # noqa: BLE001 - report to every rank, then re-raise
            error = exc
    ok_everywhere = error is None
    if distributed:
        flag = torch.tensor([0 if error is not None else 1], dtype=torch.int32, device=_collective_device(group))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        ok_everywhere = bool(flag.item())
    if ok_everywhere:
        return
    if (not distributed or dist.get_rank(group) == 0):
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint and ``latest`` are untouched
    if error is not None:
        raise CheckpointError(f"saving failed while {what} in {tmp}: {error!r}") from error
    raise CheckpointError(f"saving failed on another rank while {what} in {tmp}; see that rank's error")


def _collective_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _write_file(path: str, write, atomic_in: str | None = None) -> None:
    """Write and fsync ``path``; with ``atomic_in``, through a temp file renamed over it."""
    target = path
    if atomic_in is not None:
        path = os.path.join(atomic_in, f".tmp-{os.path.basename(target)}-{os.getpid()}")
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    if atomic_in is not None:
        os.replace(path, target)
        _fsync_dir(atomic_in)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(path: str) -> dict:
    return {"bytes": os.path.getsize(path), "sha256": _sha256(path)}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _free_name(directory: str, iteration: int) -> str:
    base = os.path.join(directory, checkpoint_name(iteration))
    candidate, k = base, 0
    while os.path.exists(candidate):
        k += 1
        candidate = f"{base}.{k}"
    return candidate


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """``(iteration, name)`` of the checkpoint directories present, oldest first (complete or not)."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _NAME.match(name)
        if match and os.path.isdir(os.path.join(directory, name)):
            found.append((int(match.group(1)), int(match.group(2) or 0), name))
    return [(it, name) for it, _, name in sorted(found)]


def _remove_superseded(directory: str, latest: str, iteration: int, keep_last: int | None) -> None:
    present = list_checkpoints(directory)
    doomed = [name for it, name in present if it == iteration and name != latest]
    if keep_last is not None:
        kept = [name for _, name in present if name not in doomed]
        doomed += [name for name in kept[:-keep_last] if name != latest]
    for name in doomed:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Load

def latest_checkpoint(directory: str) -> str | None:
    """Name of the checkpoint ``latest`` points at, or None when there is none yet."""
    path = os.path.join(directory, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    if not _NAME.match(name):
        raise CheckpointError(f"{path} holds {name!r}, not a checkpoint name like {checkpoint_name(0)!r}")
    return name


def load_checkpoint(
    directory: str,
    expected_manifest: dict | None = None,
    map_location="cpu",
    *,
    iteration: int | None = None,
    rank: int | None = None,
    compare_sections: tuple[str, ...] = ("model",),
    weights_only: bool = True,
) -> tuple[int, dict, dict]:
    """Load the ``latest`` checkpoint (or ``iteration``); returns ``(iteration, state, manifest)``.

    Raises CheckpointError when it is missing, incomplete (size or checksum mismatch, unreadable),
    or when a section in ``compare_sections`` of ``expected_manifest`` (the model configuration by
    default) differs from the saved one. SP/DP sizes are not compared. No collectives: every rank
    reads the files itself. If per-rank state was saved, this rank's (``rank``, default the global
    rank) is returned as ``state["rank_state"]``.
    """
    name = _resolve_name(directory, iteration)
    path = os.path.join(directory, name)
    manifest = _read_manifest(path)
    if expected_manifest is not None:
        _check_compatible(path, manifest, expected_manifest, compare_sections)
    state = _load_verified(path, STATE_FILE, manifest, map_location, weights_only)
    rank_files = [f for f in manifest["files"] if f != STATE_FILE]
    if rank_files:
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank_file(rank) not in manifest["files"]:
            raise CheckpointError(
                f"{path} holds per-rank state for world_size {manifest['world_size']}; "
                f"rank {rank} has none (per-rank state does not carry over to another world size)"
            )
        state[RANK_STATE_KEY] = _load_verified(path, rank_file(rank), manifest, map_location, weights_only)
    return manifest["iteration"], state, manifest


def _resolve_name(directory: str, iteration: int | None) -> str:
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint: directory {directory!r} does not exist")
    latest = latest_checkpoint(directory)
    if iteration is None:
        if latest is None:
            raise CheckpointError(
                f"no checkpoint in {directory!r}: no {LATEST_FILE!r} file (no save has completed there)"
            )
        if not os.path.isdir(os.path.join(directory, latest)):
            raise CheckpointError(f"{directory}/{LATEST_FILE} points at {latest!r}, which does not exist")
        return latest
    names = [name for it, name in list_checkpoints(directory) if it == iteration]
    if not names:
        have = [it for it, _ in list_checkpoints(directory)]
        raise CheckpointError(f"no checkpoint for iteration {iteration} in {directory!r} (found {have})")
    return latest if latest in names else names[-1]


def _read_manifest(path: str) -> dict:
    manifest_path = os.path.join(path, MANIFEST_FILE)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is incomplete: it has no {MANIFEST_FILE}") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{manifest_path} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{manifest_path} has format {found!r}, expected {FORMAT!r}")
    return manifest


def _check_compatible(path: str, saved: dict, expected: dict, sections) -> None:
    problems = []
    for section in sections:
        if section not in expected:
            continue
        want, have = expected[section], saved.get(section)
        if isinstance(want, dict) and isinstance(have, dict):
            for key in sorted(set(want) | set(have)):
                if want.get(key, "<absent>") != have.get(key, "<absent>"):
                    problems.append(f"{section}.{key}: checkpoint has {have.get(key, '<absent>')!r}, "
                                    f"this run has {want.get(key, '<absent>')!r}")
        elif want != have:
            problems.append(f"{section}: checkpoint has {have!r}, this run has {want!r}")
    if problems:
        raise CheckpointError(f"{path} was written for a different model:\n  " + "\n  ".join(problems))


def _load_verified(path: str, name: str, manifest: dict, map_location, weights_only: bool):
    file_path = os.path.join(path, name)
    recorded = manifest["files"].get(name)
    if recorded is None:
        raise CheckpointError(f"{path}/{MANIFEST_FILE} does not list {name}")
    if not os.path.isfile(file_path):
        raise CheckpointError(f"{file_path} is missing")
    size = os.path.getsize(file_path)
    if size != recorded["bytes"]:
        raise CheckpointError(
            f"{file_path} is truncated or altered: {size} bytes, manifest says {recorded['bytes']}")
    digest = _sha256(file_path)
    if digest != recorded["sha256"]:
        raise CheckpointError(f"{file_path} is corrupted: SHA-256 {digest}, manifest says {recorded['sha256']}")
    try:
        return torch.load(file_path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001 - an unpickling error names the offending type
        hint = (" (it holds non-tensor objects: pass weights_only=False for a checkpoint you trust)"
                if weights_only else "")
        raise CheckpointError(f"{file_path} could not be loaded{hint}: {exc}") from exc


def has_checkpoint(directory: str | None) -> bool:
    """True when ``directory`` has a ``latest`` pointer, i.e. a save has completed there.

    A ``latest`` that is unreadable or names a broken checkpoint still counts: loading it then
    raises CheckpointError, rather than a run silently starting from scratch over it.
    """
    return bool(directory) and os.path.isfile(os.path.join(directory, LATEST_FILE))
