"""One benchmark case on every rank of a group: time, count and track one method at one length.

A case runs, on each rank: warm-up steps, timed steps (median), one step inside
``count_collectives`` (bytes and calls per collective type), one step inside the live-tensor tracker
(peak and activation bytes), and reads the process RSS high-water mark (reset at the case start).
Measurement steps are separate from timed steps, so neither tracker slows the timings.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from lss_plugin.bench import counters
from lss_plugin.bench.memory import (LiveTensorTracker, peak_rss_bytes, release_free_heap,
                                     reset_peak_rss)
from lss_plugin.bench.model import ModelDims, Trainer, Variant, build_model, make_batch, setup_parallel


BUDGET_REFERENCE = "lss[regather,contiguous]"


@dataclass(frozen=True)
class Case:
    variant: Variant
    dims: ModelDims
    seq_len: int
    batch_size: int = 1
    warmup: int = 1
    steps: int = 3
    sweep: str = "strong"  # strong | weak | budget
    attention: str = "mha"  # mha | gqa


@dataclass
class CaseResult:
    case: dict
    world_size: int
    rank: int
    loss: float
    step_times_s: list = field(default_factory=list)
    comm: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    peak_rss_bytes: int = 0
    error: str | None = None


def _barrier() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # a barrier alone does not wait for queued GPU work
    if dist.get_world_size() > 1:
        dist.barrier()


def tracked_step(trainer: Trainer, batch: dict) -> dict:
    """One step under the live-tensor tracker; its memory report."""
    gc.collect()
    tracker = LiveTensorTracker()
    trainer.zero()
    tracker.register_static(trainer.static_tensors(), batch.values())
    with tracker:
        loss_sum, n = trainer.forward(batch)
        tracker.mark_forward_end()
        trainer.backward(loss_sum, n)
        tracker.mark_backward_end()
        trainer.optimizer_step()
    tracker.classify_static(trainer.static_tensors())
    del loss_sum
    return tracker.report().to_dict()


def build(case: Case, world_size: int):
    setup_parallel(case.variant, world_size)
    model, optimizer = build_model(case.variant, case.dims, world_size)
    return Trainer(model, optimizer)


def teardown() -> None:
    from megatron.core import parallel_state

    from lss_plugin.topology import register_topology

    _barrier()
    parallel_state.destroy_model_parallel()
    register_topology(None)  # forget the LSS topology registered for this case
    # destroy_model_parallel only drops megatron's references: destroy the groups themselves, or
    # every case leaks their gloo threads (1,400 threads per rank after a full run, which then
    # starved the later cases of CPU).
    from torch.distributed import distributed_c10d as c10d

    for group in list(c10d._world.pg_map):
        if group is not c10d.GroupMember.WORLD:
            dist.destroy_process_group(group)
    gc.collect()
    release_free_heap()


def run_case(case: Case, world_size: int) -> CaseResult:
    """All measurements of one case on this rank (collective: every rank runs the same case)."""
    release_free_heap()
    reset_peak_rss()
    trainer = build(case, world_size)
    batch = make_batch(case.variant, case.seq_len, case.batch_size, case.dims.vocab_size, world_size)
    loss = trainer.step(batch)  # also creates the optimizer state and checks LSS signatures
    for _ in range(max(0, case.warmup - 1)):
        trainer.step(batch)
    times = []
    for _ in range(case.steps):
        _barrier()
        start = time.perf_counter()
        trainer.step(batch)
        _barrier()
        times.append(time.perf_counter() - start)
    with counters.count_collectives() as counts:
        trainer.step(batch)
    memory = tracked_step(trainer, batch)
    result = CaseResult(case=case_dict(case), world_size=world_size, rank=dist.get_rank(), loss=loss,
                        step_times_s=times, comm=counts.to_dict(), memory=memory,
                        peak_rss_bytes=peak_rss_bytes())
    del trainer, batch
    teardown()
    return result


def longest_fitting(variant: Variant, dims: ModelDims, world_size: int, budget_bytes: int | None,
                    unit: int, max_len: int, attention: str, batch_size: int = 1,
                    reference_len: int | None = None) -> dict:
    """Binary search of the longest L (multiple of ``unit``) whose tracked peak fits the budget.

    Peak = the maximum over ranks of the live-tensor tracker's peak bytes of one training step.
    Measured, not timed: every probe is one tracked step on the same model. ``budget_bytes=None``:
    the budget is this model's own peak at ``reference_len`` (measured first, same model).
    """
    case = Case(variant, dims, unit, batch_size, sweep="budget", attention=attention)
    trainer = build(case, world_size)
    trainer.step(make_batch(variant, unit, batch_size, dims.vocab_size, world_size))
    probes = {}

    def peak_at(units: int) -> int:
        _drop_megatron_global_buffer()  # it only grows: a longer earlier probe must not count here
        batch = make_batch(variant, units * unit, batch_size, dims.vocab_size, world_size)
        trainer.step(batch)  # first step at this length (LSS checks signatures once per shape)
        mem = tracked_step(trainer, batch)
        peak = torch.tensor([mem["peak_bytes"]], dtype=torch.int64)
        if world_size > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        probes[units * unit] = int(peak)
        return int(peak)

    if budget_bytes is None:
        if not reference_len or reference_len % unit:
            raise ValueError(f"a measured budget needs reference_len divisible by unit {unit}, got {reference_len}")
        budget_bytes = peak_at(reference_len // unit)
    # Gallop (double until it no longer fits), then bisect: no probe is more than ~2x the answer,
    # so methods with quadratic memory are never asked for a length far beyond their budget.
    top = max_len // unit
    if peak_at(1) > budget_bytes:
        lo = 0
    else:
        lo, hi = 1, top
        while lo < top:
            nxt = min(2 * lo, top)
            if peak_at(nxt) <= budget_bytes:
                lo = nxt
            else:
                hi = nxt - 1
                break
        while lo < hi:  # invariant: lo fits, hi + 1 does not (or is beyond the cap)
            mid = (lo + hi + 1) // 2
            if peak_at(mid) <= budget_bytes:
                lo = mid
            else:
                hi = mid - 1
    del trainer
    teardown()
    return {"variant": variant.name, "method": variant.method, "world_size": world_size,
            "attention": attention, "budget_bytes": budget_bytes, "longest_seq_len": lo * unit,
            "max_len_searched": max_len, "probes": probes}


def _drop_megatron_global_buffer() -> None:
    from megatron.core import parallel_state

    buffers = getattr(parallel_state, "_GLOBAL_MEMORY_BUFFER", None)
    if buffers is not None:
        buffers.buffer.clear()


def case_dict(case: Case) -> dict:
    d = asdict(case)
    d["variant_name"] = case.variant.name
    return d


def run_cases(cases, budget_jobs=(), world_size: int | None = None, progress=None) -> dict:
    """Worker body: every case, then every budget search; failures are recorded, not raised.

    The first budget job may have ``budget_bytes=None`` and a ``reference_len``: its own peak at
    that length becomes the budget of every later job (``budget_reference_bytes`` in the result).
    """
    world_size = world_size or dist.get_world_size()
    results, budgets = [], []
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        try:
            res = run_case(case, world_size)
        except Exception as e:  # noqa: BLE001 - one failing method must not hide the others
            import traceback

            res = CaseResult(case=case_dict(case), world_size=world_size, rank=dist.get_rank(),
                             loss=float("nan"), error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            _try_teardown()
        results.append(asdict(res))
        if progress:
            progress(f"[N={world_size}] case {i + 1}/{len(cases)} {case.variant.name} {case.sweep} "
                     f"{case.attention} L={case.seq_len}: {time.perf_counter() - t0:.1f}s"
                     + (" ERROR" if res.error else f" loss={res.loss:.4f}"))
    reference = None
    for job in budget_jobs:
        t0 = time.perf_counter()
        if job.get("budget_bytes") is None and reference is not None:
            job = dict(job, budget_bytes=reference, reference_len=None)
        try:
            out = longest_fitting(world_size=world_size, **job)
            if job.get("budget_bytes") is None:
                reference = out["budget_bytes"]
        except Exception as e:  # noqa: BLE001
            out = {"variant": job["variant"].name, "method": job["variant"].method,
                   "world_size": world_size, "attention": job["attention"],
                   "error": f"{type(e).__name__}: {e}"}
            _try_teardown()
        budgets.append(out)
        if progress:
            progress(f"[N={world_size}] budget {out['variant']} {out['attention']}: "
                     f"L={out.get('longest_seq_len')} ({time.perf_counter() - t0:.1f}s)")
    return {"cases": results, "budget": budgets, "budget_reference_bytes": reference}


def _try_teardown() -> None:
    try:
        teardown()
    except Exception:  # noqa: BLE001
        pass


def worker(cases, budget_jobs=()):
    """Entry point of each benchmark rank (module-level so that spawned ranks can import it)."""
    rank0 = dist.get_rank() == 0
    return run_cases(cases, budget_jobs, progress=(lambda m: print(m, flush=True)) if rank0 else None)
