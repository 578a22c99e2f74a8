"""DeepSpeed-Ulysses as a baseline: ``deepspeed.sequence.layer.DistributedAttention`` around SDPA.

Ulysses trades the sequence split for a head split with all-to-alls: q, k, v [b, s_local, h, d]
become [b, L, h/N, d], attention runs on whole sequences for a slice of heads, and one more
all-to-all brings the output back to [b, s_local, h, d]. Per layer and rank: 4 all-to-alls forward
(q, k, v, out) and 4 backward; KV heads are never repeated (GQA needs hkv divisible by N).

All-to-all gathers the sequence in rank order, so the causal mask is only right for the contiguous
layout; the balanced layout is refused.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ensure_deepspeed_comm(backend: str | None = None) -> None:
    """Make ``deepspeed.comm`` adopt the already-initialised torch.distributed process group."""
    import deepspeed.comm as ds_comm
    from deepspeed.comm import comm as ds_comm_impl

    if ds_comm_impl.cdb is None or not ds_comm_impl.cdb.is_initialized():
        import importlib

        ds_torch_backend = importlib.import_module("deepspeed.comm.torch")

        from lss_plugin.runtime import default_backend

        # On CPU, deepspeed.comm JIT-builds a shared-memory op used only by inference_all_reduce
        # (20-400 s on a busy machine, racing other processes on its build lock). Ulysses needs
        # all_to_all_single only, which goes straight to torch.distributed: skip the build.
        build = ds_torch_backend.build_shm_op
        ds_torch_backend.build_shm_op = lambda: None
        try:
            ds_comm.init_distributed(dist_backend=backend or default_backend(),
                                     auto_mpi_discovery=False, verbose=False)
        finally:
            ds_torch_backend.build_shm_op = build


class _LocalSDPA(torch.nn.Module):
    """Full-sequence attention for the heads this rank holds after the all-to-all."""

    def __init__(self, causal: bool, softmax_scale: float | None):
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale

    def forward(self, q, k, v, *args, **kwargs):
        # q [b, L, h/N, d], k/v [b, L, hkv/N, d] -> [b, L, h/N, d]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scale = self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        # enable_gqa: the fused kernel reads the KV heads un-repeated
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2)


class UlyssesAttention(torch.nn.Module):
    """q [b, s_local, h, d], k/v [b, s_local, hkv, d] -> [b, s_local, h, d] over ``group``."""

    def __init__(self, group, *, causal: bool = False, softmax_scale: float | None = None,
                 num_kv_heads: int | None = None):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        ensure_deepspeed_comm()
        self.group = group
        self.attn = DistributedAttention(_LocalSDPA(causal, softmax_scale), group,
                                         scatter_idx=2, gather_idx=1, num_kv_heads=num_kv_heads)

    def forward(self, q, k, v):
        import torch.distributed as dist

        size = dist.get_world_size(self.group)
        if q.shape[2] % size or k.shape[2] % size:
            raise ValueError(f"Ulysses needs heads ({q.shape[2]}) and kv heads ({k.shape[2]}) "
                             f"divisible by the sequence-parallel size ({size})")
        return self.attn(q, k, v, batch_dim_idx=0)


def ulysses_attention(q, k, v, *, group, causal=False, softmax_scale=None, layout="contiguous"):
    """Functional form (builds the DeepSpeed module on each call; it holds no parameters)."""
    if layout != "contiguous":
        raise ValueError(f"Ulysses gathers the sequence in rank order: layout must be 'contiguous', "
                         f"got {layout!r}")
    return UlyssesAttention(group, causal=causal, softmax_scale=softmax_scale)(q, k, v)
