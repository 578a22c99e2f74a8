"""DeepSpeed checkpoints whose ``latest`` moves only when every rank's files are written.

``engine.save_checkpoint`` has rank 0 write ``latest`` as soon as its own files are written and
before the closing barrier, with a plain ``open``/``write``: a rank killed while the others still
write their ZeRO shards, or rank 0 killed mid-write, leaves ``latest`` naming an incomplete or
unreadable checkpoint. ``save`` writes the tag without ``latest``, waits for every rank (DeepSpeed's
own closing barrier), then replaces ``latest`` atomically; ``load`` resumes from it, so a job
restarted after a kill resumes from the last complete checkpoint.
"""
from __future__ import annotations

import os

import torch.distributed as dist

LATEST = "latest"


def tag(iteration: int) -> str:
    return f"global_step{iteration}"


def save(engine, save_dir: str, iteration: int, client_state: dict | None = None) -> None:
    """Collective: every rank writes its part of checkpoint ``iteration``, then ``latest`` moves to it."""
    engine.save_checkpoint(save_dir, tag=tag(iteration), client_state=dict(client_state or {}, iteration=iteration),
                           save_latest=False)  # returns after a barrier: every rank's files are written
    if dist.get_rank() == 0:
        tmp = os.path.join(save_dir, f".{LATEST}.tmp")
        with open(tmp, "w") as f:
            f.write(tag(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(save_dir, LATEST))
    dist.barrier()


def load(engine, load_dir: str | None) -> int:
    """Resume from ``load_dir``'s ``latest``; returns the iteration to continue after (0: none yet)."""
    if not load_dir or not os.path.isfile(os.path.join(load_dir, LATEST)):
        return 0
    _, client = engine.load_checkpoint(load_dir)
    if client is None:
        raise RuntimeError(f"{load_dir}/{LATEST} names a checkpoint DeepSpeed could not load")
    return int(client["iteration"])
