"""megatron-core adapter, end to end: a real GPTModel in megatron-core DDP, on CPU/gloo.

Reference = the same script on 1 rank. Every parallel run (LSS SP=2, SP=4, SP=2 x DP=2, both
layouts, learned and RoPE positions; Megatron TP=2 + SP; TP=2 x LSS=2 with and without Megatron
SP, both layouts, MHA and GQA; PP=2 x LSS=2 through megatron-core's 1F1B schedule) must give the
1-rank per-iteration losses and clipping norms within 1e-5 relative (float32) and, after DDP's
reduction, the 1-rank gradient of a parameter. Half the cases drop tokens from the loss with a
mask that leaves ranks with different token counts: a mean of per-rank means (Megatron's default
reduction) would be wrong there. Checkpoints resume across (T, N, D, P): SP=4 on SP=2, on 1 rank
and on TP=2 x SP=2; TP=2 and TP=2 x SP=2 on 1 rank; TP=2 x SP=2 on DP=2; PP=2 x SP=2 on 1 rank,
continuing the losses of an uninterrupted run. ``--lss-kv-buffer-mib`` sized for one KV head per
gather issues exactly the collectives of ``--lss-kv-head-chunk 1`` with regather (and the 1-rank
losses), though a larger ``LSS_KV_BUFFER_MIB`` is set beside it. Runs are batched into three spawns
(4, 2, 1 ranks).
"""
from __future__ import annotations

import argparse
import os
from unittest import mock

import numpy as np
import pytest
import torch

from lss_plugin.comm import reduce_scatter_kv_name
from lss_plugin.megatron.args import add_lss_args, validate_lss_args
from lss_plugin.options import KV_BUFFER_ENV
from lss_plugin.signature import SIGNATURE_BYTES
from tests.distributed import run_ranks

LOSS_RTOL = 1e-5  # float32, relative, per iteration
GRAD_RTOL = 1e-5  # float32: max |g - g_ref| relative to max |g_ref|
ITERS = 5
RESUME_ITERS = 7  # checkpoints are written at ITERS and resumed to RESUME_ITERS

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", "64", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--lr", "3e-3", "--seed", "7", "--timeout-s", "120",
        "--log-interval", "1000"]
QKV = "decoder.layers.0.self_attention.linear_qkv.weight"
POS = "embedding.position_embeddings.weight"
NORM = "decoder.layers.1.pre_mlp_layernorm.weight"  # TP+SP: partial per rank until all-reduced


def synthetic_splits():
    from lss_plugin.data import split_bytes

    data = np.random.default_rng(0).integers(32, 127, size=48_000).astype(np.uint8)
    return split_bytes(data, source="<synthetic>", sha256="synthetic")


def uneven_loss_mask(tokens, labels):
    """Drop every label divisible by 3: per-rank token counts then differ."""
    return labels % 3 != 0


# the dK,dV collective as run on gloo (all these tests): an all-to-all and a local sum (lss_plugin.comm)
KV_COLLECTIVES = ("all_gather_into_tensor", reduce_scatter_kv_name("gloo"))
SPARSE_COLLECTIVES = ("sparse_kv_exchange", "sparse_dkv_exchange")  # kv_exchange auto/sparse (lss_plugin.exchange)
FC1 = "decoder.layers.0.mlp.linear_fc1.weight"  # SwiGLU: TP stride 2 ([gate; up] per rank)
VARIANT = ["--swiglu", "--normalization", "RMSNorm", "--untie-embeddings-and-output-weights",
           "--disable-bias-linear"]


def case(pos, masked, *extra, iters=ITERS, env=None):
    argv = BASE + ["--position-embedding-type", pos, "--train-iters", str(iters), *extra]
    probes = (QKV, NORM, POS) if pos == "learned_absolute" else (QKV, NORM)
    if "--swiglu" in extra:
        probes += (FC1,)
    return {"argv": argv, "masked": masked, "probes": probes, "env": env or {}}


def _run_cases(cases: dict, check_attention_module: bool = False, splits_fn=synthetic_splits) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from lss_plugin import record_collectives
    from lss_plugin.megatron.pretrain import parse_args, train
    from lss_plugin.topology import get_topology

    splits, out = splits_fn(), {}
    for name, spec in cases.items():
        args = parse_args(spec["argv"])
        with mock.patch.dict(os.environ, spec.get("env", {})), record_collectives() as rec:
            records = train(args, loss_mask_fn=uneven_loss_mask if spec["masked"] else None,
                            probe_params=spec["probes"], splits=splits)
        out[name] = {
            "iterations": [r["iteration"] for r in records],
            "losses": [r["loss"] for r in records],
            "grad_norms": [r["grad_norm"] for r in records],
            "kv_collectives": {k: (rec.calls[k], rec.bytes[k]) for k in KV_COLLECTIVES + SPARSE_COLLECTIVES},
            "calls": dict(rec.calls),  # every collective the plugin counted (the hybrid's all-to-all)
            "tokens": [r["num_tokens"] for r in records],
            "probes": {k: v.numpy() for k, v in records[0]["probes"].items()} if records else {},
            "val_bpc": [r["val_bpc"] for r in records if "val_bpc" in r],
        }
        if args.lss_sequence_parallel:
            topo = get_topology()
            out[name]["groups"] = {
                "cp": dist.get_process_group_ranks(parallel_state.get_context_parallel_group()),
                "dp_cp": dist.get_process_group_ranks(
                    parallel_state.get_data_parallel_group(with_context_parallel=True)),
                "tp": dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group()),
                "sp": topo.sp_ranks, "dp": topo.dp_ranks, "lss_tp": topo.tp_ranks,
                "sp_rank": topo.sp_rank, "cp_rank": parallel_state.get_context_parallel_rank(),
            }
        parallel_state.destroy_model_parallel()
    if check_attention_module:
        out["attention_module"] = _check_attention_refusals()
        parallel_state.destroy_model_parallel()
    return out


def _check_attention_refusals() -> str:
    """LSSDotProductAttention refuses dropout and arbitrary masks with clear errors (packed documents:
    tests/test_megatron_packed.py)."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from lss_plugin.megatron.attention import LSSDotProductAttention
    from lss_plugin.megatron.parallel import initialize_lss_model_parallel

    initialize_lss_model_parallel(1, timeout_s=60)
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                               attention_dropout=0.0, context_parallel_size=1)
    attn = LSSDotProductAttention(config, 1, AttnMaskType.causal, "self")
    q = torch.randn(8, 1, 2, 8)
    with pytest.raises(ValueError, match="attention dropout 0.1"):
        LSSDotProductAttention(config, 1, AttnMaskType.causal, "self", attention_dropout=0.1)
    with pytest.raises(ValueError, match="arbitrary"):
        LSSDotProductAttention(config, 1, AttnMaskType.arbitrary, "self")
    # Without CP the module is exact single-process causal attention.
    k, v = torch.randn(8, 1, 2, 8), torch.randn(8, 1, 2, 8)
    expect = torch.nn.functional.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), is_causal=True
    ).permute(2, 0, 1, 3).reshape(8, 1, 16)
    torch.testing.assert_close(attn(q, k, v, None), expect, rtol=1e-5, atol=1e-6)
    return "ok"


# ---------------------------------------------------------------------------------------------
# The three spawns (4 ranks first: its checkpoint is resumed by the others)

TP2_LSS2 = ["--tensor-model-parallel-size", "2", "--lss-sequence-parallel",
            "--lss-sequence-parallel-size", "2"]
MHA = ["--num-query-groups", "4"]
# With MHA (4 KV heads, head dim 8) and micro-batch 2 at L = 64 in float32, one KV head of gathered
# K,V is 2 * 2 * 64 * 8 * 4 B = 8 KiB. This budget holds two one-head chunks in flight (16 KiB)
# but not two of two heads, nor all four unchunked (32 KiB): the most it fits is one head per gather.
ONE_HEAD_MIB = "0.02"
CONTIGUOUS = ["--lss-layout", "contiguous"]  # the default is balanced


def cases_4(ckpt):
    lss = ["--lss-sequence-parallel"]
    return {
        "sp4_contiguous_rope_masked": case("rope", True, *lss, "--lss-sequence-parallel-size", "4", *CONTIGUOUS),
        "sp4_balanced_learned": case(
            "learned_absolute", False, *lss, "--lss-layout", "balanced",
            "--eval-interval", str(ITERS), "--eval-iters", "2",
            "--save", ckpt["sp4"], "--save-interval", str(ITERS)),
        "sp2xdp2_contiguous_learned_masked": case(
            "learned_absolute", True, *lss, "--lss-sequence-parallel-size", "2", *CONTIGUOUS),
        "sp2xdp2_balanced_rope_masked": case(
            "rope", True, *lss, "--lss-sequence-parallel-size", "2", "--lss-layout", "balanced",
            "--lss-kv-backward", "regather"),
        # TP=2 x LSS=2: with and without Megatron's SP, both layouts, GQA (2 groups) and MHA.
        "tp2xsp2_contiguous_gqa_learned_masked": case("learned_absolute", True, *TP2_LSS2, *CONTIGUOUS),
        "tp2sp_xsp2_balanced_gqa_rope": case(
            "rope", False, *TP2_LSS2, "--sequence-parallel", "--lss-layout", "balanced",
            "--save", ckpt["tp2xsp2"], "--save-interval", str(ITERS)),
        "tp2xsp2_balanced_mha_rope_masked": case("rope", True, *TP2_LSS2, *MHA, "--lss-layout", "balanced",
                                                 "--lss-kv-backward", "regather"),
        "tp2sp_xsp2_contiguous_mha_learned": case("learned_absolute", False, *TP2_LSS2, *MHA,
                                                  "--sequence-parallel", *CONTIGUOUS),
        # PP=2 x LSS=2 through megatron-core's 1F1B schedule (untied embeddings: see pretrain.py).
        "pp2xsp2_balanced_swiglu_rmsnorm_untied": case(
            "learned_absolute", True, *VARIANT, "--pipeline-model-parallel-size", "2",
            "--lss-sequence-parallel", "--lss-sequence-parallel-size", "2", "--lss-layout", "balanced",
            "--save", ckpt["pp2xsp2"], "--save-interval", str(ITERS),
            "--eval-interval", str(ITERS), "--eval-iters", "2"),
        # (T, N, D) = (1, 4, 1) checkpoint resumed on (2, 2, 1) with Megatron SP.
        "resume_sp4_on_tp2sp_xsp2": case("learned_absolute", False, *TP2_LSS2, "--sequence-parallel",
                                         "--load", ckpt["sp4"], iters=RESUME_ITERS),
    }


def cases_2(ckpt):
    lss = ["--lss-sequence-parallel"]
    tpsp = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    return {
        "sp2_contiguous_learned_masked": case("learned_absolute", True, *lss, *CONTIGUOUS),
        # the default layout (balanced), K,V pipelined one KV head at a time, regathered ("auto")
        "sp2_balanced_rope_chunked": case("rope", False, *lss, "--lss-kv-head-chunk", "1",
                                          "--lss-kv-backward", "auto"),
        # the budget flag wins over a LSS_KV_BUFFER_MIB that alone would gather all 4 heads at once
        "sp2_mha_rope_budget": case("rope", True, *lss, *MHA, "--lss-kv-buffer-mib", ONE_HEAD_MIB,
                                    env={KV_BUFFER_ENV: "1024"}),
        "sp2_mha_rope_chunk1_regather": case("rope", True, *lss, *MHA, "--lss-kv-head-chunk", "1",
                                             "--lss-kv-backward", "regather"),
        "tp2sp_learned_masked": case("learned_absolute", True, *tpsp),
        "tp2sp_rope": case("rope", False, *tpsp, "--save", ckpt["tp2"], "--save-interval", str(ITERS)),
        "tp2sp_swiglu_rmsnorm_untied": case("learned_absolute", True, *tpsp, *VARIANT),
        "sp2_balanced_swiglu_rmsnorm_untied": case("learned_absolute", True, *lss, *VARIANT,
                                                   "--lss-layout", "balanced"),
        # SP=4 balanced checkpoint, resumed with SP=2 contiguous.
        "resume_sp4_on_sp2": case("learned_absolute", False, *lss, "--load", ckpt["sp4"], *CONTIGUOUS,
                                  iters=RESUME_ITERS),
        # (T, N, D) = (2, 2, 1) checkpoint resumed on (1, 1, 2): no TP, no LSS.
        "resume_tp2xsp2_on_dp2": case("rope", False, "--load", ckpt["tp2xsp2"], iters=RESUME_ITERS),
    }


def cases_1(ckpt):
    return {
        "ref_learned": case("learned_absolute", False, "--eval-interval", str(ITERS),
                            "--eval-iters", "2", iters=RESUME_ITERS),
        "ref_learned_masked": case("learned_absolute", True),
        "ref_rope": case("rope", False, iters=RESUME_ITERS),
        "ref_rope_masked": case("rope", True),
        "ref_swiglu_rmsnorm_untied_masked": case("learned_absolute", True, *VARIANT, "--eval-interval",
                                                 str(ITERS), "--eval-iters", "2", iters=RESUME_ITERS),
        "resume_sp4_on_1": case("learned_absolute", False, "--load", ckpt["sp4"], iters=RESUME_ITERS),
        "resume_tp2_on_1": case("rope", False, "--load", ckpt["tp2"], iters=RESUME_ITERS),
        "resume_tp2xsp2_on_1": case("rope", False, "--load", ckpt["tp2xsp2"], iters=RESUME_ITERS),
        "resume_pp2xsp2_on_1": case("learned_absolute", True, *VARIANT, "--load", ckpt["pp2xsp2"],
                                    iters=RESUME_ITERS),
        "ref_mha_rope_masked": case("rope", True, *MHA),
        "ref_mha_learned": case("learned_absolute", False, *MHA),
    }


CKPTS = ("sp4", "tp2", "tp2xsp2", "pp2xsp2")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_ckpt")
    return {name: str(root / name) for name in CKPTS}


@pytest.fixture(scope="module")
def runs4(ckpt):
    return run_ranks(_run_cases, 4, cases_4(ckpt), timeout_s=420, pg_timeout_s=120)


@pytest.fixture(scope="module")
def runs2(ckpt, runs4):
    return run_ranks(_run_cases, 2, cases_2(ckpt), timeout_s=300, pg_timeout_s=120)


@pytest.fixture(scope="module")
def runs1(ckpt, runs4, runs2):
    return run_ranks(_run_cases, 1, cases_1(ckpt), check_attention_module=True,
                     timeout_s=300, pg_timeout_s=120)[0]


REFERENCE = {  # parallel case -> 1-rank reference case
    "sp4_contiguous_rope_masked": "ref_rope_masked",
    "sp4_balanced_learned": "ref_learned",
    "sp2xdp2_contiguous_learned_masked": "ref_learned_masked",
    "sp2xdp2_balanced_rope_masked": "ref_rope_masked",
    "sp2_contiguous_learned_masked": "ref_learned_masked",
    "sp2_balanced_rope_chunked": "ref_rope",
    "sp2_mha_rope_budget": "ref_mha_rope_masked",
    "sp2_mha_rope_chunk1_regather": "ref_mha_rope_masked",
    "tp2sp_learned_masked": "ref_learned_masked",
    "tp2sp_rope": "ref_rope",
    "tp2sp_swiglu_rmsnorm_untied": "ref_swiglu_rmsnorm_untied_masked",
    "sp2_balanced_swiglu_rmsnorm_untied": "ref_swiglu_rmsnorm_untied_masked",
    "tp2xsp2_contiguous_gqa_learned_masked": "ref_learned_masked",
    "tp2sp_xsp2_balanced_gqa_rope": "ref_rope",
    "tp2xsp2_balanced_mha_rope_masked": "ref_mha_rope_masked",
    "tp2sp_xsp2_contiguous_mha_learned": "ref_mha_learned",
    "pp2xsp2_balanced_swiglu_rmsnorm_untied": "ref_swiglu_rmsnorm_untied_masked",
}


def _assert_losses_match(got, ref, iterations):
    ref_by_iter = dict(zip(ref["iterations"], ref["losses"]))
    assert got["iterations"] == list(iterations)
    for it, loss in zip(got["iterations"], got["losses"]):
        assert abs(loss - ref_by_iter[it]) <= LOSS_RTOL * abs(ref_by_iter[it]), (it, loss, ref_by_iter[it])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_losses_and_gradients_match_one_rank(name, runs4, runs2, runs1):
    per_rank = runs4 if name in cases_4(dict.fromkeys(CKPTS, "")) else runs2
    ref = runs1[REFERENCE[name]]
    for rank, results in enumerate(per_rank):
        got = results[name]
        _assert_losses_match(got, ref, range(1, ITERS + 1))
        # The clipping norm (TP x PP reduction of the DP x CP-reduced grads) is the 1-rank norm.
        for norm, ref_norm in zip(got["grad_norms"], ref["grad_norms"]):
            assert abs(norm - ref_norm) <= LOSS_RTOL * ref_norm, (rank, norm, ref_norm)
        assert got["tokens"] == ref["tokens"][:ITERS]
        # Gradient after DDP's reduction (iteration 1, before any update), on every rank:
        # LSS replicas must all hold the full, 1-rank gradient; TP ranks the gathered one;
        # a pipeline stage the gradients of its own layers.
        for param, grad in got["probes"].items():
            ref_grad = ref["probes"][param]
            scale = np.abs(ref_grad).max()
            assert np.abs(grad - ref_grad).max() <= GRAD_RTOL * scale, (rank, param)
    held = {param for results in per_rank for param in results[name]["probes"]}
    assert held == set(ref["probes"]), (held, set(ref["probes"]))
    ref_by_iter = dict(zip(ref["iterations"], ref["losses"]))
    worst_loss = max(abs(loss - ref_by_iter[it]) / abs(ref_by_iter[it]) for results in per_rank
                     for it, loss in zip(results[name]["iterations"], results[name]["losses"]))
    worst_grad = max(float(np.abs(g - ref["probes"][p]).max() / np.abs(ref["probes"][p]).max())
                     for results in per_rank for p, g in results[name]["probes"].items())
    print(f"\n{name}: worst loss deviation {worst_loss:.2e} (relative), worst gradient {worst_grad:.2e}")


@pytest.mark.slow
def test_masked_cases_have_uneven_token_counts_per_rank():
    """The masked cases would expose a mean of per-rank means: check the counts really differ."""
    from lss_plugin.data import sample_batch
    from lss_plugin.sharding import local_token_indices

    batch = sample_batch(synthetic_splits().train, 4, 64, step=1, seed=7)
    mask = uneven_loss_mask(batch[:, :-1], batch[:, 1:])
    counts = {int(mask[:, local_token_indices(64, r, 4, "contiguous")].sum()) for r in range(4)}
    assert len(counts) > 1


@pytest.mark.slow
def test_lss_is_registered_as_megatron_context_parallel_group(runs4):
    for rank, results in enumerate(runs4):
        g = results["sp2xdp2_contiguous_learned_masked"]["groups"]
        dp_rank, sp_rank = divmod(rank, 2)
        assert g["cp"] == g["sp"] == [dp_rank * 2, dp_rank * 2 + 1]
        assert g["dp"] == [sp_rank, sp_rank + 2]
        assert g["dp_cp"] == [0, 1, 2, 3]
        assert g["cp_rank"] == g["sp_rank"] == sp_rank
        g4 = results["sp4_balanced_learned"]["groups"]
        assert g4["cp"] == g4["sp"] == [0, 1, 2, 3] and g4["dp"] == [rank]


@pytest.mark.slow
def test_tp_x_lss_groups_are_megatrons_tp_and_cp_groups(runs4):
    for rank, results in enumerate(runs4):
        g = results["tp2sp_xsp2_balanced_gqa_rope"]["groups"]
        tp_rank, cp_rank = rank % 2, rank // 2
        assert g["tp"] == g["lss_tp"] == [2 * cp_rank, 2 * cp_rank + 1]
        assert g["cp"] == g["sp"] == [tp_rank, tp_rank + 2]  # same TP rank: same KV heads
        assert g["dp"] == [rank] and g["dp_cp"] == [tp_rank, tp_rank + 2]
        assert g["cp_rank"] == g["sp_rank"] == cp_rank


@pytest.mark.slow
def test_each_tp_rank_gathers_only_its_own_kv_heads(runs4):
    """Same sequence split (N=2), same micro-batch: TP=2 moves half the K/V bytes per collective.

    GQA with 2 groups: 1 KV head per TP rank instead of 2 (the gathers' signature rows excepted). Calls: one gather (forward) and one
    reduce-scatter (backward) per layer per micro-batch, as without TP.
    """
    for results in runs4:
        tp = results["tp2xsp2_contiguous_gqa_learned_masked"]["kv_collectives"]  # D=1: 2 mbs/iter
        no_tp = results["sp2xdp2_contiguous_learned_masked"]["kv_collectives"]   # D=2: 1 mb/iter
        for name in KV_COLLECTIVES:
            (calls_tp, bytes_tp), (calls, nbytes) = tp[name], no_tp[name]
            assert calls == ITERS * 1 * 2 and calls_tp == ITERS * 2 * 2, (name, calls, calls_tp)
            # Every gather also carries the N = 2 ranks' call signatures (not halved by TP).
            signatures = 2 * SIGNATURE_BYTES if "gather" in name else 0
            assert bytes_tp / calls_tp - signatures == (nbytes / calls - signatures) / 2, (name, bytes_tp, nbytes)


@pytest.mark.slow
def test_kv_buffer_budget_reaches_every_attention_call(runs2):
    """``--lss-kv-buffer-mib`` (one KV head per gather) runs what ``--lss-kv-head-chunk 1
    --lss-kv-backward regather`` runs: the same collectives, calls and bytes (the losses of both
    match one rank: test_losses_and_gradients_match_one_rank)."""
    for results in runs2:
        budget, chunked = results["sp2_mha_rope_budget"], results["sp2_mha_rope_chunk1_regather"]
        assert budget["calls"] == chunked["calls"] and budget["kv_collectives"] == chunked["kv_collectives"]
        # per iteration: 2 micro-batches x 2 layers x 4 one-head chunks, gathered again in backward
        (gathers, _), (scatters, _) = (budget["kv_collectives"][k] for k in KV_COLLECTIVES)
        assert (gathers, scatters) == (ITERS * 2 * 2 * 4 * 2, ITERS * 2 * 2 * 4), (gathers, scatters)


@pytest.mark.slow
@pytest.mark.parametrize("name,ref", [("sp4_balanced_learned", "ref_learned"),
                                      ("pp2xsp2_balanced_swiglu_rmsnorm_untied",
                                       "ref_swiglu_rmsnorm_untied_masked")])
def test_validation_bits_per_character_match_one_rank(name, ref, runs4, runs1):
    """Forward-only passes (the schedule with forward_only=True under PP) give the 1-rank BPC."""
    ref_bpc = runs1[ref]["val_bpc"][0]
    for results in runs4:
        (bpc,) = results[name]["val_bpc"]
        assert abs(bpc - ref_bpc) <= LOSS_RTOL * ref_bpc


@pytest.mark.slow
@pytest.mark.parametrize("name,ref", [("resume_sp4_on_1", "ref_learned"),
                                      ("resume_tp2_on_1", "ref_rope"),
                                      ("resume_tp2xsp2_on_1", "ref_rope"),
                                      ("resume_pp2xsp2_on_1", "ref_swiglu_rmsnorm_untied_masked")])
def test_checkpoint_resumes_on_one_rank(name, ref, runs1):
    _assert_losses_match(runs1[name], runs1[ref], range(ITERS + 1, RESUME_ITERS + 1))


@pytest.mark.slow
def test_sp4_checkpoint_resumes_with_sp2_contiguous(runs2, runs1):
    for results in runs2:
        _assert_losses_match(results["resume_sp4_on_sp2"], runs1["ref_learned"],
                             range(ITERS + 1, RESUME_ITERS + 1))


@pytest.mark.slow
def test_checkpoints_resume_across_tp_lss_and_dp_sizes(runs4, runs2, runs1):
    """(1, 4, 1) -> (2, 2, 1) with Megatron SP, and (2, 2, 1) -> (1, 1, 2), continue the losses."""
    for results in runs4:
        _assert_losses_match(results["resume_sp4_on_tp2sp_xsp2"], runs1["ref_learned"],
                             range(ITERS + 1, RESUME_ITERS + 1))
    for results in runs2:
        _assert_losses_match(results["resume_tp2xsp2_on_dp2"], runs1["ref_rope"],
                             range(ITERS + 1, RESUME_ITERS + 1))


@pytest.mark.slow
def test_lss_attention_module_refusals_and_single_rank_exactness(runs1):
    assert runs1["attention_module"] == "ok"


# ---------------------------------------------------------------------------------------------
# Argument validation (no processes)

def _parse(argv, world_size):
    from lss_plugin.megatron.pretrain import parse_args

    return parse_args(BASE + list(argv), world_size=world_size)


@pytest.mark.parametrize("argv,world,message", [
    (["--lss-sequence-parallel", "--lss-sequence-parallel-size", "3"], 4,
     r"--lss-sequence-parallel-size 3 does not divide the world: world_size\(4\)"),
    (["--lss-sequence-parallel", "--seq-length", "60", "--lss-sequence-parallel-size", "8", *CONTIGUOUS], 8,
     r"--seq-length 60 is not divisible by 8 \(N for the contiguous layout"),
    (["--lss-sequence-parallel", "--seq-length", "68", "--lss-layout", "balanced"], 4,
     r"--seq-length 68 is not divisible by 8 \(2N for the balanced layout"),
    (["--lss-sequence-parallel", "--tensor-model-parallel-size", "2", "--sequence-parallel",
      "--seq-length", "36", "--lss-sequence-parallel-size", "4", *CONTIGUOUS], 8,
     r"--seq-length 36 / --lss-sequence-parallel-size 4 = 9 local tokens are not divisible by "
     r"--tensor-model-parallel-size 2"),
    (["--lss-sequence-parallel", "--tensor-model-parallel-size", "2", "--num-query-groups", "1"], 4,
     r"--num-query-groups 1 must divide --num-attention-heads 4 and be divisible by TP 2"),
    (["--lss-sequence-parallel", "--pipeline-model-parallel-size", "2"], 4,
     r"--pipeline-model-parallel-size 2 needs --untie-embeddings-and-output-weights"),
    (["--pipeline-model-parallel-size", "4", "--untie-embeddings-and-output-weights"], 4,
     r"--num-layers 2 is not divisible by --pipeline-model-parallel-size 4"),
    (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
      "--lss-sequence-parallel", "--lss-sequence-parallel-size", "2"], 4,
     r"--lss-sequence-parallel-size 2 does not divide the world: world_size\(4\) % "
     r"\(sp\(2\) \* tp\(2\) \* pp\(2\)\) = 4"),
    (["--lss-sequence-parallel", "--tensor-model-parallel-size", "3"], 6,
     r"--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3"),
    (["--lss-sequence-parallel", "--lss-grad-averaging", "two_stage"], 2,
     r"--lss-grad-averaging two_stage is not supported with megatron-core"),
    (["--lss-sequence-parallel", "--attention-dropout", "0.1"], 2,
     r"--attention-dropout 0.1 is not supported by LSS attention"),
    (["--lss-sequence-parallel-size", "2"], 2, r"given without --lss-sequence-parallel"),
    (["--lss-sequence-parallel", "--lss-sequence-parallel-size", "2", "--global-batch-size", "6"], 4,
     r"--global-batch-size 6 is not divisible by micro-batch-size\(2\) \* data-parallel size\(2\) = 4"),
    (["--tensor-model-parallel-size", "3"], 3, r"--num-attention-heads 4 is not divisible"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "65"], 2,
     r"--seq-length 65 is not divisible by --tensor-model-parallel-size 2"),
    (["--max-position-embeddings", "32"], 1, r"--max-position-embeddings 32 < --seq-length 64"),
    # a budget is only the budget of --lss-kv-head-chunk auto
    (["--lss-sequence-parallel", "--lss-kv-head-chunk", "1", "--lss-kv-buffer-mib", "64"], 2,
     r"--lss-kv-buffer-mib \(64.0\) is the budget of --lss-kv-head-chunk=auto, got --lss-kv-head-chunk=1"),
    (["--lss-sequence-parallel", "--lss-kv-head-chunk", "all", "--lss-kv-buffer-mib", "64"], 2,
     r"--lss-kv-buffer-mib \(64.0\) is the budget of --lss-kv-head-chunk=auto, got --lss-kv-head-chunk=all"),
    (["--lss-sequence-parallel", "--lss-kv-buffer-mib", "0"], 2,
     r"--lss-kv-buffer-mib must be a positive number of MiB \(or None\), got 0.0"),
    (["--lss-sequence-parallel", "--lss-kv-buffer-mib", "nan"], 2, r"--lss-kv-buffer-mib must be a positive number"),
    (["--lss-kv-buffer-mib", "64"], 1, r"--lss-kv-buffer-mib 64.0 given without --lss-sequence-parallel"),
])
def test_invalid_arguments_are_rejected_with_the_values(argv, world, message):
    with pytest.raises(ValueError, match=message):
        _parse(argv, world)


def test_valid_lss_arguments_fill_in_sizes():
    args = _parse(["--lss-sequence-parallel", "--lss-layout", "balanced"], 4)
    assert (args.lss_sequence_parallel_size, args.data_parallel_size, args.num_microbatches) == (4, 1, 2)
    args = _parse(["--lss-sequence-parallel", "--lss-sequence-parallel-size", "2"], 4)
    assert (args.lss_sequence_parallel_size, args.data_parallel_size, args.num_microbatches) == (2, 2, 1)


def test_add_lss_args_is_a_megatron_extra_args_provider():
    parser = argparse.ArgumentParser()
    assert add_lss_args(parser) is parser
    args = parser.parse_args(["--lss-sequence-parallel", "--lss-sequence-parallel-size", "2",
                              "--lss-layout", "balanced", "--lss-kv-backward", "regather"])
    args.seq_length, args.tensor_model_parallel_size = 64, 1
    validate_lss_args(args, world_size=4)
    assert (args.lss_sequence_parallel_size, args.lss_layout, args.lss_kv_backward) == (2, "balanced", "regather")
    assert parser.parse_args(["--lss-kv-head-chunk", "auto", "--lss-kv-backward", "auto"]).lss_kv_head_chunk == "auto"
    assert parser.parse_args(["--lss-kv-head-chunk", "2"]).lss_kv_head_chunk == 2
    assert parser.parse_args(["--lss-kv-head-chunk", "all"]).lss_kv_head_chunk is None
    defaults = parser.parse_args([])
    assert (defaults.lss_kv_head_chunk, defaults.lss_kv_backward, defaults.lss_kv_buffer_mib) == ("auto", "auto", None)
    assert parser.parse_args(["--lss-kv-buffer-mib", "64"]).lss_kv_buffer_mib == 64.0
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):  # argparse: "a positive integer or 'auto', got '0'"
            parser.parse_args(["--lss-kv-head-chunk", bad])
    with pytest.raises(ValueError, match="context-parallel-size 2 conflicts"):
        args.context_parallel_size = 2
        validate_lss_args(args, world_size=4)
    args.context_parallel_size = 1
    with pytest.raises(ValueError, match=r"virtual pipeline stages \(num_virtual_stages_per_pipeline_rank=2\)"):
        args.num_virtual_stages_per_pipeline_rank = 2
        validate_lss_args(args, world_size=4)


def test_printed_kv_mode_follows_the_budget_flag_before_the_environment(monkeypatch):
    """pretrain.py prints the chunking every call runs (``resolve_kv_chunking``, as lss_attention):
    the flag's budget, else LSS_KV_BUFFER_MIB's, else the default rule (all 4 heads at this size)."""
    from lss_plugin.megatron.pretrain import _kv_mode

    lss = ["--lss-sequence-parallel", *MHA]
    monkeypatch.setenv(KV_BUFFER_ENV, "1024")
    assert _kv_mode(_parse(lss, 2)) == "keep"
    assert _kv_mode(_parse([*lss, "--lss-kv-buffer-mib", ONE_HEAD_MIB], 2)) == "regather kv_head_chunk=1/4"
    monkeypatch.setenv(KV_BUFFER_ENV, ONE_HEAD_MIB)
    assert _kv_mode(_parse(lss, 2)) == "regather kv_head_chunk=1/4"
    assert _kv_mode(_parse([*lss, "--lss-kv-buffer-mib", "1024"], 2)) == "keep"
    monkeypatch.delenv(KV_BUFFER_ENV)
    assert _kv_mode(_parse(lss, 2)) == "keep"
    with pytest.raises(ValueError, match=r"kv_buffer_mib / LSS_KV_BUFFER_MIB = 0.01 MiB is below .* 0.015625 MiB"):
        _kv_mode(_parse([*lss, "--lss-kv-buffer-mib", "0.01"], 2))


def _megatron_like_parser():
    """The Megatron-LM flags the mapping reads, with Megatron-LM's defaults."""
    p = argparse.ArgumentParser()
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--context-parallel-size", type=int, default=1)
    p.add_argument("--attention-dropout", type=float, default=0.1)
    p.add_argument("--calculate-per-token-loss", action="store_true")
    p.add_argument("--transformer-impl", default="transformer_engine")
    return p


def test_megatron_lm_args_provider_maps_lss_onto_context_parallelism(monkeypatch):
    from lss_plugin.megatron.megatron_lm import lss_extra_args_provider

    monkeypatch.setenv("WORLD_SIZE", "8")
    parser = lss_extra_args_provider(_megatron_like_parser())
    args = parser.parse_args(["--seq-length", "256", "--attention-dropout", "0",
                              "--lss-sequence-parallel", "--lss-sequence-parallel-size", "4"])
    assert (args.context_parallel_size, args.calculate_per_token_loss, args.transformer_impl) == (
        4, True, "local")
    plain = parser.parse_args(["--seq-length", "256"])  # without the flag nothing changes
    assert (plain.context_parallel_size, plain.calculate_per_token_loss, plain.transformer_impl) == (
        1, False, "transformer_engine")
    with pytest.raises(ValueError, match="--attention-dropout 0.1 is not supported"):
        parser.parse_args(["--seq-length", "256", "--lss-sequence-parallel"])
    with pytest.raises(ValueError, match="--lss-sequence-parallel-size 3 does not divide"):
        parser.parse_args(["--seq-length", "256", "--attention-dropout", "0",
                           "--lss-sequence-parallel", "--lss-sequence-parallel-size", "3"])
