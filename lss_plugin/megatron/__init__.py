"""megatron-core adapter: ``--lss-sequence-parallel`` for a Megatron GPT.

- ``add_lss_args`` / ``validate_lss_args``: the flags (an ``extra_args_provider``) and their checks.
- ``initialize_lss_model_parallel``: megatron-core parallel state with LSS as the CP group
  (``ulysses_size`` U > 1: hybrid LSS x Ulysses inside it).
- ``LSSDotProductAttention`` / ``get_gpt_layer_lss_spec``: core attention and the layer spec
  (``LSSSelfAttention``: the RoPE rows of packed documents).
- ``read_packed_seq_params`` / ``packed_seq_params_from_eod``: packed documents (global boundaries).
- ``get_batch_on_this_lss_rank``: this rank's tokens, labels, loss mask and positions.
- ``use_lss_rotary_embedding``: RoPE rows for the LSS layout.
- ``apply_cpu_shim``: megatron-core on a machine without CUDA.

Names that need megatron-core are imported on first use, so ``args`` and ``cpu_shim`` stay cheap.
"""
from lss_plugin.megatron.args import add_lss_args, validate_lss_args
from lss_plugin.megatron.cpu_shim import apply_cpu_shim

_LAZY = {
    "LSSDotProductAttention": "lss_plugin.megatron.attention",
    "get_gpt_layer_lss_spec": "lss_plugin.megatron.spec",
    "get_gpt_layer_lss_spec_from_args": "lss_plugin.megatron.spec",
    "get_batch_on_this_lss_rank": "lss_plugin.megatron.batch",
    "initialize_lss_model_parallel": "lss_plugin.megatron.parallel",
    "register_megatron_groups": "lss_plugin.megatron.parallel",
    "LSSRotaryEmbedding": "lss_plugin.megatron.rope",
    "use_lss_rotary_embedding": "lss_plugin.megatron.rope",
    "LSSSelfAttention": "lss_plugin.megatron.self_attention",
    "read_packed_seq_params": "lss_plugin.megatron.packed",
    "packed_seq_params_from_eod": "lss_plugin.megatron.packed",
}

__all__ = ["add_lss_args", "apply_cpu_shim", "validate_lss_args", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lss_plugin.megatron' has no attribute {name!r}")
