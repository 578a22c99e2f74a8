"""Hooks for a Megatron-LM checkout (``pretrain_gpt.py``), called by the patches in ``patches/``.

Megatron-LM parses its flags, then validates them (data-parallel size from the CP size, ...), then
builds the parallel groups and the model. LSS enters at each step:
- ``lss_extra_args_provider``: the ``--lss-*`` flags; after parsing, ``--lss-sequence-parallel``
  becomes ``--context-parallel-size N`` (so Megatron builds the LSS group as its CP group and
  sizes DP from it), ``--calculate-per-token-loss`` (exact loss normalisation with uneven loss
  masks), ``--transformer-impl local`` (the LSS spec is built from the local spec) and
  ``--cp-comm-type lss`` (LSS does its own communication; Megatron-LM's default ``p2p`` is
  replaced, any other choice refused). Rank 0 prints one line naming every value it changed.
  Flags that would replace the LSS attention or split documents are refused by name.
- ``lss_layer_spec``: registers the CP group as the LSS topology (with ``--lss-ulysses-size`` U > 1
  its Ulysses x LSS sub-groups too) and returns the LSS layer spec.
- ``lss_finish_model``: RoPE rows for the LSS layout.
- ``lss_model_config``: both of the above for Megatron-LM core_v0.19, which builds the model from
  a ``GPTModelConfig`` (core_v0.16.1's patch calls them from ``gpt_builders.gpt_builder``).
- ``lss_get_batch``: this rank's tokens in the LSS layout, in place of ``get_batch_on_this_cp_rank``.
"""
from __future__ import annotations

import argparse
import functools
import os


def lss_extra_args_provider(parser: argparse.ArgumentParser,
                            other_provider=None) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: adds ``--lss-*`` and maps them onto Megatron's flags.

    ``other_provider`` (e.g. ModelOpt's) is applied first, so both can be used.
    """
    from lss_plugin.megatron.args import add_lss_args

    if other_provider is not None:
        parser = other_provider(parser)
    add_lss_args(parser)
    original = parser.parse_known_args

    @functools.wraps(original)
    def parse_known_args(*a, **kw):
        args, unknown = original(*a, **kw)
        return map_lss_to_megatron_args(args), unknown

    parser.parse_known_args = parse_known_args  # parse_args goes through parse_known_args
    return parser


def map_lss_to_megatron_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validate the LSS flags and express LSS in Megatron-LM's own arguments."""
    from lss_plugin.megatron.args import validate_lss_args

    if not getattr(args, "lss_sequence_parallel", False):
        return validate_lss_args(args)
    validate_lss_args(args)  # world size from WORLD_SIZE, as Megatron-LM reads it
    _refuse_bypassed_model_flags(args)
    refuse_megatron_lm_flags(args)
    cp_comm_type = getattr(args, "cp_comm_type", None)
    if cp_comm_type is not None and list(cp_comm_type) not in (["p2p"], ["lss"]):  # p2p: Megatron-LM's default
        raise ValueError(
            f"--cp-comm-type {' '.join(cp_comm_type)} selects the communication of Megatron's context-parallel "
            "attention, which --lss-sequence-parallel replaces (one K/V all-gather per layer): drop --cp-comm-type"
        )
    changes = []
    for flag, value, why in (
        ("context_parallel_size", args.lss_sequence_parallel_size, "LSS runs as the context-parallel group"),
        ("calculate_per_token_loss", True, "exact loss normalisation when ranks hold different token counts"),
        ("transformer_impl", "local", "the LSS layer spec is megatron-core's local spec with LSS core attention"),
        ("cp_comm_type", ["lss"] if cp_comm_type is not None else None, "LSS does its own communication"),
    ):
        old = getattr(args, flag, None)
        if value is not None and old != value:
            setattr(args, flag, value)
            changes.append(f"--{flag.replace('_', '-')} {_spell(old)} -> {_spell(value)} ({why})")
    if changes and os.environ.get("RANK", "0") == "0":
        print("lss_plugin: --lss-sequence-parallel changed " + "; ".join(changes), flush=True)
    return args


# Megatron-LM flags whose effect the patched gpt_builder skips when it takes the LSS layer spec (or
# that need another attention module): accepted silently, they would train a different model.
_BYPASSED_MODEL_FLAGS = (
    ("use_legacy_models", "--use-legacy-models", "LSS plugs into megatron-core models only"),
    ("spec", "--spec", "the LSS layer spec replaces the spec module"),
    ("experimental_attention_variant", "--experimental-attention-variant", "its block spec is not built under LSS"),
    ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path", "its layer specs are not built under LSS"),
    ("multi_latent_attention", "--multi-latent-attention", "MLA's attention module is not LSS's (and RoPE would be dropped)"),
)


def _refuse_bypassed_model_flags(args) -> None:
    problems = [f"{flag} {_spell(getattr(args, name))} ({why})" for name, flag, why in _BYPASSED_MODEL_FLAGS
                if getattr(args, name, None) not in (None, False)]
    moe_layer_freq = getattr(args, "moe_layer_freq", 1)
    if getattr(args, "num_experts", None) and moe_layer_freq != 1:
        problems.append(f"--moe-layer-freq {_spell(moe_layer_freq)} with --num-experts (the LSS spec puts experts "
                        "in every layer; Megatron's decoder block spec is not built under LSS)")
    if problems:
        raise ValueError("--lss-sequence-parallel cannot honour " + "; ".join(problems))


def _spell(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def refuse_megatron_lm_flags(args: argparse.Namespace) -> None:
    """Megatron-LM flags of newer releases LSS cannot honour (read with defaults: not every release has each)."""
    problems = []
    backend = getattr(args, "attention_backend", None)
    if getattr(backend, "name", backend) == "local":
        problems.append("--attention-backend local (it swaps Megatron's DotProductAttention back in)")
    for flag in ("sft", "dataloader_inter_document_masking", "hybrid_context_parallel"):
        if getattr(args, flag, False):
            problems.append(f"--{flag.replace('_', '-')} (packed documents)")
    if getattr(args, "reset_attention_mask", False):
        # Megatron-LM's get_batch turns it into a dense [b, 1, L, L] document mask, which LSS does not
        # read; LSS takes documents as PackedSeqParams (examples/pretrain_gpt_lss.py builds them).
        problems.append("--reset-attention-mask (a dense document mask; LSS reads documents from PackedSeqParams)")
    if problems:
        raise ValueError("--lss-sequence-parallel does not support " + ", ".join(problems))


def lss_layer_spec(args):
    """Register Megatron's (initialised) CP group as the LSS group; the LSS GPT layer spec."""
    from lss_plugin.megatron.compat import megatron_core_traits
    from lss_plugin.megatron.parallel import register_megatron_groups
    from lss_plugin.megatron.spec import get_gpt_layer_lss_spec_from_args
    from lss_plugin.topology import is_topology_initialized

    megatron_core_traits()  # refuses a megatron-core release the adapter does not support
    if not is_topology_initialized():
        register_megatron_groups(timeout_s=60.0 * getattr(args, "distributed_timeout_minutes", 10),
                                 ulysses_size=args.lss_ulysses_size)
    return get_gpt_layer_lss_spec_from_args(args)


def lss_finish_model(model, args):
    """RoPE rows for the LSS layout; after the last model chunk, dropout streams per LSS rank.

    Megatron-LM's ``_set_random_seed`` gives its context-parallel ranks one seed; reseeding after
    the last chunk is built keeps the weights of every chunk identical on the LSS ranks.
    """
    from megatron.core import parallel_state

    from lss_plugin.megatron.rope import use_lss_rotary_embedding
    from lss_plugin.rng import seed_megatron_rng

    use_lss_rotary_embedding(model, args.lss_layout, args.lss_ulysses_size)
    chunks = getattr(args, "virtual_pipeline_model_parallel_size", None)
    stage = getattr(model, "vp_stage", None)
    if chunks is None or stage is None or stage == chunks - 1:
        seed = args.seed
        if getattr(args, "data_parallel_random_init", False):  # Megatron-LM's _set_random_seed
            seed += 10 * parallel_state.get_data_parallel_rank()
        seed_megatron_rng(seed)
    return model


def lss_model_config(model_config, args):
    """Megatron-LM core_v0.19: put the LSS layer spec and RoPE rows into its ``GPTModelConfig``.

    The spec is a callable because ``GPTModelBuilder`` calls it when it builds the model, after
    Megatron has created the CP group that ``lss_layer_spec`` registers; the RoPE rows are set by
    a pre-wrap hook, on the bare GPTModels before DDP wraps them.
    """
    def layer_spec(_model_config):
        return lss_layer_spec(args)

    def finish_models(models):
        return [lss_finish_model(model, args) for model in models]

    model_config.transformer_layer_spec = layer_spec
    model_config.pre_wrap_hooks.append(finish_models)
    return model_config


def lss_get_batch(batch: dict, args) -> dict:
    from lss_plugin.megatron.batch import get_batch_on_this_lss_rank

    return get_batch_on_this_lss_rank(batch, args.lss_layout, ulysses_size=args.lss_ulysses_size)
