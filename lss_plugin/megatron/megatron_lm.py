"""Hooks for a Megatron-LM checkout (``pretrain_gpt.py``), used by ``patches/megatron_lm_lss.patch``.

Megatron-LM parses its flags, then validates them (data-parallel size from the CP size, ...), then
builds the parallel groups and the model. LSS enters at each step:
- ``lss_extra_args_provider``: the ``--lss-*`` flags; after parsing, ``--lss-sequence-parallel``
  becomes ``--context-parallel-size N`` (so Megatron builds the LSS group as its CP group and
  sizes DP from it), ``--calculate-per-token-loss`` (exact loss normalisation with uneven loss
  masks) and ``--transformer-impl local`` (the LSS spec is built from the local spec).
- ``lss_layer_spec``: registers the CP group as the LSS topology and returns the LSS layer spec.
- ``lss_finish_model``: RoPE rows for the LSS layout.
- ``lss_get_batch``: this rank's tokens in the LSS layout, in place of ``get_batch_on_this_cp_rank``.
"""
from __future__ import annotations

import argparse
import functools


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
    args.context_parallel_size = args.lss_sequence_parallel_size
    args.calculate_per_token_loss = True
    args.transformer_impl = "local"
    return args


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
