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

from lss_plugin.options import check_ulysses_size
from lss_plugin.runtime import as_timedelta, set_nccl_error_handling

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
    ulysses: int = 1  # hybrid LSS x Ulysses: sp = ulysses x lss (see ``ulysses_groups``)

    def __post_init__(self) -> None:
        for name in ("sp", "dp", "world_size", "tp", "pp", "ulysses"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.tp * self.sp * self.dp * self.pp != self.world_size:
            raise ValueError(
                f"Invalid parallel dims: tp({self.tp}) * sp({self.sp}) * dp({self.dp}) * "
                f"pp({self.pp}) = {self.tp * self.sp * self.dp * self.pp} != "
                f"world_size({self.world_size})"
            )
        check_ulysses_size(self.ulysses, self.sp, "ulysses")

    @classmethod
    def from_sizes(cls, sp: int, dp: int | None, world_size: int, tp: int = 1, pp: int = 1,
                   ulysses: int = 1) -> "ParallelDims":
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
        return cls(sp=sp, dp=dp, world_size=world_size, tp=tp, pp=pp, ulysses=ulysses)

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

    @property
    def lss(self) -> int:
        """Ranks of an LSS group (R = sp / ulysses): the Ulysses groups one sequence spans."""
        return self.sp // self.ulysses

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

    def ulysses_groups(self) -> list[list[int]]:
        """Every Ulysses group: ``ulysses`` consecutive ranks of an SP group (in SP-rank order)."""
        u = self.ulysses
        return [sp[i:i + u] for sp in self.all_groups("sp") for i in range(0, self.sp, u)]

    def lss_groups(self) -> list[list[int]]:
        """Every LSS group: the ranks of an SP group with the same index in each Ulysses group."""
        return [sp[j::self.ulysses] for sp in self.all_groups("sp") for j in range(self.ulysses)]

    def all_groups(self, axes: tuple[str, ...] | str) -> list[list[int]]:
        """Every group along ``axes`` (a partition of the world), in a fixed order for new_group."""
        seen, groups = set(), []
        for rank in range(self.world_size):
            if rank not in seen:
                group = self.group_ranks(axes, rank)
                seen.update(group)
                groups.append(group)
        return groups


class _SequenceCoords:
    """Where SP rank ``sp_rank`` sits in the hybrid: sp_rank = lss_rank * ulysses_size + ulysses_rank."""

    @property
    def lss_size(self) -> int:
        return self.sp_size // self.ulysses_size

    @property
    def ulysses_rank(self) -> int:
        return self.sp_rank % self.ulysses_size

    @property
    def lss_rank(self) -> int:
        return self.sp_rank // self.ulysses_size


@dataclass(frozen=True)
class LSSTopology(_SequenceCoords):
    """This rank's place in the grid and the process groups it talks over.

    ``tp_group``/``pp_group`` are None when that axis has size 1. With ``dims.ulysses = U > 1``
    the SP group is cut into Ulysses groups (``ulysses_group``: U consecutive SP ranks) and LSS
    groups (``lss_group``: the same index in each Ulysses group); with U = 1 there is no Ulysses
    group and the LSS group is the SP group.
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
    ulysses_group: dist.ProcessGroup | None = None  # None when ulysses_size == 1
    lss_subgroup: dist.ProcessGroup | None = field(default=None, repr=False)  # None: the SP group

    @property
    def ulysses_size(self) -> int:
        return self.dims.ulysses

    @property
    def lss_group(self) -> dist.ProcessGroup:
        """The group LSS gathers K, V over: the SP group itself when ulysses_size == 1."""
        return self.lss_subgroup if self.lss_subgroup is not None else self.sp_group

    @property
    def sequence_groups(self) -> "SequenceGroups":
        """What every ``group=`` argument of the core accepts (no collective, no lookup)."""
        return SequenceGroups(sp_group=self.sp_group, ulysses_group=self.ulysses_group, lss_group=self.lss_group,
                              sp_size=self.sp_size, sp_rank=self.sp_rank, ulysses_size=self.ulysses_size)

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
        ulysses_size: int = 1,
    ) -> "LSSTopology":
        """Adopt groups built by a framework (Megatron's CP, DP, TP and PP groups, say).

        The groups must follow this module's rank layout; that is checked, not assumed. With
        ``ulysses_size > 1`` the Ulysses and LSS sub-groups of every SP group are created here:
        collective over the world, so every rank calls this with the same ``ulysses_size``; they
        are owned (``destroy_topology`` frees them), the adopted groups are not.
        """
        _require_process_group("LSSTopology.from_groups")
        rank, world = dist.get_rank(), dist.get_world_size()
        given = {"sp": sp_group, "dp": dp_group, "tp": tp_group, "pp": pp_group}
        sizes = {a: (dist.get_world_size(g) if g is not None else 1) for a, g in given.items()}
        dims = ParallelDims(world_size=world, ulysses=ulysses_size, **sizes)
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
        ulysses_group, lss_group, created = _new_sequence_subgroups(dims, rank, as_timedelta(timeout_s))
        return cls(dims=dims, rank=rank, sp_group=sp_group, dp_group=dp_group, timeout_s=timeout_s,
                   tp_group=tp_group if sizes["tp"] > 1 else None,
                   pp_group=pp_group if sizes["pp"] > 1 else None,
                   owned_groups=created, ulysses_group=ulysses_group, lss_subgroup=lss_group)


def _new_sequence_subgroups(dims: ParallelDims, rank: int, timeout):
    """(this rank's Ulysses group, its LSS group, every group created); (None, None, ()) when
    ulysses == 1. Collective over the world: every rank creates every group, in the same order."""
    if dims.ulysses == 1:
        return None, None, ()
    mine, created = {}, []
    for kind, all_ranks in (("ulysses", dims.ulysses_groups()), ("lss", dims.lss_groups())):
        for i, ranks in enumerate(all_ranks):
            group = dist.new_group(ranks, timeout=timeout, group_desc=f"lss_{kind}_{i}")
            created.append(group)
            if rank in ranks:
                mine[kind] = group
    return mine["ulysses"], mine["lss"], tuple(_members_only(created))


def _members_only(groups):
    return [g for g in groups if g is not None and g != dist.GroupMember.NON_GROUP_MEMBER]


@dataclass(frozen=True)
class SequenceGroups(_SequenceCoords):
    """The groups one sequence is split over: what the core's ``group=`` arguments accept.

    ``ulysses_size`` U = 1: pure LSS over ``sp_group`` (``ulysses_group`` None, ``lss_group`` the
    SP group). U > 1: SP rank ``sp_rank = lss_rank * U + ulysses_rank``; the all-to-all runs in
    ``ulysses_group`` (U consecutive SP ranks), LSS's gather in ``lss_group`` (R = N / U ranks).
    """

    sp_group: dist.ProcessGroup
    ulysses_group: dist.ProcessGroup | None
    lss_group: dist.ProcessGroup
    sp_size: int
    sp_rank: int
    ulysses_size: int = 1

    @classmethod
    def pure(cls, group: dist.ProcessGroup) -> "SequenceGroups":
        """Pure LSS over ``group`` (today's behaviour for a plain group)."""
        rank = dist.get_rank(group)
        if rank < 0:
            raise RuntimeError(f"this rank ({dist.get_rank()}) is not a member of the sequence-parallel group given")
        return cls(sp_group=group, ulysses_group=None, lss_group=group, sp_size=dist.get_world_size(group),
                   sp_rank=rank)

    @classmethod
    def from_groups(cls, sp_group, ulysses_group, lss_group) -> "SequenceGroups":
        """Groups a framework built itself; their ranks must follow the layout above (checked)."""
        if ulysses_group is None:
            return cls.pure(sp_group)
        sp_ranks = dist.get_process_group_ranks(sp_group)
        u_ranks, l_ranks = dist.get_process_group_ranks(ulysses_group), dist.get_process_group_ranks(lss_group)
        sp_rank, u = dist.get_rank(sp_group), len(u_ranks)
        check_ulysses_size(u, len(sp_ranks), "the Ulysses group's size")
        if u == 1:
            return cls.pure(sp_group)
        expected_u = sp_ranks[sp_rank - sp_rank % u:][:u] if sp_rank >= 0 else None
        expected_l = sp_ranks[sp_rank % u::u] if sp_rank >= 0 else None
        if u_ranks != expected_u or l_ranks != expected_l:
            raise ValueError(f"Ulysses group {u_ranks} and LSS group {l_ranks} of rank {dist.get_rank()} do not "
                             f"cut the sequence-parallel group {sp_ranks} into Ulysses groups of {u} consecutive "
                             f"ranks (expected {expected_u}) and LSS groups across them (expected {expected_l})")
        return cls(sp_group=sp_group, ulysses_group=ulysses_group, lss_group=lss_group,
                   sp_size=len(sp_ranks), sp_rank=sp_rank, ulysses_size=u)


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
    ulysses_size: int = 1,
) -> LSSTopology:
    """Build the SP and DP groups (and TP/PP groups when those axes exceed 1) and register them.

    ``ulysses_size`` U > 1 (must divide ``sp_size``): hybrid LSS x Ulysses, each SP group cut into
    Ulysses groups of U consecutive ranks (all-to-all over heads, inside a node when ranks are
    packed per node) and LSS groups across them (``LSSTopology.sequence_groups``).

    Every rank must call this with the same arguments. The sizes are validated before any group
    is created, so a wrong size fails on every rank with the same message instead of hanging.
    The groups are those of megatron-core's ``initialize_model_parallel`` with
    ``tensor_model_parallel_size=tp_size, context_parallel_size=sp_size,
    pipeline_model_parallel_size=pp_size`` (see the module docstring).
    """
    _require_process_group("init_topology")
    world, rank = dist.get_world_size(), dist.get_rank()
    dims = ParallelDims.from_sizes(sp_size, dp_size, world, tp=tp_size, pp=pp_size, ulysses=ulysses_size)
    timeout = as_timedelta(timeout_s)
    if dist.get_backend() == "nccl":
        set_nccl_error_handling()  # the groups below are NCCL's too (read at construction)
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
    ulysses_group, lss_group, subgroups = _new_sequence_subgroups(dims, rank, timeout)
    topology = LSSTopology(
        dims=dims,
        rank=rank,
        sp_group=mine["sp"],
        dp_group=mine["dp"],
        timeout_s=timeout_s,
        tp_group=mine.get("tp"),
        pp_group=mine.get("pp"),
        owned_groups=tuple(_members_only(created)) + subgroups,
        ulysses_group=ulysses_group,
        lss_subgroup=lss_group,
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


def resolve_sp_group(group) -> dist.ProcessGroup:
    """The whole sequence-parallel group of ``group`` (a ProcessGroup, SequenceGroups or
    LSSTopology), else the registered topology's SP group."""
    if isinstance(group, (SequenceGroups, LSSTopology)):
        return group.sp_group
    if group is not None:
        return group
    return _registered("LSS").sp_group


def resolve_sequence_groups(group) -> SequenceGroups:
    """What a ``group=`` argument means: None = the registered topology's groups (hybrid when it
    was built with ulysses_size > 1), a ProcessGroup = pure LSS over it, a SequenceGroups or an
    LSSTopology = its groups."""
    if isinstance(group, SequenceGroups):
        return group
    if isinstance(group, LSSTopology):
        return group.sequence_groups
    if group is not None:
        return SequenceGroups.pure(group)
    return _registered("LSS").sequence_groups


def _registered(what: str) -> LSSTopology:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{what} needs torch.distributed to be initialised and lss_plugin.init_topology() called, "
            "or an explicit group= argument"
        )
    return get_topology()
