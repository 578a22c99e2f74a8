"""Megatron parallel states that stay alive side by side, so methods can be timed round-robin.

megatron-core keeps its process groups in module globals of ``parallel_state`` and reads them at
run time (vocab-parallel cross entropy, ``finalize_model_grads``), and the plugin keeps its LSS
topology in ``lss_plugin.topology``. To interleave the steps of several methods in one launch,
each parallel layout is initialised once, its globals are captured, and ``activate()`` puts them
back before that layout's models run. A layout (``bench.methods.Layout``) is a TP size, a CP size
and whether the CP group is an SP group registered as Megatron's CP group (LSS and the
context-parallel baselines). Groups live until ``Contexts.destroy()``; every rank creates every
context in the same order.
"""
from __future__ import annotations

import math
import re

import torch
import torch.distributed as dist

_STATE_NAME = re.compile(r"_[A-Z][A-Z0-9_]*")


def _megatron_state() -> dict:
    from megatron.core import parallel_state

    from lss_plugin.topology import get_topology, is_topology_initialized

    state = {name: value for name, value in vars(parallel_state).items() if _STATE_NAME.fullmatch(name)}
    state["lss_topology"] = get_topology() if is_topology_initialized() else None
    return state


def _restore(state: dict) -> None:
    from megatron.core import parallel_state

    from lss_plugin.topology import register_topology

    for name, value in state.items():
        if name != "lss_topology":
            setattr(parallel_state, name, value)
    register_topology(state["lss_topology"])


class ParallelContext:
    """One parallel layout's megatron state (and the groups only the benchmark needs, e.g. USP's)."""

    def __init__(self, layout, timeout_s: float):
        from megatron.core import parallel_state, tensor_parallel

        self.layout, self.timeout_s = layout, timeout_s
        if layout.sp_group:
            from lss_plugin.megatron.parallel import initialize_lss_model_parallel

            extra = {"tensor_model_parallel_size": layout.tp} if layout.tp > 1 else {}
            initialize_lss_model_parallel(layout.cp, timeout_s=timeout_s, ulysses_size=layout.ulysses, **extra)
        else:
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=layout.tp, context_parallel_size=layout.cp,
                distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
                create_gloo_process_groups=dist.get_backend() != "gloo")
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        self._state = _megatron_state()
        self._usp: dict = {}

    def activate(self) -> "ParallelContext":
        _restore(self._state)
        torch.manual_seed(1234)
        return self

    def usp_groups(self, ulysses_size: int):
        """(ulysses_group, ring_group) of this rank for USP, created once per context."""
        if ulysses_size not in self._usp:
            from lss_plugin.baselines.usp import usp_groups

            self._usp[ulysses_size] = usp_groups(self.layout.cp, ulysses_size, self.timeout_s)
        return self._usp[ulysses_size]

    def drop_attention_buffer(self) -> None:
        """Empty Megatron's global memory buffer (dense attention scores, TP+SP all-gathers).

        It only grows and is shared by every model of this context: without this, a case would
        count what an earlier case (a longer probe, a dense row) allocated there.
        """
        buffers = self._state.get("_GLOBAL_MEMORY_BUFFER")
        if buffers is not None:
            buffers.buffer.clear()


class Contexts:
    """The contexts of one launch, by layout; ``get`` creates on first use and activates."""

    def __init__(self, timeout_s: float = 300.0):
        from lss_plugin.megatron.cpu_shim import apply_cpu_shim

        apply_cpu_shim()
        self.timeout_s = timeout_s
        self._clean = _megatron_state()  # as before any initialisation
        self._contexts: dict = {}

    def get(self, layout) -> ParallelContext:
        if layout not in self._contexts:
            _restore(self._clean)  # initialize_model_parallel refuses an initialised state
            self._contexts[layout] = ParallelContext(layout, self.timeout_s)
        return self._contexts[layout].activate()

    def destroy(self) -> None:
        """Forget every context and destroy every group but the default one (gloo threads leak)."""
        from torch.distributed import distributed_c10d as c10d

        _restore(self._clean)
        self._contexts.clear()
        if dist.get_world_size() > 1:
            dist.barrier()
        for group in list(c10d._world.pg_map):
            if group is not c10d.GroupMember.WORLD:
                dist.destroy_process_group(group)
