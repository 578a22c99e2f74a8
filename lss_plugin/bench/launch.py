"""Start N rank processes on this host (gloo on CPU, NCCL on GPU), run a function, collect results.

Like torchrun for one node, but returns each rank's Python result to the caller so the benchmark
can run 1, 2 and 4 ranks in one invocation. Every rank installs the collective counters before
anything imports Megatron or DeepSpeed.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
import traceback

from lss_plugin.runtime import free_port


def _rank_main(fn, rank, world_size, port, pg_timeout_s, threads, results, args, kwargs):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    code = 0
    try:
        from lss_plugin.bench import counters

        counters.install()  # before Megatron binds torch.distributed functions at import
        import torch

        torch.set_num_threads(threads)
        from lss_plugin.runtime import init_distributed

        init_distributed(timeout_s=pg_timeout_s)
        out = fn(*args, **kwargs)
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - every failure goes to the parent
        results.put((rank, "error", traceback.format_exc()))
        code = 1
    finally:
        results.close()
        results.join_thread()  # the result must be written before os._exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip interpreter teardown (DeepSpeed sometimes aborts in it)


def launch(fn, world_size: int, *args, timeout_s: float = 1800.0, pg_timeout_s: float = 300.0,
           threads: int = 1, **kwargs) -> list:
    """``fn(*args, **kwargs)`` on ``world_size`` ranks; per-rank results, or RuntimeError/TimeoutError."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, pg_timeout_s, threads,
                                                  results, args, kwargs)) for r in range(world_size)]
    for p in procs:
        p.start()
    got, errors = {}, {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) + len(errors) < world_size:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size}-rank benchmark group did not finish in {timeout_s}s")
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue.Empty:
                for i, p in enumerate(procs):
                    if p.exitcode not in (None, 0) and i not in got and i not in errors:
                        time.sleep(0.5)
                        try:
                            while True:
                                r, st, pl = results.get_nowait()
                                (got if st == "ok" else errors)[r] = pl
                        except queue.Empty:
                            pass
                        errors.setdefault(i, f"rank {i} exited with code {p.exitcode}")
                continue
            (got if status == "ok" else errors)[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("benchmark ranks failed:" + "".join(
            f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
    return [got[r] for r in range(world_size)]
