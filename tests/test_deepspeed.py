"""The DeepSpeed adapter against real DeepSpeed engines (CPU/gloo).

Reference: a 1-rank DeepSpeed engine (same config, same ZeRO stage and precision, same global
batch, plain attention). LSS runs as SP=2 (2 ranks) and SP=2 x DP=2 (4 ranks) with ZeRO 0, 1, 2
and 3, gradient accumulation 2 and gradient clipping on (active at step 0 only).
Tolerances: float32 per-step global losses and gradient norms within 1e-5 relative; parameters
after 3 steps within 1e-5 relative (norm of the difference over norm of the reference, per
tensor). bf16 (ZeRO 2 and 3): within 2x the rounding error of bf16 itself, measured in the same
run as the 1-rank bf16 engine against the 1-rank fp32 engine (see the bf16 test). Every rank
holds bit-identical parameters.

Spawns are few and batched (DeepSpeed engines are slow to start): one 4-rank, one 2-rank and
one 1-rank spawn build every engine in sequence; ds_to_universal and the example's plain
one-process run are subprocesses, as a user runs them.
"""
from __future__ import annotations

import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lss_plugin.deepspeed import BLOCK_KEY, LSSConfig, LSSConfigError, deepspeed_view
from lss_plugin.options import AttentionSettings
from tests.distributed import run_ranks

STEPS = 3
GAS = 2  # gradient accumulation steps in every engine
GLOBAL_BATCH = 4  # sequences per optimizer step
SEQ_LEN = 16  # divisible by 2 * 4 for the balanced layout on SP=4
VOCAB = 32
CLIP = 0.75  # active at step 0 only (reference norms ~0.91, 0.63, 0.54, ...): clipped and unclipped steps
RTOL = 1e-5
STAGES = (0, 1, 2, 3)
PRECISION_STAGES = {"fp32": STAGES, "bf16": (2, 3)}
CKPT_STEP = 2  # checkpoints are saved after this many steps
BF16_FACTOR = 2.0  # LSS bf16 vs 1-rank bf16 may differ by 2x the 1-rank bf16 engine's own error vs fp32
BF16_CAP = 0.05  # never looser than this, whatever the measured error
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


# ---------------------------------------------------------------------------------------------
# Configuration validation (no processes)

def _ds(block=None, **extra):
    config = {"train_batch_size": 4, **extra}
    if block is not None:
        config[BLOCK_KEY] = block
    return config


def test_block_parsed_with_defaults():
    lss = LSSConfig.from_ds_config(_ds({"size": 4}))
    assert lss == LSSConfig(enabled=True, size=4, grad_averaging="auto", timeout_s=None, ulysses_size=1,
                            attention=AttentionSettings(layout="balanced", kv_backward="auto", kv_head_chunk="auto",
                                                        kv_buffer_mib=None, kv_grad_dtype="fp32",
                                                        kv_exchange="auto", link_gbit=None))
    assert LSSConfig.from_ds_config(_ds()).enabled is False
    assert LSSConfig.from_ds_config(_ds({"enabled": False, "size": 2})).enabled is False
    full = {"enabled": True, "size": 2, "layout": "contiguous", "kv_backward": "regather",
            "grad_averaging": "fused", "kv_head_chunk": 1, "timeout_s": 30, "ulysses_size": 2, "kv_buffer_mib": None,
            "kv_grad_dtype": "input", "kv_exchange": "sparse", "link_gbit": None}
    assert LSSConfig.from_ds_config(_ds(full)).to_dict() == full
    auto = dict(full, kv_backward="auto", kv_head_chunk="auto")  # pipelined head chunks sized by lss_attention
    assert LSSConfig.from_ds_config(_ds(auto)).attention.kv_head_chunk == "auto"
    budget = LSSConfig.from_ds_config(_ds({"size": 2, "kv_buffer_mib": 64})).attention
    assert budget == AttentionSettings(kv_buffer_mib=64)
    from lss_plugin.models.gpt import LSSAttentionOptions

    assert LSSAttentionOptions(settings=budget).settings.kv_buffer_mib == 64  # the model options the example builds
    assert LSSConfig.from_ds_config(_ds({"size": 2}, sequence_parallel_size=2)).size == 2


@pytest.mark.parametrize("block, extra, message", [
    ({"size": 2, "layuot": "balanced", "zigzag": 1}, {}, "unknown key(s) ['layuot', 'zigzag']"),
    ({"size": 0}, {}, '"size" must be a positive integer, got 0'),
    ({"size": 2.0}, {}, '"size" must be a positive integer, got 2.0'),
    ({"size": True}, {}, '"size" must be a positive integer, got True'),
    ({"size": 2, "layout": "zigzag"}, {}, "\"layout\" must be one of ['contiguous', 'balanced'], got 'zigzag'"),
    ({"size": 2, "kv_backward": "drop"}, {}, '"kv_backward" must be one of'),
    ({"size": 2, "grad_averaging": "sum"}, {}, '"grad_averaging" must be one of'),
    ({"size": 2, "kv_head_chunk": 0}, {}, '"kv_head_chunk" must be a positive integer, "auto" or null, got 0'),
    ({"size": 2, "kv_head_chunk": 2, "kv_buffer_mib": 64}, {},
     '"lss_sequence_parallel": "kv_buffer_mib" (64) is the budget of "kv_head_chunk"="auto", got "kv_head_chunk"=2'),
    ({"size": 2, "kv_head_chunk": None, "kv_buffer_mib": 64}, {},
     '"kv_buffer_mib" (64) is the budget of "kv_head_chunk"="auto", got "kv_head_chunk"=null'),
    ({"size": 2, "kv_buffer_mib": 0}, {}, '"kv_buffer_mib" must be a positive number of MiB (or None), got 0'),
    ({"size": 2, "kv_buffer_mib": "64"}, {}, '"kv_buffer_mib" must be a positive number of MiB (or None), got \'64\''),
    ({"size": 2, "timeout_s": -1}, {}, '"timeout_s" must be a positive number or null, got -1'),
    ({"size": 2, "enabled": "yes"}, {}, '"enabled" must be true or false'),
    ([2], {}, "must be a JSON object"),
    ({"size": 2}, {"sequence_parallel_size": 4}, 'DeepSpeed "sequence_parallel_size" = 4 contradicts'),
    (None, {"sequence_parallel_size": 2}, 'DeepSpeed "sequence_parallel_size" = 2 contradicts'),
])
def test_block_errors_name_the_problem(block, extra, message):
    with pytest.raises(LSSConfigError) as err:
        LSSConfig.from_ds_config(_ds(block, **extra))
    assert message in str(err.value)


def test_grad_averaging_resolved_per_stage_or_refused_by_name():
    from lss_plugin.deepspeed.config import resolve_grad_averaging

    assert resolve_grad_averaging("auto", 0) == "two_stage"
    assert resolve_grad_averaging("auto", 0, "sparse embedding gradients") == "fused"
    assert [resolve_grad_averaging("auto", stage) for stage in (1, 2, 3)] == ["fused"] * 3
    assert resolve_grad_averaging("fused", 0) == "fused" and resolve_grad_averaging("two_stage", 0) == "two_stage"
    for stage, blocker, reason in ((2, None, "ZeRO stage 2 reduces"), (0, "sparse embedding gradients", "sparse embedding gradients")):
        with pytest.raises(LSSConfigError, match=f'"two_stage" cannot be honoured: {reason}'):
            resolve_grad_averaging("two_stage", stage, blocker)
    with pytest.raises(LSSConfigError, match="ZeRO stage 3"):  # before any process group exists
        LSSConfig.from_dict({"size": 2, "grad_averaging": "two_stage"}).grad_averaging_for_stage(3)


def test_world_checks_and_deepspeed_view(tmp_path):
    lss = LSSConfig.from_dict({"size": 4})
    assert lss.check_world(8) == 2
    with pytest.raises(LSSConfigError, match="size 4 does not divide the world size 6"):
        lss.check_world(6)
    with pytest.raises(LSSConfigError, match=r'"data_parallel_size" = 3 contradicts.*world_size\(8\) / size\(4\) = 2'):
        lss.check_world(8, {"data_parallel_size": 3})
    config = _ds({"size": 4}, sequence_parallel_size=4, data_parallel_size=2)
    view = deepspeed_view(config)
    assert view == {"train_batch_size": 4} and BLOCK_KEY in config  # the user's dict is untouched
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_ds({"size": 2, "bogus": 1})))
    with pytest.raises(LSSConfigError, match=r"unknown key\(s\) \['bogus'\]"):
        LSSConfig.from_ds_config(str(path))


def test_shipped_configs_parse():
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    names = sorted(n for n in os.listdir(root) if n.startswith("ds_") and n.endswith(".json"))
    assert "ds_config_lss.json" in names
    for name in names:
        lss = LSSConfig.from_ds_config(os.path.join(root, name))
        assert lss.enabled == ("baseline" not in name), name


def test_mpu_answers_every_method_deepspeed_calls():
    """Every ``mpu.<name>(`` in DeepSpeed's runtime/utils/checkpoint source exists on LSSMpu.

    Read from the installed DeepSpeed's source (not imported), so a new DeepSpeed that asks the
    mpu something else fails here instead of in a multi-rank run. Two names are deliberately
    absent: ``initialize_sequence_parallel`` (DeepSpeed reads it as "this is my own Ulysses mpu"
    and then ignores the DP/MP answers) and ``_init_tp_mesh_device`` (AutoTP builds its own mpu).
    """
    import importlib.util
    import re

    from lss_plugin.deepspeed import LSSMpu

    root = os.path.dirname(importlib.util.find_spec("deepspeed").origin)
    called = set()
    for sub in ("runtime", "utils", "checkpoint", "comm"):
        for dirpath, _, files in os.walk(os.path.join(root, sub)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                        called |= set(re.findall(r"\bmpu\.(\w+)\(", f.read()))
    deliberately_absent = {"initialize_sequence_parallel", "_init_tp_mesh_device"}
    assert "get_model_parallel_group" in called and len(called) > 15, sorted(called)
    missing = sorted(name for name in called - deliberately_absent if not hasattr(LSSMpu, name))
    assert not missing, f"LSSMpu lacks {missing}"
    assert not any(hasattr(LSSMpu, name) for name in deliberately_absent)


# ---------------------------------------------------------------------------------------------
# The model: the reference GPT, tiny (GQA, learned positions, untied head to exercise every kind
# of parameter), with LSS attention or with plain attention (the reference).

def _gpt(sp: int | None):
    from lss_plugin.models.gpt import GPT, GPTConfig, LSSAttentionOptions

    config = GPTConfig(vocab_size=VOCAB, max_seq_length=SEQ_LEN, hidden_size=16, num_layers=1, num_heads=2,
                       num_kv_heads=1, tie_embeddings=False)
    return GPT(config, lss=LSSAttentionOptions(layout="balanced") if sp else None)


def _local_loss(engine, inputs, targets, positions):
    logits = engine(inputs, positions)  # [b, s_local, V]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())  # mean over this rank's tokens


# ---------------------------------------------------------------------------------------------
# Real engines

def _ds_config(sp: int | None, stage: int, world: int, grad_averaging="auto", precision="fp32") -> dict:
    dp = world // (sp or 1)
    gas = min(GAS, GLOBAL_BATCH // dp)  # 1 at DP=4 (checkpoint resumes), else GAS
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // (dp * gas),
        "gradient_accumulation_steps": gas,
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    if sp is not None:
        config[BLOCK_KEY] = {"enabled": True, "size": sp, "layout": "balanced", "grad_averaging": grad_averaging}
    return config


def _build(sp, stage, world, seed=1234, grad_averaging="auto", precision="fp32", extra=None, adam=False):
    """A fresh model and engine: LSS (sp given) or plain DeepSpeed (sp None, the reference).

    SGD with momentum by default; ``adam``: AdamW, whose state (exp_avg, exp_avg_sq) DeepSpeed's
    universal checkpoint converter requires (it fails with KeyError 'exp_avg' on SGD's state).
    """
    import lss_plugin.deepspeed as lds
    torch.manual_seed(seed)
    model = _gpt(sp)
    if adam:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    config = {**_ds_config(sp, stage, world, grad_averaging, precision), **(extra or {})}
    engine, *_ = lds.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _global_batch(step: int, seed: int = 7):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN + 1), generator=gen)  # [B, L+1]


def _local_batch(engine, step, micro_step):
    """This rank's rows (DP, micro-batch) and tokens (SP) of the global batch, with their positions.

    Micro-step k of DP rank d holds rows [(k * dp + d) * micro, ... + micro), as DeepSpeed's
    sampler orders them.
    """
    from lss_plugin.sharding import local_token_indices

    tokens = _global_batch(step)
    topo = getattr(engine, "lss_topology", None)
    dp, dp_rank = (topo.dp_size, topo.dp_rank) if topo is not None else (1, 0)
    micro = engine.train_micro_batch_size_per_gpu()
    first = (micro_step * dp + dp_rank) * micro
    tokens = tokens[first:first + micro]
    if topo is None:
        return tokens[:, :-1], tokens[:, 1:], None
    positions = local_token_indices(SEQ_LEN, topo.sp_rank, topo.sp_size, "balanced")  # [L/N]
    return tokens[:, :-1][:, positions], tokens[:, 1:][:, positions], positions


def _global_loss(engine, local_loss):
    """Mean over every token of the micro-batch on all ranks (equal token counts: mean of rank means)."""
    import torch.distributed as dist

    if getattr(engine, "lss_topology", None) is None:
        return float(local_loss.detach())
    loss = local_loss.detach().double().clone()
    dist.all_reduce(loss, group=engine.lss_mpu.get_sequence_data_parallel_group())
    return float(loss) / dist.get_world_size()


def _grad_norm_zero0(engine) -> float:
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in engine.module.parameters())))


def _train_step(engine, step):
    """One optimizer step (its micro-steps) -> (loss of the global batch, gradient norm)."""
    losses, norm, gas = [], None, engine.gradient_accumulation_steps()
    for micro_step in range(gas):
        inputs, targets, positions = _local_batch(engine, step, micro_step)
        loss = _local_loss(engine, inputs, targets, positions)
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary() and engine.zero_optimization_stage() == 0 \
                and not engine.bfloat16_enabled():
            norm = _grad_norm_zero0(engine)  # a torch optimizer at ZeRO 0 reports no norm itself
        engine.step()
        losses.append(_global_loss(engine, loss))
    if norm is None:
        norm = float(engine.get_global_grad_norm())
    return sum(losses) / gas, norm


def _params(engine):
    """Full fp32 parameters (gathered under ZeRO 3), as numpy: tensors pickle through shared memory
    that dies with the rank."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if hasattr(p, "ds_id") or engine.bfloat16_enabled() else p.detach()
        out[name] = full.detach().float().cpu().numpy().copy()
    return out


def _run(engine, steps=STEPS):
    return {"steps": [_train_step(engine, step) for step in range(steps)], "params": _params(engine)}


def _teardown(engine):
    from lss_plugin.topology import destroy_topology

    if getattr(engine, "lss_mpu", None) is not None:
        engine.lss_mpu.destroy()
    engine.destroy()
    destroy_topology()


def _lss_runs(world: int):
    """Every precision x ZeRO stage case of this world size, engine after engine: SP=2 (x DP)."""
    runs = {}
    for precision, stages in PRECISION_STAGES.items():
        for stage in stages:
            engine = _build(2, stage, world, precision=precision)
            runs[(precision, stage)] = _run(engine)
            _teardown(engine)
    return runs


def _deepspeed_alone_norm(sp: int) -> float:
    """Step-0 gradient norm of DeepSpeed given an LSS mpu but no correction (ZeRO 0, one micro-step)."""
    import deepspeed

    import lss_plugin.deepspeed as lds
    from lss_plugin.deepspeed.mpu import LSSMpu
    from lss_plugin.topology import destroy_topology, init_topology

    topology = init_topology(sp)
    mpu = LSSMpu(topology)
    torch.manual_seed(1234)
    model = _gpt(sp)
    config = lds.deepspeed_view(_ds_config(sp, 0, 4))
    config.update(gradient_clipping=0.0, gradient_accumulation_steps=1,
                  train_micro_batch_size_per_gpu=GLOBAL_BATCH // topology.dp_size)
    plain, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                     config=config, mpu=mpu)
    plain.lss_topology = topology
    inputs, targets, positions = _local_batch(plain, 0, 0)
    plain.backward(_local_loss(plain, inputs, targets, positions))
    norm = _grad_norm_zero0(plain)
    plain.destroy()
    mpu.destroy()
    destroy_topology()
    return norm


def _four_rank_cases(ckpt_dir):
    """Everything that runs on 4 ranks, engine after engine, in one spawn."""
    # 1. DeepSpeed by itself, given an LSS mpu but no correction: gradients N times too large.
    out = {"deepspeed_alone_norm": {sp: _deepspeed_alone_norm(sp) for sp in (4, 2)}}
    # 2. LSS engines, SP=2 x DP=2, and the fused ZeRO-0 averaging.
    out["runs"] = _lss_runs(4)
    engine = _build(2, 0, 4, grad_averaging="fused")
    out["fused"] = _run(engine)
    _teardown(engine)

    # 3. Checkpoints: save with SP=2 x DP=2 after 2 steps; resume with SP=4 and SP=1 x DP=4 (same
    #    world: DeepSpeed's ZeRO shards load); the universal conversion of the same checkpoint is
    #    resumed on 2 ranks. A ZeRO-0 one is loaded by the 1-rank spawn.
    for stage in (2, 0):
        engine = _build(2, stage, 4, adam=True)
        for step in range(CKPT_STEP):
            _train_step(engine, step)
        engine.save_checkpoint(os.path.join(ckpt_dir, f"zero{stage}"), tag="step2")
        if stage == 2:
            out["uninterrupted"] = _run(engine, steps=0) | {"next": _train_step(engine, CKPT_STEP)}
        _teardown(engine)
    out["resumed"] = {}
    for sp in (4, 1):
        engine = _build(sp, 2, 4, seed=999, adam=True)  # a different init: the load must overwrite it
        engine.load_checkpoint(os.path.join(ckpt_dir, "zero2"), tag="step2")
        out["resumed"][sp] = _train_step(engine, CKPT_STEP)
        _teardown(engine)

    # 4. The example script, SP=2 x DP=2 (compared with its plain one-process run), then with packed
    #    documents (compared with its packed run on one rank).
    out["example"] = _run_example(ckpt_dir, "lss")
    out["example_packed"] = _run_example(ckpt_dir, "lss", packed=True)

    # 5. Refused on every rank, before any collective.
    refused = {
        "bad_size": (3, 0, None, {}),
        "two_stage_zero1": (2, 1, None, {"grad_averaging": "two_stage"}),
        "hpz": (2, 3, {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}, {}),
        "sum": (2, 0, {"gradient_allreduce_op": "sum"}, {}),
    }
    for name, (sp, stage, extra, kwargs) in refused.items():
        try:
            _build(sp, stage, 4, extra=extra, **kwargs)
            out[name] = None
        except LSSConfigError as err:
            out[name] = str(err)
    return out


def _zero_init_cases():
    """A model the user built under deepspeed.zero.Init() (partitioned over the world, the default)
    trains as the one initialize converts (first step). A narrower partition group is refused;
    DeepSpeed's zero.Init itself fails with a one-rank group on rank 1, so the refusal is checked on
    this engine against a grid it does not span."""
    import deepspeed

    import lss_plugin.deepspeed as lds
    from lss_plugin.deepspeed.zero3 import check_partition_groups

    torch.manual_seed(1234)
    initial = _gpt(2)  # zero.Init draws its own initial values: the reference's are copied in
    # A config, for the dtype: without one, zero.Init (0.19.8) makes bf16 parameters on an accelerator
    # without fp16 even when given dtype=torch.float32 (operator precedence in Init._set_dtype).
    with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 2}):
        model = _gpt(2)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0), torch.no_grad():
        for p, value in zip(model.parameters(), initial.parameters()):
            p.copy_(value)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    engine, *_ = lds.initialize(model=model, optimizer=optimizer, config=_ds_config(2, 3, 2))
    out = {"first_step": _train_step(engine, 0)}
    try:
        check_partition_groups(engine, 4)
        out["narrow"] = None
    except RuntimeError as err:
        out["narrow"] = str(err)
    _teardown(engine)
    return out


def _two_rank_cases(ckpt_dir):
    """SP=2 on 2 ranks: every case, and the universal checkpoint of the 4-rank run resumed."""
    out = {"runs": _lss_runs(2), "zero_init": _zero_init_cases()}
    engine = _build(2, 2, 2, seed=999, extra={"checkpoint": {"load_universal": True}}, adam=True)
    engine.load_checkpoint(os.path.join(ckpt_dir, "zero2_universal"), tag="step2")
    out["universal"] = _run(engine, steps=0) | {"next": _train_step(engine, CKPT_STEP)}
    _teardown(engine)
    return out


def _one_rank_references(ckpt_dir):
    out = {"runs": {}}
    for precision, stages in PRECISION_STAGES.items():
        for stage in stages:
            engine = _build(None, stage, 1, precision=precision)
            out["runs"][(precision, stage)] = _run(engine)
            engine.destroy()
    # SP=1 on one rank: the LSS engine loads the SP=2 x DP=2 ZeRO-0 checkpoint and resumes.
    engine = _build(1, 0, 1, seed=999, adam=True)
    engine.load_checkpoint(os.path.join(ckpt_dir, "zero0"), tag="step2")
    out["resumed_zero0_one_rank"] = _train_step(engine, CKPT_STEP)
    _teardown(engine)
    reference = _build(None, 0, 1, adam=True)
    for step in range(CKPT_STEP):
        _train_step(reference, step)
    out["uninterrupted_zero0"] = _train_step(reference, CKPT_STEP)
    reference.destroy()
    out["example_packed"] = _run_example(ckpt_dir, "plain", packed=True)
    return out


EXAMPLE_ITERS = 3
EXAMPLE_ARGS = ["--train-iters", str(EXAMPLE_ITERS), "--seq-length", "32", "--num-layers", "1", "--hidden-size", "32",
                "--num-heads", "4", "--num-kv-heads", "2", "--seed", "5", "--ignore-byte", "32"]
# Packed documents: every row and every "deepspeed" in it starts a document (a few per 32-byte row);
# RoPE positions restart per document. The plain run packs its 2 rows per micro-batch into one sequence
# of 64, the LSS run 1 row: the same documents, so the same losses.
PACKED_ARGS = ["--pack-documents", "--document-separator", "deepspeed", "--position-embedding", "rope"]


def _example_path() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "train_gpt_deepspeed.py")


def _write_example_inputs(directory: str) -> None:
    """A byte corpus and two configs: LSS SP=2 (on 4 ranks) and the same with the block disabled (1 rank).

    Both accumulate 2 micro-batches; spaces (byte 32) are left out of the loss (--ignore-byte), so
    ranks and micro-batches hold different numbers of loss tokens.
    """
    rng = np.random.default_rng(0)
    words = [b"lss", b"sequence", b"parallel", b"attention", b"deepspeed", b"token", b"the", b"of"]
    text = b" ".join(words[i] for i in rng.integers(0, len(words), size=6000))
    with open(os.path.join(directory, "corpus.txt"), "wb") as f:
        f.write(text)
    base = {"train_batch_size": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "zero_optimization": {"stage": 1}, "steps_per_print": 10**9}
    configs = {"lss": {**base, "train_micro_batch_size_per_gpu": 1, BLOCK_KEY: {"size": 2}},
               "plain": {**base, "train_micro_batch_size_per_gpu": 2, BLOCK_KEY: {"enabled": False, "size": 2}}}
    for name, config in configs.items():
        with open(os.path.join(directory, f"example_{name}.json"), "w") as f:
            json.dump(config, f)


def _example_argv(directory: str, name: str, packed: bool = False) -> list[str]:
    metrics = f"example_{name}{'_packed' if packed else ''}.jsonl"
    return ["--deepspeed_config", os.path.join(directory, f"example_{name}.json"),
            "--data-path", os.path.join(directory, "corpus.txt"),
            "--metrics-file", os.path.join(directory, metrics)] + EXAMPLE_ARGS + (PACKED_ARGS if packed else [])


def _run_example(directory: str, name: str, packed: bool = False):
    import importlib.util
    import torch.distributed as dist

    from lss_plugin.topology import destroy_topology

    spec = importlib.util.spec_from_file_location("train_gpt_deepspeed", _example_path())
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    records = example.train(example.parse_args(_example_argv(directory, name, packed)))
    destroy_topology()
    dist.barrier()
    return {"losses": [r["loss"] for r in records], "loss_tokens": [r["loss_tokens"] for r in records]}


def _read_metrics(directory: str, name: str) -> list[dict]:
    with open(os.path.join(directory, f"example_{name}.jsonl")) as f:
        return [json.loads(line) for line in f]


def _deepspeed_env() -> dict:
    """Compile DeepSpeed's CPU shared-memory op once, in one process, before any spawn.

    DeepSpeed's first init_distributed JIT-compiles it. Four ranks compiling at once wait on one
    lock, and a rank killed by a spawn timeout mid-compile leaves a stale lock that hangs every
    later run. A private extensions directory also keeps other programs on this host that build
    the op with other flags from invalidating the cache (the build is then done only once).
    """
    import subprocess
    import sys

    from lss_plugin.data import default_cache_dir

    # CI points TORCH_EXTENSIONS_DIR into its fresh clone, so no earlier run's lock can be left there.
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR")
           or os.path.join(default_cache_dir(), "torch_extensions")}
    code = ("from deepspeed.accelerator import get_accelerator\n"
            "b = get_accelerator().create_op_builder('ShareMemCommBuilder')\n"
            "import deepspeed.ops\n"
            "if b is not None and deepspeed.ops.__compatible_ops__.get(b.NAME, False): b.load()\n"
            "import os, sys; sys.stdout.flush(); os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, check=True, timeout=900,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return env


def _plain_python_example(directory: str, env: dict) -> subprocess.CompletedProcess:
    """The example as one plain `python` process: no launcher, no RANK/WORLD_SIZE in its environment."""
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    clean["PYTHONPATH"] = root + os.pathsep + clean.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, _example_path()] + _example_argv(directory, "plain"),
                          env={**clean, **env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)


def _universal(ckpt_dir: str) -> subprocess.CompletedProcess:
    """DeepSpeed's own converter, as a user runs it (the model states carry no universal-checkpoint
    info of their own: --inject_missing_state adds the default one)."""
    import sys

    return subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                           "--input_folder", os.path.join(ckpt_dir, "zero2", "step2"),
                           "--output_folder", os.path.join(ckpt_dir, "zero2_universal", "step2"),
                           "--inject_missing_state"], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    ckpt_dir = str(tmp_path_factory.mktemp("ds_ckpt"))
    _write_example_inputs(ckpt_dir)
    env = _deepspeed_env()
    four = run_ranks(_four_rank_cases, 4, ckpt_dir, timeout_s=900, env=env)
    converted = _universal(ckpt_dir)
    assert converted.returncode == 0, converted.stdout[-3000:] + converted.stderr[-3000:]
    two = run_ranks(_two_rank_cases, 2, ckpt_dir, timeout_s=600, env=env)
    one = run_ranks(_one_rank_references, 1, ckpt_dir, timeout_s=600, env=env)[0]
    plain = _plain_python_example(ckpt_dir, env)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    return {"four": four, "two": two, "one": one, "plain_stdout": plain.stdout,
            "metrics": {name: _read_metrics(ckpt_dir, name) for name in ("lss", "plain")}}


def _rel(a, b) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _param_errors(params, reference) -> dict[str, float]:
    """Per tensor: norm of the difference over norm of the reference."""
    out = {}
    for name, ref in reference.items():
        diff, ref = params[name].astype("float64") - ref.astype("float64"), ref.astype("float64")
        out[name] = float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30))
    return out


def _assert_params_close(params, reference, what, tol=RTOL):
    for name, err in _param_errors(params, reference).items():
        assert err <= tol, f"{what}: parameter {name} differs by {err:.3g} (relative) > {tol:.3g}"


def test_deepspeed_alone_sums_over_sp(engines):
    """The measurement behind the correction: DeepSpeed's own reduction is N times the truth."""
    true_norm = _deepspeed_alone_reference(engines)
    for sp, norm in engines["four"][0]["deepspeed_alone_norm"].items():
        assert math.isclose(norm / true_norm, sp, rel_tol=RTOL), (sp, norm / true_norm)


def _deepspeed_alone_reference(engines) -> float:
    """_deepspeed_alone_norm takes one micro-step over the whole global batch, so the truth is the
    gradient of the global batch mean: the 1-rank run's step-0 norm (accumulated, before clipping)."""
    return engines["one"]["runs"][("fp32", 0)]["steps"][0][1]


def _world_runs(engines):
    """(name, per-rank results) for both worlds: SP=2 on 2 ranks, SP=2 x DP=2 on 4."""
    return (("sp=2", engines["two"]), ("sp=2 x dp=2", engines["four"]))


def _step_errors(run, reference) -> tuple[float, float, float]:
    """Worst relative error over the steps of the loss and the grad norm, and over the parameter tensors."""
    loss = max(_rel(a[0], b[0]) for a, b in zip(run["steps"], reference["steps"]))
    norm = max(_rel(a[1], b[1]) for a, b in zip(run["steps"], reference["steps"]))
    return loss, norm, max(_param_errors(run["params"], reference["params"]).values())


@pytest.mark.parametrize("stage", STAGES)
def test_fp32_engine_matches_one_rank_engine(engines, stage):
    """ZeRO 0-3, accumulation 2: per-step losses and grad norms within 1e-5, parameters within 1e-5."""
    reference = engines["one"]["runs"][("fp32", stage)]
    norms = [norm for _, norm in reference["steps"]]
    assert max(norms) > CLIP > min(norms), norms  # clipped and unclipped steps both exercised
    for grid, results in _world_runs(engines):
        print(f"\nfp32 zero={stage} {grid} vs 1-rank (loss, norm, params): "
              f"{[f'{e:.3g}' for e in _step_errors(results[0]['runs'][('fp32', stage)], reference)]}")
        for rank, result in enumerate(results):
            run = result["runs"][("fp32", stage)]
            for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(run["steps"], reference["steps"])):
                assert _rel(loss, ref_loss) <= RTOL, f"{grid} zero={stage} rank {rank} step {step}: loss {loss} vs {ref_loss}"
                assert _rel(norm, ref_norm) <= RTOL, f"{grid} zero={stage} rank {rank} step {step}: norm {norm} vs {ref_norm}"
            _assert_params_close(run["params"], reference["params"], f"{grid} zero={stage} rank {rank}")
            for name, value in run["params"].items():  # every replica identical, bit for bit
                assert np.array_equal(value, results[0]["runs"][("fp32", stage)]["params"][name]), (grid, rank, name)


@pytest.mark.parametrize("stage", PRECISION_STAGES["bf16"])
def test_bf16_engine_matches_one_rank_engine_within_bf16_error(engines, stage):
    """bf16 (DeepSpeed's bf16 path, fp32 master weights) at ZeRO 2 and 3, accumulation 2.

    LSS rounds differently from one rank (attention over segments, reductions over ranks), so bf16
    runs cannot agree to fp32 precision. The yardstick is the rounding error of bf16 itself, measured
    in the same run: the 1-rank bf16 engine against the 1-rank fp32 engine on the same data. LSS bf16
    against 1-rank bf16 may differ by BF16_FACTOR x that (per quantity: loss and grad norm over the
    steps, parameters over the tensors), never by more than BF16_CAP, never required below RTOL.
    """
    runs = engines["one"]["runs"]
    reference = runs[("bf16", stage)]
    yardstick = _step_errors(reference, runs[("fp32", stage)])
    tol = [min(BF16_CAP, max(RTOL, BF16_FACTOR * e)) for e in yardstick]
    print(f"\nbf16 zero={stage}: 1-rank bf16 vs fp32 (loss, norm, params) {[f'{e:.3g}' for e in yardstick]}")
    for grid, results in _world_runs(engines):
        run = results[0]["runs"][("bf16", stage)]
        errors = _step_errors(run, reference)
        print(f"  LSS {grid} vs 1-rank bf16: {[f'{e:.3g}' for e in errors]} (allowed {[f'{t:.3g}' for t in tol]})")
        for what, err, allowed in zip(("loss", "grad norm", "parameters"), errors, tol):
            assert err <= allowed, f"{grid} bf16 zero={stage}: {what} differs by {err:.3g} > {allowed:.3g}"
        for rank, result in enumerate(results):
            for name, value in result["runs"][("bf16", stage)]["params"].items():
                assert np.array_equal(value, run["params"][name]), (grid, rank, name)


def test_zero3_model_built_under_zero_init(engines):
    reference = engines["one"]["runs"][("fp32", 3)]["steps"][0]
    for result in engines["two"]:
        loss, norm = result["zero_init"]["first_step"]
        assert _rel(loss, reference[0]) <= RTOL and _rel(norm, reference[1]) <= RTOL, (loss, norm, reference)
        narrow = result["zero_init"]["narrow"]
        assert narrow and "is partitioned over 2 ranks, not the whole SP x DP grid of 4" in narrow, narrow


def test_fused_averaging_matches(engines):
    reference = engines["one"]["runs"][("fp32", 0)]
    for result in engines["four"]:
        for (loss, norm), (ref_loss, ref_norm) in zip(result["fused"]["steps"], reference["steps"]):
            assert _rel(loss, ref_loss) <= RTOL and _rel(norm, ref_norm) <= RTOL
        _assert_params_close(result["fused"]["params"], reference["params"], "fused")


def test_checkpoint_resumes_under_other_sp_sizes(engines):
    four, one = engines["four"], engines["one"]
    expected = four[0]["uninterrupted"]["next"]
    for result in four:
        assert result["uninterrupted"]["next"] == expected
        for sp, (loss, norm) in result["resumed"].items():
            assert _rel(loss, expected[0]) <= RTOL and _rel(norm, expected[1]) <= RTOL, \
                f"SP=2 x DP=2 checkpoint resumed with SP={sp}: {loss, norm} vs {expected}"
    assert _rel(one["resumed_zero0_one_rank"][0], one["uninterrupted_zero0"][0]) <= RTOL


def test_universal_checkpoint_resumes_on_another_world_size(engines):
    """ds_to_universal of a 4-rank SP=2 x DP=2 ZeRO-2 checkpoint, loaded by a 2-rank SP=2 engine:
    the parameters it loads are the saved ones, and its next step is the uninterrupted run's."""
    uninterrupted = engines["four"][0]["uninterrupted"]
    for result in engines["two"]:
        universal = result["universal"]
        _assert_params_close(universal["params"], uninterrupted["params"], "universal checkpoint load", tol=0.0)
        loss, norm = universal["next"]
        assert _rel(loss, uninterrupted["next"][0]) <= RTOL and _rel(norm, uninterrupted["next"][1]) <= RTOL


def test_unsupported_setups_refused_on_every_rank(engines):
    for result in engines["four"]:
        assert result["bad_size"] and "size 3 does not divide the world size 4" in result["bad_size"]
        assert result["two_stage_zero1"] and '"grad_averaging" = "two_stage" cannot be honoured' in result["two_stage_zero1"]
        assert result["hpz"] and "zero_hpz_partition_size" in result["hpz"]
        assert result["sum"] and "\"gradient_allreduce_op\" = 'sum'" in result["sum"]


def test_example_script_matches_its_plain_one_process_run(engines):
    """examples/train_gpt_deepspeed.py, SP=2 x DP=2 on 4 ranks with accumulation 2 and uneven loss
    tokens, against the same script run as one plain `python` process with the block disabled."""
    assert "dp=1 (no LSS)" in engines["plain_stdout"], engines["plain_stdout"][-2000:]
    reference = [m["loss"] for m in engines["metrics"]["plain"]]
    assert len(reference) == EXAMPLE_ITERS
    for result in engines["four"]:
        for it, (loss, ref) in enumerate(zip(result["example"]["losses"], reference)):
            assert _rel(loss, ref) <= RTOL, f"iteration {it + 1}: {loss} vs {ref}"
    metrics = engines["metrics"]["lss"]
    assert [m["iteration"] for m in metrics] == list(range(1, EXAMPLE_ITERS + 1))
    for m, ref in zip(metrics, engines["metrics"]["plain"]):
        assert {"iteration", "loss", "tokens_per_s", "ms_per_iter", "loss_tokens"} <= set(m) and m["tokens_per_s"] > 0
        assert m["loss_tokens"] == ref["loss_tokens"] < 4 * 32  # the spaces are left out
        assert _rel(m["grad_norm"], ref["grad_norm"]) <= RTOL


def test_example_script_packed_documents_match_one_rank(engines):
    """examples/train_gpt_deepspeed.py --pack-documents, SP=2 x DP=2 on 4 ranks, against the same packed
    training on one rank (SDPA with the block-diagonal causal mask): per-iteration losses within 1e-5."""
    reference = engines["one"]["example_packed"]
    assert len(reference["losses"]) == EXAMPLE_ITERS
    for result in engines["four"]:
        packed = result["example_packed"]
        assert packed["loss_tokens"] == reference["loss_tokens"], (packed, reference)
        for it, (loss, ref) in enumerate(zip(packed["losses"], reference["losses"])):
            assert _rel(loss, ref) <= RTOL, f"iteration {it + 1}: {loss} vs {ref}"
    # Packing changed the training: targets across documents are left out, so fewer loss tokens.
    unpacked = [m["loss_tokens"] for m in engines["metrics"]["plain"]]
    assert all(p < u for p, u in zip(reference["loss_tokens"], unpacked)), (reference["loss_tokens"], unpacked)
