"""Cost model: per-rank memory and communication per training step, LSS and the baselines.

``python -m lss_plugin.plan`` prints PREDICTIONS (nothing is run) for the paper's setting and a
modern one; ``--layers/--hidden/...`` plan any other. The model is the benchmark's: a megatron-core
GPT (local spec: LayerNorm, GELU MLP with biases, learned positions, tied embeddings), megatron
DDP with fp32 main grads, Adam. ``tests/test_plan.py`` checks it against the benchmark's measured
counters at small sizes: communication bytes exactly, memory within 10%.

Communication (per rank, per step): every collective as (type, payload bytes, group size, calls),
with the payload convention of ``lss_plugin.bench.counters`` (assembled buffer), and bytes sent
per rank under bandwidth-optimal algorithms, and ``wire`` bytes: what the backend really sends
(``Setup.backend``; gloo's reduce-scatter sends what an all-reduce sends). LSS's dK,dV collective is a
reduce-scatter on NCCL and, on gloo, an all-to-all of the same buffer (``lss_plugin.comm``), so its wire
bytes are (N-1)/N of the buffer on both. Memory (per rank): parameters, gradients, optimizer
state, activations saved for backward, and the transient K/V buffer of LSS.

Masks and documents (``Setup.window / chunk / documents``) change only LSS's bytes, and only with
``kv_exchange="sparse"`` (or ``"auto"`` resolved to it): then its collectives follow
``lss_plugin.exchange``'s plan, rank by rank. ``information_floor`` is what any scheme that leaves
queries on their rank must move under those masks; ``kv_bytes_against_floor`` puts each scheme's K/V
bytes beside it (``python -m lss_plugin.plan --floor``). The memory model does not follow the
sparse exchange (its staging buffers are smaller; the K/V buffer is still all L positions).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from lss_plugin.comm import REDUCE_SCATTER_AS_ALL_REDUCE
from lss_plugin.documents import check_cu_seqlens
from lss_plugin.exchange import ExchangePlan, exchange_plan, resolve_kv_exchange
from lss_plugin.masks import MaskSpec
from lss_plugin.options import (check_kv_exchange, check_kv_grad_dtype, check_layout, check_ulysses_heads,
                                ulysses_kv_heads)
from lss_plugin.signature import SIGNATURE_BYTES
from lss_plugin.verdict import ROW_BYTES as VERDICT_ROW_BYTES

METHODS = ("single", "megatron_tp_sp", "lss", "ulysses", "ring", "allgather_cp", "usp", "lss_ulysses")
SP_METHODS = ("lss", "ulysses", "ring", "allgather_cp", "usp", "lss_ulysses")
ULYSSES_METHODS = ("usp", "lss_ulysses")  # the SP methods split into Ulysses groups of ``ulysses`` ranks
_WIRE = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
         "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n,
         "send": lambda n: 1.0, "recv": lambda n: 0.0}
BACKENDS = ("nccl", "gloo")


@dataclass(frozen=True)
class GPTSpec:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int | None = None
    ffn_hidden_size: int | None = None
    vocab_size: int = 256
    max_positions: int | None = None  # learned position table rows (default: the sequence length)

    @property
    def hkv(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size


@dataclass(frozen=True)
class Setup:
    """How the model is spread: method, SP/DP/TP sizes, K/V backward mode, dtype, batch.

    ``lss`` with ``tp > 1`` is LSS over ``sp`` ranks x Megatron TP + SP over ``tp`` ranks (the
    benchmark's ``lss_tp``): each TP rank gathers its ``hkv / tp`` KV heads over its SP group.
    ``usp`` and ``lss_ulysses`` (issue 17's hybrid: all-to-all inside Ulysses groups of ``ulysses``
    consecutive ranks, LSS's fused K/V gather across them) take the Ulysses group size ``ulysses``.
    """

    method: str
    sp: int = 1
    dp: int = 1
    tp: int = 1
    kv_backward: str = "keep"  # lss only: keep | regather
    kv_head_chunk: int | None = None  # lss only: KV heads gathered per collective (None: all)
    kv_grad_dtype: str = "fp32"  # lss only: dK,dV reduce-scatter of half inputs in fp32 | input dtype
    dtype_bytes: int = 4  # parameters and activations (fp32 4, bf16 2)
    batch_size: int = 1  # sequences per rank (micro-batch)
    kernel: str = "fused"  # single / megatron_tp_sp: fused (SDPA) | unfused (Megatron's dense local)
    ulysses: int | None = None  # usp / lss_ulysses: Ulysses group size (the other axis has sp / ulysses ranks)
    # lss / lss_ulysses: gather (the all-gather, whatever the masks) | sparse | auto (lss_plugin.exchange);
    # "gather" here although the library's default is "auto": "auto" resolves to gather for a full causal
    # mask, and every figure planned before the sparse exchange stays what it was
    kv_exchange: str = "gather"
    layout: str = "balanced"  # which tokens an SP rank holds (what the sparse exchange's plan reads)
    # the masks and documents of every layer (lss_attention's keywords): a (left, right) window, chunked
    # attention of ``chunk`` positions, global document boundaries (0, ..., L) (None: one document)
    causal: bool = True
    window: tuple[int, int] | None = None
    chunk: int | None = None
    documents: tuple[int, ...] | None = None
    # what runs the collectives: on gloo LSS's dK,dV go as an all-to-all (lss_plugin.comm), and every other
    # reduce-scatter sends (in ``Plan.wire_bytes``) what an all-reduce sends
    backend: str = "nccl"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.kernel not in ("fused", "unfused") or (self.kernel == "unfused" and self.method in SP_METHODS):
            raise ValueError(f"kernel must be 'fused', or 'unfused' for single/megatron_tp_sp; got "
                             f"{self.kernel!r} for {self.method}")
        if (self.method in ULYSSES_METHODS) != (self.ulysses is not None) or (
                self.ulysses is not None and (self.ulysses < 1 or self.sp % self.ulysses)):
            raise ValueError(f"ulysses (the Ulysses group size of {'/'.join(ULYSSES_METHODS)}) must divide "
                             f"sp({self.sp}) and is for those only; got ulysses={self.ulysses} for {self.method}")
        if self.method == "megatron_tp_sp" and self.sp != 1:
            raise ValueError(f"megatron_tp_sp splits the sequence over its TP group: sp must be 1, got {self.sp}")
        if self.kv_head_chunk is not None and (self.method != "lss" or self.kv_head_chunk < 1):
            raise ValueError(f"kv_head_chunk applies to lss only (not modelled for {self.method}) and "
                             f"must be >= 1, got {self.kv_head_chunk}")
        check_kv_grad_dtype(self.kv_grad_dtype)
        check_kv_exchange(self.kv_exchange)
        if isinstance(self.window, list):  # lss_attention takes a list too
            object.__setattr__(self, "window", tuple(self.window))
        if self.documents is not None:
            object.__setattr__(self, "documents", tuple(int(x) for x in self.documents))
        if self.kv_exchange != "gather" and self.method not in ("lss", "lss_ulysses"):
            raise ValueError(f"kv_exchange={self.kv_exchange!r} is LSS's (lss, lss_ulysses), not {self.method}'s")
        check_layout(self.layout)
        self.masks  # validates window and chunk, naming them
        if self.method in SP_METHODS and self.method != "lss" and self.tp != 1:
            raise ValueError(f"{self.method} with tp={self.tp} is not modelled (tp must be 1)")
        if self.method == "single" and (self.sp, self.tp) != (1, 1):
            raise ValueError(f"single runs on one rank per replica: sp=tp=1, got sp={self.sp}, tp={self.tp}")

    @property
    def world_size(self) -> int:
        return self.sp * self.dp * self.tp

    @property
    def masks(self) -> MaskSpec:
        return MaskSpec(self.causal, self.window, self.chunk)

    def bounds(self, seq_len: int) -> tuple[int, ...]:
        """The document boundaries of a sequence of ``seq_len`` tokens, checked as lss_attention checks them."""
        if self.documents is None:
            return (0, seq_len)
        return check_cu_seqlens(torch.tensor(self.documents), seq_len)


@dataclass
class Collective:
    """``calls`` calls of one collective, ``payload_bytes`` each (the counters' convention).

    ``group`` names which ranks of the SP group take part (``lss_plugin.plan_links`` routes the
    bytes by it): ``sp`` all N, ``ulysses`` the U consecutive ranks of a Ulysses group, ``strided``
    the R = N / U ranks with the same index in every Ulysses group (USP's ring, the hybrid's LSS
    group); ``tp`` Megatron's TP group; ``dp_sp`` / ``dp`` the gradient all-reduce; ``verdict`` LSS's
    fixed-size check over the SP group (left out of the link model: latency, not bandwidth).
    """

    type: str
    payload_bytes: int  # per call
    group_size: int
    calls: int
    what: str = ""
    group: str = ""
    # per call, when the wire is not the type's share of the payload: the sparse exchange's all-to-all
    # with split sizes sends its whole send buffer (it holds nothing for the rank itself)
    wire_bytes: int | None = None

    @property
    def total_payload(self) -> int:
        return self.payload_bytes * self.calls if self.group_size > 1 or self.type in ("send", "recv") else 0

    @property
    def total_sent(self) -> int:
        if self.group_size <= 1 and self.type not in ("send", "recv"):
            return 0
        if self.wire_bytes is not None:
            return self.wire_bytes * self.calls
        return int(round(self.payload_bytes * _WIRE[self.type](self.group_size))) * self.calls

    def total_wire(self, backend: str) -> int:
        """What ``backend`` really sends for all calls (the counters' ``wire_bytes``): ``total_sent``, but
        a reduce-scatter on a backend that runs it as an all-reduce sends what the all-reduce sends."""
        if self.type == "reduce_scatter" and backend in REDUCE_SCATTER_AS_ALL_REDUCE and self.group_size > 1:
            return int(round(self.payload_bytes * _WIRE["all_reduce"](self.group_size))) * self.calls
        return self.total_sent


@dataclass
class Plan:
    spec: GPTSpec
    setup: Setup
    seq_len: int
    params_per_rank: int
    memory: dict
    collectives: list = field(default_factory=list)

    @property
    def payload_bytes(self) -> int:
        return sum(c.total_payload for c in self.collectives)

    @property
    def sent_bytes(self) -> int:
        return sum(c.total_sent for c in self.collectives)

    @property
    def wire_bytes(self) -> int:
        return sum(c.total_wire(self.setup.backend) for c in self.collectives)

    def wire_by_type(self) -> dict:
        out: dict = {}
        for c in self.collectives:
            out[c.type] = out.get(c.type, 0) + c.total_wire(self.setup.backend)
        return out

    def bytes_by_type(self) -> dict:
        out: dict = {}
        for c in self.collectives:
            out[c.type] = out.get(c.type, 0) + c.total_payload
        return out

    def sent_by_type(self) -> dict:
        out: dict = {}
        for c in self.collectives:
            out[c.type] = out.get(c.type, 0) + c.total_sent
        return out

    def calls_by_type(self) -> dict:
        out: dict = {}
        for c in self.collectives:
            out[c.type] = out.get(c.type, 0) + c.calls
        return out

    def to_dict(self) -> dict:
        return {"spec": asdict(self.spec), "setup": asdict(self.setup), "seq_len": self.seq_len,
                "params_per_rank": self.params_per_rank, "memory": self.memory,
                "payload_bytes": self.payload_bytes, "sent_bytes": self.sent_bytes, "wire_bytes": self.wire_bytes,
                "collectives": [asdict(c) for c in self.collectives]}


# -- parameters ------------------------------------------------------------------------------

def parameter_counts(spec: GPTSpec, seq_len: int, tp: int = 1) -> dict:
    """Parameters held by one rank, by kind: ``sharded`` (split over TP) and ``replicated``."""
    h, dh = spec.hidden_size, spec.head_dim
    qkv_out = (spec.num_heads + 2 * spec.hkv) * dh
    positions = spec.max_positions or seq_len
    per_layer_sharded = (h * qkv_out + qkv_out  # QKV weight + bias (column parallel)
                         + spec.num_heads * dh * h  # proj weight (row parallel)
                         + h * spec.ffn + spec.ffn  # fc1 weight + bias (column parallel)
                         + spec.ffn * h)  # fc2 weight (row parallel)
    per_layer_replicated = 2 * 2 * h + 2 * h  # two LayerNorms; proj and fc2 biases
    sharded = spec.num_layers * per_layer_sharded + spec.vocab_size * h  # + word embedding (tied)
    replicated = spec.num_layers * per_layer_replicated + 2 * h + positions * h  # final LN, positions
    if sharded % tp:
        raise ValueError(f"tensor-parallel size {tp} does not divide the sharded parameters")
    # norms and row-parallel biases are sequence-parallel params: their grads are all-reduced over TP
    sequence_parallel = spec.num_layers * per_layer_replicated + 2 * h
    return {"sharded": sharded // tp, "replicated": replicated, "total": sharded // tp + replicated,
            "sequence_parallel": sequence_parallel}


# -- communication ---------------------------------------------------------------------------

def collectives(spec: GPTSpec, seq_len: int, s: Setup, rank: int | None = None) -> list[Collective]:
    """Every collective of one training step on one rank (forward, backward, grads, optimizer).

    ``rank``: the rank's index in its SP group, which sets its bytes under the sparse K/V exchange
    (ranks read different keys); None: the busiest rank (``busiest_lss_rank``). Otherwise every
    rank of a setup moves the same bytes."""
    b, h, dh, dt, layers = s.batch_size, spec.hidden_size, spec.head_dim, s.dtype_bytes, spec.num_layers
    grad_bytes = 4  # megatron DDP keeps fp32 main grads (grad_reduce_in_fp32)
    params = parameter_counts(spec, seq_len, s.tp)
    out: list[Collective] = []
    if s.method in SP_METHODS:
        n = s.sp
        s_local = seq_len // n
        block = 2 * b * s_local * spec.hkv * dh * dt  # packed K,V of one rank (tp is 1 but for lss)
        if s.method == "lss":
            out += _lss_kv_collectives(spec, seq_len, spec.hkv // s.tp, n, 1, s, rank, "sp")
        elif s.method == "lss_ulysses":
            u, r = s.ulysses, n // s.ulysses
            g = ulysses_kv_heads(spec.hkv, u)
            # q, k, v in one all-to-all carrying every rank's call signature to its Ulysses group
            out += _all_to_alls(b * s_local * dh * dt, spec.num_heads, g, u, layers, "ulysses",
                                fused=True, signatures=u * SIGNATURE_BYTES)
            # the LSS group gathers all L tokens of this rank's g / U KV heads
            out += _lss_kv_collectives(spec, seq_len, g // u, r, u, s, rank, "strided")
        elif s.method == "allgather_cp":
            kv_one = b * seq_len * spec.hkv * dh * dt  # K or V of all L positions
            out.append(Collective("all_gather", kv_one, n, 4 * layers, "K and V separately, fwd + bwd", "sp"))
            out.append(Collective("reduce_scatter", kv_one, n, 2 * layers, "dK and dV separately (bwd)", "sp"))
        elif s.method == "ring":
            out += _ring_collectives(block, n, layers, "sp")
        else:  # ulysses, usp: 4 all-to-alls (q, k, v, out) each way in the Ulysses group
            u = n if s.method == "ulysses" else s.ulysses
            out += _all_to_alls(b * s_local * dh * dt, spec.num_heads, spec.hkv, u, layers,
                                "sp" if u == n else "ulysses", fused=s.method == "usp")
            # usp's ring: the Ulysses group's tokens, 1/u of the KV heads: same bytes as a block
            out += _ring_collectives(block, n // u, layers, "strided")
        if s.method in ("lss", "lss_ulysses") and n > 1:
            # the verdict (lss_plugin.verdict): one fixed-size all-gather over the SP group at the
            # start of every lss_attention forward and backward, before any K/V collective. Its own group
            # name: a fixed 96 bytes per rank is latency, not bandwidth, so plan_links leaves it out
            out.append(Collective("all_gather", n * VERDICT_ROW_BYTES, n, 2 * layers, "verdict (fwd + bwd)", "verdict"))
        out += _tp_sp_collectives(spec, s_local, s, params)  # LSS x TP: Megatron SP inside the TP group
        # megatron DDP: one all-reduce of the fp32 grad buffer over DP x SP; token count
        out.append(Collective("all_reduce", params["total"] * grad_bytes, n * s.dp, 1, "grads (DP x SP)", "dp_sp"))
        out.append(Collective("all_reduce", 4, n * s.dp, 1, "loss token count", "dp_sp"))
    else:
        out += _tp_sp_collectives(spec, seq_len, s, params)
        out.append(Collective("all_reduce", params["total"] * grad_bytes, s.dp, 1, "grads (DP)", "dp"))
        out.append(Collective("all_reduce", 4, s.dp, 1, "loss token count", "dp"))
    return out


def _lss_kv_collectives(spec: GPTSpec, seq_len: int, heads: int, n: int, u: int, s: Setup, rank: int | None,
                        group: str) -> list[Collective]:
    """LSS's fused collectives over ``n`` LSS ranks for ``heads`` KV heads (the hybrid: Ulysses groups of
    ``u`` ranks, each LSS rank holding ``u`` ranks' tokens; LSS alone ``u = 1``).

    ``gather``, per layer: one gather of packed K,V (two with ``regather``), each carrying the n call
    signatures, and one reduce-scatter of packed dK,dV (on gloo an all-to-all of the same buffer), whose
    items are float32 for half inputs unless kv_grad_dtype="input"; with ``kv_head_chunk`` one of each per
    head chunk.
    ``sparse`` (or ``auto`` resolved to it, as the call resolves it): the same calls as all-to-alls
    (``lss_plugin.comm.start_exchange_kv`` / ``start_return_dkv``) carrying what the plan says:
    forward the tokens this rank's peers read (and one signature row per peer), backward the dK,dV
    of the tokens this rank read, none at all when no token crosses ranks (the plan's floor is 0).
    """
    if n == 1:
        return []
    b, d, dt, layers = s.batch_size, spec.head_dim, s.dtype_bytes, spec.num_layers
    gathers = 2 if s.kv_backward == "regather" else 1
    chunk_heads = s.kv_head_chunk or heads
    chunks = heads // chunk_heads  # one collective per head chunk
    grad_dt = 4 if dt < 4 and s.kv_grad_dtype == "fp32" else dt
    token = 2 * b * chunk_heads * d  # elements of one token's packed K,V in one head chunk
    fwd_what = "(fwd" + (" + bwd regather)" if gathers == 2 else ")")
    exchange = sparse_exchange(s, seq_len, n, u)
    if exchange is None:  # the all-gather: every rank's call signature rides in each gather
        kv = token * seq_len * dt
        return [Collective("all_gather", kv + n * SIGNATURE_BYTES, n, gathers * layers * chunks,
                           "packed K,V " + fwd_what, group),
                Collective("all_to_all" if s.backend in REDUCE_SCATTER_AS_ALL_REDUCE else "reduce_scatter",
                           token * seq_len * grad_dt, n, layers * chunks, "packed dK,dV (bwd)", group)]
    r = busiest_lss_rank(exchange, s) if rank is None else rank // u  # the hybrid's LSS rank: its Ulysses group
    kv = exchange.sent(r) * token * dt + (n - 1) * SIGNATURE_BYTES  # one signature row to every peer
    out = [Collective("all_to_all", kv, n, gathers * layers * chunks, "sparse K,V + signature rows " + fwd_what,
                      group, wire_bytes=kv)]
    if exchange.floor_tokens:
        dkv = exchange.received(r) * token * grad_dt
        out.append(Collective("all_to_all", dkv, n, layers * chunks, "sparse dK,dV (bwd)", group, wire_bytes=dkv))
    return out


def sparse_exchange(s: Setup, seq_len: int, n: int, u: int = 1) -> ExchangePlan | None:
    """The plan of LSS's sparse K/V exchange over ``n`` LSS ranks holding ``u`` x L / (n u) tokens each,
    or None when the call gathers (``kv_exchange="gather"``, or ``"auto"`` resolved to it)."""
    if s.kv_exchange == "gather" or n == 1:
        return None
    exchange = exchange_plan(s.layout, n, seq_len // n, s.causal, s.bounds(seq_len), s.window, s.chunk)
    return exchange if resolve_kv_exchange(s.kv_exchange, exchange) == "sparse" else None


def busiest_lss_rank(exchange: ExchangePlan, s: Setup) -> int:
    """The LSS rank that sends the most K/V bytes in a step under the sparse exchange (the lowest on a
    tie): forward the tokens its peers read (twice with ``regather``), backward the dK,dV of those it
    read (``kv_grad_dtype``'s items), per head chunk alike."""
    grad_dt = 4 if s.dtype_bytes < 4 and s.kv_grad_dtype == "fp32" else s.dtype_bytes
    gathers = 2 if s.kv_backward == "regather" else 1
    backward = 1 if exchange.floor_tokens else 0

    def step_bytes(r: int) -> int:
        return gathers * exchange.sent(r) * s.dtype_bytes + backward * exchange.received(r) * grad_dt

    return max(range(exchange.lss_size), key=lambda r: (step_bytes(r), -r))


def _all_to_alls(token_bytes: int, heads: int, kv_heads: int, u: int, layers: int, group: str,
                 fused: bool = False, signatures: int = 0) -> list[Collective]:
    """Ulysses's all-to-alls over ``u`` ranks; ``token_bytes`` = b x s_local x d x itemsize (one
    head of this rank's tokens). DeepSpeed's (``fused=False``): q, k, v, out forward and their
    inverses backward, 8 per layer. ``lss_plugin.ulysses`` (USP, the hybrid; ``fused=True``):
    q, k, v in ONE all-to-all (+ ``signatures`` bytes: the hybrid's call-signature row, one per
    destination rank), out, and backward dout and dq, dk, dv: 4 per layer, the same K,V bytes."""
    if u == 1:
        return []
    if not fused:
        return [Collective("all_to_all", token_bytes * h, u, 2 * layers, f"{what} (fwd + bwd)", group)
                for what, h in (("q", heads), ("k", kv_heads), ("v", kv_heads), ("out", heads))]
    qkv = token_bytes * (heads + 2 * kv_heads)
    return [Collective("all_to_all", qkv + signatures, u, layers,
                       "q, k, v" + (" + signature rows" if signatures else "") + " (fwd)", group),
            Collective("all_to_all", qkv, u, layers, "dq, dk, dv (bwd)", group),
            Collective("all_to_all", token_bytes * heads, u, 2 * layers, "out (fwd), dout (bwd)", group)]


def _ring_collectives(block: int, r: int, layers: int, group: str) -> list[Collective]:
    """Ring attention over ``r`` ranks: per layer r - 1 hops of K,V forward, r - 1 of K,V and r of
    the dK,dV accumulators backward, each a send and a receive of one packed block."""
    if r == 1:
        return []
    hops = 3 * r - 2
    return [Collective(kind, block, r, hops * layers, "ring K,V and dK,dV blocks", group)
            for kind in ("send", "recv")]


def _tp_sp_collectives(spec: GPTSpec, tokens: int, s: Setup, params: dict) -> list[Collective]:
    """Megatron TP + SP over ``s.tp`` ranks on a sequence of ``tokens`` (L, or L / N under LSS)."""
    t, b, dt, layers = s.tp, s.batch_size, s.dtype_bytes, spec.num_layers
    if t == 1:
        return []
    unit = b * tokens * spec.hidden_size * dt  # [s, b, h]: what each Megatron SP collective assembles
    return [
        Collective("all_gather", unit, t, 6 * layers + 3,
                   "per layer: fwd QKV/FC1 inputs, bwd re-gather of both inputs and "
                   "proj/FC2 output grads; output layer fwd+bwd, embedding bwd", "tp"),
        Collective("reduce_scatter", unit, t, 4 * layers + 1,
                   "per layer: fwd proj/FC2 outputs, bwd QKV/FC1 input grads; output layer bwd", "tp"),
        Collective("all_reduce", unit, t, 1, "vocab-parallel word embedding (fwd)", "tp"),
        Collective("all_reduce", b * tokens * 4, t, 3, "vocab-parallel cross entropy", "tp"),
        Collective("all_reduce", params["sequence_parallel"] * 4, t, 1,
                   "sequence-parallel norm/bias grads (TP)", "tp"),
    ]


# -- the information floor (issue 29) -------------------------------------------------------

@dataclass(frozen=True)
class InformationFloor:
    """The K,V of other ranks that some query of each SP rank reads under a mask and documents: what any
    scheme that leaves queries on their rank must bring to it. ``tokens[r]``: rank r's count."""

    tokens: tuple[int, ...]
    token_bytes: int  # one token's K and V over all KV heads, one layer

    @property
    def per_rank_bytes(self) -> int:
        """The most one rank reads from the others."""
        return max(self.tokens) * self.token_bytes

    @property
    def total_bytes(self) -> int:
        return sum(self.tokens) * self.token_bytes


def information_floor(spec: GPTSpec, seq_len: int, s: Setup) -> InformationFloor:
    """The floor of one layer's forward for ``s``'s SP ranks, layout, masks and documents (per rank and total)."""
    exchange = exchange_plan(s.layout, s.sp, seq_len // s.sp, s.causal, s.bounds(seq_len), s.window, s.chunk)
    token_bytes = 2 * s.batch_size * spec.hkv * spec.head_dim * s.dtype_bytes
    return InformationFloor(tuple(exchange.received(r) for r in range(s.sp)), token_bytes)


def kv_bytes_against_floor(spec: GPTSpec, seq_len: int, s: Setup) -> list[dict]:
    """Each scheme's K,V bytes of one layer's forward against the floor: the most one rank receives, and
    all ranks together, with ``s``'s SP size, layout, masks, documents, dtype and batch.

    What arrives, counted as ``collectives`` counts it: LSS gather N - 1 ranks' K,V and their call
    signatures; LSS sparse the floor and one signature row from each peer (per rank: the rank that
    reads most); ring N - 1 blocks; all-gather CP K and V gathered; Ulysses the k and v all-to-alls;
    USP those in its Ulysses group of ``s.ulysses`` (or the largest the heads allow) and its ring's
    blocks. Ring, all-gather CP, Ulysses and USP move the same whatever the masks (as modelled). Ulysses
    and USP move queries and outputs instead of keys (not counted here), so they can sit below the floor,
    which assumes queries stay on their rank; Ulysses is left out when N does not divide the heads."""
    n, L = s.sp, seq_len
    s_local = L // n
    floor = information_floor(spec, L, s)
    tb = floor.token_bytes
    exchange = exchange_plan(s.layout, n, s_local, s.causal, s.bounds(L), s.window, s.chunk)
    a2a = _WIRE["all_to_all"]
    u = s.ulysses or math.gcd(n, math.gcd(spec.num_heads, spec.hkv))
    rows = [("information floor", floor.per_rank_bytes, floor.total_bytes),
            ("lss[gather]", (n - 1) * (s_local * tb + SIGNATURE_BYTES), None),
            ("lss[sparse]", floor.per_rank_bytes + (n - 1) * SIGNATURE_BYTES,
             floor.total_bytes + n * (n - 1) * SIGNATURE_BYTES),
            ("ring", (n - 1) * s_local * tb, None),
            ("allgather_cp", int(round(L * tb * _WIRE["all_gather"](n))), None),
            ("ulysses", int(round(s_local * tb * a2a(n))) if not (spec.num_heads % n or spec.hkv % n) else None, None)]
    if 1 < u < n:
        rows.append((f"usp[u{u}]", int(round(s_local * tb * a2a(u))) + (n // u - 1) * s_local * tb, None))
    auto = resolve_kv_exchange("auto", exchange)
    rows.insert(3, (f"lss[auto] -> {auto}", *next((p, t) for name, p, t in rows if name == f"lss[{auto}]")))
    return [{"scheme": name, "per_rank_bytes": per_rank, "total_bytes": n * per_rank if total is None else total,
             "x_floor": per_rank / floor.per_rank_bytes if floor.per_rank_bytes else math.inf}
            for name, per_rank, total in rows if per_rank is not None]  # Ulysses: N must divide the heads


def floor_table(title: str, spec: GPTSpec, seq_len: int, s: Setup) -> str:
    """``kv_bytes_against_floor`` as the text table ``python -m lss_plugin.plan`` prints."""
    masks = [f"{s.layout} layout", "causal" if s.causal else "full"]
    if s.window is not None:
        masks.append(f"window {s.window}")
    if s.chunk is not None:
        masks.append(f"chunks of {s.chunk}")
    if s.documents is not None:
        masks.append(f"{len(s.documents) - 1} documents")
    lines = [f"PREDICTION (cost model) - K,V bytes of one layer's forward against the information floor: {title}",
             f"  {spec.hkv} KV heads x head dim {spec.head_dim}, {s.dtype_bytes}-byte items, batch {s.batch_size}, "
             f"L = {seq_len:,} on {s.sp} ranks; {', '.join(masks)}",
             f"  {'scheme':26} | {'K/V bytes per rank':>18} | {'x floor':>8} | {'all ranks':>15} | {'x floor':>8}"]
    rows = kv_bytes_against_floor(spec, seq_len, s)
    total_floor = rows[0]["total_bytes"]
    for r in rows:  # a floor of 0 (nothing read across ranks): no ratio
        x_rank = f"{r['x_floor']:8.2f}" if rows[0]["per_rank_bytes"] else f"{'-':>8}"
        x_total = f"{r['total_bytes'] / total_floor:8.2f}" if total_floor else f"{'-':>8}"
        lines.append(f"  {r['scheme']:26} | {r['per_rank_bytes']:>18,} | {x_rank} | {r['total_bytes']:>15,} | {x_total}")
    return "\n".join(lines)


# -- memory ----------------------------------------------------------------------------------

def _q_copy(heads: int, groups: int) -> int:
    """Query heads Megatron copies: its reshape of the q split of a GQA projection [s, b, g, a/g * d]
    to [s, b, a, d] cannot be a view when a rank holds more than one KV group (g > 1, g < a)."""
    return heads if 1 < groups < heads else 0


def activation_bytes(spec: GPTSpec, seq_len: int, s: Setup) -> dict:
    """Bytes held for backward when the forward pass ends, per rank, by part.

    Counted tensor by tensor (with the benchmark's tracker, ``record_ops=True``) for the
    megatron-core local spec without dropout; ``sl`` = tokens of this rank's residual stream:
    - every layer: LN1 and LN2 outputs, the two residual sums (4 x [sl, h]), FC1 and GELU outputs
      (2 x [sl, ffn]); LayerNorm mean/rstd (fp32);
    - attention, by method: the QKV projection output (kept alive by the saved q, k, v views; with
      more than one KV group per rank, q is copied, see ``_q_copy``), the core-attention output,
      the kernel's log-sum-exp (fp32), and the method's own state: LSS ``keep`` the gathered K,V
      of all L positions (this TP rank's heads); Ulysses / USP q, k, v after the all-to-all (the
      QKV output is freed) and the output again after the reverse all-to-all; Megatron's dense
      local attention ([unfused]) q, k, v (GQA: K/V repeated to all heads), its output and the
      softmax probabilities [b, a, L, L]; the hybrid ``lss_ulysses`` (a PREDICTION by analogy, not
      yet compared with the tracker: the benchmark has no such row yet) Ulysses's tensors with
      Hkv replicated to ``ulysses_kv_heads`` plus, with ``keep``, all L positions of its KV heads / U;
    - around the layers: embedding output, final LN output, logits (softmax computed in place),
      cross-entropy bookkeeping.
    """
    b, h, dh, dt, L = s.batch_size, spec.hidden_size, spec.head_dim, s.dtype_bytes, seq_len
    H, G, ffn, V = spec.num_heads, spec.hkv, spec.ffn, spec.vocab_size
    fp32, n_norms = 4, 2 * spec.num_layers + 1
    if s.method in ("megatron_tp_sp", "single"):
        t = s.tp
        sl = L // t  # residual stream / LayerNorm tokens per rank (Megatron SP)
        a, g = H // t, G // t
        if s.kernel == "unfused":
            attention = b * L * 4 * a * dh * dt + b * a * L * L * dt  # q, k, v, out; probabilities
        else:
            attention = b * L * ((a + 2 * g) + _q_copy(a, g) + a) * dh * dt + b * a * L * fp32
        per_layer = b * sl * 4 * h * dt + b * L * 2 * (ffn // t) * dt + attention
        head = b * L * (V // t) * dt
        cross_entropy = b * L * 9 * (2 if t > 1 else 1) + 8
    else:
        n, t = s.sp, s.tp  # t > 1 only for lss (LSS x TP)
        sq = L // n  # this rank's sequence part (what attention and the MLP see)
        sl = sq // t  # residual stream / LayerNorm tokens (Megatron SP inside the TP group)
        a, g = H // t, G // t
        common = b * sl * 4 * h * dt + b * sq * 2 * (ffn // t) * dt
        lse = b * a * sq * fp32
        if s.method in ("ulysses", "usp"):
            attention = b * sq * ((a + 2 * g) + 2 * a) * dh * dt + lse
        elif s.method == "lss_ulysses":  # NOT yet checked against the tracker (see the docstring)
            u = s.ulysses
            gu = ulysses_kv_heads(g, u)  # KV heads after replication, g / U of them per rank
            attention = b * sq * ((a + 2 * gu) + 2 * a) * dh * dt + lse
            if s.kv_backward == "keep" and u < n:
                attention += 2 * b * L * (gu // u) * dh * dt  # the gathered K,V of its g / U heads
        else:  # lss, ring, allgather_cp: QKV output, output, log-sum-exp
            attention = b * sq * ((a + 2 * g) + _q_copy(a, g) + a) * dh * dt + lse
            if s.method == "lss" and s.kv_backward == "keep":
                attention += 2 * b * L * g * dh * dt  # the gathered K,V of this TP rank's heads
        per_layer = common + attention
        head = b * sq * (V // t) * dt
        cross_entropy = b * sq * 9 * (2 if t > 1 else 1) + 8
    stats = n_norms * 2 * b * sl * fp32
    around = 2 * b * sl * h * dt + head + cross_entropy + stats
    return {"per_layer": per_layer, "layers": spec.num_layers * per_layer,
            "embedding_and_head": around, "total": spec.num_layers * per_layer + around}


def transient_bytes(spec: GPTSpec, seq_len: int, s: Setup) -> int:
    """Largest short-lived buffers on top of the saved activations (during backward).

    Every method: the largest parameter's gradient before megatron DDP adds it to ``main_grad``,
    with one [sl, h] activation gradient. Beyond that, per method (fitted against the tracker at
    1 and 4 ranks, see ``tests/test_plan.py``): LSS the gathered K,V and its unpacked copy plus
    dK,dV and a query chunk's key range (``keep`` ~2.9, ``regather`` ~3.5 x the packed K,V of all L positions and this TP
    rank's heads; what ``kv_head_chunk`` bounds; the pipelined schedule frees each gather's staging
    buffers as soon as it is unpacked; with the contiguous layout the first ranks, whose queries see
    fewer keys, peak up to ~12% lower than the last, which the factors are fitted to), where for half inputs the backward holds the
    dK,dV accumulator in fp32 and its staged copy for the reduce-scatter (fp32 unless
    ``kv_grad_dtype="input"``) instead of two input-dtype copies; all-gather CP K and V gathered
    again, dK and dV of all L and a staging buffer (~3 x); Megatron's dense local attention the
    gradient of the scores and probabilities [b, a, L, L]. Ring, Ulysses and USP buffers are one
    block or one rank's share.
    """
    b, h, dh, dt, L = s.batch_size, spec.hidden_size, spec.head_dim, s.dtype_bytes, seq_len
    sl = L // (s.sp * s.tp)  # residual stream tokens per rank
    positions = spec.max_positions or seq_len
    largest_param = max(spec.vocab_size * h // s.tp, positions * h, spec.ffn * h // s.tp)
    generic = largest_param * 4 + b * sl * h * dt  # fp32 grad before the main_grad add
    gathered_heads = {"lss": spec.hkv // s.tp,
                      "lss_ulysses": ulysses_kv_heads(spec.hkv, s.ulysses or 1) // (s.ulysses or 1)}
    lss_group = s.sp // (s.ulysses or 1) if s.method == "lss_ulysses" else s.sp
    if s.method in gathered_heads and lss_group > 1:
        kv_elements = 2 * b * L * (s.kv_head_chunk or gathered_heads[s.method]) * dh  # one gather's K,V
        # one kernel call per causal query chunk (prefix + diagonal, issue 27) holds that chunk's whole
        # key range contiguous, its dK/dV and cpu_flash's bottom-right mask at once (refitted on the
        # tracker then: keep 2.2 -> 3.2, regather 2.75 -> 4.2); since the overlap (issue 31) a chunk whose
        # prefix is another rank's is two calls again, own diagonal first (refitted: keep 2.9, regather 3.5)
        factor = 2.9 if s.kv_backward == "keep" else 3.5
        acc_dt = 4 if dt < 4 else dt  # backward: dK,dV accumulate in fp32 for half inputs
        grad_dt = acc_dt if s.kv_grad_dtype == "fp32" else dt  # and are staged for the reduce-scatter
        backward = kv_elements * (acc_dt + grad_dt) + (factor - 2) * kv_elements * dt
        return max(generic, int(factor * kv_elements * dt), int(backward))
    if s.method == "allgather_cp" and s.sp > 1:
        return max(generic, 3 * 2 * b * L * spec.hkv * dh * dt)
    if s.kernel == "unfused":
        return max(generic, 2 * b * (spec.num_heads // s.tp) * L * L * dt)
    return generic


def persistent_buffer_bytes(spec: GPTSpec, seq_len: int, s: Setup) -> int:
    """Megatron's global memory buffer "mpu": one tensor, grown to the largest request, shared by
    its dense local attention's score matmul ([b * a, L, L], [unfused] rows only) and, with TP +
    SP, the all-gathered input of its linear layers ([s, b, h]; L / N tokens under LSS x TP)."""
    scores = gathered = 0
    if s.method in ("megatron_tp_sp", "single") and s.kernel == "unfused":
        scores = s.batch_size * (spec.num_heads // s.tp) * seq_len * seq_len * s.dtype_bytes
    if s.tp > 1:
        tokens = seq_len // s.sp if s.method == "lss" else seq_len
        gathered = s.batch_size * tokens * spec.hidden_size * s.dtype_bytes
    return max(scores, gathered)


def plan(spec: GPTSpec, seq_len: int, setup: Setup, rank: int | None = None) -> Plan:
    """The cost model's prediction for one rank of ``setup`` training ``spec`` at ``seq_len`` (``rank``:
    its index in the SP group, None: the busiest, see ``collectives``)."""
    if seq_len % max(setup.sp, setup.tp) != 0:
        raise ValueError(f"sequence length {seq_len} is not divisible by sp({setup.sp}) x tp({setup.tp})")
    if setup.method == "lss" and (seq_len // setup.sp) % setup.tp:
        raise ValueError(f"the {seq_len // setup.sp} tokens per LSS rank are not divisible by tp({setup.tp})")
    if setup.method in ("megatron_tp_sp", "lss") and (spec.num_heads % setup.tp or spec.hkv % setup.tp):
        raise ValueError(f"tp({setup.tp}) must divide heads({spec.num_heads}) and kv heads({spec.hkv})")
    if setup.method == "ulysses" and (spec.num_heads % setup.sp or spec.hkv % setup.sp):
        raise ValueError(f"Ulysses sp({setup.sp}) must divide heads({spec.num_heads}) and kv heads({spec.hkv})")
    if setup.method == "usp" and (spec.num_heads % setup.ulysses or spec.hkv % setup.ulysses):
        raise ValueError(f"usp's Ulysses size {setup.ulysses} must divide heads({spec.num_heads}) and "
                         f"kv heads({spec.hkv})")
    if setup.method == "lss_ulysses":  # the core's own check: H % U, KV heads replicated to lcm(Hkv, U)
        check_ulysses_heads(spec.num_heads, spec.hkv, setup.ulysses, setting="ulysses")
    setup.bounds(seq_len)  # documents that do not cover the sequence are refused by name
    counts = parameter_counts(spec, seq_len, setup.tp)
    p = counts["total"]
    master = 4 if setup.dtype_bytes < 4 else 0  # fp32 master weights for bf16/fp16 training
    act = activation_bytes(spec, seq_len, setup)
    memory = {
        "params": p * setup.dtype_bytes,
        "grads": p * 4,
        "optimizer": p * (8 + master),
        "persistent_buffers": persistent_buffer_bytes(spec, seq_len, setup),
        "activations": act["total"],
        "transient": transient_bytes(spec, seq_len, setup),
    }
    memory["static"] = (memory["params"] + memory["grads"] + memory["optimizer"]
                        + memory["persistent_buffers"])
    memory["peak_activation"] = memory["activations"] + memory["transient"]
    memory["peak"] = memory["static"] + memory["peak_activation"]
    return Plan(spec, setup, seq_len, p, memory, collectives(spec, seq_len, setup, rank))


# -- CLI -------------------------------------------------------------------------------------

def _gib(x: float) -> str:
    return f"{x / 2**30:10.3f}"


def setups_table(title: str, spec: GPTSpec, seq_len: int, setups: list[Setup], memory_gib: float | None = None) -> str:
    """The predicted per-rank memory and bytes sent of each setup, one row each (``memory_gib``: a fits column)."""
    fits = f" {'fits ' + format(memory_gib, 'g') + ' GiB':>12}" if memory_gib else ""
    lines = [f"PREDICTION (cost model, nothing measured) - {title}",
             f"  model: {spec.num_layers} layers, hidden {spec.hidden_size}, heads {spec.num_heads}/"
             f"{spec.hkv} kv, ffn {spec.ffn}, vocab {spec.vocab_size}; L = {seq_len:,} tokens",
             f"  {'method':34} {'world':>6} {'params':>10} {'grads+opt':>10} {'activ.':>10} "
             f"{'transient':>10} {'peak GiB':>10} {'sent GiB/step':>14}{fits}"]
    for s in setups:
        try:
            pl = plan(spec, seq_len, s)
        except ValueError as e:
            lines.append(f"  {setup_label(s):34} {s.world_size:>6}  not possible: {e}")
            continue
        m = pl.memory
        fit = f" {'yes' if m['peak'] <= memory_gib * 2**30 else 'NO':>12}" if memory_gib else ""
        lines.append(f"  {setup_label(s):34} {s.world_size:>6} {_gib(m['params'])} {_gib(m['grads'] + m['optimizer'])} "
                     f"{_gib(m['activations'])} {_gib(m['transient'])} {_gib(m['peak'])} "
                     f"{pl.sent_bytes / 2**30:14.3f}{fit}")
    return "\n".join(lines)


def setup_label(s: Setup) -> str:
    """A setup's short name in tables, e.g. ``lss[keep] sp8 dp1`` or ``usp[u2] sp8 dp1``."""
    if s.method == "lss":
        chunk = f",chunk{s.kv_head_chunk}" if s.kv_head_chunk else ""
        return f"lss[{s.kv_backward}{chunk}] {f'tp{s.tp} ' if s.tp > 1 else ''}sp{s.sp} dp{s.dp}"
    unfused = "[unfused]" if s.kernel == "unfused" else ""
    if s.method == "megatron_tp_sp":
        return f"megatron_tp_sp{unfused} tp{s.tp} dp{s.dp}"
    if s.method == "single":
        return f"single{unfused} dp{s.dp}"
    if s.method in ULYSSES_METHODS:
        backward = f"{s.kv_backward}," if s.method == "lss_ulysses" else ""
        return f"{s.method}[{backward}u{s.ulysses}] sp{s.sp} dp{s.dp}"
    return f"{s.method} sp{s.sp} dp{s.dp}"


# The paper (Wang et al., arXiv 2311.02382) STATES: enwik8; Nvidia V100 GPUs (Summit); LSS 5.6x
# faster and 10.2x less memory than Nvidia's (Megatron) sequence parallelism on 144 GPUs; L = 50,112
# on 3,456 GPUs. ASSUMED here (not stated in what this project has of the paper): the GPT
# dimensions (12 layers, hidden 768, 12 heads, byte vocabulary 256, learned positions), fp32,
# L = 50,112 also on 144 GPUs (3,456 = SP 144 x DP 24), 16 GiB per V100 (Summit's), micro-batch 1.
PAPER_MODEL = GPTSpec(num_layers=12, hidden_size=768, num_heads=12, vocab_size=256)
PAPER_SEQ_LEN = 50_112
PAPER_GPU_GIB = 16.0


def paper_tables() -> str:
    """LSS, Megatron TP+SP, Ulysses and all-gather CP at the paper's GPU counts and length."""
    spec, L, fp32 = PAPER_MODEL, PAPER_SEQ_LEN, 4
    out = [
        "Paper setups (arXiv 2311.02382). STATED: enwik8, V100 GPUs, 144 GPUs (LSS vs Nvidia sequence "
        "parallelism),\n  L = 50,112 on 3,456 GPUs. ASSUMED: model 12 layers / hidden 768 / 12 heads / "
        "vocab 256, fp32,\n  L = 50,112 on 144 GPUs too, 3,456 = SP 144 x DP 24, 16 GiB per GPU, "
        "micro-batch 1. TP and Ulysses\n  cannot exceed the 12 heads: they take 12 GPUs per sequence "
        "and the rest as data parallelism.",
    ]
    for gpus, dp in ((144, 1), (3456, 24)):
        sp = gpus // dp
        setups = [Setup("lss", sp=sp, dp=dp, dtype_bytes=fp32),
                  Setup("lss", sp=sp, dp=dp, kv_backward="regather", dtype_bytes=fp32),
                  Setup("allgather_cp", sp=sp, dp=dp, dtype_bytes=fp32),
                  Setup("megatron_tp_sp", tp=12, dp=gpus // 12, dtype_bytes=fp32),
                  Setup("megatron_tp_sp", tp=12, dp=gpus // 12, dtype_bytes=fp32, kernel="unfused"),
                  Setup("ulysses", sp=12, dp=gpus // 12, dtype_bytes=fp32)]
        out.append(setups_table(f"{gpus:,} GPUs, L = {L:,} (LSS / all-gather CP: SP {sp} x DP {dp})", spec, L,
                          setups, memory_gib=PAPER_GPU_GIB))
    return "\n\n".join(out)


def tp_lss_splits(spec: GPTSpec, seq_len: int, ranks: int, dtype_bytes: int = 2,
                  kv_backward: str = "keep") -> list[Setup]:
    """Every TP = T x LSS = N split of ``ranks`` the model allows (T divides heads and KV heads).

    T = 1 is LSS alone; T = ranks is Megatron TP + SP alone (``megatron_tp_sp``).
    """
    out = []
    for t in range(1, ranks + 1):
        if ranks % t or spec.num_heads % t or spec.hkv % t or (seq_len // (ranks // t)) % t:
            continue
        n = ranks // t
        if n == 1:
            out.append(Setup("megatron_tp_sp", tp=t, dtype_bytes=dtype_bytes))
        else:
            out.append(Setup("lss", sp=n, tp=t, kv_backward=kv_backward, dtype_bytes=dtype_bytes))
    return out


def tp_x_lss_view(spec: GPTSpec, seq_len: int, ranks: int, dtype_bytes: int = 2) -> str:
    """When does T x N beat either alone? The table of every split, and the verdict per measure.

    Per rank and layer (sent bytes, bandwidth-optimal): LSS moves ~4 b L (Hkv/T) dh (N-1)/N
    (gather + reduce-scatter of this TP rank's K,V heads); Megatron TP + SP moves ~10 b (L/N) h
    (T-1)/T. Memory: parameters, grads and optimizer state shrink by T; LSS's kept K,V
    (2 b L Hkv/T dh per layer) by T; activations by N x T. A split wins on memory when the model
    state or the kept K,V dominate (large models, long L with many KV heads), and loses on traffic
    only by TP's in-node collectives, which shrink by N.
    """
    setups = tp_lss_splits(spec, seq_len, ranks, dtype_bytes)
    lines = [setups_table(f"TP x LSS on {ranks} ranks (one node)", spec, seq_len, setups)]
    plans = [plan(spec, seq_len, s) for s in setups]
    for measure, key in (("peak memory", lambda p: p.memory["peak"]), ("bytes sent", lambda p: p.sent_bytes)):
        best = min(plans, key=key).setup
        split = best.method == "lss" and best.tp > 1
        lines.append(f"  lowest {measure}: {setup_label(best)} ({'a T x N split' if split else 'one scheme alone'})")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m lss_plugin.plan: the command line is plan_cli's (it reads plan_links too)
    from lss_plugin.plan_cli import main

    raise SystemExit(main())
