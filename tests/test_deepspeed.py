"""The DeepSpeed adapter against real DeepSpeed engines (CPU/gloo).

Reference: a 1-rank DeepSpeed engine (same config, same ZeRO stage, same global batch, plain
attention). LSS runs on 4 ranks as SP=4 and SP=2 x DP=2 with ZeRO 0, 1 and 2 and gradient
clipping on. Tolerances (float32): per-step global losses and gradient norms within 1e-5
relative; parameters after 5 steps within 1e-5 relative (norm of the difference over norm of the
reference, per tensor); every rank holds bit-identical parameters.

Spawns are few and batched (DeepSpeed engines are slow to start): one 4-rank spawn builds every
LSS engine in sequence, one 1-rank spawn builds the references and loads an SP=4 checkpoint.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lss_plugin.deepspeed import BLOCK_KEY, LSSConfig, LSSConfigError, deepspeed_view
from tests.distributed import run_ranks

STEPS = 5
GLOBAL_BATCH = 4  # sequences per step
SEQ_LEN = 16  # divisible by 2 * 4 for the balanced layout on SP=4
VOCAB = 32
CLIP = 0.75  # active at step 0 only (reference norms ~0.91, 0.63, 0.54, ...): clipped and unclipped steps
RTOL = 1e-5
CASES = [(4, 0), (4, 1), (4, 2), (2, 0), (2, 1), (2, 2)]  # (sp, zero stage) on 4 ranks
STAGES = (0, 1, 2)


# ---------------------------------------------------------------------------------------------
# Configuration validation (no processes)

def _ds(block=None, **extra):
    config = {"train_batch_size": 4, **extra}
    if block is not None:
        config[BLOCK_KEY] = block
    return config


def test_block_parsed_with_defaults():
    lss = LSSConfig.from_ds_config(_ds({"size": 4}))
    assert lss == LSSConfig(enabled=True, size=4, layout="balanced", kv_backward="keep",
                            grad_averaging="auto", kv_head_chunk=None, timeout_s=None)
    assert LSSConfig.from_ds_config(_ds()).enabled is False
    assert LSSConfig.from_ds_config(_ds({"enabled": False, "size": 2})).enabled is False
    full = {"enabled": True, "size": 2, "layout": "contiguous", "kv_backward": "regather",
            "grad_averaging": "fused", "kv_head_chunk": 1, "timeout_s": 30}
    assert LSSConfig.from_ds_config(_ds(full)).to_dict() == full
    assert LSSConfig.from_ds_config(_ds({"size": 2}, sequence_parallel_size=2)).size == 2


@pytest.mark.parametrize("block, extra, message", [
    ({"size": 2, "layuot": "balanced", "zigzag": 1}, {}, "unknown key(s) ['layuot', 'zigzag']"),
    ({"size": 0}, {}, '"size" must be a positive integer, got 0'),
    ({"size": 2.0}, {}, '"size" must be a positive integer, got 2.0'),
    ({"size": True}, {}, '"size" must be a positive integer, got True'),
    ({"size": 2, "layout": "zigzag"}, {}, "\"layout\" must be one of ['contiguous', 'balanced'], got 'zigzag'"),
    ({"size": 2, "kv_backward": "drop"}, {}, '"kv_backward" must be one of'),
    ({"size": 2, "grad_averaging": "sum"}, {}, '"grad_averaging" must be one of'),
    ({"size": 2, "kv_head_chunk": 0}, {}, '"kv_head_chunk" must be a positive integer or null, got 0'),
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
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # mean over this rank's tokens


# ---------------------------------------------------------------------------------------------
# Real engines

def _ds_config(sp: int | None, stage: int, world: int, grad_averaging="auto") -> dict:
    dp = world // (sp or 1)
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // dp,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if sp is not None:
        config[BLOCK_KEY] = {"enabled": True, "size": sp, "layout": "balanced", "grad_averaging": grad_averaging}
    return config


def _build(sp, stage, world, seed=1234, grad_averaging="auto", extra=None):
    """A fresh model and engine: LSS (sp given) or plain DeepSpeed (sp None, the reference)."""
    import lss_plugin.deepspeed as lds
    torch.manual_seed(seed)
    model = _gpt(sp)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    config = {**_ds_config(sp, stage, world, grad_averaging), **(extra or {})}
    engine, *_ = lds.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _global_batch(step: int, seed: int = 7):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN + 1), generator=gen)  # [B, L+1]


def _local_batch(engine, step):
    """This rank's rows (DP) and tokens (SP) of the global batch, with their global positions."""
    from lss_plugin.sharding import local_token_indices

    tokens = _global_batch(step)
    topo = getattr(engine, "lss_topology", None)
    if topo is None:
        return tokens[:, :-1], tokens[:, 1:], None
    rows = GLOBAL_BATCH // topo.dp_size
    tokens = tokens[topo.dp_rank * rows:(topo.dp_rank + 1) * rows]
    positions = local_token_indices(SEQ_LEN, topo.sp_rank, topo.sp_size, "balanced")  # [L/N]
    return tokens[:, :-1][:, positions], tokens[:, 1:][:, positions], positions


def _global_loss(engine, local_loss):
    """Mean over every token of the global batch (equal token counts: mean of rank means)."""
    import torch.distributed as dist

    if getattr(engine, "lss_topology", None) is None:
        return float(local_loss.detach())
    loss = local_loss.detach().clone()
    dist.all_reduce(loss, group=engine.lss_mpu.get_sequence_data_parallel_group())
    return float(loss) / dist.get_world_size()


def _grad_norm_zero0(engine) -> float:
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in engine.module.parameters())))


def _train_step(engine, step):
    inputs, targets, positions = _local_batch(engine, step)
    loss = _local_loss(engine, inputs, targets, positions)
    engine.backward(loss)
    norm = _grad_norm_zero0(engine) if engine.zero_optimization_stage() == 0 else None
    engine.step()
    if norm is None:
        norm = float(engine.get_global_grad_norm())
    return _global_loss(engine, loss), norm


def _params(engine):
    # numpy, not tensors: torch pickles tensors through shared memory that dies with the rank
    return {n: p.detach().cpu().numpy().copy() for n, p in engine.module.named_parameters()}


def _teardown(engine):
    from lss_plugin.topology import destroy_topology

    if getattr(engine, "lss_mpu", None) is not None:
        engine.lss_mpu.destroy()
    engine.destroy()
    destroy_topology()



def _four_rank_cases(ckpt_dir):
    """Everything that runs on 4 ranks, engine after engine, in one spawn."""
    import lss_plugin.deepspeed as lds
    from lss_plugin.deepspeed.mpu import LSSMpu
    from lss_plugin.topology import destroy_topology, init_topology

    out = {"runs": {}}
    # 1. DeepSpeed by itself, given an LSS mpu but no correction: gradients N times too large.
    import deepspeed

    for sp in (4, 2):
        topology = init_topology(sp)
        mpu = LSSMpu(topology)
        torch.manual_seed(1234)
        model = _gpt(sp)
        config = lds.deepspeed_view(_ds_config(sp, 0, 4))
        config["gradient_clipping"] = 0.0
        plain, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                         config=config, mpu=mpu)
        plain.lss_topology = topology
        inputs, targets, positions = _local_batch(plain, 0)
        plain.backward(_local_loss(plain, inputs, targets, positions))
        out.setdefault("deepspeed_alone_norm", {})[sp] = _grad_norm_zero0(plain)
        plain.destroy()
        mpu.destroy()
        destroy_topology()

    # 2. LSS engines: 5 steps each.
    for sp, stage in CASES:
        engine = _build(sp, stage, 4)
        steps = [_train_step(engine, step) for step in range(STEPS)]
        out["runs"][(sp, stage)] = {"steps": steps, "params": _params(engine)}
        _teardown(engine)
    engine = _build(4, 0, 4, grad_averaging="fused")
    out["fused"] = {"steps": [_train_step(engine, step) for step in range(STEPS)], "params": _params(engine)}
    _teardown(engine)

    # 3. Checkpoints: save with SP=4, resume with SP=2 and SP=1 (DP=4); and an SP=4 ZeRO-0 one
    #    that the 1-rank spawn loads.
    for stage in (2, 0):
        engine = _build(4, stage, 4)
        for step in range(3):
            _train_step(engine, step)
        engine.save_checkpoint(os.path.join(ckpt_dir, f"zero{stage}"), tag="step3")
        if stage == 2:
            out["uninterrupted"] = _train_step(engine, 3)[0]
        _teardown(engine)
    out["resumed"] = {}
    for sp in (2, 1):
        engine = _build(sp, 2, 4, seed=999)  # a different init: the load must overwrite it
        engine.load_checkpoint(os.path.join(ckpt_dir, "zero2"), tag="step3")
        out["resumed"][sp] = _train_step(engine, 3)[0]
        _teardown(engine)

    # 4. The example script, SP=2 x DP=2 (its losses are compared with the 1-rank run below).
    out["example"] = _run_example(ckpt_dir, "lss")

    # 5. Refused on every rank, before any collective: a size that does not divide the world,
    #    ZeRO stage 3, and a summing gradient reduction.
    refused = (("bad_size", 3, 0, None), ("zero3", 2, 3, None), ("sum", 2, 0, {"gradient_allreduce_op": "sum"}))
    for name, sp, stage, extra in refused:
        try:
            _build(sp, stage, 4, extra=extra)
            out[name] = None
        except LSSConfigError as err:
            out[name] = str(err)
    return out


def _one_rank_references(ckpt_dir):
    out = {"runs": {}}
    for stage in STAGES:
        engine = _build(None, stage, 1)
        steps = [_train_step(engine, step) for step in range(STEPS)]
        out["runs"][stage] = {"steps": steps, "params": _params(engine)}
        engine.destroy()
    # SP=1 on one rank: the LSS engine loads the SP=4 ZeRO-0 checkpoint and resumes.
    engine = _build(1, 0, 1, seed=999)
    engine.load_checkpoint(os.path.join(ckpt_dir, "zero0"), tag="step3")
    out["resumed_zero0_one_rank"] = _train_step(engine, 3)[0]
    reference = _build(None, 0, 1)
    for step in range(3):
        _train_step(reference, step)
    out["uninterrupted_zero0"] = _train_step(reference, 3)[0]
    out["example"] = _run_example(ckpt_dir, "plain")
    return out


EXAMPLE_ITERS = 3


def _write_example_inputs(directory: str) -> None:
    """A byte corpus and two configs for the example: LSS SP=2 on 4 ranks, plain DeepSpeed on 1."""
    rng = np.random.default_rng(0)
    words = [b"lss", b"sequence", b"parallel", b"attention", b"deepspeed", b"token", b"the", b"of"]
    text = b" ".join(words[i] for i in rng.integers(0, len(words), size=6000))
    with open(os.path.join(directory, "corpus.txt"), "wb") as f:
        f.write(text)
    base = {"train_batch_size": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "zero_optimization": {"stage": 1}, "steps_per_print": 10**9}
    configs = {"lss": {**base, "train_micro_batch_size_per_gpu": 2, BLOCK_KEY: {"size": 2}},
               "plain": {**base, "train_micro_batch_size_per_gpu": 4}}
    for name, config in configs.items():
        with open(os.path.join(directory, f"example_{name}.json"), "w") as f:
            json.dump(config, f)


def _run_example(directory: str, name: str):
    import importlib.util
    import torch.distributed as dist

    from lss_plugin.topology import destroy_topology

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "train_gpt_deepspeed.py")
    spec = importlib.util.spec_from_file_location("train_gpt_deepspeed", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    metrics = os.path.join(directory, f"example_{name}.jsonl")
    args = example.parse_args([
        "--deepspeed_config", os.path.join(directory, f"example_{name}.json"), "--train-iters", str(EXAMPLE_ITERS),
        "--seq-length", "32", "--num-layers", "1", "--hidden-size", "32", "--num-heads", "4", "--num-kv-heads", "2",
        "--data-path", os.path.join(directory, "corpus.txt"), "--metrics-file", metrics, "--seed", "5",
    ])
    records = example.train(args)
    destroy_topology()
    dist.barrier()
    lines = None
    if dist.get_rank() == 0:
        with open(metrics) as f:
            lines = [json.loads(line) for line in f]
    return {"losses": [r["loss"] for r in records], "metrics": lines}


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

    env = {"TORCH_EXTENSIONS_DIR": os.path.join(default_cache_dir(), "torch_extensions")}
    code = ("from deepspeed.accelerator import get_accelerator\n"
            "b = get_accelerator().create_op_builder('ShareMemCommBuilder')\n"
            "import deepspeed.ops\n"
            "if b is not None and deepspeed.ops.__compatible_ops__.get(b.NAME, False): b.load()\n"
            "import os, sys; sys.stdout.flush(); os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, check=True, timeout=900,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return env


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    ckpt_dir = str(tmp_path_factory.mktemp("ds_ckpt"))
    _write_example_inputs(ckpt_dir)
    env = _deepspeed_env()
    four = run_ranks(_four_rank_cases, 4, ckpt_dir, timeout_s=600, env=env)
    one = run_ranks(_one_rank_references, 1, ckpt_dir, timeout_s=300, env=env)[0]
    return four, one


def _rel(a, b) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _assert_params_close(params, reference, what):
    for name, ref in reference.items():
        diff, ref = params[name].astype("float64") - ref.astype("float64"), ref.astype("float64")
        err = float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30))
        assert err <= RTOL, f"{what}: parameter {name} differs by {err:.3g} (relative) > {RTOL}"


def test_deepspeed_alone_sums_over_sp(engines):
    """The measurement behind the correction: DeepSpeed's own reduction is N times the truth."""
    four, one = engines
    true_norm = one["runs"][0]["steps"][0][1]
    for sp, norm in four[0]["deepspeed_alone_norm"].items():
        assert math.isclose(norm / true_norm, sp, rel_tol=RTOL), (sp, norm / true_norm)


@pytest.mark.parametrize("sp, stage", CASES)
def test_lss_engine_matches_one_rank_engine(engines, sp, stage):
    four, one = engines
    reference = one["runs"][stage]
    norms = [norm for _, norm in reference["steps"]]
    assert max(norms) > CLIP > min(norms), norms  # clipped and unclipped steps both exercised
    for rank, result in enumerate(four):
        run = result["runs"][(sp, stage)]
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(run["steps"], reference["steps"])):
            assert _rel(loss, ref_loss) <= RTOL, f"rank {rank} step {step}: loss {loss} vs {ref_loss}"
            assert _rel(norm, ref_norm) <= RTOL, f"rank {rank} step {step}: grad norm {norm} vs {ref_norm}"
        _assert_params_close(run["params"], reference["params"], f"sp={sp} zero={stage} rank {rank}")
        for name, value in run["params"].items():  # every replica identical, bit for bit
            assert np.array_equal(value, four[0]["runs"][(sp, stage)]["params"][name]), (rank, name)


def test_fused_averaging_matches(engines):
    four, one = engines
    reference = one["runs"][0]
    for result in four:
        for (loss, norm), (ref_loss, ref_norm) in zip(result["fused"]["steps"], reference["steps"]):
            assert _rel(loss, ref_loss) <= RTOL and _rel(norm, ref_norm) <= RTOL
        _assert_params_close(result["fused"]["params"], reference["params"], "fused")


def test_checkpoint_resumes_under_other_sp_sizes(engines):
    four, one = engines
    expected = four[0]["uninterrupted"]
    for result in four:
        assert result["uninterrupted"] == expected
        for sp, loss in result["resumed"].items():
            assert _rel(loss, expected) <= RTOL, f"SP=4 checkpoint resumed with SP={sp}: {loss} vs {expected}"
    assert _rel(one["resumed_zero0_one_rank"], one["uninterrupted_zero0"]) <= RTOL


def test_unsupported_setups_refused_on_every_rank(engines):
    four, _ = engines
    for result in four:
        assert result["bad_size"] and "size 3 does not divide the world size 4" in result["bad_size"]
        assert result["zero3"] and "ZeRO stage 3 is not supported" in result["zero3"]
        assert result["sum"] and "\"gradient_allreduce_op\" = 'sum'" in result["sum"]


def test_example_script_matches_plain_deepspeed(engines):
    """examples/train_gpt_deepspeed.py with SP=2 x DP=2 trains as plain DeepSpeed on one rank."""
    four, one = engines
    reference = one["example"]["losses"]
    assert len(reference) == EXAMPLE_ITERS
    for result in four:
        for it, (loss, ref) in enumerate(zip(result["example"]["losses"], reference)):
            assert _rel(loss, ref) <= RTOL, f"iteration {it + 1}: {loss} vs {ref}"
    metrics = four[0]["example"]["metrics"]
    assert [m["iteration"] for m in metrics] == list(range(1, EXAMPLE_ITERS + 1))
    for m in metrics:
        assert {"iteration", "loss", "tokens_per_s", "ms_per_iter"} <= set(m) and m["tokens_per_s"] > 0
