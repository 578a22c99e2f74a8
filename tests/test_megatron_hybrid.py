"""megatron-core with ``--lss-ulysses-size U`` (hybrid LSS x Ulysses), end to end on CPU/gloo.

The training script on 4 ranks must give the one-rank run's per-iteration losses and clipping
norms within 1e-5 relative (float32) and, after DDP's reduction, its gradients within 1e-5 of the
largest entry: SP = 4 with U = 2 (Ulysses groups [0, 1], [2, 3]; LSS groups [0, 2], [1, 3]) in both
layouts with GQA (2 KV heads: one per Ulysses rank), MHA and MQA (1 KV head, replicated to 2), RoPE
and learned positions, a loss mask that leaves ranks uneven token counts; SP = 4 with U = 4 (pure
Ulysses); TP = 2 (+ Megatron SP) x SP = 2 with U = 2, where each TP rank's one KV head is replicated
over its Ulysses group; PP = 2 x SP = 2 with U = 2 (1F1B); packed documents (THD, global
``cu_seqlens``) with U = 2 against megatron-core's dense document mask and its THD RoPE. Each hybrid
run must really run the all-to-all (counted). What cannot be honoured is refused by name on every
rank: U not dividing the SP size, heads per TP rank that U does not divide, a layer spec whose U
disagrees with the registered groups. One 4-rank and one 1-rank spawn (Makefile: also under
megatron-core 0.19.2, ``make test-megatron-latest``).
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.distributed import run_ranks
from tests.test_megatron import VARIANT, GRAD_RTOL, LOSS_RTOL, _assert_losses_match, _run_cases, case
from tests.test_megatron_packed import DOCS, packed_splits, pcase

pytest.importorskip("megatron.core")

ITERS = 3
SP4 = ["--lss-sequence-parallel", "--lss-sequence-parallel-size", "4"]
U2, U4 = ["--lss-ulysses-size", "2"], ["--lss-ulysses-size", "4"]
CONTIGUOUS = ["--lss-layout", "contiguous"]  # the default is balanced
MHA, MQA = ["--num-query-groups", "4"], ["--num-query-groups", "1"]  # BASE: 4 heads, 2 KV heads (GQA)
TP2_SP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--lss-sequence-parallel",
           "--lss-sequence-parallel-size", "2"]

CASES_4 = {
    "sp4u2_balanced_gqa_rope_masked": case("rope", True, *SP4, *U2, iters=ITERS),
    "sp4u2_contiguous_mha_learned_regather": case("learned_absolute", False, *SP4, *U2, *MHA, *CONTIGUOUS,
                                                  "--lss-kv-backward", "regather", iters=ITERS),
    "sp4u2_balanced_mqa_rope": case("rope", False, *SP4, *U2, *MQA, iters=ITERS),
    "sp4u4_balanced_gqa_learned_masked": case("learned_absolute", True, *SP4, *U4, iters=ITERS),
    "tp2sp_xsp2u2_balanced_gqa_rope": case("rope", False, *TP2_SP2, *U2, iters=ITERS),
    # PP = 2 x SP = 2 with U = 2 through megatron-core's 1F1B schedule (SwiGLU, RMSNorm, untied)
    "pp2xsp2u2_balanced_swiglu_masked": case("learned_absolute", True, *VARIANT, "--pipeline-model-parallel-size", "2",
                                             "--lss-sequence-parallel", "--lss-sequence-parallel-size", "2", *U2,
                                             iters=ITERS),
    # Packed documents (THD, global cu_seqlens, micro-batch 1): positions restart in every document.
    "sp4u2_balanced_learned_docs": pcase("learned_absolute", *SP4, *U2, *DOCS),
    "sp4u2_contiguous_rope_docs_masked": pcase("rope", *SP4, *U2, *CONTIGUOUS, *DOCS, masked=True),
}
CASES_1 = {
    "ref_gqa_rope_masked": case("rope", True, iters=ITERS),
    "ref_mha_learned": case("learned_absolute", False, *MHA, iters=ITERS),
    "ref_mqa_rope": case("rope", False, *MQA, iters=ITERS),
    "ref_gqa_learned_masked": case("learned_absolute", True, iters=ITERS),
    "ref_gqa_rope": case("rope", False, iters=ITERS),
    "ref_swiglu_masked": case("learned_absolute", True, *VARIANT, iters=ITERS),
    # megatron-core's dense document mask and local attention; its THD RoPE (LSS on one rank)
    "ref_dense_learned_docs": pcase("learned_absolute", *DOCS),
    "ref_thd_rope_docs_masked": pcase("rope", "--lss-sequence-parallel", "--lss-sequence-parallel-size", "1",
                                      *DOCS, masked=True),
}
REFERENCE = {
    "sp4u2_balanced_gqa_rope_masked": "ref_gqa_rope_masked",
    "sp4u2_contiguous_mha_learned_regather": "ref_mha_learned",
    "sp4u2_balanced_mqa_rope": "ref_mqa_rope",
    "sp4u4_balanced_gqa_learned_masked": "ref_gqa_learned_masked",
    "tp2sp_xsp2u2_balanced_gqa_rope": "ref_gqa_rope",
    "pp2xsp2u2_balanced_swiglu_masked": "ref_swiglu_masked",
    "sp4u2_balanced_learned_docs": "ref_dense_learned_docs",
    "sp4u2_contiguous_rope_docs_masked": "ref_thd_rope_docs_masked",
}


def _refusals() -> dict:
    """What each rank raises, by name, for settings the hybrid cannot honour (4 ranks)."""
    import torch.distributed as dist
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from lss_plugin.megatron.attention import configured_lss_attention
    from lss_plugin.megatron.parallel import destroy_lss_model_parallel, initialize_lss_model_parallel
    from lss_plugin.topology import get_topology

    def message(fn):
        try:
            fn()
        except ValueError as err:
            return str(err)
        return None

    def config(heads, groups):
        return TransformerConfig(num_layers=1, hidden_size=8 * heads, num_attention_heads=heads,
                                 num_query_groups=groups, attention_dropout=0.0, context_parallel_size=4)

    out = {"u3": message(lambda: initialize_lss_model_parallel(4, timeout_s=60, ulysses_size=3))}
    destroy_lss_model_parallel()
    initialize_lss_model_parallel(4, timeout_s=60, ulysses_size=2)
    topology = get_topology()
    out["groups"] = (dist.get_process_group_ranks(topology.ulysses_group),
                     dist.get_process_group_ranks(topology.lss_group))
    attention = configured_lss_attention(ulysses_size=2)
    out["heads"] = message(lambda: attention(config(3, 3), 1, AttnMaskType.causal, "self"))
    out["spec_u1"] = message(lambda: configured_lss_attention(ulysses_size=1)(config(4, 2), 1,
                                                                              AttnMaskType.causal, "self"))
    out["spec_u4"] = message(lambda: configured_lss_attention(ulysses_size=4)(config(4, 2), 1,
                                                                              AttnMaskType.causal, "self"))
    # None follows the registered groups: accepted, and attends over them.
    out["follows"] = configured_lss_attention()(config(4, 2), 1, AttnMaskType.causal, "self").ulysses_size
    destroy_lss_model_parallel()
    return out


def _run_four_ranks() -> dict:
    out = _run_cases(CASES_4, splits_fn=packed_splits)  # documents end at EOD bytes (unpacked cases: plain bytes)
    out["refusals"] = _refusals()
    return out


@pytest.fixture(scope="module")
def runs4():
    return run_ranks(_run_four_ranks, 4, timeout_s=600, pg_timeout_s=120)


@pytest.fixture(scope="module")
def runs1(runs4):
    return run_ranks(_run_cases, 1, CASES_1, splits_fn=packed_splits, timeout_s=300, pg_timeout_s=120)[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_hybrid_losses_and_gradients_match_one_rank(name, runs4, runs1):
    ref = runs1[REFERENCE[name]]
    worst_loss = worst_grad = 0.0
    for rank, results in enumerate(runs4):
        got = results[name]
        _assert_losses_match(got, ref, range(1, ITERS + 1))
        for norm, ref_norm in zip(got["grad_norms"], ref["grad_norms"]):
            assert abs(norm - ref_norm) <= LOSS_RTOL * ref_norm, (rank, norm, ref_norm)
        assert got["tokens"] == ref["tokens"]
        for param, grad in got["probes"].items():
            scale = np.abs(ref["probes"][param]).max()
            deviation = np.abs(grad - ref["probes"][param]).max() / scale
            assert deviation <= GRAD_RTOL, (rank, param, deviation)
            worst_grad = max(worst_grad, float(deviation))
        worst_loss = max(worst_loss, *(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"])))
        # The Ulysses all-to-all ran: without it this would be a pure LSS run that also matches.
        assert got["calls"]["all_to_all_single"] > 0, (rank, got["calls"])
    # every probed gradient was compared on some rank (a pipeline stage holds its own layers')
    assert {p for results in runs4 for p in results[name]["probes"]} == set(ref["probes"])
    print(f"\n{name}: worst loss deviation {worst_loss:.2e} (relative), worst gradient {worst_grad:.2e}")


def test_the_balanced_hybrid_splits_tokens_unlike_pure_lss():
    """So a batch split or RoPE rows that ignored U would change the losses (the comparison can fail)."""
    from lss_plugin.sharding import local_token_indices

    hybrid = [local_token_indices(64, r, 4, "balanced", ulysses_size=2).tolist() for r in range(4)]
    assert hybrid != [local_token_indices(64, r, 4, "balanced").tolist() for r in range(4)]
    assert sorted(sum(hybrid, [])) == list(range(64))


@pytest.mark.slow
def test_hybrid_groups_and_refusals_on_every_rank(runs4):
    for rank, results in enumerate(runs4):
        r = results["refusals"]
        assert r["groups"] == ([rank - rank % 2, rank - rank % 2 + 1], [rank % 2, rank % 2 + 2])
        assert "ulysses_size (3) must divide the sequence-parallel size (4)" in r["u3"]
        assert "3 query and 3 key/value heads per tensor-parallel rank" in r["heads"]
        assert "must divide the number of query heads (3)" in r["heads"]
        assert "ulysses_size=1, but the topology registered" in r["spec_u1"]
        assert "has ulysses_size=2" in r["spec_u1"]
        assert "ulysses_size=4, but" in r["spec_u4"]
        assert r["follows"] == 2


# ---------------------------------------------------------------------------------------------
# Argument validation (no processes)

def _parse(argv, world_size):
    from lss_plugin.megatron.pretrain import parse_args
    from tests.test_megatron import BASE

    return parse_args(BASE + list(argv), world_size=world_size)


@pytest.mark.parametrize("argv,world,message", [
    ([*SP4, "--lss-ulysses-size", "3"], 4, r"--lss-ulysses-size \(3\) must divide the sequence-parallel size \(4\)"),
    ([*SP4, "--lss-ulysses-size", "0"], 4, r"--lss-ulysses-size must be a positive integer, got 0"),
    (["--lss-ulysses-size", "2"], 4, r"--lss-ulysses-size 2 given without --lss-sequence-parallel"),
    # 4 heads over TP = 2: 2 per rank, which U = 4 cannot split
    (["--tensor-model-parallel-size", "2", "--lss-sequence-parallel", "--lss-sequence-parallel-size", "4",
      *U4], 8, r"--num-attention-heads 4 with 2 key/value heads over --tensor-model-parallel-size 2 "
               r"\(2 and 1 per rank\): --lss-ulysses-size \(4\) must divide the number of query heads \(2\)"),
    ([*SP4, *U4, "--num-attention-heads", "6", "--num-query-groups", "3", "--hidden-size", "48"], 4,
     r"--num-attention-heads 6 with 3 key/value heads: --lss-ulysses-size \(4\) must divide the number of query "
     r"heads \(6\)"),
    ([*SP4, *U2, "--lss-kv-head-chunk", "2"], 4,  # 2 KV heads over U = 2: one per rank
     r"--lss-kv-head-chunk \(1 key/value heads per rank after the all-to-all\) must be an integer in \[1, 1\]"),
    ([*SP4, *U2, "--seq-length", "62"], 4,
     r"--seq-length 62 with --lss-sequence-parallel-size 4 and --lss-ulysses-size 2: sequence length 62 is not "
     r"divisible by"),
])
def test_hybrid_arguments_are_refused_with_the_values(argv, world, message):
    with pytest.raises(ValueError, match=message):
        _parse(argv, world)


def test_hybrid_arguments_are_accepted_and_printed():
    from lss_plugin.megatron.pretrain import describe

    args = _parse([*SP4, *U2], 4)
    assert describe(args) == "LSS sp=4 (ulysses=2 x lss=2) x dp=1 layout=balanced kv_backward=keep"
    args = _parse([*SP4, *U4, *MQA], 4)  # 1 KV head replicated over the 4 Ulysses ranks
    assert args.lss_ulysses_size == 4
    # Megatron-LM spelling: without --group-query-attention every head is its own KV head
    from lss_plugin.megatron.args import validate_lss_args

    args.group_query_attention, args.num_query_groups, args.num_attention_heads = False, 1, 6
    with pytest.raises(ValueError, match=r"--num-attention-heads 6 with 6 key/value heads: --lss-ulysses-size \(4\)"):
        validate_lss_args(args, world_size=4)


def test_megatron_lm_hook_takes_the_ulysses_size(monkeypatch):
    """A patched Megatron-LM parses --lss-ulysses-size through the same provider, and refuses it by name."""
    from lss_plugin.megatron.megatron_lm import lss_extra_args_provider
    from tests.test_megatron import _megatron_like_parser

    monkeypatch.setenv("WORLD_SIZE", "8")
    parser = lss_extra_args_provider(_megatron_like_parser())
    lss = ["--seq-length", "256", "--attention-dropout", "0", "--lss-sequence-parallel"]
    args = parser.parse_args([*lss, "--lss-ulysses-size", "4"])
    assert (args.context_parallel_size, args.lss_ulysses_size) == (8, 4)
    with pytest.raises(ValueError, match=r"--lss-ulysses-size \(3\) must divide the sequence-parallel size \(8\)"):
        parser.parse_args([*lss, "--lss-ulysses-size", "3"])
