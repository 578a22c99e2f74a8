"""The LSS GPT layer spec: megatron-core's TE spec when TransformerEngine is importable, else its local
spec, with only the core attention swapped (and SelfAttention subclassed for packed RoPE rows). Without TE (this CPU machine) the TE branch is checked
for its error; with TE on a GPU (``gpu`` marker) for its structure and against TE's own attention.
"""
import argparse
import functools

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.models.gpt import gpt_layer_specs  # noqa: E402

from lss_plugin.options import AttentionSettings  # noqa: E402
from lss_plugin.megatron.attention import LSSDotProductAttention  # noqa: E402
from lss_plugin.megatron.self_attention import LSSSelfAttention  # noqa: E402
from lss_plugin.megatron.spec import (  # noqa: E402
    get_gpt_layer_lss_spec,
    get_gpt_layer_lss_spec_from_args,
    transformer_engine_available,
)
from tests.distributed import run_ranks  # noqa: E402

te_missing = pytest.mark.skipif(transformer_engine_available(), reason="TransformerEngine is importable here")
te_needed = pytest.mark.skipif(not transformer_engine_available(), reason="needs TransformerEngine")


def _same(a, b) -> bool:
    """Spec entries equal; megatron-core >= 0.19 builds some as a fresh ``functools.partial`` per
    call (partials compare by identity), so those compare by function, arguments and keywords."""
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):
        return a.func == b.func and a.args == b.args and a.keywords == b.keywords
    return a == b


def _same_except_core_attention(spec, base):
    """Every submodule of the layer and of its self-attention equals the base spec's, but the core
    attention; the self-attention module is megatron-core's, subclassed for packed RoPE rows."""
    layer, base_layer = spec.submodules, base.submodules
    for name in vars(base_layer):
        if name != "self_attention":
            assert _same(getattr(layer, name), getattr(base_layer, name)), name
    attn, base_attn = layer.self_attention.submodules, base_layer.self_attention.submodules
    for name in vars(base_attn):
        if name != "core_attention":
            assert _same(getattr(attn, name), getattr(base_attn, name)), name
    assert attn.core_attention is not base_attn.core_attention
    assert layer.self_attention.module is LSSSelfAttention
    assert issubclass(LSSSelfAttention, base_layer.self_attention.module)
    assert layer.self_attention.params == base_layer.self_attention.params


@te_missing
def test_without_transformer_engine_the_local_spec_is_the_base():
    spec = get_gpt_layer_lss_spec(qk_layernorm=True, normalization="RMSNorm", layout="balanced",
                                  kv_backward="regather", kv_head_chunk=2)
    _same_except_core_attention(spec, gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=True,
                                                                                normalization="RMSNorm"))
    core = spec.submodules.self_attention.submodules.core_attention
    assert issubclass(core, LSSDotProductAttention)
    assert core.lss_settings == AttentionSettings(layout="balanced", kv_backward="regather", kv_head_chunk=2)


@te_missing
def test_asking_for_transformer_engine_without_it_is_an_error():
    with pytest.raises(ValueError, match="'transformer_engine' needs TransformerEngine"):
        get_gpt_layer_lss_spec(transformer_impl="transformer_engine")
    args = argparse.Namespace(lss_layout="contiguous", lss_kv_backward="keep", transformer_impl="transformer_engine")
    with pytest.raises(ValueError, match="needs TransformerEngine"):
        get_gpt_layer_lss_spec_from_args(args)


def test_spec_arguments_are_checked_by_name():
    with pytest.raises(ValueError, match="transformer_impl 'inference_optimized' is not one of"):
        get_gpt_layer_lss_spec(transformer_impl="inference_optimized")
    with pytest.raises(ValueError, match="layout must be one of .* got 'zigzag'"):
        get_gpt_layer_lss_spec(layout="zigzag")
    with pytest.raises(ValueError, match="kv_backward must be one of .* got 'drop'"):
        get_gpt_layer_lss_spec(kv_backward="drop")
    with pytest.raises(ValueError, match="kv_head_chunk must be a positive integer, 'auto' or None, got 0"):
        get_gpt_layer_lss_spec(kv_head_chunk=0)
    with pytest.raises(ValueError, match=r"kv_buffer_mib \(64\) is the budget of kv_head_chunk='auto', got kv_head_chunk=None"):
        get_gpt_layer_lss_spec(kv_head_chunk=None, kv_buffer_mib=64)
    with pytest.raises(ValueError, match="kv_buffer_mib must be a positive number of MiB"):
        get_gpt_layer_lss_spec(kv_buffer_mib=-1)


def test_from_args_follows_transformer_impl_and_defaults_to_local():
    local = gpt_layer_specs.get_gpt_layer_local_spec()
    for extra in ({}, {"transformer_impl": "local"}):
        args = argparse.Namespace(lss_layout="contiguous", lss_kv_backward="keep", **extra)
        _same_except_core_attention(get_gpt_layer_lss_spec_from_args(args), local)
    args = argparse.Namespace(lss_layout="balanced", lss_kv_backward="auto", lss_kv_buffer_mib=8.0)
    core = get_gpt_layer_lss_spec_from_args(args).submodules.self_attention.submodules.core_attention
    # what each call passes lss_attention
    assert core.lss_settings == AttentionSettings(layout="balanced", kv_backward="auto", kv_buffer_mib=8.0)


# --- with TransformerEngine (GPU machines; `make gpu-check`) ------------------------------------

@pytest.mark.gpu
@te_needed
def test_with_transformer_engine_the_te_spec_is_the_base():
    spec = get_gpt_layer_lss_spec(qk_layernorm=True)
    assert get_gpt_layer_lss_spec(qk_layernorm=True, transformer_impl=None).submodules.self_attention \
        .submodules.linear_qkv == spec.submodules.self_attention.submodules.linear_qkv
    _same_except_core_attention(spec, gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True))
    assert issubclass(spec.submodules.self_attention.submodules.core_attention, LSSDotProductAttention)


def _te_model_against_lss_te_model():
    """One rank: the same GPT (TE linears and norms) with TE's attention and with LSS attention."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from lss_plugin.megatron.parallel import register_megatron_groups

    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=1)
    register_megatron_groups(timeout_s=60.0)
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                               attention_dropout=0.0, hidden_dropout=0.0, params_dtype=torch.float32)
    results = []
    state = None
    for spec in (gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(), get_gpt_layer_lss_spec()):
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=128, max_sequence_length=64).cuda()
        if state is None:
            state = model.state_dict()
        else:  # TE's core attention keeps only an _extra_state; every weight is shared
            missing, unexpected = model.load_state_dict(state, strict=False)
            assert all("core_attention" in key for key in missing + unexpected), (missing, unexpected)
        tokens = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
        positions = torch.arange(64, device="cuda").expand(2, 64)
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()
        grad = model.decoder.layers[0].self_attention.linear_qkv.weight.grad
        results.append((loss.item(), grad.detach().cpu()))
    parallel_state.destroy_model_parallel()
    return results


@pytest.mark.gpu
@te_needed
def test_lss_te_spec_matches_te_attention_on_one_rank():
    """float32; TE's attention and LSS's kernels differ only by rounding: 1e-4 relative."""
    (te_loss, te_grad), (lss_loss, lss_grad) = run_ranks(_te_model_against_lss_te_model, 1)[0]
    assert abs(te_loss - lss_loss) <= 1e-4 * abs(te_loss)
    assert (te_grad - lss_grad).abs().max() <= 1e-4 * te_grad.abs().max()
