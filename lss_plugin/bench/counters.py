"""Count calls and bytes of every ``torch.distributed`` collective, the same way for every method.

The wrappers replace the public functions on ``torch.distributed`` and ``distributed_c10d`` once,
at process start, BEFORE Megatron or DeepSpeed are imported: Megatron binds
``dist_all_gather_func = torch.distributed.all_gather_into_tensor`` at import time, DeepSpeed's
``deepspeed.comm`` looks the function up on every call. Either way the wrapper is what runs.
Outside a ``count_collectives()`` block a wrapper only forwards the call.

Byte conventions (per rank, per call; the cost model in ``lss_plugin.plan`` uses the same):
- ``bytes``: payload = the assembled buffer of the collective on this rank: the output of an
  all-gather, the input of a reduce-scatter, the tensor of an all-reduce / broadcast, the input of an
  all-to-all, the tensor of a send or receive. Same convention as ``lss_plugin.comm``.
- ``sent_bytes``: what this rank puts on the wire with bandwidth-optimal algorithms (ring
  all-gather / reduce-scatter send (N-1)/N of the buffer, all-reduce 2(N-1)/N, all-to-all (N-1)/N,
  send the tensor, receive nothing; an all-to-all with split sizes sends all but its own slice).
  The targets compare ``sent_bytes``.
- ``wire_bytes``: what this rank really puts on the wire with the group's backend: ``sent_bytes``, but a one-tensor
  reduce-scatter on a backend that runs it as an all-reduce (``lss_plugin.comm.REDUCE_SCATTER_AS_ALL_REDUCE``:
  gloo) sends 2(N-1)/N of its input (the cost model's ``Plan.wire_by_type``).
Spellings of one collective share a row: ``all_gather`` (``all_gather_single``,
``all_gather_into_tensor``, ``_all_gather_base``, list form), ``reduce_scatter``, ``all_to_all``,
``send``/``recv`` (blocking or not). A call on a one-rank group counts as a call with 0 bytes.
A call nested inside another counted call (``_all_gather_base`` forwarding to
``all_gather_into_tensor``, say) is counted once, as the outer call.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from lss_plugin.comm import REDUCE_SCATTER_AS_ALL_REDUCE, backend_of

# name -> (which argument holds the payload tensor, wire factor as a function of group size N)
_COLLECTIVES = {
    "all_reduce": ("tensor", lambda n: 2 * (n - 1) / n),
    "all_gather_single": ("output_tensor", lambda n: (n - 1) / n),
    "all_gather_into_tensor": ("output_tensor", lambda n: (n - 1) / n),
    "_all_gather_base": ("output_tensor", lambda n: (n - 1) / n),
    "all_gather": ("tensor_list", lambda n: (n - 1) / n),
    "reduce_scatter_single": ("input", lambda n: (n - 1) / n),
    "reduce_scatter_tensor": ("input", lambda n: (n - 1) / n),
    "_reduce_scatter_base": ("input", lambda n: (n - 1) / n),
    "reduce_scatter": ("input_list", lambda n: (n - 1) / n),
    "all_to_all_single": ("input", lambda n: (n - 1) / n),
    "all_to_all": ("input_tensor_list", lambda n: (n - 1) / n),
    "broadcast": ("tensor", lambda n: 1.0 if n > 1 else 0.0),
    "reduce": ("tensor", lambda n: 1.0 if n > 1 else 0.0),
    "send": ("tensor", lambda n: 1.0),
    "isend": ("tensor", lambda n: 1.0),
    "recv": ("tensor", lambda n: 0.0),
    "irecv": ("tensor", lambda n: 0.0),
    "barrier": (None, lambda n: 0.0),
}
# Canonical names, so that two spellings of one collective are one row in the tables.
CANONICAL = {
    "all_gather_single": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "_all_gather_base": "all_gather",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "all_to_all_single": "all_to_all",
    "isend": "send",
    "irecv": "recv",
}
_P2P = {"send", "isend", "recv", "irecv"}
_ALL_REDUCE_WIRE = _COLLECTIVES["all_reduce"][1]


@dataclass
class CommCounts:
    """Per collective type (canonical name): calls, payload bytes, bytes sent by this rank (bandwidth-optimal
    convention) and on the wire (what its backend does)."""

    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    sent_bytes: Counter = field(default_factory=Counter)
    wire_bytes: Counter = field(default_factory=Counter)
    log: list = field(default_factory=list)  # (name, payload bytes, group size) per call, in order

    def add(self, name: str, nbytes: int, sent: float, group_size: int = 0, wire: float | None = None) -> None:
        name = CANONICAL.get(name, name)
        self.log.append((name, int(nbytes), int(group_size)))
        self.calls[name] += 1
        self.bytes[name] += int(nbytes)
        self.sent_bytes[name] += int(round(sent))
        self.wire_bytes[name] += int(round(sent if wire is None else wire))

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def total_sent_bytes(self) -> int:
        return sum(self.sent_bytes.values())

    @property
    def total_wire_bytes(self) -> int:
        return sum(self.wire_bytes.values())

    def to_dict(self) -> dict:
        return {
            "calls": dict(self.calls),
            "bytes": dict(self.bytes),
            "sent_bytes": dict(self.sent_bytes),
            "wire_bytes": dict(self.wire_bytes),
            "total_bytes": self.total_bytes,
            "total_sent_bytes": self.total_sent_bytes,
            "total_wire_bytes": self.total_wire_bytes,
            "log": [list(entry) for entry in self.log],
        }


_state = threading.local()
_ACTIVE: list[CommCounts] = []
_INSTALLED: dict[str, object] = {}  # name -> original function


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


def _group_size(group) -> int:
    if group is None:
        return dist.get_world_size()
    return dist.get_world_size(group)


def _make_wrapper(name: str, original):
    arg_name, factor = _COLLECTIVES[name]
    import inspect

    try:
        params = list(inspect.signature(original).parameters)
    except (TypeError, ValueError):
        params = []

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        depth = getattr(_state, "depth", 0)
        if not _ACTIVE or depth > 0:
            _state.depth = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                _state.depth = depth
        bound = dict(zip(params, args))
        bound.update(kwargs)
        payload = bound.get(arg_name) if arg_name else None
        nbytes = _nbytes(payload)
        if name in _P2P:
            n = 2
        else:
            n = _group_size(bound.get("group"))
        sent = nbytes * factor(n)
        splits = bound.get("input_split_sizes") if name == "all_to_all_single" else None
        if splits and n > 1:  # uneven splits (the sparse K/V exchange): all but this rank's own slice leaves it
            row_bytes = nbytes // max(payload.shape[0], 1)  # splits count rows of dim 0
            sent = (sum(splits) - splits[dist.get_rank(bound.get("group"))]) * row_bytes
        wire = sent
        if CANONICAL.get(name, name) == "reduce_scatter" and n > 1 and isinstance(payload, torch.Tensor) \
                and backend_of(bound.get("group"), payload.device) in REDUCE_SCATTER_AS_ALL_REDUCE:
            wire = nbytes * _ALL_REDUCE_WIRE(n)  # gloo: a clone and an all-reduce of the whole input
        for counts in _ACTIVE:
            counts.add(name, nbytes if n > 1 or name in _P2P else 0, sent, n, wire)
        _state.depth = depth + 1
        try:
            return original(*args, **kwargs)
        finally:
            _state.depth = depth

    wrapper.__lss_counting_wrapper__ = True
    return wrapper


_WRAPPERS: dict[int, object] = {}  # id(original function) -> its wrapper
_SCANNED_MODULES = 0


def install() -> None:
    """Wrap the collectives on ``torch.distributed`` and ``distributed_c10d`` (idempotent).

    References that modules took before (``_all_gather_flat = dist.all_gather_single`` at import
    time, as ``lss_plugin.comm`` and Megatron's ``mappings`` do) are re-pointed to the wrappers.
    """
    for name in _COLLECTIVES:
        original = getattr(c10d, name, None)
        if original is None or getattr(original, "__lss_counting_wrapper__", False):
            continue
        wrapper = _make_wrapper(name, original)
        _INSTALLED[name] = original
        _WRAPPERS[id(original)] = wrapper
        setattr(c10d, name, wrapper)
        if getattr(dist, name, None) is original:
            setattr(dist, name, wrapper)
    _rebind_module_references()


def _rebind_module_references() -> None:
    """Replace module-level references to the original functions in every loaded module."""
    global _SCANNED_MODULES
    import sys

    modules = list(sys.modules.values())
    if len(modules) == _SCANNED_MODULES:
        return
    originals = set(_WRAPPERS)
    for module in modules:
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict) or module is c10d:
            continue
        for attr, value in list(namespace.items()):
            if callable(value) and id(value) in originals and value is _INSTALLED.get(value.__name__):
                namespace[attr] = _WRAPPERS[id(value)]
    _SCANNED_MODULES = len(modules)


def wrap_collectives(decorate) -> None:
    """Put ``decorate(name, fn)`` around every counting wrapper (``name``: the canonical collective name),
    e.g. the two-speed benchmark's timer, and re-point every module reference to it (later rebinds too)."""
    import sys

    global _SCANNED_MODULES
    install()
    replaced = {}  # id(counting wrapper) -> (counting wrapper, decorated)
    for name in _COLLECTIVES:
        wrapped = getattr(c10d, name, None)
        if wrapped is None or name not in _INSTALLED:
            continue
        new = decorate(CANONICAL.get(name, name), wrapped)
        _WRAPPERS[id(_INSTALLED[name])] = new
        replaced[id(wrapped)] = (wrapped, new)
        setattr(c10d, name, new)
        setattr(dist, name, new)
    for module in list(sys.modules.values()):  # modules that took the counting wrapper at install()
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict) or module is c10d:
            continue
        for attr, value in list(namespace.items()):
            if id(value) in replaced and replaced[id(value)][0] is value:
                namespace[attr] = replaced[id(value)][1]
    _SCANNED_MODULES = 0


def is_installed() -> bool:
    return bool(_INSTALLED)


@contextlib.contextmanager
def count_collectives():
    """``with count_collectives() as counts: step()`` then read ``counts.calls / bytes / sent_bytes``."""
    if not _INSTALLED:
        raise RuntimeError("lss_plugin.bench.counters.install() must run before counting")
    _rebind_module_references()  # modules imported since install() may hold originals
    counts = CommCounts()
    _ACTIVE.append(counts)
    try:
        yield counts
    finally:
        _ACTIVE.remove(counts)
