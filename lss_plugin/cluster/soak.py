"""Kill a random rank at random steps and check the job resumes to the uninterrupted losses.

The command is a torchrun training script whose arguments contain ``{ckpt}`` (its checkpoint
directory, for both saving and loading) and ``{metrics}`` (a JSON-lines file with one record
``{"iteration": i, "loss": x, ...}`` per iteration, written by rank 0). It runs twice under the same
launch (same nodes, ranks, shaping): once uninterrupted, once with ``kills`` SIGKILLs of a random
rank, each after a random iteration (increasing, so every kill happens after progress past the
previous one), under ``torchrun --max-restarts kills``. Afterwards: per kill the steps lost (the
iterations logged before the kill that had to be run again), and the largest relative difference
of any iteration's loss (its last record) from the uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import random
import signal
from dataclasses import dataclass, field

from lss_plugin.cluster import launch as launching


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().startswith("{")]


def losses_by_iteration(records: list[dict]) -> dict[int, float]:
    """The last logged loss of each iteration (a resumed run logs the re-run iterations again)."""
    out = {}
    for r in records:
        if "loss" in r and "iteration" in r:
            out[int(r["iteration"])] = float(r["loss"])
    return out


def spread_targets(rng: random.Random, iterations: int, kills: int) -> list[int]:
    """One random iteration in each of ``kills`` equal stretches of 1 .. iterations - 1."""
    edges = [1 + (iterations - 1) * k // kills for k in range(kills + 1)]
    return [rng.randrange(lo, max(lo + 1, hi)) for lo, hi in zip(edges, edges[1:])]


def fill(command: list[str], ckpt: str, metrics: str) -> list[str]:
    return [a.replace("{ckpt}", ckpt).replace("{metrics}", metrics) for a in command]


@dataclass
class Killer:
    """Called while the job runs: SIGKILLs a random rank once the metrics reach the next target."""

    metrics: str
    targets: list[int]
    rng: random.Random
    kills: list[dict] = field(default_factory=list)
    _seen: int = 0

    def __call__(self, launch) -> None:
        records = read_metrics(self.metrics)
        pending = self.kills[-1] if self.kills and "resumed_at" not in self.kills[-1] else None
        if pending is not None:
            if "restarted" not in pending:
                # records until the new workers are up belong to the killed attempt
                now = launch.workers()
                if now and not set(now.values()) & pending["pids"]:
                    pending["restarted"] = True
                    pending["last_logged"] = max(int(r["iteration"]) for r in records)
                    self._seen = len(records)
                return
            if len(records) > self._seen:
                pending["resumed_at"] = int(records[self._seen]["iteration"])
            else:
                return
        if len(self.kills) == len(self.targets) or not records:
            return
        last = int(records[-1]["iteration"])
        after_previous = self.kills[-1]["last_logged"] + 1 if self.kills else 0  # progress since the last kill
        if last >= max(self.targets[len(self.kills)], after_previous):
            workers = launch.workers()
            if not workers:
                return
            rank = self.rng.choice(sorted(workers))
            try:
                os.kill(workers[rank], signal.SIGKILL)
            except ProcessLookupError:
                return
            self.kills.append({"rank": rank, "after_iteration": last, "pids": set(workers.values())})


def soak(command: list[str], workdir: str, *, nodes: int = 2, nproc: int = 1, kills: int = 5, seed: int = 0,
         rate: str | None = "1gbit", use_netns: bool = True, timeout_s: float = 3600.0, log=print) -> dict:
    os.makedirs(workdir, exist_ok=True)
    runs = {}
    for name in ("reference", "soak"):
        ckpt, metrics = os.path.join(workdir, f"{name}_ckpt"), os.path.join(workdir, f"{name}.jsonl")
        if os.path.exists(metrics):
            os.remove(metrics)
        log_dir = os.path.join(workdir, f"{name}_logs")
        os.makedirs(log_dir, exist_ok=True)
        killer = None
        if name == "soak":
            last = max(losses_by_iteration(runs["reference"]["records"]))
            if last < kills + 1:
                raise ValueError(f"the reference ran {last} iterations: too few for {kills} kills")
            rng = random.Random(seed)
            killer = Killer(metrics, spread_targets(rng, last, kills), rng)
            log(f"soak: killing a random rank after iterations {killer.targets}")
        codes = launching.run(nodes, nproc, fill(command, ckpt, metrics), rate=rate, use_netns=use_netns,
                              max_restarts=kills if killer else 0, log_dir=log_dir, timeout_s=timeout_s,
                              on_tick=killer)
        runs[name] = {"codes": codes, "records": read_metrics(metrics), "kills": killer.kills if killer else []}
        log(f"soak: {name} run exited with {codes} (logs in {log_dir})")
    ref, got = (losses_by_iteration(runs[n]["records"]) for n in ("reference", "soak"))
    missing = sorted(set(ref) - set(got))
    rel = {i: abs(got[i] - ref[i]) / max(abs(ref[i]), 1e-30) for i in ref if i in got}
    for k in runs["soak"]["kills"]:
        k.pop("pids", None)
        k.pop("restarted", None)
        k["steps_lost"] = k["last_logged"] - (k["resumed_at"] - 1) if "resumed_at" in k else None
    return {
        "codes": {n: runs[n]["codes"] for n in runs},
        "kills": runs["soak"]["kills"],
        "iterations": len(ref), "missing_iterations": missing,
        "max_rel_loss_diff": max(rel.values()) if rel else None,
        "final_loss": {"reference": ref[max(ref)] if ref else None, "soak": got[max(got)] if got else None},
    }
