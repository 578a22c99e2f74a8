"""Adapter inputs that used to be accepted and silently ignored are refused by name, or work exactly.

transformers: attention arguments LSS does not implement are refused by name, not dropped.
gpt-oss passes its attention sinks as ``s_aux``; a caller may pass packed-sequence boundaries
(``cu_seq_lens_q/k``). Both used to be swallowed by ``**kwargs`` and ignored. On one rank (an SP
group of one, so LSS must equal SDPA) the common families still run and match SDPA within 1e-5
(float32, relative), and those two are refused naming the argument.

lss_plugin.models.gpt: position_ids that are not this rank's global positions under the layout
(local positions, another layout) are refused; the right ones give the one-process logits
(float64, 1e-10).

The budget of kv_head_chunk="auto" (kv_buffer_mib) in the adapters' options: beside a numeric or
all-heads chunk it is refused naming both settings; ``LSSAttentionOptions(kv_buffer_mib=...)`` sized
for one KV head per gather runs the collectives of ``kv_head_chunk=1`` with regather and gives the
one-process logits and gradients (float64, 1e-10), a larger LSS_KV_BUFFER_MIB set beside it.
"""
from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

from tests.distributed import run_ranks

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
    refusals["s_aux"] = refusal(lambda: hf.build_causal_lm(oss)(ids))
    llama = hf.build_causal_lm(hf.small_causal_lm_config("llama", hidden_size=16, num_heads=2, num_layers=1))
    cu = torch.tensor([0, 4, 8, 12, 16], dtype=torch.int32)
    refusals["cu_seq_lens_q"] = refusal(lambda: llama(ids.reshape(1, -1), cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                                      max_length_q=4, max_length_k=4))
    return errors, refusals


def test_unknown_attention_arguments_are_refused_and_known_families_still_match_sdpa():
    (errors, refusals), = run_ranks(_cases, 1, timeout_s=240)
    for model_type, err in errors.items():
        assert err < 1e-5, (model_type, err)
    assert refusals["s_aux"] is not None and "['s_aux']" in refusals["s_aux"] and "GptOss" in refusals["s_aux"]
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
        assert (budget[2]["all_gather_into_tensor"], budget[2]["reduce_scatter_tensor"]) == (8, 4), budget[2]


def test_a_budget_beside_a_fixed_chunk_is_refused_by_every_adapter_option():
    import lss_plugin.hf as hf
    from lss_plugin.hf.attention import LSSHFOptions
    from lss_plugin.models.gpt import LSSAttentionOptions

    for make in (LSSAttentionOptions, LSSHFOptions, lambda **kw: hf.register_lss_attention("lss_budget", **kw)):
        for chunk in (2, None):
            with pytest.raises(ValueError, match=rf"kv_buffer_mib \(64\) is the budget of kv_head_chunk='auto', "
                                                 rf"got kv_head_chunk={chunk}"):
                make(kv_head_chunk=chunk, kv_buffer_mib=64)
        with pytest.raises(ValueError, match="kv_buffer_mib must be a positive number of MiB"):
            make(kv_buffer_mib=0)
    assert hf.register_lss_attention("lss_budget", kv_buffer_mib=64) == "lss_budget"
    assert hf.lss_options("lss_budget").kv_buffer_mib == 64
