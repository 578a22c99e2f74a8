"""Optimizer state sharded over the whole SP x DP grid (ZeRO stage 1), for the plain-PyTorch path
and the Megatron script.

LSS replicates every weight over the SP group, and after ``lss_plugin.average_gradients`` (or
megatron-core DDP's reduction over DP x CP) every rank of the grid holds the same gradient. So
each rank may step only its part of the parameters and broadcast the result: the update is the
unsharded one, element for element, while each rank keeps ~1/world of the optimizer state.
torch's ``ZeroRedundancyOptimizer`` does exactly that, assigning whole parameters to ranks.
"""
from __future__ import annotations

from typing import Iterable, Optional, Type

import torch
import torch.distributed as dist


def sharded_optimizer(params: Iterable, optimizer_class: Type[torch.optim.Optimizer],
                      group: Optional[dist.ProcessGroup] = None, **defaults):
    """``optimizer_class(params, **defaults)`` with its state sharded over ``group``.

    ``group``: the ranks whose gradients are identical (default: the whole world, which is the
    SP x DP grid of ``lss_plugin.topology`` when there is no TP or PP; under Megatron its DP x CP
    group). ``params``: tensors or
    param-group dicts, as for any torch optimizer. Every rank of ``group`` must pass the same
    parameters in the same order and step together (``step`` broadcasts the updated weights).
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if group is None:
        from lss_plugin.topology import get_topology

        topology = get_topology()
        if not topology.replicates_parameters_over_whole_world:
            raise ValueError(
                f"sharded_optimizer: with tp={topology.tp_size}, pp={topology.pp_size} ranks hold different "
                "parameters; pass group= the SP x DP group of ranks that hold the same ones")
        group = dist.group.WORLD
    groups = list(params)
    if not groups:
        raise ValueError("sharded_optimizer got no parameters")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    # ZeroRedundancyOptimizer takes the first group at construction and the rest through
    # add_param_group, each with its own hyper-parameters (weight decay per group).
    first, rest = groups[0], groups[1:]
    first_hyper = {k: v for k, v in first.items() if k != "params"}
    optimizer = ZeroRedundancyOptimizer(list(first["params"]), optimizer_class=optimizer_class,
                                        process_group=group, **{**defaults, **first_hyper})
    for extra in rest:
        optimizer.add_param_group(dict(extra))
    return optimizer


def local_state_tensors(optimizer: torch.optim.Optimizer):
    """The state tensors this rank holds (a ZeroRedundancyOptimizer keeps its shard in ``.optim``)."""
    inner = getattr(optimizer, "optim", optimizer)
    for state in inner.state.values():
        yield from (v for v in state.values() if torch.is_tensor(v))


def local_state_numel(optimizer: torch.optim.Optimizer) -> int:
    """Elements of the tensor state (e.g. Adam's moments) this rank holds; step counters excluded."""
    return sum(v.numel() for v in local_state_tensors(optimizer) if v.dim() > 0)


def _is_sharded(optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def _params(optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_param_states(optimizer: torch.optim.Optimizer) -> dict:
    """parameter -> its optimizer state, for every parameter, on every rank (a sharded one's on CPU).

    Collective over a ``sharded_optimizer``'s group: each parameter's state is broadcast from the
    one rank that holds it (found by an all-reduce, so nothing private of torch's ZeRO is read).
    This is what a full-state checkpoint needs: it then resumes on any grid, sharded or not.
    An unsharded optimizer's states are returned as they are, without communication."""
    params = _params(optimizer)
    if not _is_sharded(optimizer):
        return {p: optimizer.state.get(p, {}) for p in params}
    group, local = optimizer.process_group, {p for g in optimizer.optim.param_groups for p in g["params"]}
    rank = dist.get_rank(group)
    owners = torch.tensor([rank if p in local else 0 for p in params], device=params[0].device)
    dist.all_reduce(owners, group=group)  # each parameter has exactly one owner
    states = {}
    for p, owner in zip(params, owners.tolist()):
        state = [{k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in optimizer.optim.state.get(p, {}).items()}
                 if owner == rank else None]
        dist.broadcast_object_list(state, src=dist.get_global_rank(group, owner), group=group)
        states[p] = state[0]
    return states


def load_param_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, state: dict) -> None:
    """Restore one parameter's optimizer state; a ``sharded_optimizer`` keeps it only on the rank
    that owns the parameter (every rank may be given every parameter's state)."""
    if not _is_sharded(optimizer):
        optimizer.state[param] = state
    elif any(param is p for g in optimizer.optim.param_groups for p in g["params"]):
        optimizer.optim.state[param] = state
