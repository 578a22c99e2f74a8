"""The DeepSpeed block's "ulysses_size" and the transformers path under the hybrid LSS x Ulysses (issue 17).

Reference: the same model in one process (transformers models: same config and seeded weights with
"eager" attention, as tests/test_hf.py; the LSS GPT of lss_plugin.models.gpt with plain attention),
trained with the same SGD on the whole global batch. LSS runs in real DeepSpeed engines on 4 ranks,
SP = 4 with "ulysses_size": 2 (two Ulysses groups of 2 ranks, LSS's gather across them) and SP = 2 with
"ulysses_size": 2 (all Ulysses) x DP = 2; packed documents as tests/test_hf_packed.py builds them (reference:
transformers' own packed mask). Tolerances (float32), as tests/test_hf.py: losses within 1e-5
relative; every parameter's gradient, and every parameter after the last step, within 1e-5 relative
(norm of the difference over the reference norm). Each case also asserts that the engine built the
hybrid topology and that the batch follows the hybrid's token layout (tests/test_hf.py::_ds_case).

One 4-rank spawn runs every engine in sequence; the block's checks run in this process.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from lss_plugin.deepspeed import BLOCK_KEY, LSSConfig, LSSConfigError
from tests.test_hf import LR, RTOL, _assert_matches, _ds_case
from tests.test_hf_packed import _assert_packed_matches
from tests.test_hf_packed import _ds_case as _packed_ds_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT_STEPS = 2
GPT_SEQ_LEN = 16
GPT_VOCAB = 32


# ---------------------------------------------------------------------------------------------
# The block (no processes)

def _ds(block, **extra):
    return {"train_batch_size": 4, BLOCK_KEY: block, **extra}


def test_block_ulysses_size_parsed_and_refused_by_name():
    assert LSSConfig.from_ds_config(_ds({"size": 4})).ulysses_size == 1
    lss = LSSConfig.from_ds_config(_ds({"size": 4, "ulysses_size": 2}, sequence_parallel_size=4))
    assert lss.ulysses_size == 2 and lss.to_dict()["ulysses_size"] == 2
    assert LSSConfig.from_ds_config(_ds({"size": 4, "ulysses_size": 4})).ulysses_size == 4  # all Ulysses
    refusals = [
        ({"size": 4, "ulysses_size": 3}, {}, '"ulysses_size" (3) must divide the sequence-parallel size (4)'),
        ({"size": 2, "ulysses_size": 4}, {}, '"ulysses_size" (4) must divide the sequence-parallel size (2)'),
        ({"size": 4, "ulysses_size": 0}, {}, '"ulysses_size" must be a positive integer, got 0'),
        ({"size": 4, "ulysses_size": 2.0}, {}, '"ulysses_size" must be a positive integer, got 2.0'),
        ({"size": 4, "ulysses_size": True}, {}, '"ulysses_size" must be a positive integer, got True'),
        ({"size": 4, "ulysses": 2}, {}, "unknown key(s) ['ulysses']"),
        # DeepSpeed's own Ulysses degree set to U: it counts every rank of one sequence (N) here
        ({"size": 4, "ulysses_size": 2}, {"sequence_parallel_size": 2},
         'DeepSpeed "sequence_parallel_size" = 2 contradicts "lss_sequence_parallel" (enabled=True, size=4, '
         'ulysses_size=2; "sequence_parallel_size" counts every rank of one sequence, the Ulysses degree is '
         '"ulysses_size"): remove it or set it to 4'),
    ]
    for block, extra, message in refusals:
        with pytest.raises(LSSConfigError) as err:
            LSSConfig.from_ds_config(_ds(block, **extra))
        assert message in str(err.value), (block, str(err.value))


def test_heads_checked_against_ulysses_size():
    lss = LSSConfig.from_dict({"size": 4, "ulysses_size": 2})
    for heads, kv_heads in ((4, 2), (4, 1), (6, 2), (6, 3), (2, 1)):  # split, replicated (MQA, 3 -> lcm 6)
        lss.check_heads(heads, kv_heads)
    with pytest.raises(LSSConfigError) as err:
        lss.check_heads(3, 3, model="LlamaForCausalLM")
    assert "LlamaForCausalLM (3 query heads, 3 key/value heads)" in str(err.value)
    assert '"ulysses_size" (2) must divide the number of query heads (3)' in str(err.value)
    LSSConfig.from_dict({"size": 4}).check_heads(3, 3)  # pure LSS: any head count


def test_model_heads_read_before_any_group():
    import lss_plugin.hf as hf
    from lss_plugin.deepspeed.engine import attention_heads
    from lss_plugin.models.gpt import GPT, GPTConfig

    llama = hf.build_causal_lm(hf.small_causal_lm_config("llama", hidden_size=16, num_heads=4, num_kv_heads=2,
                                                         num_layers=1))
    gpt2 = hf.build_causal_lm(hf.small_causal_lm_config("gpt2", hidden_size=16, num_heads=4, num_layers=1))
    assert attention_heads(llama) == (4, 2) and attention_heads(gpt2) == (4, 4)
    assert attention_heads(GPT(GPTConfig(hidden_size=16, num_heads=4, num_kv_heads=1, num_layers=1))) == (4, 1)
    assert attention_heads(torch.nn.Linear(2, 2)) is None  # not said: lss_attention checks at its first call


def test_hybrid_layout_differs_from_pure_lss():
    """The position check of every engine case can tell the hybrid's layout from pure LSS's (balanced)."""
    from lss_plugin.sharding import local_token_indices

    pure = [local_token_indices(16, r, 4, "balanced").tolist() for r in range(4)]
    hybrid = [local_token_indices(16, r, 4, "balanced", ulysses_size=2).tolist() for r in range(4)]
    assert pure != hybrid and sorted(sum(hybrid, [])) == list(range(16))


def _example():
    spec = importlib.util.spec_from_file_location("train_hf_deepspeed", os.path.join(ROOT, "examples",
                                                                                      "train_hf_deepspeed.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_flag_written_into_the_block():
    example = _example()
    config = os.path.join(ROOT, "configs", "ds_config_lss_sp4_zero2.json")
    args = example.parse_args(["--model-type", "llama", "--deepspeed_config", config, "--ulysses-size", "2"])
    assert args.deepspeed_config[BLOCK_KEY]["ulysses_size"] == 2 and args.deepspeed_config[BLOCK_KEY]["size"] == 4
    assert LSSConfig.from_ds_config(args.deepspeed_config).ulysses_size == 2
    assert example.parse_args(["--model-type", "llama", "--deepspeed_config", config]).deepspeed_config == config
    with pytest.raises(LSSConfigError, match=r'"ulysses_size" \(3\) must divide the sequence-parallel size \(4\)'):
        example.parse_args(["--model-type", "llama", "--deepspeed_config", config, "--ulysses-size", "3"])
    baseline = os.path.join(ROOT, "configs", "ds_config_baseline.json")
    with pytest.raises(ValueError, match="--ulysses-size 2 needs an enabled"):
        example.parse_args(["--model-type", "llama", "--deepspeed_config", baseline, "--ulysses-size", "2"])


# ---------------------------------------------------------------------------------------------
# Multi-rank: one spawn of 4 ranks

def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _gpt_zero3_case():
    """lss_plugin.models.gpt (RoPE, GQA 4/2 heads, untied head) under ZeRO-3 through
    lss_plugin.deepspeed.initialize, SP=4 with ulysses_size 2, next to the one-process GPT.
    Returns per step (ref loss, LSS loss, max grad rel. error) and the max parameter rel. error."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    import lss_plugin.deepspeed as lds
    from lss_plugin.models.gpt import GPT, GPTConfig, LSSAttentionOptions
    from lss_plugin.sharding import local_positions
    from lss_plugin.topology import destroy_topology

    config = GPTConfig(vocab_size=GPT_VOCAB, max_seq_length=GPT_SEQ_LEN, hidden_size=16, num_layers=1, num_heads=4,
                       num_kv_heads=2, position_embedding="rope", tie_embeddings=False)
    torch.manual_seed(21)
    ref = GPT(config)
    torch.manual_seed(21)
    model = GPT(config, lss=LSSAttentionOptions(layout="balanced"))
    ds_config = {
        "train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "gradient_clipping": 0.0,
        BLOCK_KEY: {"size": 4, "layout": "balanced", "ulysses_size": 2},
    }
    engine, *_ = lds.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9),
                                config=ds_config)
    assert engine.lss_topology.ulysses_size == 2 and engine.lss_mpu.get_sequence_parallel_world_size() == 4
    ref_optimizer = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9)
    positions = local_positions(GPT_SEQ_LEN, layout="balanced")  # [L/N]: the hybrid's layout (the topology's)
    steps = []
    for step in range(GPT_STEPS):
        tokens = torch.randint(0, GPT_VOCAB, (2, GPT_SEQ_LEN + 1), generator=torch.Generator().manual_seed(40 + step))
        inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [2, L]
        ref_optimizer.zero_grad(set_to_none=True)
        ref_loss = F.cross_entropy(ref(inputs).flatten(0, 1), targets.flatten())
        ref_loss.backward()
        ref_grads = {name: p.grad.clone() for name, p in ref.named_parameters()}
        ref_optimizer.step()
        logits = engine(inputs[:, positions], positions)  # [2, L/N, V]
        loss = F.cross_entropy(logits.flatten(0, 1), targets[:, positions].flatten())  # this rank's token mean
        engine.backward(loss)
        err = max(_rel(safe_get_full_grad(p), ref_grads[name]) for name, p in engine.module.named_parameters())
        engine.step()
        mean = loss.detach().double().clone()
        dist.all_reduce(mean)  # equal token counts on every rank: the mean of rank means is the global mean
        steps.append((float(ref_loss.detach()), float(mean) / dist.get_world_size(), err))
    refs = dict(ref.named_parameters())
    params_err = max(_rel(safe_get_full_fp32_param(p), refs[name].detach()) for name, p in engine.module.named_parameters())
    engine.lss_mpu.destroy()
    engine.destroy()
    destroy_topology()
    return steps, params_err


def _heads_refusal():
    """3 query heads with ulysses_size 2: refused by name on every rank before any LSS group exists."""
    import lss_plugin.hf as hf
    from lss_plugin.topology import is_topology_initialized

    model = hf.build_causal_lm(hf.small_causal_lm_config("llama", hidden_size=12, num_heads=3, num_layers=1))
    config = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
              "zero_allow_untested_optimizer": True, BLOCK_KEY: {"size": 4, "ulysses_size": 2}}
    try:
        hf.deepspeed_initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config)
        message = None
    except LSSConfigError as err:
        message = str(err)
    return message, is_topology_initialized()


# (model_type, sp, heads, kv_heads, layout, padded, ulysses) for tests/test_hf.py::_ds_case on 4 ranks
HF_CASES = [
    ("llama", 4, 4, 2, "balanced", False, 2),  # GQA, RoPE: the 2 KV heads split over each Ulysses pair
    ("llama", 4, 4, 1, "contiguous", False, 2),  # MQA: the one KV head replicated to 2
    ("qwen2", 4, 6, 2, "balanced", False, 2),  # 6 heads: not divisible by SP=4, only by U=2
    ("gpt2", 2, 4, None, "balanced", True, 2),  # SP=2 all Ulysses x DP=2, learned positions, unequal tokens
]


# tests/test_hf_packed.py::_ds_case: DataCollatorWithFlattening's packed rows (29 tokens padded to 32),
# documents crossing Ulysses and LSS ranks, MQA; SP=4 with ulysses_size 2
PACKED_CASE = ("llama", "balanced", 4, 1, "odd", "both")


def _four_rank_cases():
    out = {"refusal": _heads_refusal(), "gpt_zero3": _gpt_zero3_case(), "hf": {},
           "packed": _packed_ds_case(*PACKED_CASE, sp=4, ulysses=2)}
    for case in HF_CASES:
        out["hf"][case] = _ds_case(*case)
    return out


@pytest.fixture(scope="module")
def four_ranks():
    from tests.distributed import run_ranks

    return run_ranks(_four_rank_cases, 4, timeout_s=900, pg_timeout_s=120)


def test_hybrid_engines_match_one_process(four_ranks):
    runs = []
    for rank_out in four_ranks:
        for case, run in [*rank_out["hf"].items(), ("gpt zero3 sp4 u2", rank_out["gpt_zero3"])]:
            _assert_matches(case, *run)  # within RTOL = 1e-5 (tests/test_hf.py)
            runs.append(run)
    for rank_out in four_ranks:
        _assert_packed_matches(PACKED_CASE, *rank_out["packed"])
        steps, params_err = rank_out["packed"]
        runs.append(([(r, l, e) for r, _, l, e in steps], params_err))
    worst_loss = max(abs(l - r) / abs(r) for st, _ in runs for r, l, _ in st)
    worst_grad = max(e for st, _ in runs for _, _, e in st)
    worst_param = max(err for _, err in runs)
    print(f"\nhybrid LSS x Ulysses, {len(HF_CASES)} transformers cases + 1 packed (ZeRO-2) + the LSS GPT (ZeRO-3): "
          f"worst rel. errors: loss {worst_loss:.2e}, gradients {worst_grad:.2e}, parameters {worst_param:.2e} (tolerance {RTOL})")


def test_heads_refused_by_name_on_every_rank(four_ranks):
    for message, topology_built in (r["refusal"] for r in four_ranks):
        assert message is not None and '"ulysses_size" (2) must divide the number of query heads (3)' in message
        assert "LlamaForCausalLM" in message
        assert not topology_built  # refused before init_topology created any group
