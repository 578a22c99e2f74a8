"""The benchmark on every rank of one launch: measure each case, then time all cases round-robin.

Per case, on each rank: warm-up steps, one step inside ``count_collectives`` (bytes and calls per
collective type, and which attention ops ran), one step inside the live-tensor tracker (peak and
activation bytes), the process RSS high-water mark. Then the timing: ``repetitions`` rounds; in
each round every case runs ``steps`` timed steps, cases in a rotated order, so that load that
comes and goes on a shared machine hits every method alike and ratios can be paired per round.
Each timed step sits between two barriers. Measurement steps are separate from timed steps, so
neither tracker slows the timings. Cases attending with ``lss_attention`` run one more, untimed step
per round inside ``timing.time_collectives`` (``comm_timing``: the busy and blocked seconds of LSS's
collectives and the hidden fraction 1 - blocked / busy, per round), so the listener's callbacks stay
out of the timed steps.
"""
from __future__ import annotations

import gc
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from lss_plugin.bench import counters
from lss_plugin.bench.context import Contexts
from lss_plugin.bench.memory import LiveTensorTracker, peak_rss_bytes, release_free_heap, reset_peak_rss
from lss_plugin.bench.methods import method_of
from lss_plugin.bench.model import ModelDims, Trainer, Variant, build_model, make_batch
from lss_plugin.bench.timing import sync_ranks, time_collectives

BUDGET_REFERENCE = "lss[regather,contiguous]"


@dataclass(frozen=True)
class Case:
    variant: Variant
    dims: ModelDims
    seq_len: int
    batch_size: int = 1
    warmup: int = 1
    steps: int = 3  # timed steps per repetition
    sweep: str = "strong"  # strong | weak | budget
    attention: str = "mha"  # mha | gqa
    doc_len: int | None = None  # packed documents of about this many tokens (None: one sequence)
    link_gbit: float | None = None  # the configured rate of the link the launch runs behind (None: no limit)


@dataclass
class CaseResult:
    case: dict
    world_size: int
    rank: int
    loss: float
    step_times_s: list = field(default_factory=list)  # one list of step times per repetition
    comm_timing: list = field(default_factory=list)  # LSS methods: per repetition, busy/blocked s, hidden fraction
    comm: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    attention_ops: list = field(default_factory=list)
    peak_rss_bytes: int = 0
    error: str | None = None


class AttentionOpProbe(TorchDispatchMode):
    """Records which attention kernels run: SDPA-family ops, or the dense baddbmm/softmax/bmm path."""

    _DENSE = {"aten.baddbmm", "aten._softmax", "aten.bmm"}
    _FUSED = re.compile(r"scaled_dot_product|flash_attention|efficient_attention")

    def __init__(self):
        super().__init__()
        self.ops: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in self._DENSE or self._FUSED.search(name):
            self.ops.add(name)
        return func(*args, **(kwargs or {}))


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


def timed_steps(trainer: Trainer, batch: dict, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        sync_ranks()
        start = time.perf_counter()
        trainer.step(batch)
        sync_ranks()
        times.append(time.perf_counter() - start)
    return times


def collective_timing(trainer: Trainer, batch: dict) -> dict:
    """One untimed step inside ``time_collectives``: how long LSS's collectives were in flight (busy),
    how long this rank waited for them (blocked) and the share hidden behind computation."""
    sync_ranks()
    with time_collectives() as timer:
        trainer.step(batch)
    sync_ranks()
    return {"busy_s": timer.busy_s(), "blocked_s": sum(timer.blocked_s.values()),
            "hidden_fraction": timer.hidden_fraction()}


def build(case: Case, world_size: int, contexts: Contexts, dims: ModelDims | None = None) -> Trainer:
    context = contexts.get(method_of(case.variant).layout(world_size))
    model, optimizer = build_model(case.variant, dims or case.dims, world_size, context, case.link_gbit)
    return Trainer(model, optimizer)


def measure_case(case: Case, world_size: int, contexts: Contexts):
    """Warm-up, counters, attention ops, memory and RSS of one case; (result, trainer, batch)."""
    release_free_heap()
    reset_peak_rss()
    trainer = build(case, world_size, contexts)
    # Megatron's global buffer lives in the shared context: start from what this method allocates
    contexts.get(method_of(case.variant).layout(world_size)).drop_attention_buffer()
    batch = make_batch(case.variant, case.seq_len, case.batch_size, case.dims.vocab_size, world_size,
                       doc_len=case.doc_len)
    loss = trainer.step(batch)  # also creates the optimizer state and checks LSS signatures
    for _ in range(max(0, case.warmup - 1)):
        trainer.step(batch)
    probe = AttentionOpProbe()
    with counters.count_collectives() as counts, probe:
        trainer.step(batch)
    memory = tracked_step(trainer, batch)
    result = CaseResult(case=case_dict(case), world_size=world_size, rank=dist.get_rank(), loss=loss,
                        comm=counts.to_dict(), memory=memory, attention_ops=sorted(probe.ops),
                        peak_rss_bytes=peak_rss_bytes())
    return result, trainer, batch


def longest_fitting(variant: Variant, dims: ModelDims, world_size: int, contexts: Contexts,
                    budget_bytes: int | None, unit: int, max_len: int, attention: str,
                    batch_size: int = 1, reference_len: int | None = None) -> dict:
    """The longest L (multiple of ``unit``, to ~6%) whose tracked peak fits the budget.

    Peak = the maximum over ranks of the live-tensor tracker's peak bytes of one training step.
    Each probe builds the model for its own length: the learned position table has exactly L
    rows, as a model trained at L would (a table sized for the longest probe would put a static
    floor under every short probe). ``budget_bytes=None``: the budget is this method's own peak
    at ``reference_len`` (measured first).
    """
    context = contexts.get(method_of(variant).layout(world_size))
    probes = {}

    def peak_at(units: int) -> int:
        seq_len = units * unit
        context.activate().drop_attention_buffer()
        case = Case(variant, replace(dims, max_positions=seq_len), seq_len, batch_size, sweep="budget",
                    attention=attention)
        trainer = build(case, world_size, contexts, case.dims)
        batch = make_batch(variant, seq_len, batch_size, dims.vocab_size, world_size)
        trainer.step(batch)  # first step at this length (LSS checks signatures once per shape)
        mem = tracked_step(trainer, batch)
        del trainer, batch
        gc.collect()
        peak = torch.tensor([mem["peak_bytes"]], dtype=torch.int64)
        if world_size > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        probes[seq_len] = int(peak)
        return int(peak)

    if budget_bytes is None:
        if not reference_len or reference_len % unit:
            raise ValueError(f"a measured budget needs reference_len divisible by unit {unit}, got {reference_len}")
        budget_bytes = peak_at(reference_len // unit)
    # Gallop (double until it no longer fits), then bisect to ~6%: no probe is more than ~2x the
    # answer, so methods with quadratic memory are never asked for a length far beyond their budget.
    top = max_len // unit
    if peak_at(1) > budget_bytes:
        lo = hi = 0
    else:
        lo, hi = 1, top
        while lo < top:
            nxt = min(2 * lo, top)
            if peak_at(nxt) <= budget_bytes:
                lo = nxt
            else:
                hi = nxt - 1
                break
        while hi - lo > max(0, lo // 16):  # invariant: lo fits, hi + 1 does not (or is the cap)
            mid = (lo + hi + 1) // 2
            if peak_at(mid) <= budget_bytes:
                lo = mid
            else:
                hi = mid - 1
    return {"variant": variant.name, "method": variant.method, "world_size": world_size,
            "attention": attention, "budget_bytes": budget_bytes, "longest_seq_len": lo * unit,
            "upper_bound": (hi + 1) * unit, "max_len_searched": max_len, "probes": probes}


def case_dict(case: Case) -> dict:
    d = asdict(case)
    d["variant_name"] = case.variant.name
    return d


def _failed(case: Case, world_size: int, exc: Exception) -> CaseResult:
    import traceback

    return CaseResult(case=case_dict(case), world_size=world_size, rank=dist.get_rank(),
                      loss=float("nan"), error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")


def run_cases(cases, budget_jobs=(), world_size: int | None = None, repetitions: int = 1,
              progress=None) -> dict:
    """Worker body: measure every case, time them round-robin, then every budget search.

    Failures are recorded, not raised. The first budget job may have ``budget_bytes=None`` and a
    ``reference_len``: its own peak at that length becomes the budget of every later job
    (``budget_reference_bytes`` in the result).
    """
    world_size = world_size or dist.get_world_size()
    say = progress or (lambda msg: None)
    contexts = Contexts()
    results, live = [], []  # live: (index, trainer, batch) of the cases to time
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        try:
            res, trainer, batch = measure_case(case, world_size, contexts)
            if case.steps > 0:
                live.append((i, trainer, batch))
            else:
                del trainer, batch
        except Exception as e:  # noqa: BLE001 - one failing method must not hide the others
            res = _failed(case, world_size, e)
        results.append(res)
        say(f"[N={world_size}] measured {i + 1}/{len(cases)} {case.variant.name} {case.sweep} "
            f"{case.attention} L={case.seq_len}: {time.perf_counter() - t0:.1f}s"
            + (f" ERROR {res.error.splitlines()[0]}" if res.error else f" loss={res.loss:.4f}"))
    load = [os.getloadavg()[0]]
    for rep in range(repetitions if live else 0):
        t0 = time.perf_counter()
        shift = rep % len(live)
        for i, trainer, batch in live[shift:] + live[:shift]:  # rotated: no case always follows another
            case = cases[i]
            contexts.get(method_of(case.variant).layout(world_size))
            results[i].step_times_s.append(timed_steps(trainer, batch, case.steps))
            if method_of(case.variant).runs_lss:
                results[i].comm_timing.append(collective_timing(trainer, batch))
        load.append(os.getloadavg()[0])
        say(f"[N={world_size}] timing round {rep + 1}/{repetitions}: {len(live)} cases, "
            f"{time.perf_counter() - t0:.1f}s, load average {load[-1]:.2f}")
    del live
    gc.collect()
    budgets, reference = [], None
    for job in budget_jobs:
        t0 = time.perf_counter()
        if job.get("budget_bytes") is None and reference is not None:
            job = dict(job, budget_bytes=reference, reference_len=None)
        try:
            out = longest_fitting(world_size=world_size, contexts=contexts, **job)
            if job.get("budget_bytes") is None:
                reference = out["budget_bytes"]
        except Exception as e:  # noqa: BLE001
            out = {"variant": job["variant"].name, "method": job["variant"].method,
                   "world_size": world_size, "attention": job["attention"],
                   "error": f"{type(e).__name__}: {e}"}
        budgets.append(out)
        say(f"[N={world_size}] budget {out['variant']} {out['attention']}: "
            f"L={out.get('longest_seq_len')} ({time.perf_counter() - t0:.1f}s)")
    contexts.destroy()
    release_free_heap()
    return {"cases": [asdict(r) for r in results], "budget": budgets,
            "budget_reference_bytes": reference, "load_average": load}


def worker(cases, budget_jobs=(), repetitions: int = 1):
    """Entry point of each benchmark rank (module-level so that spawned ranks can import it)."""
    rank0 = dist.get_rank() == 0
    return run_cases(cases, budget_jobs, repetitions=repetitions,
                     progress=(lambda m: print(m, flush=True)) if rank0 else None)
