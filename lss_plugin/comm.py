"""The two fused collectives of LSS, over the sequence-parallel group, and their counters.

Forward: local ``k, v`` ([b, s_local, hkv, d] each) are packed into one buffer and gathered with
ONE ``all_gather_into_tensor`` (``start_gather_kv``). Backward: the key/value gradients for all L
positions are packed and handed back to their owners with ONE ``reduce_scatter_tensor`` (sum,
``start_reduce_scatter_kv``). KV heads travel un-repeated (GQA/MQA); the caller expands them
locally, after communication.

On a backend whose reduce-scatter is not at the wire's floor (``REDUCE_SCATTER_AS_ALL_REDUCE``: gloo)
the backward's collective is instead ONE ``all_to_all_single`` of the same owner-major buffer (rank j's
slice to rank j) and a local sum of the N received slices in rank order, recorded as
``REDUCE_SCATTER_A2A``: (N-1)/N of the buffer on the wire instead of an all-reduce's 2 (N-1)/N.

Payload bytes recorded per call = bytes of the assembled buffer (N x the packed local k, v):
``2 * b * L * hkv * d * itemsize`` for both collectives, plus, for the all-gather, N x the
80-byte call signature each rank appends (``lss_plugin.signature``). The reduce-scatter's itemsize
is that of the dtype it sends (float32 for half inputs by default: ``kv_grad_dtype``). With
sp_size 1 nothing is sent and nothing is recorded.

The sparse exchange (``kv_exchange="sparse"``, ``lss_plugin.exchange``) replaces the pair with ONE
``all_to_all_single`` each way (``start_exchange_kv``, ``start_return_dkv``): each rank sends each
peer only the tokens the plan says the peer's queries read, and gets the peers' dK, dV of those
tokens back. Payload recorded = the send buffer, which holds no token for the rank itself: the
information floor plus, forward, one signature row per peer.

All are asynchronous: they issue the collective with ``async_op=True`` and return a ``Pending``
whose ``wait()`` blocks until it is done and then unpacks (reorders into global positions);
``lss_plugin.attention`` pipelines head chunks with them. A blocking call is ``start_...(...).wait()``.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lss_plugin.exchange import ExchangePlan
from lss_plugin.sharding import rank_chunks


@dataclass
class CollectiveRecord:
    """Calls and payload bytes per collective name, filled while ``record_collectives`` is open."""

    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)

    def add(self, name: str, nbytes: int) -> None:
        self.calls[name] += 1
        self.bytes[name] += int(nbytes)


_ACTIVE_RECORDS: list[CollectiveRecord] = []  # diagnostics only; empty unless a test/bench listens
_LISTENERS: list = []  # see listen_to_collectives; empty unless the benchmark times


@contextlib.contextmanager
def record_collectives():
    """``with record_collectives() as rec: ...`` then read ``rec.calls`` and ``rec.bytes``."""
    record = CollectiveRecord()
    _ACTIVE_RECORDS.append(record)
    try:
        yield record
    finally:
        _ACTIVE_RECORDS.remove(record)


@contextlib.contextmanager
def listen_to_collectives(listener):
    """While open, tell ``listener`` about every started collective (the benchmark's timing,
    ``lss_plugin.bench.timing``): ``listener.issued(pending, work)`` once it is issued,
    ``listener.waiting(pending)`` and ``listener.waited(pending)`` around the blocking part of its
    ``wait()``. Collectives with nothing to send (a group of one) are not reported."""
    _LISTENERS.append(listener)
    try:
        yield listener
    finally:
        _LISTENERS.remove(listener)


class CollectiveError(RuntimeError):
    """A plugin collective failed or timed out (a peer died or stalled); says which and where."""


def _note(name: str, tensor: torch.Tensor) -> None:
    for record in _ACTIVE_RECORDS:
        record.add(name, tensor.numel() * tensor.element_size())


@contextlib.contextmanager
def counted_collective(name: str, group, tensor: torch.Tensor | None = None):
    """Count a collective (when ``tensor`` is given: its bytes under ``name``) and turn a backend failure
    into a ``CollectiveError`` naming it and its group; wrap both issuing a collective and waiting for it
    (``with counted_collective("all_to_all", group, send): dist.all_to_all_single(...)``)."""
    if tensor is not None:
        _note(name, tensor)
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - gloo/NCCL raise several types; all mean the same here
        try:
            ranks = dist.get_process_group_ranks(group)
        except Exception:  # noqa: BLE001
            ranks = "?"
        raise CollectiveError(
            f"lss_plugin: {name} over the process group of ranks {ranks} failed on rank "
            f"{dist.get_rank()} ({type(exc).__name__}: {exc}). A peer rank probably died or stalled "
            f"longer than the group's timeout."
        ) from exc


# torch >= 2.13 names the flat collectives *_single and deprecates the *_tensor spellings; both
# take an output that is the inputs concatenated along dim 0.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Pending:
    """A collective issued with ``async_op=True``. ``wait()`` blocks until it is done (a failure
    there is a ``CollectiveError`` too) and returns ``finish()``, the unpacking of what arrived.

    The buffers the backend reads and writes stay referenced here until ``wait()``: on CUDA,
    ProcessGroupNCCL runs the collective on its own stream, and a buffer handed back to the
    caching allocator early could be reused by the compute stream while NCCL still reads or
    writes it. ``wait()`` orders the current stream after NCCL's, so dropping them then is safe.
    On CPU, gloo runs the work on its own threads and ``wait()`` blocks this one.
    """

    def __init__(self, name: str, group, work, finish, buffers=()):
        self.name, self.group = name, group
        self._work, self._finish, self._buffers = work, finish, buffers
        if work is not None:
            for listener in _LISTENERS:
                listener.issued(self, work)

    @property
    def done(self) -> bool:
        return self._finish is None

    def wait(self):
        if self._finish is None:
            raise RuntimeError(f"lss_plugin: wait() called twice on a {self.name}")
        listeners = list(_LISTENERS) if self._work is not None else []
        for listener in listeners:
            listener.waiting(self)
        with counted_collective(self.name, self.group):
            if self._work is not None:
                self._work.wait()
        for listener in listeners:
            listener.waited(self)
        # the work object references its tensors too (gloo's, NCCL's): drop it with the buffers
        finish, self._finish, self._buffers, self._work = self._finish, None, (), None
        return finish()


class InFlight:
    """The collectives a schedule started and has not waited for yet (``with InFlight() as f:``).

    Leaving the block waits for whatever is left, so a schedule that stops early (a signature
    mismatch, on which every rank raises together; a local error) leaves no collective pending;
    except after a ``CollectiveError``: the group is broken and waiting again could only time out
    again, delaying the error."""

    def __init__(self):
        self._started: list[Pending] = []

    def start(self, pending: Pending) -> Pending:
        self._started = [p for p in self._started if not p.done] + [pending]  # waited ones are released
        return pending

    def __enter__(self) -> "InFlight":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        left, self._started = [p for p in self._started if not p.done], []
        if exc_type is not None and issubclass(exc_type, CollectiveError):
            return False
        for pending in left:
            try:
                pending.wait()
            except Exception:  # noqa: BLE001 - the error already propagating is the one to report
                if exc_type is None:
                    raise
        return False


def start_all_gather_flat(output: torch.Tensor, tensor: torch.Tensor, group, name="all_gather_into_tensor"):
    """Issue: output [N * tensor.shape[0], ...] = the ranks' ``tensor`` concatenated along dim 0."""
    with counted_collective(name, group, output):
        return _all_gather_flat(output, tensor, group=group, async_op=True)


def start_reduce_scatter_flat(output: torch.Tensor, tensor: torch.Tensor, group):
    """Issue: output = this rank's dim-0 slice of the sum of the ranks' ``tensor`` [N * output.shape[0], ...]."""
    with counted_collective("reduce_scatter_tensor", group, tensor):
        return _reduce_scatter_flat(output, tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)


def all_gather_flat(output: torch.Tensor, tensor: torch.Tensor, group, name="all_gather_into_tensor") -> None:
    """Blocking ``start_all_gather_flat``."""
    work = start_all_gather_flat(output, tensor, group, name)
    Pending(name, group, work, lambda: None, (output, tensor)).wait()


def reduce_scatter_flat(output: torch.Tensor, tensor: torch.Tensor, group) -> None:
    """Blocking ``start_reduce_scatter_flat``."""
    work = start_reduce_scatter_flat(output, tensor, group)
    Pending("reduce_scatter_tensor", group, work, lambda: None, (output, tensor)).wait()


def all_reduce_sum(tensor: torch.Tensor, group) -> None:
    """In-place sum over ``group``; nothing is sent (or counted) for a group of one."""
    if dist.get_world_size(group) > 1:
        with counted_collective("all_reduce", group, tensor):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def _chunk_moves(local_len: int, sp_size: int, layout: str):
    """(source rank, local offset, global offset, length) of every chunk of the sequence."""
    for rank in range(sp_size):
        for c in rank_chunks(local_len, rank, sp_size, layout):
            yield rank, c.local_start, c.global_start, c.length


def start_gather_kv(k: torch.Tensor, v: torch.Tensor, group, layout: str,
                    header: torch.Tensor | None = None) -> Pending:
    """Issue ONE all-gather of packed (k, v); ``wait()`` -> ([2, b, hkv, L, d] in global position
    order, headers).

    k, v: [b, s_local, hkv, d]. ``header`` ([n] in k's dtype, e.g. the call signature bit-cast)
    rides at the end of this rank's slice of the same collective; every rank gets all of them
    back as ``headers`` [N, n] (None without a header or with sp_size 1, where nothing is sent).
    """
    sp_size = dist.get_world_size(group)
    b, s_local, hkv, d = k.shape
    payload = 2 * k.numel()
    extra = 0 if header is None or sp_size == 1 else header.numel()
    send = k.new_empty((payload + extra,))  # [k; v; header] of this rank, one contiguous buffer
    packed = send[:payload].view(2, b, s_local, hkv, d)
    packed[0] = k
    packed[1] = v
    if sp_size == 1:  # nothing to send
        return Pending("all_gather_into_tensor", group, None,
                       lambda: (_in_global_order(packed.unsqueeze(0), layout), None))
    if extra:
        send[payload:] = header
    flat = send.new_empty((sp_size, payload + extra))  # rank-major: [N, 2*b*s_local*hkv*d + n]
    work = start_all_gather_flat(flat.view(-1), send, group)

    def finish():
        gathered = flat[:, :payload].view(sp_size, 2, b, s_local, hkv, d)  # [N, 2, b, s_local, hkv, d]
        headers = flat[:, payload:].clone() if extra else None  # [N, n]; a copy, so flat can be freed
        return _in_global_order(gathered, layout), headers

    return Pending("all_gather_into_tensor", group, work, finish, (send, flat))


def _in_global_order(gathered: torch.Tensor, layout: str) -> torch.Tensor:
    """[N, 2, b, s_local, hkv, d] rank-major -> [2, b, hkv, L, d] in global position order."""
    sp_size, _, b, s_local, hkv, d = gathered.shape
    kv = gathered.new_empty((2, b, hkv, s_local * sp_size, d))
    for rank, local_start, global_start, length in _chunk_moves(s_local, sp_size, layout):
        src = gathered[rank, :, :, local_start:local_start + length]  # [2, b, n, hkv, d]
        kv[:, :, :, global_start:global_start + length] = src.transpose(2, 3)
    return kv


# Backends whose reduce-scatter sends more than (N-1)/N of its buffer: torch's ProcessGroupGloo (2.13) runs
# reduce_scatter_tensor / _reduce_scatter_base as a clone and an all-reduce of the WHOLE buffer, then keeps
# its own chunk (``reduce_scatter_tensor_coalesced``): 2 (N-1)/N on the wire (measured: 1.502 x the buffer
# per rank at N = 4, docs/benchmark.md). NCCL's ring reduce-scatter is at the floor and stays.
REDUCE_SCATTER_AS_ALL_REDUCE = ("gloo",)
REDUCE_SCATTER = "reduce_scatter_tensor"  # record_collectives names of LSS's dK/dV collective, by route
REDUCE_SCATTER_A2A = "reduce_scatter_all_to_all"


def backend_of(group, device: torch.device) -> str:
    """The backend that runs ``group``'s collectives on ``device`` ("gloo", "nccl", ...)."""
    name = str(dist.get_backend(group)).lower()
    if ":" in name:  # a per-device configuration, "cpu:gloo,cuda:nccl"
        name = dict(pair.split(":", 1) for pair in name.split(",")).get(device.type, name)
    return name


def reduce_scatter_kv_name(backend: str) -> str:
    """What ``start_reduce_scatter_kv`` records (and names its Pending) on ``backend``."""
    return REDUCE_SCATTER_A2A if backend in REDUCE_SCATTER_AS_ALL_REDUCE else REDUCE_SCATTER


def start_reduce_scatter_kv(dkv: torch.Tensor, group, layout: str,
                            send_dtype: torch.dtype | None = None, *, route: str | None = None) -> Pending:
    """Issue ONE reduce-scatter (sum) of packed (dK, dV) [2, b, hkv, L, d]; ``wait()`` -> this
    rank's [2, b, s_local, hkv, d].

    Sent, summed and returned in ``send_dtype`` (default ``dkv``'s); the cast happens in the
    staging copy the reorder makes anyway, so ``dkv`` may be freed as soon as this returns.
    On a backend of ``REDUCE_SCATTER_AS_ALL_REDUCE`` the collective is an all-to-all of the staged
    buffer and ``wait()`` sums the N slices in rank order. ``route`` (tests and benchmarks comparing
    the two only): ``REDUCE_SCATTER`` or ``REDUCE_SCATTER_A2A`` forces one; None: the backend decides."""
    sp_size = dist.get_world_size(group)
    two, b, hkv, seq_len, d = dkv.shape
    s_local = seq_len // sp_size
    staged = dkv.new_empty((sp_size, 2, b, s_local, hkv, d), dtype=send_dtype or dkv.dtype)  # owner-major
    for rank, local_start, global_start, length in _chunk_moves(s_local, sp_size, layout):
        src = dkv[:, :, :, global_start:global_start + length]  # [2, b, hkv, n, d]
        staged[rank, :, :, local_start:local_start + length] = src.transpose(2, 3)
    if sp_size == 1:
        return Pending(REDUCE_SCATTER, group, None, lambda: staged[0])
    route = route or reduce_scatter_kv_name(backend_of(group, dkv.device))
    if route == REDUCE_SCATTER:
        out = staged.new_empty((2, b, s_local, hkv, d))
        work = start_reduce_scatter_flat(out, staged.view((sp_size * 2, b, s_local, hkv, d)), group)
        return Pending(REDUCE_SCATTER, group, work, lambda: out, (staged, out))
    if route != REDUCE_SCATTER_A2A:
        raise ValueError(f"route must be {REDUCE_SCATTER!r}, {REDUCE_SCATTER_A2A!r} or None, got {route!r}")
    received = torch.empty_like(staged)  # [N, 2, b, s_local, hkv, d]: slice j = rank j's part of this rank's dK, dV
    with counted_collective(REDUCE_SCATTER_A2A, group, staged):
        work = dist.all_to_all_single(received, staged, group=group, async_op=True)

    def finish():
        out = received[0].clone()
        for part in received[1:]:  # rank order, one add at a time: the same sum on every run
            out += part
        return out

    return Pending(REDUCE_SCATTER_A2A, group, work, finish, (staged, received))



# ---------------------------------------------------------------------------------------------
# The sparse exchange: what each peer's queries read, one all-to-all each way.
# ---------------------------------------------------------------------------------------------

SPARSE_KV = "sparse_kv_exchange"  # record_collectives names (the benchmark counts them as all_to_all)
SPARSE_DKV = "sparse_dkv_exchange"
_INDEX_CACHE: dict = {}  # (id(plan), rank, kind, device) -> (plan, index tensor): every layer reuses them
_INDEX_CACHE_MAX = 64


def _plan_indices(plan: ExchangePlan, rank: int, kind: str, device) -> torch.Tensor:
    """``send`` (this rank's local token indices, destination-major) or ``receive`` (global positions it
    gets, source-major) as an int64 tensor on ``device``, made once per plan."""
    key = (id(plan), rank, kind, str(device))
    hit = _INDEX_CACHE.get(key)
    if hit is not None and hit[0] is plan:
        return hit[1]
    values = plan.send_indices(rank) if kind == "send" else plan.receive_positions(rank)
    index = torch.tensor(values, dtype=torch.long, device=device)
    if len(_INDEX_CACHE) >= _INDEX_CACHE_MAX:
        _INDEX_CACHE.pop(next(iter(_INDEX_CACHE)))
    _INDEX_CACHE[key] = (plan, index)
    return index


def _own_positions(kv: torch.Tensor, local: torch.Tensor, plan: ExchangePlan, rank: int) -> None:
    """kv [2, b, hkv, L, d] at this rank's own global positions <- local [2, b, s_local, hkv, d]."""
    for c in rank_chunks(plan.local_len, rank, plan.lss_size, plan.layout):
        kv[:, :, :, c.global_start:c.global_start + c.length] = \
            local[:, :, c.local_start:c.local_start + c.length].transpose(2, 3)


def start_exchange_kv(k: torch.Tensor, v: torch.Tensor, group, plan: ExchangePlan, rank: int,
                      header: torch.Tensor | None = None) -> Pending:
    """Issue ONE all_to_all_single of the (k, v) tokens each peer reads; ``wait()`` -> ([2, b, hkv, L, d]
    in global position order, zero wherever no local query reads, headers [N, n] or None).

    k, v: [b, s_local, hkv, d]. Peer j's slice is its tokens [m_j, 2, b, hkv, d], then ``header`` (this
    rank's signature row); nothing goes to the rank itself. Zeros, not garbage, fill what is not
    read: a kernel tile may cover keys its band masks, and 0 * a NaN would not be 0."""
    n = plan.lss_size
    b, s_local, hkv, d = k.shape
    packed = torch.stack((k, v))  # [2, b, s_local, hkv, d]
    kv = k.new_zeros((2, b, hkv, plan.seq_len, d))
    _own_positions(kv, packed, plan, rank)
    if n == 1:
        return Pending(SPARSE_KV, group, None, lambda: (kv, None))
    token = 2 * b * hkv * d  # elements of one token's packed k, v
    extra = 0 if header is None else header.numel()
    chosen = packed.index_select(2, _plan_indices(plan, rank, "send", k.device))
    chosen = chosen.permute(2, 0, 1, 3, 4).reshape(-1)  # [m * 2 * b * hkv * d], destination-major tokens
    pieces, send_splits, offset = [], [], 0
    for dst in range(n):
        m = plan.tokens(rank, dst) * token
        if dst != rank:
            pieces.append(chosen[offset:offset + m])
            if extra:
                pieces.append(header)
        offset += m
        send_splits.append(0 if dst == rank else m + extra)
    send = torch.cat(pieces) if pieces else k.new_empty((0,))
    recv_splits = [0 if src == rank else plan.tokens(src, rank) * token + extra for src in range(n)]
    recv = send.new_empty((sum(recv_splits),))
    with counted_collective(SPARSE_KV, group, send):
        work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group, async_op=True)
    positions = _plan_indices(plan, rank, "receive", k.device)

    def finish():
        tokens, rows, offset = [], [], 0
        for src in range(n):
            if src == rank:
                rows.append(header)
                continue
            m = recv_splits[src] - extra
            tokens.append(recv[offset:offset + m])
            rows.append(recv[offset + m:offset + m + extra])
            offset += recv_splits[src]
        arrived = torch.cat(tokens).view(-1, 2, b, hkv, d)  # [M, 2, b, hkv, d], source-major
        kv.index_copy_(3, positions, arrived.permute(1, 2, 3, 0, 4))
        return kv, (torch.stack(rows) if extra else None)

    return Pending(SPARSE_KV, group, work, finish, (send, recv))


def start_return_dkv(dkv: torch.Tensor, group, plan: ExchangePlan, rank: int,
                     send_dtype: torch.dtype | None = None) -> Pending:
    """Issue ONE all_to_all_single handing each peer the dK, dV of its tokens this rank read (the forward
    plan reversed); ``wait()`` -> this rank's [2, b, s_local, hkv, d]: its own part plus every peer's, in
    ``send_dtype`` (default ``dkv``'s), summed in rank order. With no token read across ranks at all
    (a fact of the shared plan) nothing is issued on any rank."""
    n = plan.lss_size
    two, b, hkv, seq_len, d = dkv.shape
    dtype = send_dtype or dkv.dtype
    local = dkv.new_empty((2, b, plan.local_len, hkv, d), dtype=dtype)
    for c in rank_chunks(plan.local_len, rank, n, plan.layout):
        local[:, :, c.local_start:c.local_start + c.length] = \
            dkv[:, :, :, c.global_start:c.global_start + c.length].transpose(2, 3)
    if n == 1 or plan.floor_tokens == 0:
        return Pending(SPARSE_DKV, group, None, lambda: local)
    token = 2 * b * hkv * d
    positions = _plan_indices(plan, rank, "receive", dkv.device)
    send = dkv.index_select(3, positions).permute(3, 0, 1, 2, 4).to(dtype).reshape(-1)  # [M * token], source-major
    send_splits = [plan.tokens(peer, rank) * token for peer in range(n)]
    recv_splits = [plan.tokens(rank, peer) * token for peer in range(n)]
    recv = send.new_empty((sum(recv_splits),))
    with counted_collective(SPARSE_DKV, group, send):
        work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group, async_op=True)
    indices = _plan_indices(plan, rank, "send", dkv.device)

    def finish():
        offset = 0
        for peer in range(n):  # one index_add_ per peer: its indices are distinct, so the sum is deterministic
            m = recv_splits[peer] // token
            if m:
                part = recv[offset * token:(offset + m) * token].view(m, 2, b, hkv, d).permute(1, 2, 0, 3, 4)
                local.index_add_(2, indices[offset:offset + m], part)
            offset += m
        return local

    return Pending(SPARSE_DKV, group, work, finish, (send, recv))
