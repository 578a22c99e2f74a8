"""When LSS's collectives were in flight and how long this rank blocked on them: the benchmark's overlap figures.

``with time_collectives() as timer: step()`` listens to ``lss_plugin.comm`` (``listen_to_collectives``) and
records, per started collective, its span (name, issued, finished) in ``time.perf_counter`` seconds, the
finish taken by a callback on the work's future, and the time this rank's thread spent blocked in its
``wait()``. ``hidden_fraction`` = 1 - blocked / busy, where busy is the time at least one collective was in
flight: the share of communication that overlapped computation. On CUDA the wait only orders streams, so
these are CPU-side times. Diagnostics only: nothing here changes what is computed or sent.
"""
from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lss_plugin.comm import listen_to_collectives


@dataclass
class CollectiveTimer:
    """``blocked_s`` per collective name; ``spans`` [name, issued, finished (None while in flight)]."""

    blocked_s: Counter = field(default_factory=Counter)
    spans: list = field(default_factory=list)
    _open: dict = field(default_factory=dict, repr=False)  # Pending -> [its span, when its wait() began]

    def issued(self, pending, work) -> None:
        span = [pending.name, time.perf_counter(), None]
        self.spans.append(span)
        self._open[pending] = [span, None]
        _when_done(work, lambda: _finished(span))

    def waiting(self, pending) -> None:
        if pending in self._open:
            self._open[pending][1] = time.perf_counter()

    def waited(self, pending) -> None:
        span, started = self._open.pop(pending, (None, None))
        if span is not None and started is not None:
            self.blocked_s[pending.name] += time.perf_counter() - started
            _finished(span)  # the future's callback may run just after wait() returns

    def busy_s(self) -> float:
        """Length of the union of the collectives' [issued, finished] intervals."""
        total, reach = 0.0, float("-inf")
        for _, start, end in sorted((s for s in self.spans if s[2] is not None), key=lambda s: s[1]):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total

    def hidden_fraction(self) -> float | None:
        busy = self.busy_s()
        return None if busy <= 0 else max(0.0, 1.0 - sum(self.blocked_s.values()) / busy)


@contextlib.contextmanager
def time_collectives():
    """``with time_collectives() as timer: ...`` then read ``timer.blocked_s``, ``busy_s()``, ``hidden_fraction()``."""
    with listen_to_collectives(CollectiveTimer()) as timer:
        yield timer


def quartiles(xs) -> tuple[float, float, float]:
    """First quartile, median and third quartile (inclusive method) of per-round figures."""
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def sync_ranks() -> None:
    """Line the ranks up between timed regions: queued GPU work finished, then a barrier over the world."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # a barrier alone does not wait for queued GPU work
    if dist.get_world_size() > 1:
        dist.barrier()


def _finished(span: list) -> None:
    if span[2] is None:
        span[2] = time.perf_counter()


def _when_done(work, callback) -> None:
    """Run ``callback()`` when ``work`` completes: on the work's future (the backend's thread), or,
    where the backend gives none (gloo's reduce-scatter), on a watcher thread that waits for it."""
    try:
        work.get_future().then(lambda _: callback())
    except RuntimeError:
        def watch():
            try:
                work.wait()
            except Exception:  # noqa: BLE001 - the caller's own wait() reports the failure
                pass
            callback()
        threading.Thread(target=watch, daemon=True).start()
