"""The DeepSpeed examples with a sliding window and attention sinks (issue 28): ``--window``, ``--sinks``.

examples/train_gpt_deepspeed.py (the bundled GPT, window on every other layer, sinks on every layer)
and examples/train_hf_deepspeed.py (gpt-oss, whose config alternates sliding and full layers and whose
attention has learned sinks) each train 2 steps with accumulation 2 at SP = 2 on 2 ranks; reference:
the same script on 1 rank with the LSS block disabled (the bundled GPT's dense masked attention;
transformers' eager attention for gpt-oss). float32: every step's loss within 1e-5 relative.
Argument refusals are checked in this process.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from lss_plugin.deepspeed import BLOCK_KEY
from tests.distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5
COMMON = ["--train-iters", "2", "--seq-length", "32", "--num-layers", "2", "--hidden-size", "32", "--num-heads", "4",
          "--num-kv-heads", "2", "--seed", "5", "--window", "6", "--sinks"]
ARGS = {"train_gpt_deepspeed": COMMON + ["--full-attention-every", "2", "--position-embedding", "rope"],
        "train_hf_deepspeed": COMMON + ["--model-type", "gpt_oss"]}


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_window_and_sinks_arguments_refused_by_name():
    gpt = _example("train_gpt_deepspeed")
    config = os.path.join(ROOT, "configs", "ds_config_lss.json")
    args = gpt.parse_args(["--deepspeed_config", config, "--window", "8", "--full-attention-every", "3",
                           "--num-layers", "4", "--sinks"])
    assert gpt.layer_types(args) == ("sliding_attention", "sliding_attention", "full_attention", "sliding_attention")
    for argv, message in ((["--window", "0"], "--window must be positive, got 0"),
                          (["--full-attention-every", "2"], "--full-attention-every 2 needs --window")):
        with pytest.raises(ValueError, match=message):
            gpt.parse_args(["--deepspeed_config", config] + argv)

    import lss_plugin.hf as hf

    hfx = _example("train_hf_deepspeed")
    with pytest.raises(ValueError, match=r"--window must be positive, got -1"):
        hfx.parse_args(["--model-type", "mistral", "--deepspeed_config", config, "--window", "-1"])
    small = dict(hidden_size=16, num_layers=2, num_heads=4, max_positions=32)
    assert hfx.with_window(hf.small_causal_lm_config("mistral", **small), 8).sliding_window == 8
    oss = hfx.with_window(hf.small_causal_lm_config("gpt_oss", **small), 8)
    assert oss.sliding_window == 8 and list(oss.layer_types) == ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match=r"--window 8: LlamaConfig \(model_type 'llama'\) has no sliding_window"):
        hfx.with_window(hf.small_causal_lm_config("llama", **small), 8)
    with pytest.raises(ValueError, match=r"Qwen3Config.layer_types .* has no sliding layer \(max_window_layers=28 of 2"):
        hfx.with_window(hf.small_causal_lm_config("qwen3", **small), 8)
    llama = hf.build_causal_lm(hf.small_causal_lm_config("llama", **small), attn_implementation="eager")
    with pytest.raises(ValueError, match="--sinks: LlamaForCausalLM has no learned attention sinks"):
        hfx.check_sinks(llama, True)
    hfx.check_sinks(llama, False)
    assert hfx.baseline_attention(oss) == "eager" and hfx.baseline_attention(hf.small_causal_lm_config("llama", **small)) == "sdpa"


def _write_inputs(directory: str) -> None:
    from tests.test_deepspeed import _write_example_inputs

    _write_example_inputs(directory)  # the corpus (its configs are for 4 ranks; these are for 2 and 1)
    base = {"train_batch_size": 2, "gradient_accumulation_steps": 2, "train_micro_batch_size_per_gpu": 1,
            "gradient_clipping": 1.0, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "zero_optimization": {"stage": 1}, "steps_per_print": 10**9}
    for name, block in (("lss", {"size": 2}), ("plain", {"enabled": False, "size": 2})):
        with open(os.path.join(directory, f"masks_{name}.json"), "w") as f:
            json.dump({**base, BLOCK_KEY: block}, f)


def _run_example(directory: str, config: str, name: str) -> list[float]:
    import torch.distributed as dist

    from lss_plugin.topology import destroy_topology

    example = _example(name)
    records = example.train(example.parse_args(
        ARGS[name] + ["--deepspeed_config", os.path.join(directory, f"masks_{config}.json"),
                      "--data-path", os.path.join(directory, "corpus.txt")]))
    destroy_topology()
    dist.barrier()
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from tests.test_deepspeed import _deepspeed_env

    directory = str(tmp_path_factory.mktemp("masks_examples"))
    _write_inputs(directory)
    return directory, _deepspeed_env()


@pytest.mark.parametrize("name", sorted(ARGS))
def test_example_with_window_and_sinks_matches_one_rank(inputs, name):
    directory, env = inputs
    reference = run_ranks(_run_example, 1, directory, "plain", name, timeout_s=600, env=env)[0]
    assert len(reference) == 2
    for rank, losses in enumerate(run_ranks(_run_example, 2, directory, "lss", name, timeout_s=900, env=env)):
        print(name, "rank", rank, "losses", losses, "one rank", reference)
        for step, (loss, ref) in enumerate(zip(losses, reference)):
            assert abs(loss - ref) <= RTOL * abs(ref), (name, rank, step, loss, ref)
