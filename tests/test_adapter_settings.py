"""Adapter inputs that used to be accepted and silently ignored are refused by name, or work exactly.

transformers: attention arguments LSS does not implement are refused by name, not dropped.
A caller may pass an argument LSS does not implement (``seq_idx``) or packed-sequence boundaries
that do not cover the batch (``cu_seq_lens_q/k``); both used to be swallowed by ``**kwargs`` and
ignored. On one rank (an SP group of one, so LSS must equal SDPA) the common families still run and
match SDPA within 1e-5 (float32, relative), gpt-oss's sinks (``s_aux``, issue 28) match its eager
attention, and those two are refused naming the argument.

lss_plugin.models.gpt: position_ids that are not this rank's global positions under the layout
(local positions, another layout) are refused; the right ones give the one-process logits
(float64, 1e-10).

The budget of kv_head_chunk="auto" (kv_buffer_mib) in the adapters' options: beside a numeric or
all-heads chunk it is refused naming both settings; ``LSSAttentionOptions(kv_buffer_mib=...)`` sized
for one KV head per gather runs the collectives of ``kv_head_chunk=1`` with regather and gives the
one-process logits and gradients (float64, 1e-10), a larger LSS_KV_BUFFER_MIB set beside it.

One settings object: every AttentionSettings field, set to non-default values, goes through every
adapter's own spelling (Megatron flags into a megatron-core GPTModel, register_lss_attention keywords
into a transformers model, the DeepSpeed block's keys, the bundled GPT, LSSAttention) and the settings
lss_attention received are compared with the case (one rank). Settings that used to be accepted and
not applied are refused by name: LSS_KV_BUFFER_MIB beside a fixed chunk (every adapter; at a call on
every rank of 2, before any collective), a model whose attention differs from the DeepSpeed block, a
registered hybrid over other ranks than Megatron's CP group (4 ranks).
"""
from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

from tests.distributed import run_ranks
from tests.test_attention import DKV  # gloo: the dK,dV all-to-all

L = 8


def _cases():
    import lss_plugin
    import lss_plugin.hf as hf

    lss_plugin.init_topology(1)
    ids = torch.randint(0, 256, (2, L), generator=torch.Generator().manual_seed(0))
    errors, refusals = {}, {}
    for model_type in ("llama", "gpt2", "mistral", "qwen2"):
        config = hf.small_causal_lm_config(model_type, hidden_size=16, num_heads=2, num_layers=1)
        ref = hf.build_causal_lm(config, attn_implementation="sdpa")(ids).logits
        out = hf.build_causal_lm(config)(ids).logits
        errors[model_type] = ((out - ref).abs().max() / ref.abs().max()).item()

    def refusal(run):
        try:
            run()
        except ValueError as e:
            return str(e)
        return None

    oss = hf.small_causal_lm_config("gpt_oss", hidden_size=16, num_heads=2, num_kv_heads=1, num_layers=1,
                                    num_local_experts=2, num_experts_per_tok=1)
    ref = hf.build_causal_lm(oss, attn_implementation="eager")(ids).logits  # sdpa has no sinks
    errors["gpt_oss"] = ((hf.build_causal_lm(oss)(ids).logits - ref).abs().max() / ref.abs().max()).item()
    llama = hf.build_causal_lm(hf.small_causal_lm_config("llama", hidden_size=16, num_heads=2, num_layers=1))
    refusals["seq_idx"] = refusal(lambda: llama(ids, seq_idx=torch.zeros_like(ids, dtype=torch.int32)))
    cu = torch.tensor([0, 4, 8, 12, 16], dtype=torch.int32)
    refusals["cu_seq_lens_q"] = refusal(lambda: llama(ids.reshape(1, -1), cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                                      max_length_q=4, max_length_k=4))
    return errors, refusals


def test_unknown_attention_arguments_are_refused_and_known_families_still_match_sdpa():
    (errors, refusals), = run_ranks(_cases, 1, timeout_s=240)
    for model_type, err in errors.items():
        assert err < 1e-5, (model_type, err)
    assert set(errors) == {"llama", "gpt2", "mistral", "qwen2", "gpt_oss"}, errors
    assert refusals["seq_idx"] is not None and "['seq_idx']" in refusals["seq_idx"] and "Llama" in refusals["seq_idx"]
    assert refusals["cu_seq_lens_q"] is not None and "cu_seq_lens_q" in refusals["cu_seq_lens_q"]


def _gpt_cases():
    import torch.distributed as dist

    import lss_plugin

    lss_plugin.init_topology(dist.get_world_size())
    return {"positions": _gpt_positions(), "budget": _gpt_budget()}


def _gpt_positions():
    import torch.distributed as dist

    import lss_plugin
    from lss_plugin.models.gpt import GPT, GPTConfig, LSSAttentionOptions
    from lss_plugin.sharding import local_token_indices

    rank, world = dist.get_rank(), dist.get_world_size()
    config = GPTConfig(max_seq_length=16, hidden_size=16, num_heads=2, num_layers=1, position_embedding="rope")
    torch.manual_seed(0)
    reference = GPT(config).double()
    model = GPT(config, lss=LSSAttentionOptions(layout="balanced")).double()
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    idx = local_token_indices(16, rank, world, "balanced")
    out = model(ids[:, idx], lss_plugin.local_positions(16, layout="balanced"))
    error = (out - reference(ids)[:, idx]).abs().max().item()
    try:
        model(ids[:, idx], lss_plugin.local_positions(16, layout="contiguous"))
        refused = None
    except ValueError as e:
        refused = str(e)
    return error, refused


# 4 KV heads of head dim 4, batch 1 of L = 16 in float64: one KV head of gathered K,V is
# 2 * 16 * 4 * 8 B = 1 KiB. 3 KiB holds two one-head chunks in flight, not two of two heads (4 KiB).
ONE_HEAD_BUDGET_MIB = 3 * 1024 / 2**20
BUDGET_OPTIONS = {"budget": {"kv_buffer_mib": ONE_HEAD_BUDGET_MIB},
                  "chunk1_regather": {"kv_head_chunk": 1, "kv_backward": "regather"}}


def _gpt_budget():
    """Per BUDGET_OPTIONS: (max logits error, max gradient error vs one process, collective calls)."""
    import torch.distributed as dist

    import lss_plugin
    from lss_plugin.models.gpt import GPT, GPTConfig, LSSAttentionOptions
    from lss_plugin.options import KV_BUFFER_ENV
    from lss_plugin.sharding import local_token_indices

    config = GPTConfig(max_seq_length=16, hidden_size=16, num_heads=4, num_layers=1)
    torch.manual_seed(0)
    reference = GPT(config).double()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    ref_logits = reference(ids)  # [1, L, V]
    ref_logits.square().sum().backward()
    idx = local_token_indices(16, dist.get_rank(), dist.get_world_size(), "balanced")
    out = {}
    for name, options in BUDGET_OPTIONS.items():
        model = GPT(config, lss=LSSAttentionOptions(**options)).double()
        model.load_state_dict(reference.state_dict())
        env = {KV_BUFFER_ENV: "1024"} if "kv_buffer_mib" in options else {}  # alone: all 4 heads at once
        with mock.patch.dict(os.environ, env), lss_plugin.record_collectives() as rec:
            logits = model(ids[:, idx], lss_plugin.local_positions(16, layout="balanced"))  # [1, L/N, V]
            logits.square().sum().backward()
            lss_plugin.average_gradients(model.parameters(), lss_plugin.get_topology())
        # the loss is a sum over tokens: the full gradient is the sum over ranks, the average times N
        grad_error = max((p.grad * dist.get_world_size() - r.grad).abs().max().item()
                         for p, r in zip(model.parameters(), reference.parameters()))
        calls = dict(rec.calls)  # the verdicts included: one per lss_attention forward and backward
        out[name] = ((logits - ref_logits[:, idx]).abs().max().item(), grad_error, calls)
    return out


@pytest.fixture(scope="module")
def gpt_cases():
    return run_ranks(_gpt_cases, 2, timeout_s=120)


def test_reference_gpt_refuses_positions_of_another_layout(gpt_cases):
    for result in gpt_cases:
        error, refused = result["positions"]
        assert error < 1e-10
        assert refused is not None and "under layout 'balanced'" in refused and "local_positions" in refused


def test_reference_gpt_budget_runs_one_head_chunks_exactly(gpt_cases):
    for result in gpt_cases:
        budget, chunked = (result["budget"][name] for name in BUDGET_OPTIONS)
        for logits_error, grad_error, _ in (budget, chunked):
            assert logits_error < 1e-10 and grad_error < 1e-10, (logits_error, grad_error)
        assert budget[2] == chunked[2], (budget[2], chunked[2])
        # one layer, 4 one-head chunks: gathered in forward and again in backward, reduce-scattered once
        assert (budget[2]["all_gather_into_tensor"], budget[2][DKV]) == (8, 4), budget[2]


def test_a_budget_beside_a_fixed_chunk_is_refused_by_every_adapter_option():
    import lss_plugin.hf as hf
    from lss_plugin.models.gpt import LSSAttentionOptions
    from lss_plugin.options import AttentionSettings

    for make in (LSSAttentionOptions, AttentionSettings, lambda **kw: hf.register_lss_attention("lss_budget", **kw)):
        for chunk in (2, None):
            with pytest.raises(ValueError, match=rf"kv_buffer_mib \(64\) is the budget of kv_head_chunk='auto', "
                                                 rf"got kv_head_chunk={chunk}"):
                make(kv_head_chunk=chunk, kv_buffer_mib=64)
        with pytest.raises(ValueError, match="kv_buffer_mib must be a positive number of MiB"):
            make(kv_buffer_mib=0)
    assert hf.register_lss_attention("lss_budget", kv_buffer_mib=64) == "lss_budget"
    assert hf.lss_options("lss_budget").settings.kv_buffer_mib == 64


# --- one settings object: every AttentionSettings field through every adapter -----------------------
# Each case differs from the defaults in some fields (kv_buffer_mib needs kv_head_chunk "auto", so no
# one case can change every field); test_every_field_is_swept refuses a field no case changes.
SWEEP_CASES = {
    "contiguous_regather_chunk1_input": dict(layout="contiguous", kv_backward="regather", kv_head_chunk=1,
                                             kv_grad_dtype="input", kv_exchange="gather"),
    "keep_all_heads": dict(kv_backward="keep", kv_head_chunk=None, kv_exchange="sparse"),
    "budget": dict(kv_buffer_mib=64.0),
    "link": dict(link_gbit=1.0),
}


def test_every_field_is_swept():
    from lss_plugin.options import AttentionSettings, setting_fields

    cases = [AttentionSettings(**case) for case in SWEEP_CASES.values()]
    unswept = [f.name for f in setting_fields() if all(getattr(c, f.name) == f.default for c in cases)]
    assert not unswept, f"add a SWEEP_CASES entry with a non-default {unswept}"


def _received(run) -> list:
    """The settings (and leftover keywords) every lss_attention call inside ``run()`` received."""
    import lss_plugin.attention as core

    seen, real = [], core.settings_from_keywords

    def record(settings, keywords, where):
        if where == "lss_attention":
            seen.append((settings, dict(keywords)))
        return real(settings, keywords, where)

    with mock.patch.object(core, "settings_from_keywords", record):
        run()
    return seen


def _megatron(settings, ids):
    """The bundled Megatron script's parser (its --lss-* flags), validation and model: a megatron-core
    GPTModel built with the LSS layer spec, one forward."""
    from lss_plugin.megatron import pretrain
    from lss_plugin.megatron.model import GPTShape, build_gpt_model
    from lss_plugin.megatron.parallel import destroy_lss_model_parallel
    from lss_plugin.options import FLAGS

    argv = ["--lss-sequence-parallel", "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
            "--seq-length", str(L), "--micro-batch-size", "1", "--global-batch-size", "1"]
    for flag, value in settings.names(FLAGS).items():
        if value is not None or flag == "--lss-kv-head-chunk":  # unset kv_buffer_mib: no flag
            argv += [flag, FLAGS.spell(value)]
    args = pretrain.parse_args(argv, world_size=1)
    pretrain.setup_parallel(args)
    try:
        model = build_gpt_model(args, GPTShape.from_args(args))
        positions = torch.arange(L)[None]  # [1, L]
        return _received(lambda: model(ids[:1], positions, None))
    finally:
        destroy_lss_model_parallel()


def _transformers(settings, ids):
    import lss_plugin.hf as hf
    from lss_plugin.options import KEYWORDS

    hf.register_lss_attention("lss_sweep", **settings.names(KEYWORDS))
    config = hf.small_causal_lm_config("llama", hidden_size=16, num_heads=2, num_layers=1)
    model = hf.build_causal_lm(config, attn_implementation="lss_sweep")
    return _received(lambda: model(ids))


def _deepspeed(settings, ids):
    """The block's keys -> lss_plugin.hf.deepspeed_initialize -> the model's attention."""
    import lss_plugin.hf as hf
    from lss_plugin.deepspeed import BLOCK_KEY
    from lss_plugin.options import BLOCK_KEYS

    config = {"train_batch_size": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
              BLOCK_KEY: {"size": 1, **settings.names(BLOCK_KEYS)}}
    hf.register_lss_attention("lss_ds_sweep")  # the defaults: the block's keys must replace them
    model = hf.build_causal_lm(hf.small_causal_lm_config("llama", hidden_size=16, num_heads=2, num_layers=1),
                               attn_implementation="lss_ds_sweep")
    engine, *_ = hf.deepspeed_initialize(model=model, config=config)
    return _received(lambda: engine(ids))


def _bundled_gpt(settings, ids):
    import lss_plugin
    from lss_plugin.models.gpt import GPT, GPTConfig, LSSAttentionOptions
    from lss_plugin.options import KEYWORDS

    model = GPT(GPTConfig(max_seq_length=L, hidden_size=16, num_heads=2, num_layers=1),
                LSSAttentionOptions(**settings.names(KEYWORDS)))
    return _received(lambda: model(ids, lss_plugin.local_positions(L, layout=settings.layout)))


def _module(settings, ids):
    import lss_plugin
    from lss_plugin.options import KEYWORDS

    attention = lss_plugin.LSSAttention(**settings.names(KEYWORDS))
    q = torch.randn(1, L, 2, 4, generator=torch.Generator().manual_seed(0))  # [b, s, H, d]
    return _received(lambda: attention(q, q, q))


ADAPTERS = {"megatron": _megatron, "transformers": _transformers, "deepspeed": _deepspeed,
            "bundled_gpt": _bundled_gpt, "LSSAttention": _module}


def _sweep():
    """{(case, adapter): [(settings, keywords) per lss_attention call]} on one rank."""
    import lss_plugin
    from lss_plugin.options import AttentionSettings

    ids = torch.randint(0, 256, (2, L), generator=torch.Generator().manual_seed(0))
    out = {}
    for case, values in SWEEP_CASES.items():
        for adapter, run in ADAPTERS.items():
            if not lss_plugin.is_topology_initialized():  # the Megatron adapter registers (and destroys) its own
                lss_plugin.init_topology(1)
            out[case, adapter] = run(AttentionSettings(**values), ids)
    return out


def test_every_setting_reaches_the_core_from_every_adapter():
    from lss_plugin.options import AttentionSettings

    (received,) = run_ranks(_sweep, 1, timeout_s=420)
    for (case, adapter), calls in received.items():
        expected = AttentionSettings(**SWEEP_CASES[case])
        assert calls, (case, adapter, "no lss_attention call")
        for settings, keywords in calls:
            assert settings == expected and keywords == {}, (case, adapter, settings, keywords)


# --- settings accepted and not applied: refused by name before training ----------------------------

def test_kv_buffer_env_beside_a_fixed_chunk_is_refused_by_every_adapter(monkeypatch):
    """LSS_KV_BUFFER_MIB is the budget of kv_head_chunk "auto" only; beside a fixed chunk it used to be
    ignored. Each adapter refuses it when it is configured, naming the variable and its own chunk setting."""
    import argparse

    import lss_plugin.hf as hf
    from lss_plugin.deepspeed import LSSConfig, LSSConfigError
    from lss_plugin.megatron.args import add_lss_args, validate_lss_args
    from lss_plugin.models.gpt import LSSAttentionOptions
    from lss_plugin.options import KV_BUFFER_ENV, AttentionSettings

    monkeypatch.setenv(KV_BUFFER_ENV, "64")
    for make in (AttentionSettings, LSSAttentionOptions, lambda **kw: hf.register_lss_attention("lss_env", **kw)):
        with pytest.raises(ValueError, match=r"LSS_KV_BUFFER_MIB=64 is the budget of kv_head_chunk='auto', "
                                             r"got kv_head_chunk=1"):
            make(kv_head_chunk=1)
    parser = add_lss_args(argparse.ArgumentParser())
    with pytest.raises(ValueError, match=r"LSS_KV_BUFFER_MIB=64 is the budget of --lss-kv-head-chunk=auto, "
                                         r"got --lss-kv-head-chunk=all"):
        validate_lss_args(parser.parse_args(["--lss-sequence-parallel", "--lss-kv-head-chunk", "all"]), world_size=2)
    with pytest.raises(LSSConfigError, match=r'"lss_sequence_parallel": LSS_KV_BUFFER_MIB=64 is the budget of '
                                             r'"kv_head_chunk"="auto", got "kv_head_chunk"=2'):
        LSSConfig.from_dict({"size": 2, "kv_head_chunk": 2})
    # with "auto" it is the budget, and an explicit kv_buffer_mib wins over it
    assert AttentionSettings(kv_buffer_mib=8).kv_buffer_mib == 8 and AttentionSettings().kv_head_chunk == "auto"


def _env_set_after_configuring():
    """Settings checked without the variable, then LSS_KV_BUFFER_MIB set on every rank: the next call
    refuses it in its verdict, before any K/V collective, and the group still works."""
    import torch.distributed as dist

    import lss_plugin
    from lss_plugin.options import KV_BUFFER_ENV

    lss_plugin.init_topology(dist.get_world_size())
    attention = lss_plugin.LSSAttention(kv_head_chunk=1)
    q = torch.randn(1, 4, 2, 4, generator=torch.Generator().manual_seed(dist.get_rank()))  # [b, s_local, H, d]
    with mock.patch.dict(os.environ, {KV_BUFFER_ENV: "64"}), lss_plugin.record_collectives() as rec:
        try:
            attention(q, q, q)
            refused = None
        except ValueError as err:
            refused = str(err)
    total = torch.ones(1)
    dist.all_reduce(total)
    return refused, dict(rec.calls), total.item()


def test_kv_buffer_env_set_after_configuring_is_refused_at_the_call_on_every_rank():
    for refused, collectives, total in run_ranks(_env_set_after_configuring, 2, timeout_s=120):
        assert refused is not None and "LSS_KV_BUFFER_MIB=64 is the budget of kv_head_chunk='auto'" in refused
        # only the fixed-size verdict and its messages ran (lss_plugin.verdict), no K/V collective
        assert collectives == {"verdict": 1, "verdict_messages": 1} and total == 2.0


def _deepspeed_model_checks():
    import lss_plugin
    import lss_plugin.deepspeed as lds
    import lss_plugin.hf as hf
    from lss_plugin.deepspeed import BLOCK_KEY
    from lss_plugin.models.gpt import GPT, GPTConfig, LSSAttentionOptions

    def config(**block):
        return {"train_batch_size": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
                BLOCK_KEY: {"size": 1, **block}}

    gpt = GPTConfig(max_seq_length=L, hidden_size=16, num_heads=2, num_layers=2)

    class Custom(torch.nn.Module):  # a model of one's own around LSSAttention
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.attention = lss_plugin.LSSAttention(kv_grad_dtype="input")

    hf.register_lss_attention("lss_other", kv_backward="keep")
    llama = hf.build_causal_lm(hf.small_causal_lm_config("llama", hidden_size=16, num_heads=2, num_layers=1),
                               attn_implementation="lss_other")
    models = {
        "gpt_other_layout": (GPT(gpt, LSSAttentionOptions(layout="contiguous")), config()),
        "gpt_without_lss": (GPT(gpt), config()),
        "custom_grad_dtype": (Custom(), config()),
        "hf_registered_other": (llama, config()),
        "gpt_same": (GPT(gpt, LSSAttentionOptions(layout="contiguous", kv_grad_dtype="input")),
                     config(layout="contiguous", kv_grad_dtype="input")),
    }
    out = {}
    for name, (model, ds_config) in models.items():
        try:
            lds.initialize(model=model, config=ds_config)
            out[name] = None
        except lds.LSSConfigError as err:
            out[name] = str(err)
        lss_plugin.destroy_topology()
    return out


def test_deepspeed_refuses_a_model_whose_attention_runs_other_settings_than_the_block():
    """The block's layout / kv_* keys are applied by the model's own attention: a model built with other
    settings (or none) is refused by name before DeepSpeed starts, instead of training with its own."""
    (out,) = run_ranks(_deepspeed_model_checks, 1, timeout_s=240)
    assert out["gpt_same"] is None
    assert "blocks.0.attn runs \"layout\"='contiguous' (not 'balanced')" in out["gpt_other_layout"]
    assert "blocks.1.attn" in out["gpt_other_layout"] and 'the "lss_sequence_parallel" block' in out["gpt_other_layout"]
    assert "blocks.0.attn runs one-process attention" in out["gpt_without_lss"]
    assert "attention runs \"kv_grad_dtype\"='input' (not 'fp32')" in out["custom_grad_dtype"]
    assert "LlamaForCausalLM" in out["hf_registered_other"] and \
        "\"kv_backward\"='keep' (not 'auto')" in out["hf_registered_other"]


def _hybrid_over_other_ranks():
    """A registered hybrid (U = 2 over all 4 ranks) and a context-parallel group of 2 other ranks."""
    import torch.distributed as dist

    import lss_plugin
    from lss_plugin.megatron.parallel import lss_group_for

    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    cp_group = pairs[dist.get_rank() // 2]
    lss_plugin.init_topology(4, ulysses_size=2)
    try:
        lss_group_for(cp_group)
        refused = None
    except ValueError as err:
        refused = str(err)
    lss_plugin.destroy_topology()
    return refused, lss_group_for(cp_group)[1]  # nothing registered: pure LSS over the group


def test_megatron_refuses_a_registered_hybrid_over_other_ranks_than_the_cp_group():
    """Attention used to fall back to pure LSS (U = 1) there, while get_batch_on_this_lss_rank sliced the
    batch with the registered U: refused on every rank instead."""
    for refused, alone in run_ranks(_hybrid_over_other_ranks, 4, timeout_s=180):
        assert refused is not None and "ulysses_size=2 over the sequence-parallel ranks [0, 1, 2, 3]" in refused
        assert "context-parallel group is [" in refused and alone == 1
