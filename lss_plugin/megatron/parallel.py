"""Register the LSS sequence-parallel group where megatron-core keeps its context-parallel group.

``parallel_state.initialize_model_parallel(context_parallel_size=N)`` with the default order
``tp-cp-ep-dp-pp`` and TP = PP = 1 puts rank ``dp_rank * N + cp_rank``: exactly the LSS grid. So
the CP group *is* the SP group, and everything in megatron-core that looks at it sees LSS:
``get_context_parallel_group()``, the DP x CP group over which ``DistributedDataParallel``
reduces gradients, ``TransformerConfig.context_parallel_size`` (RoPE sequence length). The layout
is checked by ``LSSTopology.from_groups``, not assumed.

What megatron-core gets wrong for LSS, and the plugin corrects:
- RoPE on a CP rank (``get_pos_emb_on_this_cp_rank``) assumes the balanced 2N-chunk layout (and
  CUDA): ``LSSRotaryEmbedding`` selects the frequencies of this rank's tokens in either layout.
- ``get_batch_on_this_cp_rank`` assumes the balanced layout: see ``lss_plugin.megatron.batch``.
- With ``calculate_per_token_loss=False`` DDP averages per-rank *mean* losses over DP x CP, which
  is wrong when ranks hold different numbers of loss tokens (loss masks). LSS training uses
  ``calculate_per_token_loss=True`` (``lss_transformer_config_kwargs``): each rank back-props its
  loss *sum* and ``finalize_model_grads(num_tokens=...)`` divides by the global token count.
"""
from __future__ import annotations

import math

import torch

from lss_plugin.topology import LSSTopology, register_topology


def initialize_lss_model_parallel(
    sp_size: int, timeout_s: float | None = None, **initialize_kwargs
) -> LSSTopology:
    """``initialize_model_parallel`` with the LSS group as the CP group; register the topology.

    Needs an initialised default process group. ``initialize_kwargs`` are passed through
    (tensor/pipeline sizes other than 1 are refused: LSS does not compose with them yet).
    """
    from megatron.core import parallel_state

    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if initialize_kwargs.get(name, 1) != 1:
            raise ValueError(f"{name}={initialize_kwargs[name]} is not supported with LSS yet (use 1)")
    world = torch.distributed.get_world_size()
    if not isinstance(sp_size, int) or sp_size < 1 or world % sp_size:
        raise ValueError(f"LSS sequence-parallel size {sp_size!r} does not divide world_size({world})")
    if timeout_s is not None:
        initialize_kwargs.setdefault("distributed_timeout_minutes", max(1, math.ceil(timeout_s / 60)))
    # Megatron builds extra gloo copies of its groups for CPU-side work (distributed optimizer);
    # when the backend is gloo already they would only double the group count.
    initialize_kwargs.setdefault(
        "create_gloo_process_groups", torch.distributed.get_backend() != "gloo"
    )
    parallel_state.initialize_model_parallel(context_parallel_size=sp_size, **initialize_kwargs)
    return register_megatron_groups(timeout_s=timeout_s)


def register_megatron_groups(timeout_s: float | None = None) -> LSSTopology:
    """Adopt megatron-core's (already initialised) CP group as the LSS SP group and register it."""
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise ValueError(
            f"tensor-model-parallel size {parallel_state.get_tensor_model_parallel_world_size()} "
            "with LSS is not supported yet: the LSS grid is rank = dp_rank * sp_size + sp_rank"
        )
    cp_group = parallel_state.get_context_parallel_group()
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=False)
    # from_groups raises if Megatron's rank order ever stops matching dp_rank * sp + sp_rank.
    topology = LSSTopology.from_groups(cp_group, dp_group, timeout_s=timeout_s)
    return register_topology(topology)


def lss_transformer_config_kwargs(sp_size: int) -> dict:
    """TransformerConfig fields an LSS run needs (merge into the user's config kwargs)."""
    return {
        "context_parallel_size": sp_size,
        # Loss sums + global token count instead of a mean of per-rank means (see module doc).
        "calculate_per_token_loss": True,
    }
