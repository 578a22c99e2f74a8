"""Optimizer state sharded over the SP x DP grid (lss_plugin.optim), exact against one rank.

Megatron: the real GPTModel of examples/pretrain_gpt_lss.py with ``--use-distributed-optimizer``
under LSS SP=2 x DP=2 (the DP x CP group has 4 ranks) must give the unsharded one-rank losses and
clipping norms within LOSS_RTOL per iteration, and the AdamW moments held per rank must add up to
those of the unsharded optimizer, each rank within the greedy partition's bound of 1/4 of them;
so must TP=2 x SP=2 (each TP rank's state sharded over its 2-rank DP x CP group). Its full-state
checkpoint (each parameter's moments gathered from the rank that holds them) must resume the
one-rank losses on the same grid, on TP=2 x SP=2 (re-sharded over 2 ranks) and on one unsharded rank.
Plain PyTorch: ``sharded_optimizer`` over 4 ranks after ``lss_plugin.average_gradients`` must give
the same parameters as an unsharded AdamW on the same gradients, step for step. Benchmark: the
budget search's ``+zero1`` LSS variant gives the same loss with its static bytes smaller by exactly
the AdamW state this rank no longer holds. One 4-rank spawn.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed import run_ranks
from tests.test_megatron import ITERS as CKPT_ITERS
from tests.test_megatron import (BASE, LOSS_RTOL, RESUME_ITERS, _assert_losses_match, _run_cases, case,
                                 synthetic_splits)

ITERS = 3
ARGV = BASE + ["--train-iters", str(ITERS)]
PLAIN_STEPS = 3
PLAIN_ATOL = 0.0  # the same AdamW arithmetic on the same numbers, split by parameter: bit-exact


def _train(argv):
    """Losses, grad norms, and this rank's / the unsharded optimizer-state element counts."""
    from megatron.core import parallel_state

    from lss_plugin.megatron.model import GPTShape, build_gpt_model, named_trainable
    from lss_plugin.megatron.pretrain import build_optimizer, parse_args, setup_parallel, train_step
    from lss_plugin.optim import local_state_numel

    args = parse_args(argv)
    setup_parallel(args)
    model = build_gpt_model(args, GPTShape.from_args(args))
    optimizer = build_optimizer(model, args)
    train = synthetic_splits().train
    steps = [train_step(model, optimizer, args, it, train) for it in range(1, args.train_iters + 1)]
    out = {"losses": [s["loss"] for s in steps], "grad_norms": [s["grad_norm"] for s in steps],
           "state_numel": local_state_numel(optimizer),
           # AdamW keeps two moments per element; the largest parameter bounds the greedy partition.
           "unsharded_numel": 2 * sum(p.numel() for _, p in named_trainable(model)),
           "largest_numel": 2 * max(p.numel() for _, p in named_trainable(model)),
           "dp_cp_size": parallel_state.get_data_parallel_world_size(with_context_parallel=True),
           "tp_rank": parallel_state.get_tensor_model_parallel_rank()}
    parallel_state.destroy_model_parallel()
    return out


def _plain_steps():
    """Parameters after each step: ZeRO over the 4-rank grid (SP=2 x DP=2) vs unsharded AdamW."""
    import torch.distributed as dist

    from lss_plugin import average_gradients
    from lss_plugin.optim import local_state_numel, sharded_optimizer
    from lss_plugin.topology import destroy_topology, init_topology

    topology = init_topology(sp_size=2, dp_size=2)
    torch.manual_seed(0)  # the same weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    hyper = dict(lr=1e-2, weight_decay=0.1, foreach=False)
    sharded = sharded_optimizer(model.parameters(), torch.optim.AdamW, **hyper)
    unsharded = torch.optim.AdamW(reference, **hyper)
    max_diff = []
    for step in range(PLAIN_STEPS):
        torch.manual_seed(100 * step + dist.get_rank())  # every rank its own local batch
        x = torch.randn(4, 8)
        model.zero_grad()
        model(x).pow(2).sum().backward()
        average_gradients(model.parameters(), topology)  # identical gradients on every rank
        for p, r in zip(model.parameters(), reference):
            r.grad = p.grad.clone()
        sharded.step()
        unsharded.step()
        max_diff.append(max(float((p - r).detach().abs().max()) for p, r in zip(model.parameters(), reference)))
    out = {"max_diff": max_diff, "state_numel": local_state_numel(sharded),
           "unsharded_numel": local_state_numel(unsharded),
           "largest_numel": 2 * max(p.numel() for p in reference)}
    destroy_topology()
    return out


def _bench_cases():
    """The benchmark's LSS reference on 4 ranks (SP=4), unsharded and +zero1: loss and static bytes."""
    from lss_plugin.bench import counters
    from lss_plugin.bench.methods import Variant
    from lss_plugin.bench.model import ModelDims
    from lss_plugin.bench.run import BUDGET_REFERENCE, Case, run_cases

    dims = ModelDims(num_layers=1, hidden_size=32, num_heads=4, num_kv_heads=4, max_positions=64)
    variants = [Variant("lss", kv_backward="regather"), Variant("lss", kv_backward="regather", shard_optimizer=True)]
    assert variants[0].name == BUDGET_REFERENCE
    counters.install()  # as the benchmark's launcher does (its cases count collectives)
    results = run_cases([Case(v, dims, 64, steps=0) for v in variants])["cases"]
    hidden, norm = 32, 2 * 32  # a LayerNorm's weight and bias
    numel = (256 * hidden + 64 * hidden  # tied word embeddings, 64 positions
             + norm + (3 * hidden * hidden + 3 * hidden) + (hidden * hidden + hidden)  # attention
             + norm + (4 * hidden * hidden + 4 * hidden) + (4 * hidden * hidden + hidden)  # MLP
             + norm)  # final norm
    return {"names": [r["case"]["variant_name"] for r in results], "errors": [r["error"] for r in results],
            "losses": [r["loss"] for r in results], "static": [r["memory"].get("static_bytes") for r in results],
            # AdamW's two fp32 moments, and a 0-dim fp32 step count for each of the 16 parameters
            "adam_bytes": 2 * 4 * numel + 4 * 16}


ZERO_SP2 = ["--lss-sequence-parallel", "--lss-sequence-parallel-size", "2", "--use-distributed-optimizer"]
TP2 = ["--tensor-model-parallel-size", "2"]


def _four_ranks(ckpt):
    resumes = {  # saved at CKPT_ITERS by SP=2 x DP=2 sharded, resumed to RESUME_ITERS
        "save": case("learned_absolute", False, *ZERO_SP2, "--save", ckpt, "--save-interval", str(CKPT_ITERS)),
        "same_grid": case("learned_absolute", False, *ZERO_SP2, "--load", ckpt, iters=RESUME_ITERS),
        "tp2xsp2": case("learned_absolute", False, *ZERO_SP2, *TP2, "--load", ckpt, iters=RESUME_ITERS),
    }
    return {"zero": _train(ARGV + ZERO_SP2), "zero_tp": _train(ARGV + ZERO_SP2 + TP2),
            "plain": _plain_steps(), "bench": _bench_cases(), "resumes": _run_cases(resumes)}


def _one_rank(ckpt):
    resumes = {"ref": case("learned_absolute", False, iters=RESUME_ITERS),
               "unsharded": case("learned_absolute", False, "--load", ckpt, iters=RESUME_ITERS)}
    return {**_train(ARGV), "resumes": _run_cases(resumes)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("zero_ckpt") / "sp2xdp2")
    return (run_ranks(_four_ranks, 4, ckpt, timeout_s=420, pg_timeout_s=120),
            run_ranks(_one_rank, 1, ckpt, timeout_s=180))


def _assert_one_rank_losses(per_rank, ref, dp_cp_size):
    for rank, got in enumerate(per_rank):
        assert got["dp_cp_size"] == dp_cp_size
        for name in ("losses", "grad_norms"):
            torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(ref[name]), rtol=LOSS_RTOL, atol=0,
                                       msg=lambda m: f"rank {rank} {name}: {m}")


def test_megatron_distributed_optimizer_matches_one_rank_and_shards_state(runs):
    ranks, (ref,) = runs
    _assert_one_rank_losses([out["zero"] for out in ranks], ref, dp_cp_size=4)
    shards = [out["zero"]["state_numel"] for out in ranks]
    assert ref["state_numel"] == ref["unsharded_numel"] > 0  # the one-rank AdamW holds both moments
    assert sum(shards) == ref["unsharded_numel"], shards  # every moment on exactly one rank
    bound = ref["unsharded_numel"] / 4 + ref["largest_numel"]
    assert all(0 < s <= bound for s in shards), (shards, bound)


def test_megatron_distributed_optimizer_with_tensor_parallelism(runs):
    ranks, (ref,) = runs
    _assert_one_rank_losses([out["zero_tp"] for out in ranks], ref, dp_cp_size=2)
    by_tp = {}
    for out in ranks:
        by_tp.setdefault(out["zero_tp"]["tp_rank"], []).append(out["zero_tp"])
    assert sorted(by_tp) == [0, 1]
    for group in by_tp.values():  # a TP rank's (TP-sharded) AdamW state, split over its DP x CP group
        unsharded = group[0]["unsharded_numel"]
        assert sum(g["state_numel"] for g in group) == unsharded
        assert all(0 < g["state_numel"] <= unsharded / 2 + g["largest_numel"] for g in group), group


def test_plain_pytorch_sharded_optimizer_equals_unsharded(runs):
    ranks, _ = runs
    for out in ranks:
        assert out["plain"]["max_diff"] == [PLAIN_ATOL] * PLAIN_STEPS
    shards = [out["plain"]["state_numel"] for out in ranks]
    total = ranks[0]["plain"]["unsharded_numel"]
    bound = total / 4 + ranks[0]["plain"]["largest_numel"]  # whole parameters per rank, greedily
    assert sum(shards) == total and all(0 < s <= bound for s in shards), (shards, bound)


def test_benchmark_counts_the_sharded_optimizer_state(runs):
    ranks, _ = runs
    saved = []
    for out in ranks:
        bench = out["bench"]
        assert bench["errors"] == [None, None], bench["errors"]
        assert bench["names"] == ["lss[regather,contiguous]", "lss[regather,contiguous]+zero1"]
        torch.testing.assert_close(bench["losses"][1], bench["losses"][0], rtol=LOSS_RTOL, atol=0)
        saved.append(bench["static"][0] - bench["static"][1])
    # every byte of the AdamW state is dropped by exactly three of the four ranks
    assert sum(saved) == 3 * ranks[0]["bench"]["adam_bytes"], (saved, ranks[0]["bench"]["adam_bytes"])
    assert all(s > 0 for s in saved), saved


def test_a_sharded_optimizer_checkpoint_resumes_on_any_grid(runs):
    """The moments each rank held were gathered into the checkpoint: resuming sharded on the same
    grid, re-sharded under TP=2 x SP=2, or unsharded on one rank continues the one-rank losses."""
    ranks, (one,) = runs
    ref = one["resumes"]["ref"]
    for out in ranks:
        _assert_losses_match(out["resumes"]["save"], ref, range(1, CKPT_ITERS + 1))
        for name in ("same_grid", "tp2xsp2"):
            _assert_losses_match(out["resumes"][name], ref, range(CKPT_ITERS + 1, RESUME_ITERS + 1))
    _assert_losses_match(one["resumes"]["unsharded"], ref, range(CKPT_ITERS + 1, RESUME_ITERS + 1))
