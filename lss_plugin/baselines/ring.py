"""Ring Self-Attention (Li et al., 2021) in PyTorch: K/V blocks travel around the SP group.

Every rank keeps its queries. At step i, rank r holds the packed K/V block of rank (r - i) mod N,
attends to it, and passes it on to rank r + 1 with point-to-point ``isend``/``irecv`` (overlapped
with the block's compute). Partial results are merged exactly with running max / log-sum-exp, so
the output equals full attention. Backward sends the K/V blocks around again, together with their
gradient accumulators, which arrive at their owner after N hops (as ring-flash-attention does).

Communication per rank and layer (N > 1), K/V never repeated for GQA:
  forward  N - 1 sends of packed [2, b, s_local, hkv, d]
  backward N - 1 sends of K/V + N sends of packed dK/dV (same size)

Three layers, as in ring-flash-attention: pure forward/backward functions holding the
communication, a thin ``autograd.Function``, and ``ring_attention`` with an SDPA-like signature.
When ``flash_attn`` and ``ring_flash_attn`` are importable (GPUs), ``ring_attention`` uses
ring-flash-attention's kernel instead for the contiguous layout.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from lss_plugin.sharding import check_layout, local_token_indices

_NEG_INF = float("-inf")


def _ring_exchange(buf: torch.Tensor, group, rank: int, size: int):
    """Start sending ``buf`` to the next rank and receiving the previous rank's into a new buffer."""
    nxt = dist.get_global_rank(group, (rank + 1) % size)
    prv = dist.get_global_rank(group, (rank - 1) % size)
    recv = torch.empty_like(buf)
    works = [dist.isend(buf, nxt, group=group), dist.irecv(recv, prv, group=group)]
    return recv, works


def _wait(works) -> None:
    for w in works:
        w.wait()


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, hkv, s, d] -> [b, heads, s, d] (query head h reads KV head h // (heads / hkv))."""
    hkv = x.shape[1]
    return x if hkv == heads else x.repeat_interleave(heads // hkv, dim=1)


def _reduce_kv_heads(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """[b, heads, s, d] -> [b, hkv, s, d]: gradient of ``_expand_kv``."""
    b, heads, s, d = x.shape
    return x if heads == hkv else x.view(b, hkv, heads // hkv, s, d).sum(dim=2)


def _block_scores(q, k, scale, q_pos, k_pos, causal):
    """q [b, h, sq, d], k [b, h, sk, d] -> scores [b, h, sq, sk] with -inf where masked."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], _NEG_INF)
    return scores


def _fully_masked(q_pos, k_pos, causal) -> bool:
    return causal and bool(k_pos.min() > q_pos.max())


def ring_forward(q, k, v, group, scale, causal, layout):
    """q [b, h, s, d], k/v [b, hkv, s, d] (local) -> out [b, h, s, d], lse [b, h, s]."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    heads, s_local = q.shape[1], q.shape[2]
    seq_len = s_local * size
    q_pos = local_token_indices(seq_len, rank, size, layout).to(q.device)
    kv = torch.stack((k, v)).contiguous()  # [2, b, hkv, s, d]: one message per hop
    row_max = q.new_full(q.shape[:-1], _NEG_INF)  # [b, h, s]
    row_sum = q.new_zeros(q.shape[:-1])
    acc = torch.zeros_like(q)
    for step in range(size):
        if step + 1 < size:
            next_kv, works = _ring_exchange(kv, group, rank, size)
        src = (rank - step) % size
        k_pos = local_token_indices(seq_len, src, size, layout).to(q.device)
        if not _fully_masked(q_pos, k_pos, causal):
            kb, vb = _expand_kv(kv[0], heads), _expand_kv(kv[1], heads)
            scores = _block_scores(q, kb, scale, q_pos, k_pos, causal)
            new_max = torch.maximum(row_max, scores.amax(dim=-1))
            safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            alpha = torch.exp(row_max - safe_max)  # 0 where nothing was seen yet
            p = torch.exp(scores - safe_max.unsqueeze(-1))
            acc = acc * alpha.unsqueeze(-1) + torch.matmul(p, vb)
            row_sum = row_sum * alpha + p.sum(dim=-1)
            row_max = new_max
        if step + 1 < size:
            _wait(works)
            kv = next_kv
    safe_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    out = acc / row_sum.clamp_min(torch.finfo(acc.dtype).tiny).unsqueeze(-1)
    lse = safe_max + torch.log(row_sum)
    return out, lse


def ring_backward(dout, q, k, v, out, lse, group, scale, causal, layout):
    """Gradients of ``ring_forward``: dq [b, h, s, d] and dk, dv [b, hkv, s, d] of the local block."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    heads, hkv, s_local = q.shape[1], k.shape[1], q.shape[2]
    seq_len = s_local * size
    q_pos = local_token_indices(seq_len, rank, size, layout).to(q.device)
    delta = (dout * out).sum(dim=-1, keepdim=True)  # [b, h, s, 1]
    dq = torch.zeros_like(q)
    kv = torch.stack((k, v)).contiguous()  # [2, b, hkv, s, d]
    dkv = None  # accumulator of the block currently held, travels with it
    dkv_works = None
    for step in range(size):
        if step + 1 < size:
            next_kv, works = _ring_exchange(kv, group, rank, size)
        src = (rank - step) % size
        k_pos = local_token_indices(seq_len, src, size, layout).to(q.device)
        block = torch.zeros_like(kv)  # [2, b, hkv, s, d]
        if not _fully_masked(q_pos, k_pos, causal):
            kb, vb = _expand_kv(kv[0], heads), _expand_kv(kv[1], heads)
            scores = _block_scores(q, kb, scale, q_pos, k_pos, causal)
            p = torch.exp(scores - lse.unsqueeze(-1))  # [b, h, sq, sk], 0 where masked
            block[1] = _reduce_kv_heads(torch.matmul(p.transpose(-1, -2), dout), hkv)
            ds = p * (torch.matmul(dout, vb.transpose(-1, -2)) - delta)
            dq = dq + torch.matmul(ds, kb) * scale
            block[0] = _reduce_kv_heads(torch.matmul(ds.transpose(-1, -2), q) * scale, hkv)
        if dkv is None:
            dkv = block
        else:
            _wait(dkv_works)
            dkv = dkv + block
        if size > 1:
            sending = dkv  # kept referenced until its send is waited on
            dkv, dkv_works = _ring_exchange(sending, group, rank, size)
        if step + 1 < size:
            _wait(works)
            kv = next_kv
    if size > 1:
        _wait(dkv_works)  # after N hops the accumulator of our own block is back
    return dq, dkv[0], dkv[1]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, scale, causal, layout):
        out, lse = ring_forward(q, k, v, group, scale, causal, layout)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, scale, causal, layout)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None


def _flash_ring_available() -> bool:
    try:
        import flash_attn  # noqa: F401
        import ring_flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def ring_attention(q, k, v, *, group, causal=False, softmax_scale=None, layout="contiguous",
                   use_flash=None):
    """Ring attention over ``group``. q [b, s_local, h, d], k/v [b, s_local, hkv, d] -> [b, s_local, h, d].

    ``layout`` says which global positions each rank holds (as in ``lss_plugin.sharding``); it only
    matters for the causal mask.
    """
    check_layout(layout)
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q [b, s, h, d] and k, v [b, s, hkv, d], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] != k.shape[1] or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"q heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]} and "
                         f"local lengths must agree ({q.shape[1]} vs {k.shape[1]})")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if use_flash is None:
        use_flash = _flash_ring_available() and layout == "contiguous"
    if use_flash:
        from ring_flash_attn import ring_flash_attn_func

        heads, hkv = q.shape[2], k.shape[2]
        if hkv != heads:  # ring-flash-attention's kernel expects equal head counts
            k = k.repeat_interleave(heads // hkv, dim=2)
            v = v.repeat_interleave(heads // hkv, dim=2)
        return ring_flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, group=group)
    # [b, s, h, d] -> [b, h, s, d] for the block matmuls
    out = _RingAttention.apply(q.transpose(1, 2), k.transpose(1, 2).contiguous(),
                               v.transpose(1, 2).contiguous(), group, scale, causal, layout)
    return out.transpose(1, 2)
