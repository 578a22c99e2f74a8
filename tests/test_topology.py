"""The SP x DP grid: validation, rank layout and the groups built on real process groups."""
import pytest
import torch.distributed as dist

import lss_plugin
from lss_plugin.topology import ParallelDims
from tests.distributed import run_ranks


def test_sizes_that_do_not_multiply_name_every_value():
    with pytest.raises(ValueError, match=r"sp\(4\) \* dp\(3\) = 12 != world_size\(8\)"):
        ParallelDims(sp=4, dp=3, world_size=8)
    with pytest.raises(ValueError, match=r"sequence-parallel size 3 does not divide world_size\(8\)"):
        ParallelDims.from_sizes(3, None, 8)
    with pytest.raises(ValueError, match="sp must be a positive integer, got 0"):
        ParallelDims(sp=0, dp=1, world_size=1)


def test_rank_layout_keeps_sequence_groups_consecutive():
    dims = ParallelDims.from_sizes(2, None, 6)
    assert dims.dp == 3
    assert [dims.sp_group_ranks(d) for d in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert [dims.dp_group_ranks(s) for s in range(2)] == [[0, 2, 4], [1, 3, 5]]
    assert dims.coords(5) == (2, 1)


def test_use_before_init_is_a_clear_error():
    lss_plugin.destroy_topology()
    with pytest.raises(RuntimeError, match="init_topology"):
        lss_plugin.get_topology()


def _build_groups(sp):
    topo = lss_plugin.init_topology(sp, timeout_s=30)
    # A real collective over each group proves the groups are the ones the layout promises.
    import torch

    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t, group=topo.sp_group)
    u = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(u, group=topo.dp_group)
    adopted = lss_plugin.LSSTopology.from_groups(topo.sp_group, topo.dp_group)
    out = dict(sp_rank=topo.sp_rank, dp_rank=topo.dp_rank, sp_sum=t.item(), dp_sum=u.item(),
               sp_ranks=topo.sp_ranks, dp_ranks=topo.dp_ranks, adopted=(adopted.sp_rank, adopted.dp_rank))
    try:
        lss_plugin.init_topology(3)
    except ValueError as e:
        out["error"] = str(e)
    lss_plugin.destroy_topology()
    return out


def test_groups_on_four_ranks():
    res = run_ranks(_build_groups, 4, 2)
    for rank, r in enumerate(res):
        assert (r["dp_rank"], r["sp_rank"]) == divmod(rank, 2)
        assert r["sp_ranks"] == [2 * r["dp_rank"], 2 * r["dp_rank"] + 1]
        assert r["sp_sum"] == sum(r["sp_ranks"]) and r["dp_sum"] == sum(r["dp_ranks"])
        assert r["adopted"] == (r["sp_rank"], r["dp_rank"])
        assert "sequence-parallel size 3 does not divide world_size(4)" in r["error"]
