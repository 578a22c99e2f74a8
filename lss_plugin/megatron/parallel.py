"""Register the LSS sequence-parallel group where megatron-core keeps its context-parallel group.

``parallel_state.initialize_model_parallel(tensor_model_parallel_size=T, context_parallel_size=N,
pipeline_model_parallel_size=P)`` with the default order ``tp-cp-ep-dp-pp`` puts rank
``tp_rank + T * (cp_rank + N * (dp_rank + D * pp_rank))``: exactly the LSS grid
(``lss_plugin.topology``). So the CP group *is* the SP group (one TP rank per sequence segment:
each TP rank gathers only its own KV heads), and everything in megatron-core that looks at it sees LSS:
``get_context_parallel_group()``, the DP x CP group over which ``DistributedDataParallel``
reduces gradients, ``TransformerConfig.context_parallel_size`` (RoPE sequence length). The layout
is checked by ``LSSTopology.from_groups``, not assumed. Hybrid LSS x Ulysses (``ulysses_size`` U > 1):
``from_groups`` also cuts every CP group into Ulysses groups of U consecutive CP ranks and LSS groups
across them; ``lss_group_for`` hands attention, batch split and RoPE rows those ``SequenceGroups``.

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
import torch.distributed as dist

from lss_plugin.options import check_ulysses_size
from lss_plugin.topology import (
    LSSTopology, ParallelDims, destroy_topology, get_topology, is_topology_initialized, register_topology,
)


def initialize_lss_model_parallel(
    sp_size: int, timeout_s: float | None = None, ulysses_size: int = 1, **initialize_kwargs
) -> LSSTopology:
    """``initialize_model_parallel`` with the LSS group as the CP group; register the topology.

    Needs an initialised default process group. ``initialize_kwargs`` are passed through
    (``tensor_model_parallel_size``, ``pipeline_model_parallel_size``, ...); the sizes are
    checked against the world before Megatron creates any group. ``ulysses_size`` U > 1: the
    hybrid, each CP group split into Ulysses groups of U consecutive CP ranks and LSS groups across
    them (``register_megatron_groups``).
    """
    from megatron.core import parallel_state

    world = torch.distributed.get_world_size()
    tp = initialize_kwargs.get("tensor_model_parallel_size", 1)
    pp = initialize_kwargs.get("pipeline_model_parallel_size", 1)
    ParallelDims.from_sizes(sp_size, None, world, tp=tp, pp=pp)  # raises, naming every factor
    check_ulysses_size(ulysses_size, sp_size, setting="ulysses_size")
    if "context_parallel_size" in initialize_kwargs:
        raise ValueError(f"context_parallel_size={initialize_kwargs['context_parallel_size']} "
                         "conflicts with LSS, which occupies the context-parallel axis: pass sp_size")
    if initialize_kwargs.get("order", "tp-cp-ep-dp-pp") != "tp-cp-ep-dp-pp":
        raise ValueError(f"order={initialize_kwargs['order']!r}: LSS needs Megatron's default "
                         "order 'tp-cp-ep-dp-pp' (the layout lss_plugin.topology describes)")
    for name in ("virtual_pipeline_model_parallel_size", "hierarchical_context_parallel_sizes"):
        if initialize_kwargs.get(name) not in (None, 1):
            raise ValueError(f"{name}={initialize_kwargs[name]!r} is not supported with LSS yet")
    if timeout_s is not None:
        initialize_kwargs.setdefault("distributed_timeout_minutes", max(1, math.ceil(timeout_s / 60)))
    # Megatron builds extra gloo copies of its groups for CPU-side work (distributed optimizer);
    # when the backend is gloo already they would only double the group count.
    initialize_kwargs.setdefault(
        "create_gloo_process_groups", torch.distributed.get_backend() != "gloo"
    )
    parallel_state.initialize_model_parallel(context_parallel_size=sp_size, **initialize_kwargs)
    return register_megatron_groups(timeout_s=timeout_s, ulysses_size=ulysses_size)


def register_megatron_groups(timeout_s: float | None = None, ulysses_size: int = 1) -> LSSTopology:
    """Adopt megatron-core's (already initialised) groups, CP as the LSS SP group, and register them.

    TP and PP groups are adopted too; ``LSSTopology.from_groups`` checks that they follow the
    tp-cp-dp-pp layout (raising if Megatron's rank order ever changes). With ``ulysses_size`` > 1 it
    also builds the Ulysses and LSS sub-groups of every CP group (collective over the world: every
    rank calls this, with the same U).
    """
    from megatron.core import parallel_state

    sp_group = parallel_state.get_context_parallel_group()
    check_ulysses_size(ulysses_size, sp_group.size(), setting="ulysses_size")  # before any group is made
    topology = LSSTopology.from_groups(
        sp_group=sp_group,
        dp_group=parallel_state.get_data_parallel_group(with_context_parallel=False),
        timeout_s=timeout_s,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        ulysses_size=ulysses_size,
    )
    return register_topology(topology)


def destroy_lss_model_parallel() -> None:
    """Undo ``initialize_lss_model_parallel`` (whatever of it is there): the registered topology
    and the Ulysses x LSS sub-groups it created, then megatron-core's groups."""
    from megatron.core import parallel_state

    destroy_topology()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def lss_group_for(cp_group, ulysses_size: int | None = None) -> tuple:
    """``(group, U)``: what LSS runs over for Megatron's CP group ``cp_group`` - the group itself
    (pure LSS, U = 1), or the registered topology's ``SequenceGroups`` (Ulysses x LSS) when its
    ``ulysses_size`` U is > 1 - for ``lss_attention`` and the sharding functions' ``group=``.

    ``ulysses_size`` None follows the registered topology; a value is checked against it, because
    tokens, positions, RoPE rows and attention must all follow one layout: a disagreement is
    refused by name on every rank, before any collective. So is a registered hybrid (U > 1) over
    other ranks than ``cp_group``: the batch split reads the registered U. A group of one rank (or
    None) is returned as is.
    """
    if cp_group is None or cp_group.size() == 1:
        if ulysses_size not in (None, 1):
            raise ValueError(f"ulysses_size={ulysses_size} needs a context-parallel (LSS) group of more than one rank")
        return cp_group, 1
    topology = _topology_over(cp_group)
    if topology is None and registered_ulysses_size() > 1:
        # attention would run pure LSS over the CP group while the batch split (get_batch_on_this_lss_rank)
        # and RoPE follow the registered hybrid's token layout: refused instead of falling back to U = 1
        raise ValueError(
            f"the registered topology has ulysses_size={registered_ulysses_size()} over the sequence-parallel "
            f"ranks {get_topology().sp_ranks}, but the context-parallel group is "
            f"{dist.get_process_group_ranks(cp_group)}: tokens, RoPE rows and attention must share one layout "
            "(register the CP group with register_megatron_groups / initialize_lss_model_parallel, or "
            "destroy the other topology)")
    registered = topology.ulysses_size if topology is not None else 1
    if ulysses_size is not None and ulysses_size != registered:
        raise ValueError(
            f"ulysses_size={ulysses_size}, but the topology registered for the context-parallel group "
            f"{dist.get_process_group_ranks(cp_group)} has ulysses_size={registered}: tokens, RoPE rows and "
            "attention must share one layout (pass the same --lss-ulysses-size to "
            "initialize_lss_model_parallel / register_megatron_groups, the layer spec and the batch split)")
    return (topology.sequence_groups, registered) if registered > 1 else (cp_group, 1)


def registered_ulysses_size() -> int:
    """The registered topology's Ulysses size (1 when none is registered)."""
    return get_topology().ulysses_size if is_topology_initialized() else 1


def _topology_over(cp_group) -> LSSTopology | None:
    """The registered topology if its SP group is ``cp_group`` (same ranks), else None."""
    if not is_topology_initialized():
        return None
    topology = get_topology()
    return topology if topology.sp_ranks == dist.get_process_group_ranks(cp_group) else None


def lss_transformer_config_kwargs(sp_size: int) -> dict:
    """TransformerConfig fields an LSS run needs (merge into the user's config kwargs)."""
    return {
        "context_parallel_size": sp_size,
        # Loss sums + global token count instead of a mean of per-rank means (see module doc).
        "calculate_per_token_loss": True,
    }
