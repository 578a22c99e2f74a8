"""Live tensor bytes per rank, measured by tracking every storage the dispatcher allocates.

``LiveTensorTracker`` is a ``TorchDispatchMode``: each op's output storages are recorded (once per
storage, so views are free) with a ``weakref.finalize`` that records their release. Storages that
exist before the step (parameters, buffers, optimizer state, the input batch) are registered up
front. The result is an exact timeline of bytes held by tensors, independent of the allocator, the
device and the framework, the same for every method.

Why not ``torch.distributed._tools.mem_tracker.MemTracker``: in torch 2.13 it runs on CPU, but it
refuses a second iteration without ``reset_mod_stats`` and reports categories *at the moment of the
total peak* (its ACT at peak is ~0 when the peak falls in the optimizer step). We need the peak of
the activation part on its own, so we keep our own ~100-line tracker.

Categories after a step:
- ``static``: parameters, buffers, gradients, optimizer state, inputs (what exists outside the step
  or survives it as ``.grad`` / optimizer state);
- ``activation``: everything else: tensors saved for backward, temporaries, activation gradients,
  communication buffers.
Reported: ``peak_bytes`` (max of all live bytes, optimizer step included),
``peak_activation_bytes`` (max of the activation part alone during forward, backward and gradient
reduction, up to ``mark_backward_end``: the optimizer's own temporaries are not activations),
``activation_bytes_after_forward`` (activation part live when forward ends: what is
saved for backward), ``static_bytes``.
"""
from __future__ import annotations

import ctypes
import weakref
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_bytes(st: torch.UntypedStorage) -> int:
    return int(st.nbytes())


@dataclass
class MemoryReport:
    peak_bytes: int
    peak_activation_bytes: int
    activation_bytes_after_forward: int
    static_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


class LiveTensorTracker(TorchDispatchMode):
    """Track bytes of live tensor storages during one training step.

    Usage::

        tracker = LiveTensorTracker()
        tracker.register_static(model.parameters(), buffers, optimizer_state_tensors)
        with tracker:
            loss = step_forward(); tracker.mark_forward_end(); loss.backward(); opt.step()
        tracker.classify_static(p.grad for p in params, optimizer_state_tensors)
        report = tracker.report()
    """

    def __init__(self, record_ops: bool = False) -> None:
        super().__init__()
        self._record_ops = record_ops
        self._ops: list[str] = []  # creating op per record (record_ops=True only)
        self._ids: dict[int, int] = {}  # id(storage) -> record index (while alive)
        self._sizes: list[int] = []
        self._alive: list[bool] = []
        self._events: list[tuple[int, int]] = []  # (record index, +1 alloc / -1 free)
        self._static: set[int] = set()
        self._forward_end_event: int | None = None
        self._backward_end_event: int | None = None

    # -- recording ---------------------------------------------------------------------------
    def _track(self, st: torch.UntypedStorage, static: bool = False, op: str = "") -> int | None:
        if st.device.type == "meta":
            return None
        key = id(st)
        idx = self._ids.get(key)
        if idx is not None and self._alive[idx]:
            if static:
                self._static.add(idx)
            return idx
        idx = len(self._sizes)
        self._ids[key] = idx
        self._sizes.append(_storage_bytes(st))
        self._alive.append(True)
        if self._record_ops:
            self._ops.append(op)
        self._events.append((idx, +1))
        if static:
            self._static.add(idx)
        weakref.finalize(st, self._release, idx, key)
        return idx

    def _release(self, idx: int, key: int) -> None:
        self._alive[idx] = False
        self._events.append((idx, -1))
        if self._ids.get(key) == idx:
            del self._ids[key]

    def register_static(self, *tensor_iterables) -> None:
        """Storages that exist before the step: parameters, buffers, optimizer state, inputs."""
        for tensors in tensor_iterables:
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    self._track(t.untyped_storage(), static=True)

    def classify_static(self, *tensor_iterables) -> None:
        """After the step: mark gradients and optimizer state (created during the step) as static."""
        for tensors in tensor_iterables:
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    idx = self._ids.get(id(t.untyped_storage()))
                    if idx is not None:
                        self._static.add(idx)

    def mark_forward_end(self) -> None:
        self._forward_end_event = len(self._events)

    def mark_backward_end(self) -> None:
        """After backward and gradient reduction: the activation peak is taken up to here."""
        self._backward_end_event = len(self._events)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                try:
                    self._track(t.untyped_storage(), op=str(func) if self._record_ops else "")
                except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, ...)
                    pass
        return out

    def live_at_forward_end(self) -> list[tuple[str, int]]:
        """(creating op, bytes) of the activation storages live when forward ended (record_ops=True)."""
        alive: dict[int, bool] = {}
        for idx, sign in self._events[: self._forward_end_event]:
            alive[idx] = sign > 0
        return sorted(((self._ops[i] if self._ops else "?", self._sizes[i]) for i, a in alive.items()
                       if a and i not in self._static), key=lambda x: -x[1])

    # -- results -----------------------------------------------------------------------------
    def report(self) -> MemoryReport:
        total = act = peak = peak_act = 0
        act_after_forward = None
        for i, (idx, sign) in enumerate(self._events):
            if self._forward_end_event is not None and i == self._forward_end_event:
                act_after_forward = act
            delta = sign * self._sizes[idx]
            total += delta
            if idx not in self._static:
                act += delta
            peak = max(peak, total)
            if self._backward_end_event is None or i < self._backward_end_event:
                peak_act = max(peak_act, act)
        if act_after_forward is None:
            act_after_forward = act
        static = sum(self._sizes[i] for i in self._static if self._alive[i])
        return MemoryReport(
            peak_bytes=peak,
            peak_activation_bytes=peak_act,
            activation_bytes_after_forward=act_after_forward,
            static_bytes=static,
        )


def optimizer_state_tensors(optimizer: torch.optim.Optimizer):
    from lss_plugin.optim import local_state_tensors

    return local_state_tensors(optimizer)  # this rank's shard only when the state is sharded


# -- process resident set size ---------------------------------------------------------------

def release_free_heap() -> None:
    """Hand freed heap back to the OS (glibc), so the next RSS high-water mark starts lower."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_bytes(field: str):
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes; None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    """VmRSS of this process now (Linux); 0 where /proc is not available."""
    return _proc_status_bytes("VmRSS") or 0


def peak_rss_bytes() -> int:
    """VmHWM of this process (since the last reset), else ru_maxrss."""
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
