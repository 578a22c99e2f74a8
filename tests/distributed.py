"""Run a function on several ranks (processes on this host) and collect what each returns.

Every rank gets a default process group (gloo on CPU, NCCL on GPU) with a timeout, so a broken
test fails with the rank's traceback, or a TimeoutError after ``timeout_s``, never a hang.
The function must be importable by name (a module-level function) because ranks are spawned.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
import traceback

from lss_plugin.runtime import free_port


def _rank_main(fn, rank, world_size, port, pg_timeout_s, results, args, kwargs, env):
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    code = 0
    try:
        import torch

        torch.set_num_threads(1)  # ranks share two cores; oversubscription only slows them down
        from lss_plugin.runtime import init_distributed

        init_distributed(timeout_s=pg_timeout_s)
        out = fn(*args, **kwargs)
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        results.put((rank, "error", traceback.format_exc()))
        code = 1
    finally:
        try:
            import torch.distributed as dist

            if code == 0 and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        # The queue sends from a feeder thread: flush it before os._exit, or the result is lost.
        results.close()
        results.join_thread()
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip interpreter teardown: libraries like DeepSpeed sometimes abort in it.
        os._exit(code)


def run_ranks(fn, world_size, *args, timeout_s=240.0, pg_timeout_s=60.0, env=None, allow_exit=(), **kwargs):
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return the list of per-rank results.

    Raises RuntimeError with every failing rank's traceback, or TimeoutError naming the ranks
    that did not finish within ``timeout_s`` (they are killed). Ranks in ``allow_exit`` may die
    without reporting (tests that kill a rank on purpose); their result is None.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, pg_timeout_s, results, args, kwargs, dict(env or {})),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    collected, errors = {}, {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(collected) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(collected) - set(errors))
                raise TimeoutError(
                    f"ranks {missing} of {world_size} did not finish {fn.__name__} within {timeout_s}s"
                    + ("".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
                )
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode is not None
                        and i not in collected and i not in errors]
                # A rank that died without reporting (segfault, os._exit) is an error too.
                for i in dead:
                    time.sleep(0.5)  # its report may still be in the pipe
                    try:
                        while True:
                            r, st, pl = results.get_nowait()
                            (collected if st == "ok" else errors)[r] = pl
                    except queue.Empty:
                        pass
                    if i not in collected and i not in errors:
                        if i in allow_exit:
                            collected[i] = None
                        else:
                            errors[i] = f"process exited with code {procs[i].exitcode} without reporting"
                continue
            (collected if status == "ok" else errors)[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError(
            f"{len(errors)} of {world_size} ranks failed in {fn.__name__}:"
            + "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        )
    return [collected[r] for r in range(world_size)]
