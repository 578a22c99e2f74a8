"""Layouts: which global positions each rank holds, and shard/unshard round trips."""
import pytest
import torch
import torch.distributed as dist

import lss_plugin
from lss_plugin.sharding import check_seq_len, local_token_indices
from tests.distributed import run_ranks


def test_contiguous_and_balanced_indices():
    assert local_token_indices(8, 1, 2, "contiguous").tolist() == [4, 5, 6, 7]
    # 2N = 4 chunks of 2: rank 0 holds chunks 0 and 3, rank 1 holds chunks 1 and 2.
    assert local_token_indices(8, 0, 2, "balanced").tolist() == [0, 1, 6, 7]
    assert local_token_indices(8, 1, 2, "balanced").tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "balanced"])
def test_every_position_held_exactly_once(n, layout):
    seq = 24
    held = torch.cat([local_token_indices(seq, r, n, layout) for r in range(n)])
    assert sorted(held.tolist()) == list(range(seq))


def test_balanced_layout_evens_out_causal_work():
    n, seq = 4, 64
    work = [int((local_token_indices(seq, r, n, "balanced") + 1).sum()) for r in range(n)]
    assert len(set(work)) == 1  # keys visible to a rank's queries, summed: equal on every rank
    contiguous = [int((local_token_indices(seq, r, n, "contiguous") + 1).sum()) for r in range(n)]
    assert contiguous[-1] > 3 * contiguous[0]


def test_lengths_that_cannot_split_name_the_values():
    with pytest.raises(ValueError, match=r"sequence length 10 is not divisible by 2 \* sp_size = 8"):
        check_seq_len(10, 4, "balanced")
    with pytest.raises(ValueError, match=r"sequence length 10 is not divisible by sp_size = 3"):
        check_seq_len(10, 3, "contiguous")
    with pytest.raises(ValueError, match="layout must be one of"):
        check_seq_len(12, 3, "zigzag")


def _round_trip(layout):
    lss_plugin.init_topology(dist.get_world_size())
    x = torch.arange(2 * 24 * 3).view(2, 24, 3)
    local = lss_plugin.shard_sequence(x, 1, layout=layout)
    back = lss_plugin.unshard_sequence(local, 1, layout=layout)
    pos = lss_plugin.local_positions(24, layout=layout)
    return torch.equal(back, x), torch.equal(local, x[:, pos])


@pytest.mark.parametrize("layout", ["contiguous", "balanced"])
def test_shard_unshard_round_trip_on_three_ranks(layout):
    assert all(r == (True, True) for r in run_ranks(_round_trip, 3, layout))
