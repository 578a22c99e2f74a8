"""The rank grid (TP x SP x DP x PP) as a validated dataclass, and the process groups built from it.

Rank layout, Megatron's order ``tp-cp-dp-pp`` with LSS's SP on the CP axis (TP fastest, PP
outermost)::

    rank = tp_rank + tp * (sp_rank + sp * (dp_rank + dp * pp_rank))

With TP = PP = 1 this is ``rank = dp_rank * sp + sp_rank``: the ranks of one sequence (an SP
group) are consecutive, so with ranks packed per node they share a node and its fast links. With
TP > 1 the TP group is innermost (it talks most) and each SP group holds one TP rank per position
of the sequence: a TP rank gathers K, V of its own heads from the ranks with the same TP rank.
The groups are the ones megatron-core's ``initialize_model_parallel(tensor_model_parallel_size=T,
context_parallel_size=N, pipeline_model_parallel_size=P)`` builds (``tests/test_topology.py``
checks them against megatron-core's ``RankGenerator`` and its real groups).

We say ``axis`` for a grid axis (tp, sp, dp, pp) and ``dim`` for a tensor dimension.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch.distributed as dist

from lss_plugin.runtime import as_timedelta

AXES = ("tp", "sp", "dp", "pp")  # fastest to slowest (Megatron's tp-cp-dp-pp, SP on the CP axis)


class RankCoords(NamedTuple):
    tp: int
    sp: int
    dp: int
    pp: int


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the grid. Validates itself and prints the whole product when it does not fit."""

    sp: int
    dp: int
    world_size: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in ("sp", "dp", "world_size", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.tp * self.sp * self.dp * self.pp != self.world_size:
            raise ValueError(
                f"Invalid parallel dims: tp({self.tp}) * sp({self.sp}) * dp({self.dp}) * "
                f"pp({self.pp}) = {self.tp * self.sp * self.dp * self.pp} != "
                f"world_size({self.world_size})"
            )

    @classmethod
    def from_sizes(cls, sp: int, dp: int | None, world_size: int, tp: int = 1, pp: int = 1) -> "ParallelDims":
        """``dp=None`` means "whatever is left": world_size / (tp * sp * pp), which must be whole."""
        if dp is None:
            sizes = {"tp": tp, "sp": sp, "pp": pp}
            for name, value in sizes.items():
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"{name} must be a positive integer, got {value!r}")
            if world_size % (tp * sp * pp) != 0:
                raise ValueError(
                    f"sequence-parallel size {sp} does not divide world_size({world_size}): "
                    f"tp({tp}) * sp({sp}) * pp({pp}) = {tp * sp * pp} leaves no whole dp"
                )
            dp = world_size // (tp * sp * pp)
        return cls(sp=sp, dp=dp, world_size=world_size, tp=tp, pp=pp)

    # -- one-line views, torchtitan style -----------------------------------------------------
    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def sp_enabled(self) -> bool:
        return self.sp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    def size(self, axis: str) -> int:
        if axis not in AXES:
            raise ValueError(f"unknown axis {axis!r}; axes are {AXES}")
        return getattr(self, axis)

    def _stride(self, axis: str) -> int:
        stride = 1
        for a in AXES[:AXES.index(axis)]:
            stride *= self.size(a)
        return stride

    # -- ranks and groups ---------------------------------------------------------------------
    def coords(self, rank: int) -> RankCoords:
        """``RankCoords(tp, sp, dp, pp)`` of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world_size({self.world_size})")
        return RankCoords(*((rank // self._stride(a)) % self.size(a) for a in AXES))

    def rank_of(self, coords: RankCoords) -> int:
        return sum(getattr(coords, a) * self._stride(a) for a in AXES)

    def group_ranks(self, axes: tuple[str, ...] | str, rank: int) -> list[int]:
        """The ranks that differ from ``rank`` only along ``axes``, ascending (Megatron's order).

        ``group_ranks("sp", r)`` is r's SP group, ``group_ranks(("sp", "dp"), r)`` the SP x DP
        group over which replicated parameters are averaged.
        """
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        for axis in axes:
            self.size(axis)  # raises on an unknown axis
        base = self.coords(rank)._replace(**{a: 0 for a in axes})
        ranks = [self.rank_of(base)]
        for axis in axes:
            stride = self._stride(axis)
            ranks = [r + i * stride for r in ranks for i in range(self.size(axis))]
        return sorted(ranks)

    def all_groups(self, axes: tuple[str, ...] | str) -> list[list[int]]:
        """Every group along ``axes`` (a partition of the world), in a fixed order for new_group."""
        seen, groups = set(), []
        for rank in range(self.world_size):
            if rank not in seen:
                group = self.group_ranks(axes, rank)
                seen.update(group)
                groups.append(group)
        return groups


@dataclass(frozen=True)
class LSSTopology:
    """This rank's place in the grid and the process groups it talks over.

    ``tp_group``/``pp_group`` are None when that axis has size 1.
    """

    dims: ParallelDims
    rank: int
    sp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    timeout_s: float | None = None
    tp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    # Groups this topology created and must destroy (adapters may lend groups they own).
    owned_groups: tuple = field(default=(), repr=False, compare=False)

    @property
    def sp_size(self) -> int:
        return self.dims.sp

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def tp_size(self) -> int:
        return self.dims.tp

    @property
    def pp_size(self) -> int:
        return self.dims.pp

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def coords(self) -> RankCoords:
        return self.dims.coords(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.coords.dp

    @property
    def sp_rank(self) -> int:
        return self.coords.sp

    @property
    def tp_rank(self) -> int:
        return self.coords.tp

    @property
    def pp_rank(self) -> int:
        return self.coords.pp

    @property
    def sp_ranks(self) -> list[int]:
        return self.dims.group_ranks("sp", self.rank)

    @property
    def dp_ranks(self) -> list[int]:
        return self.dims.group_ranks("dp", self.rank)

    @property
    def tp_ranks(self) -> list[int]:
        return self.dims.group_ranks("tp", self.rank)

    @property
    def pp_ranks(self) -> list[int]:
        return self.dims.group_ranks("pp", self.rank)

    @property
    def replicates_parameters_over_whole_world(self) -> bool:
        """True when every rank holds every parameter (no TP shards, no PP stages)."""
        return not (self.dims.tp_enabled or self.dims.pp_enabled)

    @classmethod
    def from_groups(
        cls,
        sp_group: dist.ProcessGroup,
        dp_group: dist.ProcessGroup,
        timeout_s: float | None = None,
        tp_group: dist.ProcessGroup | None = None,
        pp_group: dist.ProcessGroup | None = None,
    ) -> "LSSTopology":
        """Adopt groups built by a framework (Megatron's CP, DP, TP and PP groups, say).

        The groups must follow this module's rank layout; that is checked, not assumed.
        """
        _require_process_group("LSSTopology.from_groups")
        rank, world = dist.get_rank(), dist.get_world_size()
        given = {"sp": sp_group, "dp": dp_group, "tp": tp_group, "pp": pp_group}
        sizes = {a: (dist.get_world_size(g) if g is not None else 1) for a, g in given.items()}
        dims = ParallelDims(world_size=world, **sizes)
        wrong = []
        for axis, group in given.items():
            got = dist.get_process_group_ranks(group) if group is not None else [rank]
            expected = dims.group_ranks(axis, rank)
            if got != expected:
                wrong.append(f"{axis} group {got} (expected {expected})")
        if wrong:
            raise ValueError(
                "groups do not follow rank = tp_rank + tp * (sp_rank + sp * (dp_rank + dp * pp_rank)) "
                f"with tp({dims.tp}) sp({dims.sp}) dp({dims.dp}) pp({dims.pp}): rank {rank} has "
                + ", ".join(wrong)
            )
        return cls(dims=dims, rank=rank, sp_group=sp_group, dp_group=dp_group, timeout_s=timeout_s,
                   tp_group=tp_group if sizes["tp"] > 1 else None,
                   pp_group=pp_group if sizes["pp"] > 1 else None)


_TOPOLOGY: LSSTopology | None = None  # the one registration, like Megatron's parallel_state


def _require_process_group(caller: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{caller} needs an initialised default process group: call "
            "torch.distributed.init_process_group (or lss_plugin.runtime.init_distributed) first"
        )


def init_topology(
    sp_size: int,
    dp_size: int | None = None,
    timeout_s: float | None = None,
    tp_size: int = 1,
    pp_size: int = 1,
) -> LSSTopology:
    """Build the SP and DP groups (and TP/PP groups when those axes exceed 1) and register them.

    Every rank must call this with the same arguments. The sizes are validated before any group
    is created, so a wrong size fails on every rank with the same message instead of hanging.
    The groups are those of megatron-core's ``initialize_model_parallel`` with
    ``tensor_model_parallel_size=tp_size, context_parallel_size=sp_size,
    pipeline_model_parallel_size=pp_size`` (see the module docstring).
    """
    _require_process_group("init_topology")
    world, rank = dist.get_world_size(), dist.get_rank()
    dims = ParallelDims.from_sizes(sp_size, dp_size, world, tp=tp_size, pp=pp_size)
    timeout = as_timedelta(timeout_s)
    mine, created = {}, []
    # new_group is collective over the world: every rank creates every group, in the same order.
    for axis in ("sp", "dp", "tp", "pp"):
        if axis in ("tp", "pp") and dims.size(axis) == 1:
            continue
        for i, ranks in enumerate(dims.all_groups(axis)):
            group = dist.new_group(ranks, timeout=timeout, group_desc=f"lss_{axis}_{i}")
            created.append(group)
            if rank in ranks:
                mine[axis] = group
    topology = LSSTopology(
        dims=dims,
        rank=rank,
        sp_group=mine["sp"],
        dp_group=mine["dp"],
        timeout_s=timeout_s,
        tp_group=mine.get("tp"),
        pp_group=mine.get("pp"),
        owned_groups=tuple(g for g in created if g is not None and g != dist.GroupMember.NON_GROUP_MEMBER),
    )
    register_topology(topology)
    return topology


def register_topology(topology: LSSTopology) -> LSSTopology:
    """Make ``topology`` the default for every ``group=None`` call in the plugin."""
    global _TOPOLOGY
    _TOPOLOGY = topology
    return topology


def is_topology_initialized() -> bool:
    return _TOPOLOGY is not None


def get_topology() -> LSSTopology:
    if _TOPOLOGY is None:
        raise RuntimeError(
            "lss_plugin is not initialised: call lss_plugin.init_topology(sp_size, dp_size) "
            "(or the Megatron/DeepSpeed adapter) before using LSS without an explicit group"
        )
    return _TOPOLOGY


def destroy_topology() -> None:
    """Forget the registered topology and destroy the groups it created."""
    global _TOPOLOGY
    if _TOPOLOGY is not None and dist.is_initialized():
        for group in _TOPOLOGY.owned_groups:
            dist.destroy_process_group(group)
    _TOPOLOGY = None


def resolve_sp_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """The group an LSS call runs over: the one given, else the registered topology's SP group."""
    if group is not None:
        return group
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "LSS needs torch.distributed to be initialised and lss_plugin.init_topology() called, "
            "or an explicit group= argument"
        )
    return get_topology().sp_group
