"""The SP x DP rank grid: a validated dataclass, and the process groups built from it.

Rank layout: ``rank = dp_rank * sp_size + sp_rank``. The ranks of one sequence (an SP group)
are consecutive, so with ranks packed per node they share a node and its fast links, and the
gradient all-reduce of stage 1 of double averaging stays inside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from lss_plugin.runtime import as_timedelta


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the grid. Validates itself and prints the whole product when it does not fit."""

    sp: int
    dp: int
    world_size: int

    def __post_init__(self) -> None:
        for name in ("sp", "dp", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.sp * self.dp != self.world_size:
            raise ValueError(
                f"sp({self.sp}) * dp({self.dp}) = {self.sp * self.dp} != world_size({self.world_size})"
            )

    @classmethod
    def from_sizes(cls, sp: int, dp: int | None, world_size: int) -> "ParallelDims":
        """``dp=None`` means "whatever is left": world_size / sp, which must be whole."""
        if dp is None:
            if not isinstance(sp, int) or sp < 1 or world_size % sp != 0:
                raise ValueError(
                    f"sequence-parallel size {sp!r} does not divide world_size({world_size})"
                )
            dp = world_size // sp
        return cls(sp=sp, dp=dp, world_size=world_size)

    def coords(self, rank: int) -> tuple[int, int]:
        """``(dp_rank, sp_rank)`` of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world_size({self.world_size})")
        return divmod(rank, self.sp)

    def sp_group_ranks(self, dp_rank: int) -> list[int]:
        return [dp_rank * self.sp + s for s in range(self.sp)]

    def dp_group_ranks(self, sp_rank: int) -> list[int]:
        return [d * self.sp + sp_rank for d in range(self.dp)]


@dataclass(frozen=True)
class LSSTopology:
    """This rank's place in the grid and the process groups it talks over."""

    dims: ParallelDims
    rank: int
    sp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    timeout_s: float | None = None
    # Groups this topology created and must destroy (adapters may lend groups they own).
    owned_groups: tuple = field(default=(), repr=False, compare=False)

    @property
    def sp_size(self) -> int:
        return self.dims.sp

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def dp_rank(self) -> int:
        return self.dims.coords(self.rank)[0]

    @property
    def sp_rank(self) -> int:
        return self.dims.coords(self.rank)[1]

    @property
    def sp_ranks(self) -> list[int]:
        return self.dims.sp_group_ranks(self.dp_rank)

    @property
    def dp_ranks(self) -> list[int]:
        return self.dims.dp_group_ranks(self.sp_rank)

    @classmethod
    def from_groups(
        cls, sp_group: dist.ProcessGroup, dp_group: dist.ProcessGroup, timeout_s: float | None = None
    ) -> "LSSTopology":
        """Adopt groups built by a framework (Megatron's CP and DP groups, say).

        The groups must follow this module's rank layout; that is checked, not assumed.
        """
        _require_process_group("LSSTopology.from_groups")
        rank, world = dist.get_rank(), dist.get_world_size()
        dims = ParallelDims(
            sp=dist.get_world_size(sp_group), dp=dist.get_world_size(dp_group), world_size=world
        )
        sp_ranks = dist.get_process_group_ranks(sp_group)
        dp_ranks = dist.get_process_group_ranks(dp_group)
        dp_rank, sp_rank = dims.coords(rank)
        if sp_ranks != dims.sp_group_ranks(dp_rank) or dp_ranks != dims.dp_group_ranks(sp_rank):
            raise ValueError(
                f"groups do not follow rank = dp_rank * sp_size + sp_rank: rank {rank} has "
                f"sp group {sp_ranks} (expected {dims.sp_group_ranks(dp_rank)}) and dp group "
                f"{dp_ranks} (expected {dims.dp_group_ranks(sp_rank)})"
            )
        return cls(dims=dims, rank=rank, sp_group=sp_group, dp_group=dp_group, timeout_s=timeout_s)


_TOPOLOGY: LSSTopology | None = None  # the one registration, like Megatron's parallel_state


def _require_process_group(caller: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{caller} needs an initialised default process group: call "
            "torch.distributed.init_process_group (or lss_plugin.runtime.init_distributed) first"
        )


def init_topology(sp_size: int, dp_size: int | None = None, timeout_s: float | None = None) -> LSSTopology:
    """Build the SP and DP groups on an initialised default process group and register them.

    Every rank must call this with the same arguments. The sizes are validated before any group
    is created, so a wrong size fails on every rank with the same message instead of hanging.
    """
    _require_process_group("init_topology")
    world, rank = dist.get_world_size(), dist.get_rank()
    dims = ParallelDims.from_sizes(sp_size, dp_size, world)
    timeout = as_timedelta(timeout_s)
    # new_group is collective over the world: every rank creates every group, in the same order.
    sp_group = dp_group = None
    created = []
    for d in range(dims.dp):
        group = dist.new_group(dims.sp_group_ranks(d), timeout=timeout, group_desc=f"lss_sp_{d}")
        created.append(group)
        if rank in dims.sp_group_ranks(d):
            sp_group = group
    for s in range(dims.sp):
        group = dist.new_group(dims.dp_group_ranks(s), timeout=timeout, group_desc=f"lss_dp_{s}")
        created.append(group)
        if rank in dims.dp_group_ranks(s):
            dp_group = group
    topology = LSSTopology(
        dims=dims,
        rank=rank,
        sp_group=sp_group,
        dp_group=dp_group,
        timeout_s=timeout_s,
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
