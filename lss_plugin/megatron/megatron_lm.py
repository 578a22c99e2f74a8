"""Hooks for a Megatron-LM checkout (``pretrain_gpt.py``), used by ``patches/megatron_lm_lss.patch``.

Megatron-LM parses its flags, then validates them (data-parallel size from the CP size, ...), then
builds the parallel groups and the model. LSS enters at each step:
- ``lss_extra_args_provider``: the ``--lss-*`` flags; after parsing, ``--lss-sequence-parallel``
  becomes ``--context-parallel-size N`` (so Megatron builds the LSS group as its CP group and
  sizes DP from it), ``--calculate-per-token-loss`` (exact loss normalisation with uneven loss
  masks), ``--transformer-impl local`` (the LSS spec is built from the local spec) and
  ``--cp-comm-type lss`` (LSS does its own communication; Megatron-LM's default ``p2p`` is
  replaced, any other choice refused). Rank 0 prints one line naming every value it changed.
- ``lss_layer_spec``: registers the CP group as the LSS topology and returns the LSS layer spec.
- ``lss_finish_model``: RoPE rows for the LSS layout.
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


def lss_layer_spec(args):
    """Register Megatron's (initialised) CP group as the LSS group; the LSS GPT layer spec."""
    from lss_plugin.megatron.parallel import register_megatron_groups
    from lss_plugin.megatron.spec import get_gpt_layer_lss_spec_from_args
    from lss_plugin.topology import is_topology_initialized

    if not is_topology_initialized():
        register_megatron_groups(timeout_s=60.0 * getattr(args, "distributed_timeout_minutes", 10))
    return get_gpt_layer_lss_spec_from_args(args)


def lss_finish_model(model, args):
    from lss_plugin.megatron.rope import use_lss_rotary_embedding

    use_lss_rotary_embedding(model, args.lss_layout)
    return model


def lss_get_batch(batch: dict, args) -> dict:
    from lss_plugin.megatron.batch import get_batch_on_this_lss_rank

    return get_batch_on_this_lss_rank(batch, args.lss_layout)
