"""Double gradient averaging inside DeepSpeed's own gradient reduction.

What DeepSpeed 0.19.8 does by itself, given an mpu with a sequence-parallel group of size N and
a data-parallel group of size D: it all-reduces (ZeRO 0) or reduce-scatters (ZeRO 1/2/3) the
gradients over the whole N x D grid and divides by ``world(grid) / N = D``
(``engine._reduce_non_expert_gradients``; ``stage_1_and_2.average_tensor``,
``gradient_reduction_w_predivide``, ``allreduce_bucket``; ``stage3`` likewise). That is a *sum*
over the SP ranks, right for Ulysses, whose loss is normalised over the whole sequence. LSS's
loss is the mean over each rank's own tokens, so that sum is N times the gradient of the global
mean loss (measured: tests/test_deepspeed.py::test_deepspeed_alone_sums_over_sp, ratio N).

The correction, per reduction path, without touching the user's loss:

- ZeRO 0, ``grad_averaging`` "two_stage" (or "auto"): the engine's ``buffered_allreduce_fallback``
  is replaced by ``lss_plugin.average_gradients`` (average over SP, then over DP).
- ZeRO 0 "fused", and engines whose gradients LSS cannot average itself (the bf16 optimizer's fp32
  copies, MoE, sparse embeddings; "two_stage" is refused there by name): DeepSpeed's bucketed
  all-reduce over the grid stays, and the divisor it is handed becomes the grid size N x D
  (``allreduce_bucket`` / ``sparse_allreduce`` wrapped).
- ZeRO 1, 2, 3: the partitioned reduction runs over the whole grid (where the optimizer state
  lives), one collective ("fused"; "two_stage" refused). The ZeRO optimizer's divisor
  ``world(grid) / sequence_parallel_size`` becomes ``world(grid)`` by setting its
  ``sequence_parallel_size`` attribute to 1 (stage 3's default reduce-scatter path divides by the
  group size already). ZeRO 3 also needs its parameters partitioned over the grid: ``zero3``.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from lss_plugin.topology import LSSTopology



def install_lss_gradient_averaging(engine, topology: LSSTopology, grad_averaging: str) -> str:
    """Make ``engine`` average gradients over SP and DP; returns a one-line description.

    ``grad_averaging`` is the block's setting ("auto", "two_stage" or "fused"); a mode this
    engine's reduction path cannot honour is refused by name (``LSSConfigError``) on every rank.
    """
    from lss_plugin.deepspeed.config import resolve_grad_averaging

    if not getattr(engine, "gradient_average", True):
        raise ValueError(
            'LSS needs gradients averaged, but the DeepSpeed config sets "gradient_allreduce_op" '
            "to a sum: remove it"
        )
    stage = int(engine.zero_optimization_stage())
    if stage != 0 and not hasattr(engine.optimizer, "get_grads_for_reduction"):
        resolve_grad_averaging(grad_averaging, stage)  # refuses "two_stage"
        return _install_zero_partitioned(engine, topology, stage)
    # ZeRO 0, and the bf16 optimizer of ZeRO 1 (bf16 + fp32 accumulation): the engine's all-reduce.
    mode = resolve_grad_averaging(grad_averaging, stage, _two_stage_blocker(engine))
    return _install_allreduce(engine, topology, mode)


def _two_stage_blocker(engine) -> str | None:
    """Why the engine's gradients cannot be averaged in two stages by LSS itself (None: they can)."""
    if engine.has_moe_layers:
        return "MoE layers"
    if hasattr(engine.optimizer, "get_grads_for_reduction"):
        return f"{type(engine.optimizer).__name__} reduces its own fp32 gradient copies"
    if any(isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse for m in engine.module.modules()):
        return "sparse embedding gradients"
    return None


def _install_allreduce(engine, topology: LSSTopology, grad_averaging: str) -> str:
    grid_group = engine.seq_data_parallel_group
    grid_size = dist.get_world_size(grid_group)

    # DeepSpeed's own path, with the divisor corrected from D to N x D.
    def _grid_divisor(dp_group, dp_world_size):
        if dp_world_size is not None and dp_group is grid_group:
            return grid_size
        return dp_world_size

    allreduce_bucket = engine.allreduce_bucket
    sparse_allreduce = engine.sparse_allreduce

    @functools.wraps(allreduce_bucket)
    def lss_allreduce_bucket(bucket, dp_group, dp_world_size=None):
        return allreduce_bucket(bucket, dp_group, _grid_divisor(dp_group, dp_world_size))

    @functools.wraps(sparse_allreduce)
    def lss_sparse_allreduce(sparse, dp_group, dp_world_size=None):
        return sparse_allreduce(sparse, dp_group, _grid_divisor(dp_group, dp_world_size))

    engine.allreduce_bucket = lss_allreduce_bucket
    engine.sparse_allreduce = lss_sparse_allreduce
    if grad_averaging == "fused":
        return f"DeepSpeed all-reduce over SP x DP ({grid_size} ranks), divided by {grid_size}"

    fallback = engine.buffered_allreduce_fallback

    @functools.wraps(fallback)
    def lss_buffered_allreduce_fallback(grads=None, elements_per_buffer=500000000):
        if grads is not None:  # DeepSpeed never passes them in 0.19.8 ZeRO 0; refuse rather than guess
            raise RuntimeError("lss_plugin two-stage averaging: DeepSpeed passed explicit gradients to "
                               "buffered_allreduce_fallback, a path this DeepSpeed version was not checked for")
        from lss_plugin.grads import average_gradients

        average_gradients(_params_with_grads(engine), topology=topology, mode="two_stage")

    engine.buffered_allreduce_fallback = lss_buffered_allreduce_fallback
    return f"two-stage averaging, SP ({topology.sp_size} ranks) then DP ({topology.dp_size} ranks)"


def _params_with_grads(engine):
    """Every trainable parameter; as DeepSpeed does, one without a gradient on this rank counts as zeros."""
    params = [p for p in engine.module.parameters() if p.requires_grad and p.numel() > 0]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return params


def _install_zero_partitioned(engine, topology: LSSTopology, stage: int) -> str:
    optimizer = engine.optimizer
    found = getattr(optimizer, "sequence_parallel_size", None)
    if found != topology.sp_size:
        # The correction below relies on DeepSpeed's divisor; refuse rather than guess.
        raise RuntimeError(
            f"DeepSpeed's ZeRO stage {stage} optimizer ({type(optimizer).__name__}) reports "
            f"sequence_parallel_size={found!r}, expected {topology.sp_size}: this DeepSpeed version "
            "reduces gradients in a way lss_plugin does not know (supported: deepspeed 0.19.x)"
        )
    grid_size = dist.get_world_size(engine.seq_data_parallel_group)
    # Divisor world(grid) / sequence_parallel_size -> world(grid): an average over SP and DP.
    optimizer.sequence_parallel_size = 1
    return f"ZeRO {stage}: DeepSpeed reduce over SP x DP ({grid_size} ranks), divided by {grid_size}"
