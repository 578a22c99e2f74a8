"""The TP x SP x DP x PP grid: validation, rank layout, and the groups on real process groups.

The layout must be megatron-core's (``tp-cp-ep-dp-pp`` with LSS's SP as CP): checked against
megatron-core's pure ``RankGenerator`` for many sizes without processes, and against the groups
``parallel_state.initialize_model_parallel`` really builds on 4 ranks.
"""
import itertools

import pytest
import torch
import torch.distributed as dist

import lss_plugin
from lss_plugin.topology import ParallelDims, RankCoords
from tests.distributed import run_ranks


class TestParallelDimsValidation:
    """Without process groups."""

    def test_sizes_that_do_not_multiply_name_every_factor(self):
        with pytest.raises(ValueError, match=r"tp\(1\) \* sp\(4\) \* dp\(3\) \* pp\(1\) = 12 != world_size\(8\)"):
            ParallelDims(sp=4, dp=3, world_size=8)
        with pytest.raises(ValueError, match=r"tp\(2\) \* sp\(2\) \* dp\(1\) \* pp\(2\) = 8 != world_size\(4\)"):
            ParallelDims(sp=2, dp=1, world_size=4, tp=2, pp=2)

    def test_dp_left_over_must_be_whole(self):
        with pytest.raises(ValueError, match=r"sequence-parallel size 3 does not divide world_size\(8\)"):
            ParallelDims.from_sizes(3, None, 8)
        with pytest.raises(ValueError, match=r"tp\(4\) \* sp\(2\) \* pp\(1\) = 8 leaves no whole dp"):
            ParallelDims.from_sizes(2, None, 12, tp=4)
        assert ParallelDims.from_sizes(2, None, 16, tp=2, pp=2).dp == 2

    def test_non_positive_sizes_are_named(self):
        with pytest.raises(ValueError, match="sp must be a positive integer, got 0"):
            ParallelDims(sp=0, dp=1, world_size=1)
        with pytest.raises(ValueError, match="tp must be a positive integer, got 0"):
            ParallelDims.from_sizes(1, None, 4, tp=0)
        with pytest.raises(ValueError, match="unknown axis 'cp'"):
            ParallelDims(sp=1, dp=1, world_size=1).group_ranks("cp", 0)


def test_ulysses_must_divide_sp_and_cuts_each_sp_group():
    with pytest.raises(ValueError, match=r"ulysses \(3\) must divide the sequence-parallel size \(4\)"):
        ParallelDims(sp=4, dp=1, world_size=4, ulysses=3)
    with pytest.raises(ValueError, match="ulysses must be a positive integer, got 0"):
        ParallelDims.from_sizes(4, None, 8, ulysses=0)
    dims = ParallelDims.from_sizes(4, None, 8, ulysses=2)
    assert (dims.dp, dims.lss) == (2, 2)
    assert dims.ulysses_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]  # consecutive SP ranks
    assert dims.lss_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]  # the same index in each Ulysses group
    # under TP the SP ranks are strided; the sub-groups follow the SP order
    tp = ParallelDims(sp=4, dp=1, world_size=8, tp=2, ulysses=2)
    assert tp.ulysses_groups() == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert tp.lss_groups() == [[0, 4], [2, 6], [1, 5], [3, 7]]
    whole = ParallelDims(sp=4, dp=1, world_size=4, ulysses=4)  # pure Ulysses: LSS groups of one
    assert whole.ulysses_groups() == [[0, 1, 2, 3]] and whole.lss_groups() == [[0], [1], [2], [3]]


def test_rank_layout_keeps_sequence_groups_consecutive_without_tp():
    dims = ParallelDims.from_sizes(2, None, 6)
    assert dims.dp == 3
    assert dims.all_groups("sp") == [[0, 1], [2, 3], [4, 5]]
    assert dims.all_groups("dp") == [[0, 2, 4], [1, 3, 5]]
    assert dims.coords(5) == RankCoords(tp=0, sp=1, dp=2, pp=0)


def test_tp_is_fastest_then_sp_then_dp_then_pp():
    dims = ParallelDims(sp=2, dp=2, world_size=16, tp=2, pp=2)
    assert dims.coords(13) == RankCoords(tp=1, sp=0, dp=1, pp=1)
    assert dims.rank_of(dims.coords(13)) == 13
    assert dims.group_ranks("tp", 13) == [12, 13]
    assert dims.group_ranks("sp", 13) == [13, 15]  # same TP rank: a TP rank gathers its own heads
    assert dims.group_ranks("dp", 13) == [9, 13]
    assert dims.group_ranks("pp", 13) == [5, 13]
    assert dims.group_ranks(("sp", "dp"), 13) == [9, 11, 13, 15]


SIZES = [(t, n, d, p) for t, n, d, p in itertools.product((1, 2, 3), (1, 2, 4), (1, 2, 3), (1, 2))
         if t * n * d * p <= 48]


@pytest.mark.parametrize("tp,sp,dp,pp", SIZES)
def test_groups_equal_megatron_rank_generator(tp, sp, dp, pp):
    """Every group kind, against megatron-core's own generator (the default order)."""
    from megatron.core.parallel_state import RankGenerator

    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=sp, order="tp-cp-ep-dp-pp")
    dims = ParallelDims(sp=sp, dp=dp, world_size=tp * sp * dp * pp, tp=tp, pp=pp)
    for token, axes in [("tp", "tp"), ("cp", "sp"), ("dp", "dp"), ("pp", "pp"),
                        ("dp-cp", ("sp", "dp")), ("tp-cp", ("tp", "sp")), ("tp-pp", ("tp", "pp"))]:
        assert sorted(dims.all_groups(axes)) == sorted(gen.get_ranks(token)), (token, axes)


def test_use_before_init_is_a_clear_error():
    lss_plugin.destroy_topology()
    with pytest.raises(RuntimeError, match="init_topology"):
        lss_plugin.get_topology()


# ---------------------------------------------------------------------------------------------
# Real process groups (one spawn of 4 ranks, several grids)

GRIDS = [  # (tp, sp, pp) on 4 ranks; dp is what is left
    (1, 2, 1),
    (2, 2, 1),
    (2, 1, 2),
    (1, 2, 2),
]


def _ranks(group):
    return dist.get_process_group_ranks(group) if group is not None else [dist.get_rank()]


def _build_groups():
    from megatron.core import parallel_state

    from lss_plugin.megatron.parallel import register_megatron_groups

    out = {}
    for tp, sp, pp in GRIDS:
        topo = lss_plugin.init_topology(sp, timeout_s=30, tp_size=tp, pp_size=pp)
        # A real collective over each group proves the groups are the ones the layout promises.
        sums = {}
        for axis in ("sp", "dp", "tp", "pp"):
            group = getattr(topo, f"{axis}_group")
            t = torch.tensor([float(dist.get_rank())])
            if group is not None:
                dist.all_reduce(t, group=group)
            sums[axis] = t.item()
        mine = {a: _ranks(getattr(topo, f"{a}_group")) for a in ("sp", "dp", "tp", "pp")}
        lss_plugin.destroy_topology()

        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, context_parallel_size=sp,
            pipeline_model_parallel_size=pp, create_gloo_process_groups=False)
        megatron = {
            "sp": _ranks(parallel_state.get_context_parallel_group()),
            "dp": _ranks(parallel_state.get_data_parallel_group(with_context_parallel=False)),
            "tp": _ranks(parallel_state.get_tensor_model_parallel_group()),
            "pp": _ranks(parallel_state.get_pipeline_model_parallel_group()),
        }
        adopted = register_megatron_groups(timeout_s=30)
        out[(tp, sp, pp)] = dict(
            mine=mine, megatron=megatron, sums=sums, coords=tuple(topo.coords),
            adopted={a: getattr(adopted, f"{a}_ranks") for a in ("sp", "dp", "tp", "pp")},
            adopted_coords=tuple(adopted.coords),
        )
        lss_plugin.destroy_topology()
        parallel_state.destroy_model_parallel()
    try:
        lss_plugin.init_topology(3)
    except ValueError as e:
        out["error"] = str(e)
    out["hybrid"] = _hybrid_groups()
    return out


def _hybrid_groups():
    """init_topology and from_groups with ulysses_size = 2: sub-groups, ranks, a real collective."""
    from lss_plugin.topology import LSSTopology

    out = {}
    try:
        lss_plugin.init_topology(4, ulysses_size=3)
    except ValueError as e:
        out["error"] = str(e)
    for how in ("init", "from_groups"):
        if how == "init":
            topo = lss_plugin.init_topology(2, ulysses_size=2)
        else:
            base = lss_plugin.init_topology(2)
            topo = LSSTopology.from_groups(base.sp_group, base.dp_group, ulysses_size=2)
        sums = {}
        for kind in ("ulysses", "lss"):
            t = torch.tensor([float(dist.get_rank())])
            dist.all_reduce(t, group=getattr(topo, f"{kind}_group"))
            sums[kind] = t.item()
        groups = topo.sequence_groups
        out[how] = dict(
            ulysses=_ranks(topo.ulysses_group), lss=_ranks(topo.lss_group), sums=sums,
            sizes=(topo.ulysses_size, topo.lss_size, topo.ulysses_rank, topo.lss_rank),
            sequence=(groups.sp_size, groups.sp_rank, groups.ulysses_size, groups.ulysses_rank, groups.lss_rank),
            owned=len(topo.owned_groups),
        )
        lss_plugin.destroy_topology()
    return out


def test_groups_equal_megatron_parallel_state_on_four_ranks():
    res = run_ranks(_build_groups, 4, timeout_s=300)
    for rank, r in enumerate(res):
        for (tp, sp, pp) in GRIDS:
            g = r[(tp, sp, pp)]
            dims = ParallelDims.from_sizes(sp, None, 4, tp=tp, pp=pp)
            assert g["mine"] == g["megatron"] == g["adopted"], (tp, sp, pp, rank, g)
            assert g["coords"] == g["adopted_coords"] == tuple(dims.coords(rank))
            for axis, ranks in g["mine"].items():
                assert ranks == dims.group_ranks(axis, rank)
                assert g["sums"][axis] == sum(ranks)
        assert "sequence-parallel size 3 does not divide world_size(4)" in r["error"]
        hybrid = r["hybrid"]
        assert "ulysses (3) must divide the sequence-parallel size (4)" in hybrid["error"]
        for how in ("init", "from_groups"):  # SP = 2 = U: Ulysses groups [0, 1], [2, 3]; LSS groups of one
            h = hybrid[how]
            assert h["ulysses"] == [rank - rank % 2, rank - rank % 2 + 1] and h["lss"] == [rank], h
            assert h["sums"] == {"ulysses": float(2 * (rank - rank % 2) + 1), "lss": float(rank)}, h
            assert h["sizes"] == (2, 1, rank % 2, 0) and h["sequence"] == (2, rank % 2, 2, rank % 2, 0), h
        # init: 2 SP + 2 DP groups + 2 Ulysses + 4 LSS groups created, this rank a member of one of each
        # (non-members get NON_GROUP_MEMBER, not kept); from_groups owns only the sub-groups it made
        assert hybrid["init"]["owned"] == 4 and hybrid["from_groups"]["owned"] == 2, hybrid
