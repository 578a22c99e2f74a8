"""transformers models with attn_implementation="lss", against the same model in one process.

Reference: the same transformers model (same config, same seeded weights) with "eager"
attention, run in one process on the whole global batch; its loss is the token mean over every
counted label of the batch. Tolerances (float32): losses within 1e-5 relative, every parameter's
gradient within 1e-5 relative (norm of the difference over the reference norm).

One 4-rank spawn runs everything multi-rank, engine after engine: real DeepSpeed ZeRO-2 engines
(lss_plugin.hf.deepspeed_initialize) at SP=4 and SP=2 x DP=2 for Llama (GQA), GPT-2 (learned
absolute positions) and Mistral (sliding-window config wider than the sequence), a head count
that SP does not divide, right padding with unequal token counts, the plain-torch path with
lss_plugin.average_gradients, and the settings LSS refuses. The block's "kv_buffer_mib" sized for one
KV head per gather reaches the attention through deepspeed_initialize: the collectives of
"kv_head_chunk": 1 with "regather" and the one-process losses, a larger LSS_KV_BUFFER_MIB set beside it.
"""
from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

from tests.test_attention import DKV  # gloo: the dK,dV all-to-all

STEPS = 3
GLOBAL_BATCH = 4
SEQ_LEN = 16  # divisible by 2 * 4: balanced layout on SP=4
RTOL = 1e-5
LR = 0.5


# ---------------------------------------------------------------------------------------------
# In-process checks (no process group)

def test_registration_reaches_every_entry_point(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    import lss_plugin.hf as hf

    config = hf.small_causal_lm_config("llama", hidden_size=16, num_heads=2, num_layers=1)
    assert hf.build_causal_lm(config).config._attn_implementation == "lss"  # AutoModel.from_config
    assert LlamaForCausalLM._from_config(config, attn_implementation="lss").config._attn_implementation == "lss"
    model = hf.build_causal_lm(config, attn_implementation="sdpa")
    model.set_attn_implementation("lss")
    assert model.config._attn_implementation == "lss"
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="lss")
    assert loaded.config._attn_implementation == "lss"
    with pytest.raises(ValueError, match="not supported"):
        model.set_attn_implementation("lss_unregistered")
    with pytest.raises(ValueError, match="new plain name"):
        hf.register_lss_attention("sdpa")


def test_labels_shift_before_sharding_and_padding_rules():
    import lss_plugin.hf as hf
    from lss_plugin.hf.batch import _check_right_padding

    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert hf.shift_labels_for_causal_lm(ids, mask).tolist() == [[6, 7, 8, -100], [2, -100, -100, -100]]
    _check_right_padding(mask)
    with pytest.raises(ValueError, match=r"rows \[0\] .*left or interior padding"):
        _check_right_padding(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]]))


def test_small_configs_have_no_dropout_and_byte_vocab():
    import lss_plugin.hf as hf

    for model_type in ("llama", "gpt2", "mistral", "qwen2"):
        config = hf.small_causal_lm_config(model_type, num_kv_heads=None)
        assert config.vocab_size == 256
        drops = {k: v for k, v in config.to_dict().items() if isinstance(v, float) and ("drop" in k)}
        assert all(v == 0.0 for v in drops.values()), (model_type, drops)


# ---------------------------------------------------------------------------------------------
# Multi-rank: one spawn

def _global_batch(step: int, padded: bool = False):
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 256, (GLOBAL_BATCH, SEQ_LEN), generator=gen)
    mask = None
    if padded:  # right padding, unequal per row and per DP shard: token weighting matters
        mask = torch.ones_like(ids)
        for row, real in enumerate((16, 5, 11, 2)):
            mask[row, real:] = 0
    return ids, mask


def _reference_step(ref, ids, mask):
    """The one-process model's global token-mean loss and gradients on the whole batch."""
    import lss_plugin.hf as hf

    ref.zero_grad(set_to_none=True)
    labels = hf.shift_labels_for_causal_lm(ids, mask)  # [B, L], same rule as the sharded path
    logits = ref(input_ids=ids, use_cache=False).logits  # [B, L, V]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    return float(loss), [p.grad.clone() for p in ref.parameters()]


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _ds_case(model_type, sp, heads, kv_heads, layout, padded=False, ulysses=1, block=None):
    """STEPS steps of a ZeRO-2 engine next to the one-process model trained with the same SGD
    (``ulysses`` > 1: the block's "ulysses_size", the hybrid LSS x Ulysses; tests/test_deepspeed_hybrid.py;
    ``block``: more keys of the "lss_sequence_parallel" block).

    Returns per step (ref loss, LSS loss, max grad rel. error) and the max parameter rel. error
    after the last step. DeepSpeed clips gradients at 1.0 unless told otherwise: clipping is off.
    """
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    import lss_plugin.hf as hf
    from lss_plugin.grads import reduce_loss
    from lss_plugin.sharding import local_token_indices
    from lss_plugin.topology import destroy_topology

    config = hf.small_causal_lm_config(model_type, hidden_size=4 * heads, num_heads=heads,
                                       num_kv_heads=kv_heads, num_layers=2, max_positions=SEQ_LEN)
    ref = hf.build_causal_lm(config, attn_implementation="eager", seed=11)
    model = hf.build_causal_lm(config, attn_implementation="lss", seed=11)
    dp = dist.get_world_size() // sp
    ds_config = {
        "train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // dp,
        "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
        "gradient_clipping": 0.0,
        "lss_sequence_parallel": {"size": sp, "layout": layout, "ulysses_size": ulysses, **(block or {})},
    }
    engine, *_ = hf.deepspeed_initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), config=ds_config)
    ref_optimizer = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9)
    steps = []
    for step in range(STEPS):
        ids, mask = _global_batch(step, padded)
        ref_loss, ref_grads = _reference_step(ref, ids, mask)
        ref_optimizer.step()
        rows = hf.data_parallel_rows(ids, engine.lss_topology)
        batch = hf.shard_causal_lm_batch(rows, None if mask is None else hf.data_parallel_rows(mask, engine.lss_topology))
        # the engine built the topology the block asked for, and the batch follows its token layout
        topo = engine.lss_topology
        assert topo.ulysses_size == ulysses, (topo.ulysses_size, ulysses)
        assert batch.position_ids[0].tolist() == local_token_indices(
            SEQ_LEN, topo.sp_rank, sp, layout, ulysses_size=ulysses).tolist(), batch.position_ids[0]
        loss = hf.causal_lm_loss(engine(**batch.model_inputs()).logits, batch.shift_labels)
        engine.backward(loss.loss)
        grads = [safe_get_full_grad(p) for p in engine.module.parameters()]  # assembled over ZeRO partitions
        err = max(_rel(g, r) for g, r in zip(grads, ref_grads))
        engine.step()
        steps.append((ref_loss, float(reduce_loss(loss.local_mean, num_tokens=loss.num_tokens)), err))
    params_err = max(_rel(p.detach(), r.detach()) for p, r in zip(engine.module.parameters(), ref.parameters()))
    engine.lss_mpu.destroy()
    engine.destroy()
    destroy_topology()
    return steps, params_err


def _plain_torch_case():
    """No DeepSpeed: SP=2 x DP=2, ragged examples through the collator, SP-normalised loss +
    average_gradients(num_tokens); 6 query / 2 KV heads, balanced layout."""
    import lss_plugin
    import lss_plugin.hf as hf
    from lss_plugin.grads import average_gradients, reduce_loss
    from lss_plugin.topology import destroy_topology

    topology = lss_plugin.init_topology(2)
    hf.register_lss_attention(layout="balanced")
    config = hf.small_causal_lm_config("qwen2", hidden_size=24, num_heads=6, num_kv_heads=2, num_layers=2)
    ref = hf.build_causal_lm(config, attn_implementation="eager", seed=5)
    model = hf.build_causal_lm(config, attn_implementation="lss", seed=5)
    ids, mask = _global_batch(0, padded=True)
    ref_loss, ref_grads = _reference_step(ref, ids, mask)
    # The collator pads each DP shard to its own longest row (16 and 11 -> 12 real + pad here).
    rows, lengths = hf.data_parallel_rows(ids), hf.data_parallel_rows(mask).sum(1).tolist()
    batch = hf.LSSCausalLMCollator()([{"input_ids": row[:n]} for row, n in zip(rows, lengths)])
    loss = hf.causal_lm_loss(model(**batch.model_inputs()).logits, batch.shift_labels, group=topology.sp_group)
    loss.loss.backward()
    average_gradients(model.parameters(), topology, num_tokens=loss.num_tokens)
    out = (ref_loss, float(reduce_loss(loss.local_mean, num_tokens=loss.num_tokens)),
           max(_rel(p.grad, r) for p, r in zip(model.parameters(), ref_grads)))
    hf.register_lss_attention()
    destroy_topology()
    return out


def _refusals():
    """Settings LSS cannot reproduce fail with a message naming them (SP=4, before any collective)."""
    import lss_plugin
    import lss_plugin.hf as hf
    from lss_plugin.topology import destroy_topology

    lss_plugin.init_topology(4)
    # Balanced: no rank's positions are 0..s_local-1, so a missing position_ids fails on every rank.
    hf.register_lss_attention(layout="balanced")
    found = {}

    def attempt(name, fn):
        try:
            fn()
            found[name] = None
        except ValueError as err:
            found[name] = str(err)

    ids = torch.randint(0, 256, (1, SEQ_LEN))
    batch = hf.shard_causal_lm_batch(ids)
    # Llama 4's query temperature tuning on a NoPE layer reads local indices: exact only below floor_scale
    llama4 = hf.build_causal_lm(hf.small_causal_lm_config(
        "llama4_text", hidden_size=16, num_heads=2, num_layers=1, no_rope_layers=[0], layer_types=["full_attention"],
        floor_scale=8))
    attempt("temperature", lambda: llama4(**batch.model_inputs()))
    llama_cfg = hf.small_causal_lm_config("llama", hidden_size=16, num_heads=2, num_layers=1)
    llama = hf.build_causal_lm(llama_cfg)
    inputs = batch.model_inputs()
    attempt("padding", lambda: llama(**{**inputs, "attention_mask": torch.tensor([[1, 1, 0, 0]])}))
    attempt("positions", lambda: llama(input_ids=batch.input_ids, use_cache=False))
    dropout = hf.build_causal_lm(hf.small_causal_lm_config("llama", hidden_size=16, num_heads=2, num_layers=1,
                                                           attention_dropout=0.1))
    attempt("dropout", lambda: dropout.train()(**inputs))
    attempt("left_padding", lambda: hf.shard_causal_lm_batch(ids, torch.cat([torch.zeros(1, 1), torch.ones(1, SEQ_LEN - 1)], 1)))
    attempt("length", lambda: hf.shard_causal_lm_batch(torch.zeros(1, 6, dtype=torch.long)))
    hf.register_lss_attention()
    destroy_topology()
    return found


# (model_type, sp, heads, kv_heads, layout, padded) on 4 ranks
DS_CASES = [
    ("llama", 4, 4, 2, "balanced", False),  # GQA, RoPE
    ("llama", 2, 4, 1, "contiguous", True),  # MQA; DP=2 with unequal token counts per shard
    ("gpt2", 4, 4, None, "contiguous", False),  # learned absolute positions, tied embeddings
    ("gpt2", 2, 4, None, "balanced", False),
    ("mistral", 4, 4, 2, "balanced", False),  # sliding_window=4096 > L: exact
    ("mistral", 2, 4, 2, "contiguous", False),
    ("gpt2", 4, 6, None, "balanced", False),  # 6 heads on SP=4: not divisible (Ulysses cannot)
    ("llama", 2, 3, 3, "contiguous", False),  # 3 heads on SP=2
]


# The budget cases: 3 KV heads (head dim 4), micro-batch 2 of L = 16 in float32 at SP=2 x DP=2, so one
# KV head of gathered K,V is 2 * 2 * 16 * 4 * 4 B = 1 KiB. 2.5 KiB holds two one-head chunks in
# flight but not the three heads unchunked (3 KiB): one head per gather.
BUDGET_CASE = ("llama", 2, 3, 3, "contiguous", False)
ONE_HEAD_BUDGET_MIB = 2.5 * 1024 / 2**20
BUDGET_BLOCKS = {"budget": {"kv_buffer_mib": ONE_HEAD_BUDGET_MIB},
                 "chunk1_regather": {"kv_head_chunk": 1, "kv_backward": "regather"}}


def _budget_cases():
    """Each block of BUDGET_BLOCKS on BUDGET_CASE: (steps, params_err, collective calls). The budget
    runs beside a LSS_KV_BUFFER_MIB that alone would gather all heads at once: the block's wins."""
    from lss_plugin import record_collectives
    from lss_plugin.options import KV_BUFFER_ENV

    out = {}
    for name, block in BUDGET_BLOCKS.items():
        env = {KV_BUFFER_ENV: "1024"} if "kv_buffer_mib" in block else {}
        with mock.patch.dict(os.environ, env), record_collectives() as rec:
            steps, params_err = _ds_case(*BUDGET_CASE, block=block)
        out[name] = (steps, params_err, dict(rec.calls))
    return out


def _four_rank_cases():
    out = {"plain": _plain_torch_case(), "refusals": _refusals(), "ds": {}}
    for case in DS_CASES:
        out["ds"][case] = _ds_case(*case)
    out["budget"] = _budget_cases()
    return out


@pytest.fixture(scope="module")
def four_ranks():
    from tests.distributed import run_ranks

    return run_ranks(_four_rank_cases, 4, timeout_s=600, pg_timeout_s=120)


def _assert_matches(case, steps, params_err):
    """One ``_ds_case`` run against its one-process reference, within RTOL."""
    assert params_err <= RTOL, (case, params_err)
    for step, (ref_loss, loss, grad_err) in enumerate(steps):
        assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), (case, step, loss, ref_loss)
        assert grad_err <= RTOL, (case, step, grad_err)


def test_deepspeed_zero2_matches_one_process(four_ranks):
    for rank_out in four_ranks:
        for case, (steps, params_err) in rank_out["ds"].items():
            _assert_matches(case, steps, params_err)
    runs = [run for o in four_ranks for run in o["ds"].values()]
    worst_loss = max(abs(l - r) / abs(r) for st, _ in runs for r, l, _ in st)
    worst_grad = max(e for st, _ in runs for _, _, e in st)
    worst_param = max(err for _, err in runs)
    print(f"\nHF + DeepSpeed ZeRO-2, {len(DS_CASES)} cases x {STEPS} steps: worst rel. errors: loss {worst_loss:.2e}, "
          f"gradients {worst_grad:.2e}, parameters after the last step {worst_param:.2e} (tolerance {RTOL})")
    # The model actually trained (the loss moved), so later steps compare real updates.
    for case, (steps, _) in four_ranks[0]["ds"].items():
        assert steps[-1][0] != steps[0][0], case


def test_plain_torch_average_gradients_with_padding(four_ranks):
    for ref_loss, loss, grad_err in (r["plain"] for r in four_ranks):
        assert abs(loss - ref_loss) <= RTOL * abs(ref_loss)
        assert grad_err <= RTOL


def test_block_kv_buffer_mib_reaches_the_attention(four_ranks):
    """The block's budget (one KV head per gather) issues what "kv_head_chunk": 1 with "regather"
    issues, and both train as the one-process model does."""
    for rank_out in four_ranks:
        budget, chunked = (rank_out["budget"][name] for name in BUDGET_BLOCKS)
        for steps, params_err, _ in (budget, chunked):
            _assert_matches(BUDGET_CASE, steps, params_err)
        assert budget[2] == chunked[2], (budget[2], chunked[2])
        # per step: one micro-batch x 2 layers x 3 one-head chunks, gathered again in backward
        assert (budget[2]["all_gather_into_tensor"], budget[2][DKV]) == (
            STEPS * 2 * 3 * 2, STEPS * 2 * 3), budget[2]
    steps, params_err, _ = four_ranks[0]["budget"]["budget"]
    print(f"\nHF + DeepSpeed, block kv_buffer_mib={ONE_HEAD_BUDGET_MIB:.6g} (one KV head per gather): worst rel. "
          f"loss {max(abs(l - r) / abs(r) for r, l, _ in steps):.2e}, gradients {max(e for _, _, e in steps):.2e}, "
          f"parameters {params_err:.2e} (tolerance {RTOL})")


def test_refused_settings_name_themselves(four_ranks):
    for found in (r["refusals"] for r in four_ranks):
        _check_refusals(found)


def _check_refusals(found):
    assert "attn_temperature_tuning" in found["temperature"] and "16 tokens (floor_scale=8)" in found["temperature"]
    assert "padding" in found["padding"]
    assert "position_ids" in found["positions"] and "shard_causal_lm_batch" in found["positions"]
    assert "dropout=0.1" in found["dropout"]
    assert "left or interior padding" in found["left_padding"]
    assert "not divisible" in found["length"]


def test_models_that_bypass_the_attention_registry_are_refused():
    """Bloom (ALiBi) computes attention itself: it builds with attn_implementation="lss" and would then
    attend each rank's shard alone. Refused by name before DeepSpeed starts; a registry model passes."""
    import lss_plugin.hf as hf
    from lss_plugin.hf.attention import check_model_runs_lss
    from transformers import BloomConfig, BloomForCausalLM

    bloom = BloomForCausalLM(BloomConfig(vocab_size=256, hidden_size=16, n_layer=1, n_head=2))
    bloom.config._attn_implementation = "lss"  # what attn_implementation="lss" leaves on such a model
    config = {"train_batch_size": 1, "lss_sequence_parallel": {"enabled": True, "size": 1}}
    with pytest.raises(ValueError, match=r"BloomForCausalLM computes its attention itself"):
        hf.deepspeed_initialize(model=bloom, config=config)
    llama = hf.build_causal_lm(hf.small_causal_lm_config("llama", hidden_size=16, num_heads=2, num_layers=1),
                               attn_implementation="lss")
    check_model_runs_lss(llama)  # goes through the registry: nothing to refuse
