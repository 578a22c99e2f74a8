"""Adapter inputs that used to be accepted and silently ignored are refused by name, or work exactly.

transformers: attention arguments LSS does not implement are refused by name, not dropped.
gpt-oss passes its attention sinks as ``s_aux``; a caller may pass packed-sequence boundaries
(``cu_seq_lens_q/k``). Both used to be swallowed by ``**kwargs`` and ignored. On one rank (an SP
group of one, so LSS must equal SDPA) the common families still run and match SDPA within 1e-5
(float32, relative), and those two are refused naming the argument.

lss_plugin.models.gpt: position_ids that are not this rank's global positions under the layout
(local positions, another layout) are refused; the right ones give the one-process logits
(float64, 1e-10).
"""
from __future__ import annotations

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


def _gpt_positions():
    import torch.distributed as dist

    import lss_plugin
    from lss_plugin.models.gpt import GPT, GPTConfig, LSSAttentionOptions
    from lss_plugin.sharding import local_token_indices

    lss_plugin.init_topology(dist.get_world_size())
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


def test_reference_gpt_refuses_positions_of_another_layout():
    for error, refused in run_ranks(_gpt_positions, 2, timeout_s=120):
        assert error < 1e-10
        assert refused is not None and "under layout 'balanced'" in refused and "local_positions" in refused
