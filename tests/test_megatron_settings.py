"""Megatron settings LSS used to accept and silently ignore: each works exactly or is refused by name.

- attention masks (``causal``, ``padding_causal``, ``no_mask``, ``padding`` with a mask): exact
  against the one-process SDPA reference (float32, 1e-5 relative) when the mask adds nothing to
  what LSS applies; refused on EVERY rank (NotImplementedError naming the mask type) when it would
  pad or split documents, even though only some ranks' rows are affected;
- ``cp_comm_type``: refused by name unless unset or "lss";
- rotary embeddings ``rope``, ``yarn``, ``mrope``: this rank's rows of megatron-core's own
  full-sequence table in both layouts (exact, the same floats); other rotary classes refused;
- Megatron-LM flag mapping: one line naming every value changed (``--transformer-impl``,
  ``--cp-comm-type``, ...), explicit other ``--cp-comm-type`` values refused.
All on 2 ranks with real megatron-core modules and a real gloo CP group.
"""
from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_ranks

TOL = 1e-5  # float32, max |out - ref| / max |ref|
L, B, HEADS, D = 8, 2, 2, 8


def _attention_cases():
    import torch.distributed as dist
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from lss_plugin.megatron.attention import configured_lss_attention
    from lss_plugin.options import LAYOUTS
    from lss_plugin.sharding import local_token_indices

    rank, world = dist.get_rank(), dist.get_world_size()
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * D, num_attention_heads=HEADS,
                               attention_dropout=0.0, context_parallel_size=world)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(L, B, HEADS, D, generator=gen) for _ in range(3))  # [L, b, h, d], same on every rank

    def reference(causal):
        out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=causal)
        return out.permute(2, 0, 1, 3).reshape(L, B, HEADS * D)  # [L, b, h*d]

    causal_mask = torch.ones(L, L, dtype=torch.bool).triu(1)[None, None]  # [1, 1, L, L], True = hidden
    key_padding = (torch.arange(L) >= L - 2)[None, None, None, :]  # the last two keys are padding
    documents = causal_mask | (torch.arange(L)[:, None] // 4 != torch.arange(L)[None, :] // 4)  # two documents
    # The padding keys hidden from the queries before them only: 2 * (L - 2) pairs, every one of them
    # in a query's future (a check that compared local positions, or ignored causality, refuses it).
    padding_in_future = key_padding & (torch.arange(L) < L - 2)[None, None, :, None]  # [1, 1, L, L]
    assert padding_in_future.sum() == 2 * (L - 2) and not (padding_in_future & ~causal_mask).any()
    # ... and one pair more that causality shows: query L - 2 and its own key (j <= i is visible).
    padding_one_visible = padding_in_future.clone()
    padding_one_visible[..., L - 2, L - 2] = True
    results = {}
    for layout in LAYOUTS:
        cls = configured_lss_attention(layout=layout)
        idx = local_token_indices(L, rank, world, layout)
        local = [t[idx] for t in (q, k, v)]  # [s_local, b, h, d]

        def run(mask_type, mask):
            return cls(config, 1, mask_type, "self")(*local, None if mask is None else mask[:, :, idx]
                                                     if mask.shape[2] == L else mask)

        def error(mask_type, mask, causal):
            ref = reference(causal)[idx]
            return ((run(mask_type, mask) - ref).abs().max() / ref.abs().max()).item()

        def refusal(mask_type, mask):
            try:
                run(mask_type, mask)
            except (NotImplementedError, ValueError) as e:
                return f"{type(e).__name__}: {e}"
            return None

        results[layout] = {
            "exact": {
                "causal, no mask": error(AttnMaskType.causal, None, True),
                "causal, causal mask": error(AttnMaskType.causal, causal_mask, True),
                "padding_causal, no mask": error(AttnMaskType.padding_causal, None, True),
                "padding_causal, causal mask": error(AttnMaskType.padding_causal, causal_mask, True),
                "padding_causal, key padding hidden by causality anyway":
                    error(AttnMaskType.padding_causal, padding_in_future, True),
                "no_mask, all visible": error(AttnMaskType.no_mask, torch.zeros(1, 1, 1, L, dtype=torch.bool), False),
                "padding, no padding": error(AttnMaskType.padding, torch.zeros(B, 1, 1, L, dtype=torch.bool), False),
            },
            "refused": {
                "padding_causal": refusal(AttnMaskType.padding_causal, causal_mask | key_padding),
                "padding_causal, one visible pair": refusal(AttnMaskType.padding_causal, padding_one_visible),
                "causal": refusal(AttnMaskType.causal, documents),
                "no_mask": refusal(AttnMaskType.no_mask, key_padding),
                "padding": refusal(AttnMaskType.padding, key_padding),
                "shape": refusal(AttnMaskType.causal, torch.zeros(1, 1, L // world, L // world, dtype=torch.bool)),
            },
            "after": error(AttnMaskType.causal, None, True),  # the group is still in step
        }
    try:
        cls(config, 1, AttnMaskType.causal, "self", cp_comm_type="p2p")
        results["cp_comm_type"] = None
    except ValueError as e:
        results["cp_comm_type"] = str(e)
    cls(config, 1, AttnMaskType.causal, "self", cp_comm_type="lss")  # the value the Megatron-LM mapping sets
    return results


def _rotary_cases():
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rotary_pos_embedding import (
        MultimodalRotaryEmbedding,
        RotaryEmbedding,
    )
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

    from lss_plugin.megatron.rope import adopt_rotary
    from lss_plugin.options import LAYOUTS
    from lss_plugin.sharding import local_token_indices

    rank, world = dist.get_rank(), dist.get_world_size()
    cp = parallel_state.get_context_parallel_group()
    seq = 16
    t = torch.arange(seq)
    position_ids = torch.stack([t, t // 2, t % 3])[:, None, :].expand(3, B, seq)  # [3, b, L]: distinct sections
    # YarnRotaryEmbedding fills a cache through its CP-sliced forward while it is built, which needs
    # CUDA (pin_memory): build it over a one-rank group here, then give it the CP group as GPTModel would.
    alone = [dist.new_group([r]) for r in range(world)][rank]
    makers = {
        "rope": (lambda: RotaryEmbedding(kv_channels=D, rotary_percent=1.0, use_cpu_initialization=True),
                 lambda m: m(seq)),
        "yarn": (lambda: _with_group(YarnRotaryEmbedding(kv_channels=D, scaling_factor=4.0, use_cpu_initialization=True,
                                                         original_max_position_embeddings=4, cp_group=alone), cp),
                 lambda m: m(seq)[0]),
        "mrope": (lambda: MultimodalRotaryEmbedding(kv_channels=D, rotary_percent=1.0),
                  lambda m: m(position_ids, [1, 1, 2])),
    }
    out = {}
    for name, (make, call) in makers.items():
        whole = make()
        whole.cp_group = None  # megatron-core's table for the whole sequence, as on one device
        full = call(whole)  # [L, ...]
        for layout in LAYOUTS:
            lss = adopt_rotary(make(), layout)
            assert lss.cp_group is cp and cp.size() == world
            rows = call(lss)
            out[(name, layout)] = (tuple(rows.shape), torch.equal(rows, full[local_token_indices(seq, rank, world, layout)]))
    try:
        adopt_rotary(torch.nn.Identity(), "contiguous")
        out["unknown"] = None
    except TypeError as e:
        out["unknown"] = str(e)
    return out


def _with_group(module, group):
    module.cp_group = group
    return module


def _all_cases():
    from lss_plugin.megatron.cpu_shim import apply_cpu_shim
    from lss_plugin.megatron.parallel import initialize_lss_model_parallel

    apply_cpu_shim()
    initialize_lss_model_parallel(2, timeout_s=60)
    return {"attention": _attention_cases(), "rotary": _rotary_cases()}


@pytest.fixture(scope="module")
def per_rank():
    return run_ranks(_all_cases, 2, timeout_s=300, pg_timeout_s=60)


def test_masks_that_add_nothing_are_exact(per_rank):
    for result in per_rank:
        for layout in ("contiguous", "balanced"):
            cases = result["attention"][layout]
            for name, err in cases["exact"].items():
                assert err < TOL, (layout, name, err)
            assert cases["after"] < TOL


def test_padding_and_document_masks_are_refused_on_every_rank_by_mask_type(per_rank):
    for result in per_rank:
        for layout in ("contiguous", "balanced"):
            refused = result["attention"][layout]["refused"]
            for mask_type in ("padding_causal", "causal", "no_mask", "padding"):
                assert refused[mask_type] is not None and refused[mask_type].startswith("NotImplementedError"), refused
                assert f"attn_mask_type={mask_type} " in refused[mask_type], refused[mask_type]
            assert refused["shape"].startswith("ValueError") and "attention_mask of shape (1, 1, 4, 4)" in refused["shape"]
            one = refused["padding_causal, one visible pair"]  # the one pair on the causal boundary, on every rank
            assert one is not None and "hides 1 (query, key) pairs a causal mask shows" in one, one


def test_cp_comm_type_is_refused_by_name(per_rank):
    for result in per_rank:
        assert "cp_comm_type='p2p'" in result["attention"]["cp_comm_type"]


def test_rotary_rows_follow_the_lss_layout_for_rope_yarn_and_mrope(per_rank):
    for result in per_rank:
        rotary = result["rotary"]
        for name in ("rope", "yarn", "mrope"):
            for layout in ("contiguous", "balanced"):
                shape, equal = rotary[(name, layout)]
                assert shape[0] == 8 and equal, (name, layout, shape)
        assert "Identity" in rotary["unknown"] and "MultimodalRotaryEmbedding" in rotary["unknown"]


# ---------------------------------------------------------------------------------------------
# Megatron-LM flag mapping (no processes)

def _megatron_lm_parser():
    """The Megatron-LM flags the mapping reads, with Megatron-LM's defaults (core_v0.16.1)."""
    p = argparse.ArgumentParser()
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--attention-dropout", type=float, default=0.0)
    p.add_argument("--context-parallel-size", type=int, default=1)
    p.add_argument("--calculate-per-token-loss", action="store_true")
    p.add_argument("--transformer-impl", default="transformer_engine")
    p.add_argument("--cp-comm-type", nargs="+", type=str, default=["p2p"])
    return p


def test_megatron_lm_mapping_says_what_it_changed_and_refuses_other_cp_comm_types(monkeypatch, capsys):
    from lss_plugin.megatron.megatron_lm import lss_extra_args_provider

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    parser = lss_extra_args_provider(_megatron_lm_parser())
    args = parser.parse_args(["--lss-sequence-parallel"])
    assert (args.transformer_impl, args.cp_comm_type, args.context_parallel_size) == ("local", ["lss"], 4)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    for change in ("--transformer-impl transformer_engine -> local (the LSS layer spec",
                   "--cp-comm-type p2p -> lss (LSS does its own communication)",
                   "--context-parallel-size 1 -> 4", "--calculate-per-token-loss False -> True"):
        assert change in lines[0], lines[0]
    parser.parse_args(["--seq-length", "256"])  # without LSS: nothing changes, nothing printed
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="--cp-comm-type a2a selects the communication"):
        parser.parse_args(["--lss-sequence-parallel", "--cp-comm-type", "a2a"])
    monkeypatch.setenv("RANK", "1")
    parser.parse_args(["--lss-sequence-parallel", "--transformer-impl", "local"])
    assert capsys.readouterr().out == ""  # only rank 0 prints


@pytest.mark.parametrize("flag,value,extra", [
    ("--spec", "my.module", ["--spec", "my.module"]),
    ("--multi-latent-attention", "True", ["--multi-latent-attention"]),
    ("--use-legacy-models", "True", ["--use-legacy-models"]),
    ("--moe-layer-freq", "2", ["--num-experts", "4", "--moe-layer-freq", "2"]),
])
def test_megatron_lm_flags_the_lss_spec_would_bypass_are_refused(monkeypatch, flag, value, extra):
    from lss_plugin.megatron.megatron_lm import lss_extra_args_provider

    monkeypatch.setenv("WORLD_SIZE", "4")
    p = _megatron_lm_parser()
    p.add_argument("--spec", default=None)
    p.add_argument("--multi-latent-attention", action="store_true")
    p.add_argument("--use-legacy-models", action="store_true")
    p.add_argument("--num-experts", type=int, default=None)
    p.add_argument("--moe-layer-freq", type=int, default=1)
    parser = lss_extra_args_provider(p)
    with pytest.raises(ValueError, match=f"cannot honour {flag} {value}"):
        parser.parse_args(["--lss-sequence-parallel", *extra])
    parser.parse_args(extra)  # without LSS they are Megatron-LM's business
