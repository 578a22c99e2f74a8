"""Double gradient averaging: stage 1 over the SP group, stage 2 over the DP group.

Every parameter is replicated on every rank of the SP x DP grid, so each rank's gradient is
partial. After ``average_gradients`` every rank holds the gradient of the global token-mean loss:
  stage 1 (SP): plain average. The dK/dV reduce-scatter already routed cross-segment terms to
                their owners, and ``sharded_cross_entropy`` normalised by the group's token count.
  stage 2 (DP): average weighted by each DP shard's loss tokens (equal weights without counts).
``mode="fused"`` does the same in one all-reduce over the whole grid. Gradients travel in a few
flat buckets (one collective per bucket and stage); the token counts ride in the first bucket.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lss_plugin.comm import all_reduce_sum
from lss_plugin.topology import LSSTopology, get_topology

GRAD_AVERAGING_MODES = ("two_stage", "fused")
DEFAULT_BUCKET_BYTES = 32 * 1024 * 1024


def _buckets(params, bucket_bytes):
    """Group parameters by dtype and device into runs of at most ``bucket_bytes`` (at least one each)."""
    by_kind: dict = {}
    for p in params:
        by_kind.setdefault((p.dtype, p.device), []).append(p)
    for group in by_kind.values():
        bucket, size = [], 0
        for p in group:
            nbytes = p.numel() * p.element_size()
            if bucket and size + nbytes > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append(p)
            size += nbytes
        if bucket:
            yield bucket


def _sequence_tokens(num_tokens, topology: LSSTopology, device) -> float:
    """Loss tokens of this rank's whole SP group (one scalar all-reduce; fused mode only)."""
    count = torch.tensor([float(num_tokens)], dtype=torch.float64, device=device)
    all_reduce_sum(count, topology.sp_group)
    return count.item()


@torch.no_grad()
def average_gradients(
    parameters,
    topology: LSSTopology | None = None,
    mode: str = "two_stage",
    num_tokens: int | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> None:
    """Turn every rank's local-loss gradients into the gradient of the global token-mean loss.

    ``num_tokens``: this rank's loss-token count (None: every rank has the same count). Parameters
    without a gradient count as zeros (they get a zero ``.grad``). Every rank must pass the same
    parameters in the same order.
    """
    if mode not in GRAD_AVERAGING_MODES:
        raise ValueError(f"mode must be one of {GRAD_AVERAGING_MODES}, got {mode!r}")
    if num_tokens is not None and (int(num_tokens) != num_tokens or num_tokens < 0):
        raise ValueError(f"num_tokens must be a non-negative integer, got {num_tokens!r}")
    topology = topology or get_topology()
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if mode == "fused":
        _require_replicated_grid(topology, "fused gradient averaging")
    sp, weighted = topology.sp_size, num_tokens is not None
    shard_tokens = total_tokens = None  # loss tokens of this SP group / of the whole grid
    buckets = list(_buckets(params, bucket_bytes))
    # Token counts ride in a slot of the first bucket, unless its dtype cannot hold them exactly.
    slot_ok = bool(buckets) and buckets[0][0].dtype in (torch.float32, torch.float64)
    if weighted and (mode == "fused" or not slot_ok):
        shard_tokens = _sequence_tokens(num_tokens, topology, params[0].device if params else None)
    if weighted and not slot_ok:
        total = torch.tensor([shard_tokens], dtype=torch.float64, device=params[0].device if params else None)
        all_reduce_sum(total, topology.dp_group)
        total_tokens = total.item()
    for i, bucket in enumerate(buckets):
        count_slot = 1 if (weighted and slot_ok and i == 0) else 0
        # flat: [numel of the bucket (+ 1 token-count slot in the first bucket)]
        flat = torch.cat([p.grad.reshape(-1) for p in bucket] + [bucket[0].grad.new_zeros(count_slot)])
        grads = flat[: flat.numel() - count_slot]
        if mode == "two_stage":
            if count_slot:
                flat[-1] = float(num_tokens)
            all_reduce_sum(flat, topology.sp_group)  # stage 1: SP
            grads.div_(sp)
            if weighted:
                if count_slot:
                    shard_tokens = flat[-1].item()
                _scale_or_zero(grads, shard_tokens)
            all_reduce_sum(flat, topology.dp_group)  # stage 2: DP (count slot sums shard tokens)
        else:
            if weighted:
                _scale_or_zero(grads, shard_tokens / sp)
                if count_slot:
                    flat[-1] = shard_tokens / sp  # summed over the N ranks of each shard
            else:
                grads.div_(sp)
            all_reduce_sum(flat, dist.group.WORLD)
        if weighted:
            if count_slot:
                total_tokens = flat[-1].item()
            _scale_or_zero(grads, 1.0 / total_tokens if total_tokens > 0 else 0.0)
        else:
            grads.div_(topology.dp_size)
        offset = 0
        for p in bucket:
            p.grad.copy_(grads[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()


def _require_replicated_grid(topology: LSSTopology, caller: str) -> None:
    """Reductions over WORLD are right only when the world is the SP x DP grid alone."""
    if topology.world_size != dist.get_world_size():
        raise RuntimeError(f"{caller} needs the topology to span the whole world")
    if not topology.replicates_parameters_over_whole_world:
        raise ValueError(
            f"{caller} reduces over the whole world, but the grid has tp({topology.tp_size}) and "
            f"pp({topology.pp_size}) axes whose ranks hold different shards: reduce over the SP and "
            "DP groups instead (average_gradients mode='two_stage', or Megatron's finalize_model_grads)"
        )


def _scale_or_zero(t: torch.Tensor, factor: float) -> None:
    """Multiply in place; a zero factor gives zeros even where ``t`` holds inf or NaN."""
    if factor == 0:
        t.zero_()
    else:
        t.mul_(factor)


@torch.no_grad()
def reduce_loss(local_loss, topology: LSSTopology | None = None, num_tokens: int | None = None) -> torch.Tensor:
    """The global mean loss for logging, the same value on every rank (one small all-reduce).

    ``local_loss`` is the mean over this rank's tokens; with ``num_tokens`` the result is the
    token-weighted mean (a rank without tokens contributes nothing, even if its loss is NaN).
    """
    topology = topology or get_topology()
    loss = torch.as_tensor(local_loss).detach().to(torch.float64).reshape(())
    if num_tokens is None:
        pair = torch.stack([loss, torch.ones((), dtype=torch.float64, device=loss.device)])
    else:
        tokens = torch.tensor(float(num_tokens), dtype=torch.float64, device=loss.device)
        pair = torch.stack([loss * tokens if num_tokens > 0 else torch.zeros_like(loss), tokens])
    group = dist.group.WORLD
    _require_replicated_grid(topology, "reduce_loss")
    all_reduce_sum(pair, group)
    return pair[0] / pair[1] if pair[1] > 0 else torch.zeros((), dtype=torch.float64)
