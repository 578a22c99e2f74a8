"""LSS distributed attention: local queries attend to the whole sequence's keys and values.

Three layers, as ring-flash-attention builds them:
  ``_lss_forward`` / ``_lss_backward``  pure functions that hold the communication,
  ``_LSSAttentionFunction``             a thin autograd.Function,
  ``lss_attention``                     the public call, shaped like flash-attn / SDPA.

Per call: forward and backward each start with ONE 96-byte all-gather over the SP group, the
verdict (``lss_plugin.verdict``): every rank's local checks and call signature, decided together
before any variable-size collective, so a refusal raises on every rank. Then, per KV-head chunk:
forward = 1 all-gather of packed (k, v); backward = 1 reduce-scatter of packed (dk, dv), plus 1
all-gather again when ``kv_backward="regather"``. Every K/V all-gather also carries the signature
in band (``lss_plugin.signature``), compared on the device and reported by the next verdict.

Overlap: a rank's own K, V are there before any collective, so each head chunk's pieces on its own
keys (``lss_plugin.blocks``) are attended while its K/V collective is in flight, the rest once it
arrived; in backward the own pieces run while the chunk's dK/dV travel (``keep``) or while its K, V
are regathered (``regather``), and their gradients are added when that collective is waited for.
Pipelined head chunks: with ``kv_head_chunk=c < Hkv`` the chunks' collectives overlap each other's
computation too. Forward starts the gather of chunk i+1 as soon as chunk i's arrived; backward
starts the regather of chunk i+1 when chunk i's arrived, and reduce-scatters chunk i's dK/dV while
chunk i+1 computes (waiting for it only before the next reduce-scatter). At most two chunks of
gathered K, V are alive.
Every collective is waited for before forward/backward returns. ``kv_head_chunk="auto"`` picks c
(``lss_plugin.options.auto_head_chunk``; ``kv_buffer_mib`` / ``LSS_KV_BUFFER_MIB`` set its budget),
and ``kv_backward="auto"`` regathers exactly when K, V are gathered in chunks for memory.

Hybrid LSS x Ulysses (a ``group`` with ulysses_size U > 1, ``lss_plugin.topology.SequenceGroups``):
``_hybrid_attention`` wraps the same autograd.Function in ONE fused all-to-all of q, k, v inside the
Ulysses group (``lss_plugin.ulysses``) and ONE all-to-all of the output back; the LSS path runs
unchanged over the LSS group of R = N / U ranks on the group's U * s_local tokens and a head slice.

Packed documents (``cu_seqlens``) change only which key ranges each query segment reads
(``lss_plugin.documents``), never the communication: the same gather and reduce-scatter run.
So do the per-layer masks (``lss_plugin.masks``): ``chunk`` cuts the query segments at more
boundaries (``refine_bounds``), ``window`` makes each segment's key blocks ``masks.key_blocks`` of the
layer's band (keys outside it are never computed), ``softcap`` goes to the kernel, and ``sinks``
rescale each head chunk's merged (out, lse) (``masks.apply_sinks``) with their gradient computed
locally in backward (``masks.sinks_grad``); every rank holds every key of its queries, so a mask
is a local matter. Without a window the blocks are exactly those of a plain call.

Precision: for float16/bfloat16 inputs the block merges (running out and log-sum-exp of a query
chunk), the dq and dK/dV accumulators and the GQA head-group sums are float32
(``kernels.base.compute_dtype``); each result is rounded to the input dtype once. A causal query
chunk is ONE kernel call over its prefix and diagonal (no merge) when the kernel aligns its mask
bottom-right and takes GQA natively (``cpu_flash``, ``tiled``, ``math``, ``flash_attn``); the
CPU kernels return float32 blocks (``Kernel.fp32_out`` / ``fp32_grads``), flash-attn rounds a
chunk's out once inside the kernel. Only torch's CUDA SDPA ops (``sdpa_*``: top-left causal, no
GQA) still take a chunk with a prefix in two calls whose half outputs are merged in float32.
The dK/dV reduce-scatter sends those float32 sums (``kv_grad_dtype="fp32"``, default) or rounds
them to the input dtype first (``"input"``: half the bytes, a little more error; see the README).
``python -m lss_plugin.bench.precision`` prints the error per rank and tensor beside SDPA's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lss_plugin.blocks import Piece, plan_pieces
from lss_plugin.comm import (
    InFlight, Pending, backend_of, start_exchange_kv, start_gather_kv, start_reduce_scatter_kv, start_return_dkv,
)
from lss_plugin.documents import Segment, check_cu_seqlens, digest, query_segments
from lss_plugin.exchange import ExchangePlan, exchange_plan, resolve_kv_exchange
from lss_plugin.kernels import block_backward, block_forward, causal_prefix_in_one_call, select_kernel
from lss_plugin.kernels.base import compute_dtype
from lss_plugin.masks import Band, MaskSpec, apply_sinks, check_softcap, refine_bounds, sinks_grad
from lss_plugin.options import (
    AttentionSettings, check_kv_head_chunk, check_ulysses_heads, resolve_kv_chunking, settings_from_keywords,
)
from lss_plugin.sharding import Chunk, rank_chunks
from lss_plugin.signature import CallSignature, check_mode
from lss_plugin.topology import resolve_sequence_groups
from lss_plugin.ulysses import replicate_kv_heads, to_heads, to_sequence
from lss_plugin.verdict import LocalVerdict, describe_inputs, note_in_band, settle


@dataclass(frozen=True)
class _Plan:
    group: object
    lss_size: int  # ranks of the LSS group the K/V collectives run over (R = N / U in the hybrid)
    lss_rank: int  # this rank in the LSS group
    causal: bool
    scale: float
    layout: str
    kv_backward: str
    kv_grad_dtype: str  # "fp32" | "input": the dtype the dK/dV reduce-scatter sends
    head_chunk: int  # KV heads gathered and attended at a time
    groups_per_kv: int  # query heads per KV head (GQA factor g)
    query_segments: tuple[Segment, ...]  # local queries cut at document (and ``chunk``) boundaries
    signature: CallSignature  # what every rank's gathers carry and compare
    band: Band | None = None  # the layer's band (causal and window) when a window is set, else None
    softcap: float | None = None
    exchange: ExchangePlan | None = None  # the sparse exchange's plan; None: the all-gather
    own_chunks: tuple[Chunk, ...] = ()  # the tokens this rank holds (its keys need no collective)

    def start_kv(self, k, v, header) -> Pending:
        """Issue this head chunk's K, V collective (k, v [b, s_local, c, d]); wait() -> ([2, b, c, L, d], rows)."""
        if self.exchange is not None:
            return start_exchange_kv(k, v, self.group, self.exchange, self.lss_rank, header)
        return start_gather_kv(k, v, self.group, self.layout, header)

    def start_dkv(self, dkv, send_dtype) -> Pending:
        """Issue this head chunk's dK, dV collective (dkv [2, b, c, L, d]); wait() -> [2, b, s_local, c, d]."""
        if self.exchange is not None:
            return start_return_dkv(dkv, self.group, self.exchange, self.lss_rank, send_dtype)
        return start_reduce_scatter_kv(dkv, self.group, self.layout, send_dtype)

    def head_slices(self, num_kv_heads: int):
        for h0 in range(0, num_kv_heads, self.head_chunk):
            h1 = min(h0 + self.head_chunk, num_kv_heads)
            yield slice(h0, h1), slice(h0 * self.groups_per_kv, h1 * self.groups_per_kv)


# ---------------------------------------------------------------------------------------------
# Validation: everything checkable locally is checked before any collective.
# ---------------------------------------------------------------------------------------------

def _validate(q, k, v, kv_head_chunk, softmax_scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [b, s_local, heads, d], got {shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: k {tuple(k.shape)} vs v {tuple(v.shape)}")
    b, s, h, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, s, d):
        raise ValueError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)} disagree on batch, local length or head dim"
        )
    if s == 0 or h == 0 or d == 0 or b == 0:
        raise ValueError(f"empty attention input: q {tuple(q.shape)}")
    hkv = k.shape[2]
    if h % hkv != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"attention needs floating-point inputs, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    check_kv_head_chunk(kv_head_chunk, hkv)  # the settings object checked the rest; only the heads bound it here
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale!r}")


# ---------------------------------------------------------------------------------------------
# Local attention of one head chunk: query chunks against the gathered, globally ordered K, V.
# ---------------------------------------------------------------------------------------------

def _merge(out_a, lse_a, out_b, lse_b):
    """Combine two partial softmax results over disjoint key sets by log-sum-exp.

    Computed in the dtype of ``lse_a`` (float32 for half inputs, as the kernels return lse), so a
    half-precision running ``out`` is not rounded once per merged block. A row that sees no key in
    either (lse -inf in both: a window's tile cut at the rank's own tokens, ``lss_plugin.blocks``)
    stays out 0, lse -inf instead of becoming NaN."""
    lse = torch.logaddexp(lse_a, lse_b)
    acc = lse.dtype
    ref = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)  # exp(-inf - 0) = 0 for keyless rows
    out = out_a.to(acc) * torch.exp(lse_a - ref).unsqueeze(-1) + out_b.to(acc) * torch.exp(lse_b - ref).unsqueeze(-1)
    return out, lse


def _one_call(qh, kv_heads: int, plan: _Plan) -> bool:
    """Prefix and diagonal in one kernel call: the kernel aligns a causal mask bottom-right and takes
    GQA natively (else the prefix's KV heads would be repeated; kernels.gqa repeats only diagonals)."""
    return plan.causal and causal_prefix_in_one_call(qh, kv_heads, softcap=plan.softcap)


def _pieces(qh, kv_heads: int, plan: _Plan):
    """This head chunk's kernel calls (``lss_plugin.blocks``), those on the rank's own keys marked."""
    return plan_pieces(plan.query_segments, plan.own_chunks, plan.causal, plan.band, _one_call(qh, kv_heads, plan))


def _mask_keywords(band, plan: _Plan) -> dict:
    """A block's ``band=`` / ``softcap=`` (only those set: a plain call's blocks are called as before)."""
    return {name: value for name, value in (("band", band), ("softcap", plan.softcap)) if value is not None}


def _own_kv(k, v, kv_heads: slice):
    """This rank's own K, V of a head chunk, as the gathered ones are laid out: [2, b, c, s_local, d]."""
    return torch.stack((k[:, :, kv_heads], v[:, :, kv_heads])).transpose(2, 3)


def _rows(piece: Piece, plan: _Plan) -> slice:
    seg = plan.query_segments[piece.segment]
    return slice(seg.local_start + piece.q0, seg.local_start + piece.q1)


def _attend_forward(qh, own_kv, arrive, plan: _Plan, sinks=None):
    """qh [b, hq, s_local, d], own_kv [2, b, hkv, s_local, d] (, sinks [hq]) -> out [b, hq, s_local, d],
    lse [b, hq, s_local] and the arrived kv [2, b, hkv, L, d].

    The pieces on the rank's own keys run first, while the K/V collective is in flight; ``arrive()``
    then waits for it, and the other pieces run on what arrived. Pieces of the same query rows merge
    by log-sum-exp in lse's dtype (float32 for half inputs); each out is rounded to the input dtype
    once, here: after the sinks' rescaling (``masks.apply_sinks``) when there are sinks."""
    partial = {}  # (segment, q0, q1) -> (out, lse), merged as pieces arrive

    def attend(piece: Piece, keys):
        keys = keys[:, :, :, piece.keys()]  # [2, b, hkv, m, d]
        o, l = block_forward(qh[:, :, _rows(piece, plan)], keys[0], keys[1], plan.scale, piece.causal,
                             **_mask_keywords(piece.band, plan))
        at = (piece.segment, piece.q0, piece.q1)
        partial[at] = _merge(*partial[at], o, l) if at in partial else (o, l)

    pieces = _pieces(qh, own_kv.shape[2], plan)
    for piece in pieces:
        if piece.own:
            attend(piece, own_kv)
    kv = arrive()
    for piece in pieces:
        if not piece.own:
            attend(piece, kv)
    lse = None
    for (segment, q0, q1), (o, l) in partial.items():
        if lse is None:  # lse's dtype: float32 for half inputs (the kernels'), the merges' accumulator
            lse = l.new_empty(qh.shape[:3])
            out = qh.new_empty(qh.shape, dtype=l.dtype)
        seg = plan.query_segments[segment]
        rows = slice(seg.local_start + q0, seg.local_start + q1)
        out[:, :, rows], lse[:, :, rows] = o, l
    if sinks is not None:
        out, lse = apply_sinks(out, lse, sinks)  # in lse's dtype (float32 for half inputs)
    return out.to(qh.dtype), lse, kv


def _attend_backward(dout_h, qh, out_h, lse, pieces, keys, plan: _Plan, dq, dkeys):
    """Add the gradients of ``pieces`` (all own, or all not) to dq [b, hq, s_local, d] and dkeys (own:
    [2, b, hkv, s_local, d], else [2, b, hkv, L, d]), both in ``compute_dtype``: a key's gradient sums
    every query chunk's (and, inside the kernel or ``kernels.gqa``, every GQA group's) before it is
    rounded or sent. ``keys``: own_kv or the gathered kv, laid out like dkeys."""
    for piece in pieces:
        rows, at = _rows(piece, plan), piece.keys()
        dq_b, dk_b, dv_b = block_backward(dout_h[:, :, rows], qh[:, :, rows], keys[0, :, :, at], keys[1, :, :, at],
                                          out_h[:, :, rows], lse[:, :, rows], plan.scale, piece.causal,
                                          **_mask_keywords(piece.band, plan))  # dq [b, hq, n, d], dk/dv [b, hkv, m, d]
        dq[:, :, rows] += dq_b
        dkeys[0, :, :, at] += dk_b
        dkeys[1, :, :, at] += dv_b


# ---------------------------------------------------------------------------------------------
# Pure forward / backward with the communication.
# ---------------------------------------------------------------------------------------------


def _header(plan: _Plan, gather: str, head_chunk_index: int, like: torch.Tensor):
    """This gather's signature row, bit-cast into the buffer's dtype (nothing on a group of one)."""
    return plan.signature.at(gather, head_chunk_index).encode(like.dtype, like.device) if plan.lss_size > 1 else None


class _Prefetched:
    """(kv_heads, q_heads, kv [2, b, c, L, d]) per head chunk, one gather ahead.

    Handing out chunk i starts the gather of chunk i+1; asking for chunk i+1 waits for it and checks
    every rank's signature before anything uses it. Nothing is referenced here once handed out, so
    at most two chunks are alive: the caller's and the one arriving."""

    def __init__(self, k, v, plan: _Plan, gather: str, flight: InFlight):
        self._k, self._v, self._plan, self._gather, self._flight = k, v, plan, gather, flight
        self._slices = list(plan.head_slices(k.shape[2]))
        self._index = 0
        self._pending = self._start(0)

    def _start(self, i: int):
        heads = self._slices[i][0]
        k, v = self._k[:, :, heads], self._v[:, :, heads]  # [b, s_local, c, d]
        return self._flight.start(self._plan.start_kv(k, v, _header(self._plan, self._gather, i, k)))

    def __iter__(self):
        return self

    def __next__(self):
        i = self._index
        if i == len(self._slices):
            raise StopIteration
        kv, headers = self._pending.wait()
        if headers is not None:  # [N, n]: compared on the device, reported by the next verdict
            note_in_band(headers)
        self._index += 1
        self._pending = self._start(i + 1) if i + 1 < len(self._slices) else None
        return (*self._slices[i], kv)


def _lss_forward(q, k, v, plan: _Plan, sinks=None):
    """q [b, s, H, d], k/v [b, s, Hkv, d] (, sinks [H]) -> out [b, s, H, d], lse [b, H, s], kept KV
    per head chunk. With sinks, out and lse are those with the sink (what backward runs on).

    Per head chunk: its own pieces run while its K/V collective is in flight; then it is waited for,
    the next chunk's starts, and the other pieces run while that one travels."""
    b, s, h, d = q.shape
    qh = q.transpose(1, 2)  # [b, H, s, d] (a view; kernels make what they need contiguous)
    out = torch.empty_like(q)  # [b, s, H, d]
    out_h = out.transpose(1, 2)
    lse = None
    kept = []
    with InFlight() as flight:
        arriving = _Prefetched(k, v, plan, "forward", flight)
        for kv_heads, q_heads in plan.head_slices(k.shape[2]):
            o, l, kv = _attend_forward(qh[:, q_heads], _own_kv(k, v, kv_heads), lambda: next(arriving)[2], plan,
                                       None if sinks is None else sinks[q_heads])  # kv [2, b, c, L, d]
            out_h[:, q_heads] = o
            if lse is None:
                lse = l.new_empty((b, h, s))
            lse[:, q_heads] = l
            if plan.kv_backward == "keep":
                kept.append(kv)
            del kv  # regather: free this chunk before the next one is unpacked
    return out, lse, kept


def _lss_backward(dout, q, k, v, out, lse, kept, plan: _Plan, sinks=None):
    """dq, dk, dv (and d sinks [H], None without sinks). ``out``, ``lse``: the forward's, sinks
    included; every block's backward runs on them unchanged, the sinks' gradient is per head chunk.

    Per head chunk: with ``regather`` the own pieces run while the chunk's K, V are gathered again;
    the other pieces run on the gathered K, V and their dK, dV start back to their owners; with
    ``keep`` the own pieces run while those travel. A chunk's dK, dV collective is waited for when
    the next chunk's starts (or at the end), and its own pieces' gradients are added then."""
    qh, dout_h, out_h = q.transpose(1, 2), dout.transpose(1, 2), out.transpose(1, 2)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dq_h = dq.transpose(1, 2)
    dsinks = None if sinks is None else torch.empty_like(sinks)
    acc = compute_dtype(q.dtype)

    def store(kv_heads, scatter, own_grads):  # waits for a chunk's dK/dV collective: [2, b, s, c, d]
        local = scatter.wait().to(acc) + own_grads.transpose(2, 3)
        dk[:, :, kv_heads] = local[0]
        dv[:, :, kv_heads] = local[1]

    with InFlight() as flight:
        regather = plan.kv_backward == "regather"
        arriving = _Prefetched(k, v, plan, "regather", flight) if regather else iter(kept)
        previous = None  # (kv_heads, dK/dV collective, own gradients) of the chunk before, in flight
        for kv_heads, q_heads in plan.head_slices(k.shape[2]):
            rows = dout_h[:, q_heads], qh[:, q_heads], out_h[:, q_heads], lse[:, q_heads]
            own_kv = _own_kv(k, v, kv_heads)  # [2, b, c, s, d]
            pieces = _pieces(rows[1], own_kv.shape[2], plan)
            own = [p for p in pieces if p.own]
            dq_c = torch.zeros_like(rows[1], dtype=acc)
            own_grads = torch.zeros_like(own_kv, dtype=acc)
            if regather:  # while this chunk's K, V are gathered again
                _attend_backward(*rows, own, own_kv, plan, dq_c, own_grads)
            kv = next(arriving)[2] if regather else next(arriving)  # [2, b, c, L, d]
            dkv = torch.zeros_like(kv, dtype=acc)  # keys no local query sees (other documents) stay zero
            _attend_backward(*rows, [p for p in pieces if not p.own], kv, plan, dq_c, dkv)
            send_dtype = acc if plan.kv_grad_dtype == "fp32" else kv.dtype
            del kv
            if previous is not None:
                store(*previous)  # its staging buffer is released before the next one is made
            previous = kv_heads, flight.start(plan.start_dkv(dkv, send_dtype)), own_grads
            del dkv
            if not regather:  # while this chunk's dK, dV travel
                _attend_backward(*rows, own, own_kv, plan, dq_c, own_grads)
            dq_h[:, q_heads] = dq_c
            if sinks is not None:
                dsinks[q_heads] = sinks_grad(dout_h[:, q_heads], out_h[:, q_heads], lse[:, q_heads], sinks[q_heads])
        store(*previous)
    return dq, dk, dv, dsinks


class _LSSAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, plan: _Plan):
        out, lse, kept = _lss_forward(q, k, v, plan, sinks)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse, sinks, *kept)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks, *kept = ctx.saved_tensors
        dq, dk, dv, dsinks = _lss_backward(dout, q, k, v, out, lse, kept, ctx.plan, sinks)
        return dq, dk, dv, dsinks, None


def lss_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    causal: bool = False,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    chunk: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    settings: AttentionSettings | None = None,
    **setting_keywords,
) -> torch.Tensor:
    """Exact attention of this rank's queries over the whole (sequence-parallel) sequence.

    ``settings``: what the call runs with (``lss_plugin.options.AttentionSettings``: layout,
    kv_backward, kv_head_chunk, kv_buffer_mib, kv_grad_dtype; None: the defaults), as every adapter
    passes it. Compatibility: the same settings as keywords (``layout="contiguous"``, ...) build it
    here; passing both is refused.

    q: [b, s_local, H, d]; k, v: [b, s_local, Hkv, d] with H % Hkv == 0 (GQA/MQA; KV heads are
    communicated un-repeated). Returns [b, s_local, H, d]. ``group``: a ProcessGroup (pure LSS over
    it), a ``SequenceGroups`` / ``LSSTopology`` (hybrid LSS x Ulysses when its ulysses_size U > 1),
    or None (the registered topology's). Hybrid: H % U == 0; KV heads are split over the Ulysses
    group, or replicated to lcm(Hkv, U) when U does not divide them (``check_ulysses_heads``);
    tokens follow ``local_token_indices(..., ulysses_size=U)``; ``kv_head_chunk`` counts the
    Hkv' / U KV heads a rank holds after the all-to-all. ``causal`` masks by *global* position under ``layout``.
    ``kv_grad_dtype``: "fp32" (default) reduce-scatters dK/dV of half inputs as float32, "input"
    in the input dtype (half the backward bytes); float32/float64 inputs send their own dtype either way.
    ``cu_seqlens``: packed documents, a 1-D integer tensor of boundaries in *global* positions
    (``0 = cu[0] < ... < cu[-1] = L``), the same on every rank, shared by the batch rows; no token
    attends outside its document (causal inside it with ``causal``). See ``lss_plugin.documents``.
    ``kv_head_chunk``: None (all KV heads in one gather), c (c KV heads per gather, pipelined) or
    "auto" (``lss_plugin.options.auto_head_chunk``, within ``kv_buffer_mib`` MiB when given, else
    ``LSS_KV_BUFFER_MIB``); ``kv_backward="auto"`` regathers exactly when K, V are chunked for memory.

    Per-layer masks (``lss_plugin.masks``), all in *global* positions, inside each document, and
    composing with ``causal`` (None: a plain call, bit for bit):
    ``window=(left, right)``: query q sees keys ``q - left <= k <= q + right`` (and ``k <= q`` when
    causal). transformers' ``sliding_window = W`` keeps W keys including the query's own: ``(W - 1, 0)``
    (flash-attn ``window_size=(W - 1, 0)``; ``masks.MaskSpec.sliding(W)``); megatron-core's
    ``window_size`` is ``(left, right)`` as here. Non-causal calls take both sides.
    ``chunk=C``: chunked attention (Llama 4 ``attention_chunk_size``): only keys of the same C-aligned
    chunk of global positions, ``k // C == q // C`` (RoPE positions are the caller's and do not restart).
    ``softcap``: ``cap * tanh(s / cap)`` on the scaled scores ``s``, before masking (Gemma 2
    ``attn_logit_softcapping``).
    ``sinks``: [H] floating tensor on q's device, one logit per query head of this rank (TP: the rank's
    heads; the hybrid slices them itself), added to every row's softmax denominator without a value
    (gpt-oss ``s_aux``, megatron-core ``softmax_type="learnable"``; ``"off-by-one"`` is sinks fixed at
    0). Learnable: its gradient (this rank's queries' part, in sinks' dtype) flows back through
    autograd; sum / average it over the SP group like any weight's.
    Keys outside a window or chunk are never computed; masks change no collective.
    """
    groups = resolve_sequence_groups(group)  # no group to settle on: the same refusal on every rank
    # Every local check leaves its verdict; ONE fixed-size all-gather decides for the whole SP group
    # before any variable-size collective (lss_plugin.verdict), so a refusal is every rank's: the
    # settings are built inside it too (a bad keyword or LSS_KV_BUFFER_MIB on one rank only).
    local = LocalVerdict(lambda: describe_inputs(q, k, v, cu_seqlens))
    masks = _Masks(window, chunk, softcap, sinks)
    call = local.attempt(_plan_call, q, k, v, groups, causal, softmax_scale, cu_seqlens, settings, setting_keywords,
                         masks)
    settle(local, groups.sp_group, None if call is None else call[0].signature.to_bytes())
    plan, kv_heads = call
    if groups.ulysses_size == 1:
        out = _LSSAttentionFunction.apply(q, k, v, sinks, plan)
    else:
        out = _hybrid_attention(q, k, v, sinks, plan, groups, kv_heads)
    return _BackwardVerdict.apply(out, groups.sp_group, plan.signature) if groups.sp_size > 1 else out


@dataclass(frozen=True)
class _Masks:
    """A call's per-layer mask arguments, as given (checked by ``_check_masks`` inside the verdict)."""

    window: object = None
    chunk: object = None
    softcap: object = None
    sinks: object = None


def _check_masks(masks: _Masks, q, causal) -> MaskSpec:
    """The call's MaskSpec; ValueError naming the value for a bad window, chunk, softcap or sinks."""
    window = tuple(masks.window) if isinstance(masks.window, list) else masks.window
    spec = MaskSpec(bool(causal), window, masks.chunk)  # validates window and chunk
    check_softcap(masks.softcap)
    sinks = masks.sinks
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor):
            raise ValueError(f"sinks must be a 1-D floating tensor [H] (one logit per query head), "
                             f"got {type(sinks).__name__}")
        if sinks.dim() != 1 or sinks.shape[0] != q.shape[2] or not sinks.dtype.is_floating_point:
            raise ValueError(f"sinks must be a 1-D floating tensor of this rank's {q.shape[2]} query heads, "
                             f"got shape {tuple(sinks.shape)} dtype {sinks.dtype}")
        if sinks.device != q.device:
            raise ValueError(f"sinks must be on q's device {q.device}, got {sinks.device}")
    return spec


def _plan_call(q, k, v, groups, causal, softmax_scale, cu_seqlens, settings, setting_keywords, masks=_Masks()):
    """Every check of one call that reads only this rank's inputs and settings, and its plan; no collective.
    Returns (plan, KV heads after the hybrid's replication)."""
    settings = settings_from_keywords(settings, setting_keywords, "lss_attention")
    layout, kv_backward, kv_head_chunk = settings.layout, settings.kv_backward, settings.kv_head_chunk
    kv_grad_dtype, kv_buffer_mib = settings.kv_grad_dtype, settings.kv_buffer_mib
    _validate(q, k, v, kv_head_chunk, softmax_scale)
    check_mode()  # LSS_CHECK_CONSISTENCY: only its retired value is refused (lss_plugin.signature)
    spec = _check_masks(masks, q, causal)
    # A causal-only band would steer blocks away from kernels without one (the sdpa ones on GPU): only windows send it.
    band = spec.band if spec.window is not None else None
    # LSS_ATTENTION_KERNEL: a kernel that cannot run here, or cannot take the masks, is refused before any collective
    select_kernel(q, band=band, softcap=masks.softcap)
    b, s, h, d = q.shape
    hkv = k.shape[2]
    u = groups.ulysses_size
    # The LSS part runs on the Ulysses group's tokens (U * s of them, laid out over the R LSS ranks)
    # with H / U query heads and Hkv' / U KV heads (Hkv' = Hkv, or lcm(Hkv, U) replicated); U = 1: as given.
    kv_heads = check_ulysses_heads(h, hkv, u) if u > 1 else hkv
    if u > 1:
        check_kv_head_chunk(kv_head_chunk, kv_heads // u, "kv_head_chunk (KV heads per rank after the all-to-all)")
    seq_len = s * groups.sp_size
    bounds = (0, seq_len) if cu_seqlens is None else check_cu_seqlens(cu_seqlens, seq_len)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    backend = backend_of(groups.lss_group, q.device) if groups.lss_size > 1 else None
    head_chunk, kv_backward = resolve_kv_chunking(kv_head_chunk, kv_backward, kv_buffer_mib, b, seq_len, kv_heads // u,
                                                   d, q.dtype.itemsize, settings.link_gbit, backend)
    exchange = None  # the all-gather
    if settings.kv_exchange != "gather" and groups.lss_size > 1:
        # a pure function of values every rank shares (lss_plugin.exchange); its digest is signed below
        exchange = exchange_plan(layout, groups.lss_size, u * s, bool(causal), bounds, spec.window, spec.chunk)
        if resolve_kv_exchange(settings.kv_exchange, exchange) == "gather":
            exchange = None
    signature = CallSignature(
        batch=b, s_local=s, heads=h, kv_heads=hkv, head_dim=d, dtype=q.dtype, layout=layout,
        causal=bool(causal), kv_backward=kv_backward, kv_head_chunk=head_chunk, softmax_scale=scale,
        kv_grad_dtype=kv_grad_dtype, documents=digest(bounds), ulysses=u,
        window=spec.window, chunk=spec.chunk, softcap=masks.softcap, sinks=masks.sinks is not None,
        exchange=0 if exchange is None else exchange.digest,
    )
    signature.to_bytes()  # a value too wide for its field fails here, before any collective
    own_chunks = rank_chunks(u * s, groups.lss_rank, groups.lss_size, layout)
    plan = _Plan(
        group=groups.lss_group,
        lss_size=groups.lss_size,
        lss_rank=groups.lss_rank,
        causal=bool(causal),
        scale=scale,
        layout=layout,
        kv_backward=kv_backward,
        kv_grad_dtype=kv_grad_dtype,
        head_chunk=head_chunk,
        groups_per_kv=h // kv_heads,
        # chunked attention is packed documents with more boundaries (masks.refine_bounds)
        query_segments=query_segments(own_chunks, refine_bounds(bounds, spec.chunk)),
        own_chunks=tuple(own_chunks),
        signature=signature,
        band=band,
        softcap=masks.softcap,
        exchange=exchange,
    )
    return plan, kv_heads


class _BackwardVerdict(torch.autograd.Function):
    """Identity on the call's output whose backward settles a verdict (signature at gather "backward")
    over the SP group before any backward collective of the call: a rank in this backward meeting a
    rank in another call's forward (or backward) raises on every rank instead of pairing collectives."""

    @staticmethod
    def forward(ctx, out, sp_group, signature):
        ctx.sp_group, ctx.signature = sp_group, signature
        return out.view_as(out)

    @staticmethod
    def backward(ctx, dout):
        settle(LocalVerdict(), ctx.sp_group, ctx.signature.at("backward", 0).to_bytes())
        return dout, None, None


def _hybrid_attention(q, k, v, sinks, plan: _Plan, groups, kv_heads: int):
    """LSS x Ulysses: all-to-all in the Ulysses group, the LSS path over the LSS group, all-to-all back.

    q [b, s, H, d], k/v [b, s, Hkv, d] -> [b, s, H, d]. KV heads are replicated to ``kv_heads``
    first when U does not divide Hkv (autograd sums the copies' gradients). Forward: ONE fused
    all-to-all of q, k, v (carrying this rank's signature row) + the LSS collectives + ONE back;
    backward: ONE all-to-all of dout + the LSS collectives + ONE fused all-to-all of dq, dk, dv.
    ``sinks`` [H]: this rank's slice after the all-to-all is the query heads it gets, slice
    ``ulysses_rank`` of U (``ulysses.seq_to_heads``); autograd routes the slice's gradient back."""
    ulysses_group = groups.ulysses_group
    k, v = replicate_kv_heads(k, kv_heads), replicate_kv_heads(v, kv_heads)
    row = plan.signature.encode(q.dtype, q.device)  # [SIGNATURE_BYTES / itemsize]
    qh, kh, vh, rows = to_heads(q, k, v, group=ulysses_group, header=row)  # [b, U*s, H/U | Hkv'/U, d]
    note_in_band(rows)  # [U, n]: compared on the device, reported by the next verdict
    if sinks is not None:
        per_rank = sinks.shape[0] // groups.ulysses_size
        sinks = sinks[groups.ulysses_rank * per_rank:(groups.ulysses_rank + 1) * per_rank]  # [H/U]
    out = _LSSAttentionFunction.apply(qh, kh, vh, sinks, plan)  # [b, U*s, H/U, d]
    return to_sequence(out, group=ulysses_group)[0]


class LSSAttention(torch.nn.Module):
    """``lss_attention`` with its settings fixed at construction (no parameters): ``settings=`` or the
    settings' keywords (``layout=``, ...), checked here, not at a call."""

    def __init__(self, *, group=None, causal=True, softmax_scale=None, settings: AttentionSettings | None = None,
                 **setting_keywords):
        super().__init__()
        self.group, self.causal, self.softmax_scale = group, causal, softmax_scale
        self.settings = settings_from_keywords(settings, setting_keywords, "LSSAttention")

    @property
    def lss_attention_settings(self) -> AttentionSettings:
        """What this module's ``lss_attention`` calls run with (read by ``lss_plugin.model_settings``)."""
        return self.settings

    def forward(self, q, k, v, cu_seqlens=None, *, window=None, chunk=None, softcap=None, sinks=None):
        """Masks are per call (per layer): see ``lss_attention``."""
        return lss_attention(q, k, v, group=self.group, causal=self.causal, softmax_scale=self.softmax_scale,
                             cu_seqlens=cu_seqlens, window=window, chunk=chunk, softcap=softcap, sinks=sinks,
                             settings=self.settings)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, {self.settings}"
