"""The local block runs while the K/V exchange is in flight (issue 31), on 2 and 3 ranks.

The order of events on each rank, from ``comm.listen_to_collectives`` (a collective issued, waited
for) and a spy on the kernels' block calls: in forward, every head chunk's pieces on the rank's own
keys are computed between issuing its K/V collective and waiting for it; in backward with ``keep``
its own pieces run between issuing its dK/dV collective and waiting for it, with ``regather``
between issuing its regather and waiting for that. For the gather and the sparse exchange, whole and
pipelined head chunks. Results stay float64-exact (1e-10) against the one-process reference.
"""
import pytest
import torch
import torch.distributed as dist

import lss_plugin
import lss_plugin.attention as attention
from lss_plugin.comm import backend_of, listen_to_collectives, reduce_scatter_kv_name
from lss_plugin.sharding import local_token_indices
from tests.distributed import run_ranks
from tests.reference import reference_attention

B, L, H, HKV, D = 1, 48, 4, 2, 8
KV_NAMES = {"all_gather_into_tensor", "sparse_kv_exchange"}


class _Events:
    def __init__(self):
        self.log = []

    def issued(self, pending, work):
        self.log.append(("issued", pending.name))

    def waiting(self, pending):
        self.log.append(("waiting", pending.name))

    def waited(self, pending):
        pass


def _spy(events, name):
    real = getattr(attention, name)

    def spy(*args, **kwargs):
        events.log.append((name, None))
        return real(*args, **kwargs)

    return real, spy


def _between(log, first, then, kinds):
    """Kernel calls of ``kinds`` between each (issued, name in first) and the next (waiting, same)."""
    counts, open_at = [], None
    for i, (event, name) in enumerate(log):
        if event == "issued" and name in first:
            open_at = (i, name)
        elif event == "waiting" and open_at and name == open_at[1]:
            counts.append(sum(1 for e, _ in log[open_at[0]:i] if e in kinds))
            open_at = None
    return counts


def _case(exchange, kv_backward, head_chunk, window):
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(B, L, n, D, generator=gen, dtype=torch.float64) for n in (H, HKV, HKV, H))
    idx = local_token_indices(L, rank, world, "balanced")
    local = [t[:, idx].clone().requires_grad_() for t in (q, k, v)]
    events = _Events()
    real_f, spy_f = _spy(events, "block_forward")
    real_b, spy_b = _spy(events, "block_backward")
    attention.block_forward, attention.block_backward = spy_f, spy_b
    try:
        with listen_to_collectives(events):
            out = lss_plugin.lss_attention(*local, causal=True, window=window, kv_exchange=exchange,
                                           kv_backward=kv_backward, kv_head_chunk=head_chunk)
            events.log.append(("backward", None))
            out.backward(dout[:, idx])
    finally:
        attention.block_forward, attention.block_backward = real_f, real_b
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_in, causal=True, window=window)
    ref.backward(dout)
    error = max((a - b[:, idx]).abs().max().item() for a, b in
                ((out, ref), (local[0].grad, ref_in[0].grad), (local[1].grad, ref_in[1].grad),
                 (local[2].grad, ref_in[2].grad)))
    split = events.log.index(("backward", None))
    forward, backward = events.log[:split], events.log[split:]
    return {
        "error": error,
        "forward": _between(forward, KV_NAMES, "waiting", {"block_forward"}),
        "backward_dkv": _between(backward, {reduce_scatter_kv_name(backend_of(dist.group.WORLD, torch.device("cpu"))),
                                            "sparse_dkv_exchange"}, "waiting", {"block_backward"}),
        "backward_regather": _between(backward, KV_NAMES, "waiting", {"block_backward"}),
    }


CASES = [("gather", "keep", None, None), ("gather", "regather", 1, None), ("sparse", "keep", 1, (5, 0)),
         ("sparse", "regather", None, (5, 0))]


def _sweep():
    lss_plugin.init_topology(dist.get_world_size(), timeout_s=60)
    return [(case, _case(*case)) for case in CASES]


@pytest.mark.parametrize("world", [2, 3])
def test_own_pieces_run_while_the_exchange_is_in_flight(world):
    for results in run_ranks(_sweep, world):
        for (exchange, kv_backward, head_chunk, window), got in results:
            chunks = HKV // (head_chunk or HKV)
            assert got["error"] < 1e-10, got
            # every head chunk's K/V collective had its own pieces computed while in flight
            assert len(got["forward"]) == chunks and all(n >= 1 for n in got["forward"]), got
            if kv_backward == "keep":
                assert len(got["backward_dkv"]) == chunks and all(n >= 1 for n in got["backward_dkv"]), got
            else:
                assert len(got["backward_regather"]) == chunks, got
                assert all(n >= 1 for n in got["backward_regather"]), got
