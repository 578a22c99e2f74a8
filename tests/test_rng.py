"""Dropout under LSS has one device's statistics: every SP rank draws its own masks.

Masks are read from every training-mode ``torch.nn.functional.dropout`` call (``nn.Dropout``
included) through a ``TorchFunctionMode``, on 2 ranks with hidden dropout p = 0.1:
- megatron-core GPTModel with the LSS spec (``pretrain.train``, SP = 2): masks differ between the
  SP ranks and agree as often as independent masks would, each rank drops p of its elements,
  the weights are identical on both ranks after init, and a run resumed from a checkpoint draws
  exactly the masks of the uninterrupted run. Megatron's own TP semantics stay: TP = 2 without
  Megatron SP draws one mask on both TP ranks (they hold the same activations), TP = 2 with SP
  one per TP rank (its tracker's stream). Megatron-LM's ``lss_finish_model`` hook moves the
  streams only after the last virtual-pipeline chunk is built;
- GPT-2 (resid_pdrop = embd_pdrop = 0.1) under ``lss_plugin.hf.deepspeed_initialize``, SP = 2:
  the same statistics, weights identical after the engine is built; under ``LSSTrainer`` the same,
  and a resume from checkpoint-2 draws the uninterrupted run's step-3 masks.
Tolerances are binomial: a rate within 4 sigma of its expectation over the recorded elements.
"""
from __future__ import annotations

import hashlib
import inspect
import math

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from lss_plugin.rng import (
    PIPELINE_SEED_STRIDE, fork_sequence_parallel_rng, rng_state, sequence_parallel_seed, set_rng_state,
)
from tests.distributed import run_ranks

P = 0.1
SIGMAS = 4.0
_DROPOUT_SIGNATURE = inspect.signature(torch.nn.functional.dropout)


class DropoutMasks(TorchFunctionMode):
    """Which elements each training-mode dropout call keeps (``kept``) among its non-zero inputs (``valid``)."""

    def __init__(self):
        super().__init__()
        self.kept, self.valid, self.p = [], [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.nn.functional.dropout:
            call = _DROPOUT_SIGNATURE.bind(*args, **kwargs)
            call.apply_defaults()
            a = call.arguments
            if a["training"] and a["p"] > 0:
                assert not a["inplace"], "an in-place dropout overwrites the input the mask is read against"
                self.kept.append((out != 0).detach().cpu().numpy())
                self.valid.append((a["input"] != 0).detach().cpu().numpy())
                self.p.append(float(a["p"]))
        return out

    def result(self) -> dict:
        return {"kept": self.kept, "valid": self.valid, "p": self.p}


def _drop_rate(masks) -> tuple[float, int]:
    dropped = sum(int((~k & v).sum()) for k, v in zip(masks["kept"], masks["valid"]))
    n = sum(int(v.sum()) for v in masks["valid"])
    return dropped / n, n


def _agreement(a, b) -> tuple[float, int]:
    """How often two ranks' masks agree, over the elements valid on both."""
    same = n = 0
    for ka, va, kb, vb in zip(a["kept"], a["valid"], b["kept"], b["valid"]):
        both = va & vb
        same += int(((ka == kb) & both).sum())
        n += int(both.sum())
    return same / n, n


def _within_binomial(rate: float, expected: float, n: int) -> bool:
    return abs(rate - expected) <= SIGMAS * math.sqrt(expected * (1 - expected) / n)


def _assert_one_device_statistics(masks0, masks1):
    """Each rank drops p; the two ranks' masks are independent (agree with probability p^2 + (1-p)^2)."""
    assert masks0["p"] and masks0["p"] == masks1["p"] and set(masks0["p"]) == {P}, (masks0["p"], masks1["p"])
    for rank, masks in enumerate((masks0, masks1)):
        rate, n = _drop_rate(masks)
        print(f"rank {rank}: drop rate {rate:.4f} over {n} elements (p = {P}, "
              f"{SIGMAS} sigma = {SIGMAS * math.sqrt(P * (1 - P) / n):.4f})")
        assert _within_binomial(rate, P, n), (rank, rate, n)
    agree, n = _agreement(masks0, masks1)
    independent = P * P + (1 - P) * (1 - P)
    print(f"masks agree on {agree:.4f} of {n} elements (independent: {independent:.4f}, identical: 1)")
    assert _within_binomial(agree, independent, n), (agree, n)


def _same_masks(a, b) -> bool:
    return len(a["kept"]) == len(b["kept"]) and all(
        np.array_equal(x, y) for x, y in zip(a["kept"], b["kept"]))


def _digest(named_tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(named_tensors):
        h.update(name.encode())
        h.update(named_tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Seeds and states, one process


def test_sp_rank_0_keeps_megatrons_seed_and_every_stream_is_distinct():
    seed = 1234
    assert [sequence_parallel_seed(seed, 0, pp) for pp in range(4)] == [seed + PIPELINE_SEED_STRIDE * pp
                                                                      for pp in range(4)]
    default, tracker = [], []  # Megatron's streams from each (sp, pp) seed: default, TP (2718 + tp)
    for sp in range(64):
        for pp in range(8):
            s = sequence_parallel_seed(seed, sp, pp)
            default.append(s)
            tracker += [s + 2718 + tp for tp in range(16)]
    assert len(set(default)) == len(default) and len(set(tracker)) == len(tracker)
    assert not set(default) & set(tracker)


def test_seed_arguments_are_checked_by_name():
    with pytest.raises(ValueError, match="sp_rank must be a non-negative integer, got -1"):
        sequence_parallel_seed(1, -1)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got 1.5"):
        sequence_parallel_seed(1.5, 0)
    with pytest.raises(ValueError, match="sp_rank must be a non-negative integer, got True"):
        fork_sequence_parallel_rng(True)


def test_fork_keeps_rank_0_and_gives_other_ranks_streams_of_the_seed():
    def draws_after_fork(sp_rank, seed=5):
        torch.manual_seed(seed)
        fork_sequence_parallel_rng(sp_rank)
        return torch.rand(1000)

    torch.manual_seed(5)
    unforked = torch.rand(1000)
    assert torch.equal(draws_after_fork(0), unforked)  # rank 0: the caller's stream, untouched
    streams = [draws_after_fork(r) for r in range(4)]
    assert all(not torch.equal(streams[i], streams[j]) for i in range(4) for j in range(i))
    assert torch.equal(draws_after_fork(3), streams[3])  # a function of the seed
    assert not torch.equal(draws_after_fork(3, seed=6), streams[3])


def test_rng_state_restores_the_streams():
    torch.manual_seed(9)
    saved = rng_state()
    first = torch.rand(100)
    torch.rand(7)
    set_rng_state(saved)
    assert torch.equal(torch.rand(100), first)
    with pytest.raises(ValueError, match=r"RNG state lacks \['tracker'\]"):
        set_rng_state({"cpu": saved["cpu"]}, tracker=object())


# --------------------------------------------------------------------------------------------
# megatron-core GPTModel, LSS SP = 2


MEGATRON_BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                 "--num-query-groups", "2", "--seq-length", "64", "--micro-batch-size", "2",
                 "--global-batch-size", "4", "--lr", "3e-3", "--seed", "7", "--timeout-s", "120",
                 "--log-interval", "1000", "--hidden-dropout", str(P)]
LSS = ["--lss-sequence-parallel"]
ITERS = 3  # the checkpoint is written after 2 and resumed for the third


def _megatron_runs(ckpt_dir: str) -> dict:
    from megatron.core import parallel_state

    from lss_plugin.megatron.model import GPTShape, build_gpt_model, full_model_state
    from lss_plugin.megatron.pretrain import parse_args, setup_parallel, train
    from tests.test_megatron import synthetic_splits

    splits, out = synthetic_splits(), {}
    args = parse_args(MEGATRON_BASE + LSS + ["--train-iters", "1"])
    setup_parallel(args)
    model = build_gpt_model(args, GPTShape.from_args(args))
    out["weights"] = _digest(full_model_state(model))
    out["megatron_lm_hook"] = _megatron_lm_hook_streams(model.module, args)
    parallel_state.destroy_model_parallel()
    runs = {
        "lss": LSS + ["--train-iters", str(ITERS)],
        "lss_first_two": LSS + ["--train-iters", str(ITERS - 1), "--save", ckpt_dir,
                                "--save-interval", str(ITERS - 1)],
        "lss_resumed": LSS + ["--train-iters", str(ITERS), "--load", ckpt_dir],
        "tp2": ["--tensor-model-parallel-size", "2", "--train-iters", "1"],
        "tp2_megatron_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--train-iters", "1"],
    }
    for name, extra in runs.items():
        with DropoutMasks() as masks:
            records = train(parse_args(MEGATRON_BASE + extra), splits=splits)
        out[name] = masks.result()
        out[name]["iterations"] = [r["iteration"] for r in records]
        parallel_state.destroy_model_parallel()
    return out


def _megatron_lm_hook_streams(gpt_model, args) -> dict:
    """Megatron-LM's ``lss_finish_model`` hook with two virtual-pipeline chunks: the streams stay
    while chunk 0 is finished (chunk 1 is still to be built from them) and are this rank's after chunk 1."""
    import copy

    from lss_plugin.megatron.megatron_lm import lss_finish_model
    from lss_plugin.rng import seed_megatron_rng

    hook_args = copy.copy(args)
    hook_args.virtual_pipeline_model_parallel_size, hook_args.data_parallel_random_init = 2, False
    torch.manual_seed(99)  # Megatron-LM's _set_random_seed: one seed on every CP rank
    before = torch.get_rng_state()
    gpt_model.vp_stage = 0
    lss_finish_model(gpt_model, hook_args)
    kept_after_chunk_0 = torch.equal(torch.get_rng_state(), before)
    gpt_model.vp_stage = 1
    lss_finish_model(gpt_model, hook_args)
    after_chunk_1 = torch.get_rng_state()
    seed_megatron_rng(args.seed)
    return {"kept_after_chunk_0": kept_after_chunk_0,
            "seeded_after_chunk_1": torch.equal(after_chunk_1, torch.get_rng_state()),
            "draw": torch.rand(8).numpy()}


@pytest.fixture(scope="module")
def megatron_runs(tmp_path_factory):
    return run_ranks(_megatron_runs, 2, str(tmp_path_factory.mktemp("rng_ckpt")), timeout_s=600)


def test_megatron_lss_ranks_draw_independent_masks_at_rate_p(megatron_runs):
    r0, r1 = megatron_runs
    assert r0["weights"] == r1["weights"]  # the fork comes after the weights
    assert not _same_masks(r0["lss"], r1["lss"])
    _assert_one_device_statistics(r0["lss"], r1["lss"])


def test_megatron_lm_hook_forks_after_the_last_chunk(megatron_runs):
    r0, r1 = (out["megatron_lm_hook"] for out in megatron_runs)
    assert r0["kept_after_chunk_0"] and r1["kept_after_chunk_0"]
    assert r0["seeded_after_chunk_1"] and r1["seeded_after_chunk_1"]
    assert not np.array_equal(r0["draw"], r1["draw"])  # the CP (LSS) ranks left Megatron-LM's one seed


def test_megatron_resume_draws_the_masks_of_the_uninterrupted_run(megatron_runs):
    for rank, out in enumerate(megatron_runs):
        assert out["lss_resumed"]["iterations"] == [ITERS], out["lss_resumed"]["iterations"]
        full, resumed = out["lss"], out["lss_resumed"]
        per_iter = len(full["kept"]) // ITERS
        assert len(resumed["kept"]) == per_iter > 0, (len(resumed["kept"]), len(full["kept"]))
        last = {"kept": full["kept"][-per_iter:]}
        assert _same_masks(resumed, last), f"rank {rank}: the resumed iteration drew other masks"
        # and the first run's two iterations were the uninterrupted run's first two
        assert _same_masks(out["lss_first_two"], {"kept": full["kept"][:-per_iter]}), rank


def test_megatron_tensor_parallel_ranks_keep_megatrons_streams(megatron_runs):
    r0, r1 = megatron_runs
    # TP without Megatron SP: hidden dropout on activations both TP ranks hold, from one stream
    assert r0["tp2"]["kept"] and _same_masks(r0["tp2"], r1["tp2"])
    # Megatron SP: each TP rank holds other tokens and draws from its tracker stream (seed + 2718 + tp)
    assert not _same_masks(r0["tp2_megatron_sp"], r1["tp2_megatron_sp"])
    _assert_one_device_statistics(r0["tp2_megatron_sp"], r1["tp2_megatron_sp"])


# --------------------------------------------------------------------------------------------
# transformers GPT-2 under lss_plugin.hf.deepspeed_initialize, SP = 2

HF_SEQ, HF_BATCH, HF_STEPS = 64, 4, 3


def _hf_run() -> dict:
    import lss_plugin.hf as hf
    from lss_plugin.topology import destroy_topology

    config = hf.small_causal_lm_config("gpt2", hidden_size=32, num_heads=4, num_layers=2,
                                       max_positions=HF_SEQ, resid_pdrop=P, embd_pdrop=P)
    model = hf.build_causal_lm(config, attn_implementation="lss", seed=11)
    ds_config = {
        "train_batch_size": HF_BATCH, "train_micro_batch_size_per_gpu": HF_BATCH,
        "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
        "lss_sequence_parallel": {"size": 2},
    }
    engine, *_ = hf.deepspeed_initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         config=ds_config)
    out = {"weights": _digest(dict(engine.module.named_parameters()))}
    engine.train()
    with DropoutMasks() as masks:
        for step in range(HF_STEPS):
            ids = torch.randint(0, 256, (HF_BATCH, HF_SEQ), generator=torch.Generator().manual_seed(step))
            batch = hf.shard_causal_lm_batch(ids)
            loss = hf.causal_lm_loss(engine(**batch.model_inputs()).logits, batch.shift_labels)
            engine.backward(loss.loss)
            engine.step()
    out["masks"] = masks.result()
    engine.lss_mpu.destroy()
    engine.destroy()
    destroy_topology()
    return out


def test_hf_lss_ranks_draw_independent_masks_at_rate_p():
    r0, r1 = run_ranks(_hf_run, 2, timeout_s=600)
    assert r0["weights"] == r1["weights"]
    assert not _same_masks(r0["masks"], r1["masks"])
    _assert_one_device_statistics(r0["masks"], r1["masks"])


# --------------------------------------------------------------------------------------------
# LSSTrainer (transformers.Trainer + DeepSpeed), SP = 2: a resume from checkpoint-2 draws step 3's masks

TRAINER_STEPS, TRAINER_SEQ = 3, 32


class _Windows(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(0, 256, (TRAINER_SEQ,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


def _trainer_run(out_dir: str, ds_config: str, save: bool, resume: str | None) -> dict:
    from accelerate.state import AcceleratorState
    from transformers import TrainingArguments

    import lss_plugin.hf as hf
    from lss_plugin.hf.trainer import configure_accelerate_for_deepspeed

    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator_config = None
    if not torch.cuda.is_available():  # accelerate would see one process on a CPU-only host
        configure_accelerate_for_deepspeed()
        accelerator_config = {"use_configured_state": True}
    args = TrainingArguments(
        output_dir=out_dir, deepspeed=ds_config, max_steps=TRAINER_STEPS, per_device_train_batch_size=2,
        learning_rate=1e-3, seed=7, report_to="none", logging_steps=1, disable_tqdm=True,
        save_strategy="steps" if save else "no", save_steps=2, accelerator_config=accelerator_config)
    config = hf.small_causal_lm_config("gpt2", hidden_size=32, num_heads=4, num_layers=2,
                                       max_positions=TRAINER_SEQ, resid_pdrop=P, embd_pdrop=P)
    model = hf.build_causal_lm(config, attn_implementation="sdpa", seed=args.seed)
    trainer = hf.LSSTrainer(model=model, args=args, train_dataset=_Windows())
    try:
        with DropoutMasks() as masks:
            trainer.train(resume_from_checkpoint=resume)
    finally:
        trainer.close()
    return {**masks.result(), "global_step": trainer.state.global_step}


def _trainer_runs(out_dir: str, ds_config: str) -> dict:
    import os

    full = _trainer_run(out_dir, ds_config, save=True, resume=None)
    resumed = _trainer_run(out_dir + "-resumed", ds_config, save=False,
                           resume=os.path.join(out_dir, "checkpoint-2"))
    return {"full": full, "resumed": resumed}


def test_lss_trainer_ranks_differ_and_resume_draws_the_uninterrupted_masks(tmp_path):
    import json
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "configs", "ds_config_hf_trainer_lss.json")) as f:
        config = json.load(f)
    config["lss_sequence_parallel"] = {"enabled": True, "size": 2}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    r0, r1 = run_ranks(_trainer_runs, 2, str(tmp_path / "out"), str(path), timeout_s=900)
    assert not _same_masks(r0["full"], r1["full"])
    _assert_one_device_statistics(r0["full"], r1["full"])
    for rank, out in enumerate((r0, r1)):
        full, resumed = out["full"], out["resumed"]
        assert full["global_step"] == resumed["global_step"] == TRAINER_STEPS
        per_step = len(full["kept"]) // TRAINER_STEPS
        assert len(resumed["kept"]) == per_step > 0, (len(resumed["kept"]), len(full["kept"]))
        assert _same_masks(resumed, {"kept": full["kept"][-per_step:]}), f"rank {rank}: step 3 drew other masks"
