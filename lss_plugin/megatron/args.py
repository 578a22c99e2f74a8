"""Command-line flags for LSS in a Megatron launch, and their validation.

``add_lss_args`` has the shape Megatron-LM's ``extra_args_provider`` expects (takes the parser,
returns it). ``validate_lss_args`` runs on the parsed namespace before any process group or
collective exists, so a wrong combination fails on every rank with the same clear message.
"""
from __future__ import annotations

import argparse

from lss_plugin.options import (
    FLAGS, AttentionSettings, check_kv_head_chunk, check_ulysses_heads, check_ulysses_size, setting_fields,
)

GRAD_AVERAGING_MODES = ("two_stage", "fused")


def add_lss_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group(title="LSS sequence parallelism (lss_plugin)")
    group.add_argument("--lss-sequence-parallel", action="store_true",
                       help="Split every sequence across --lss-sequence-parallel-size ranks "
                            "with LSS attention (registered as Megatron's context-parallel group).")
    group.add_argument("--lss-sequence-parallel-size", type=int, default=None,
                       help="Ranks per sequence (N). Default: the whole world divided by the "
                            "tensor- and pipeline-parallel sizes, i.e. no data parallelism.")
    group.add_argument("--lss-ulysses-size", type=int, default=1,
                       help="Hybrid LSS x Ulysses: split the N sequence-parallel ranks into groups of "
                            "U consecutive ones (inside a node) that exchange heads by all-to-all, "
                            "and gather K,V with LSS across the N/U groups. U must divide N and the "
                            "query heads per tensor-parallel rank (KV heads U does not divide are "
                            "replicated to lcm(KV heads, U)). Default 1: pure LSS; U = N: pure Ulysses.")
    for f in setting_fields():  # every AttentionSettings field, as its flag (the field table)
        spelling = f.metadata["spelling"]
        group.add_argument(spelling.flag, type=spelling.flag_type, choices=spelling.flag_choices, default=f.default,
                           metavar=spelling.flag_metavar, help=f.metadata["doc"])
    group.add_argument("--lss-grad-averaging", choices=GRAD_AVERAGING_MODES, default="fused",
                       help="Gradient averaging over SP x DP. Megatron's DDP reduces over the "
                            "DP x CP group in one collective, which is the 'fused' mode; "
                            "'two_stage' (SP then DP) is not available under Megatron DDP yet.")
    return parser


def attention_settings_from_args(args: argparse.Namespace) -> AttentionSettings:
    """The ``AttentionSettings`` the flags give (absent ones: the defaults); errors name the flags."""
    values = {f.metadata["spelling"].flag: getattr(args, f.metadata["spelling"].dest)
              for f in setting_fields() if hasattr(args, f.metadata["spelling"].dest)}
    return AttentionSettings.from_names(values, FLAGS)


def validate_lss_args(args: argparse.Namespace, world_size: int | None = None) -> argparse.Namespace:
    """Check the LSS flags against the rest of the launch; fill ``lss_sequence_parallel_size``.

    ``world_size`` defaults to ``args.world_size`` (Megatron sets it) or torch.distributed's.
    Raises ValueError naming the offending values. Returns ``args`` (modified in place).
    """
    if not getattr(args, "lss_sequence_parallel", False):
        if getattr(args, "lss_sequence_parallel_size", None) not in (None, 1):
            raise ValueError(
                f"--lss-sequence-parallel-size {args.lss_sequence_parallel_size} given without "
                "--lss-sequence-parallel"
            )
        if getattr(args, "lss_ulysses_size", 1) != 1:
            raise ValueError(f"--lss-ulysses-size {args.lss_ulysses_size} given without --lss-sequence-parallel")
        if getattr(args, "lss_kv_buffer_mib", None) is not None:
            raise ValueError(f"--lss-kv-buffer-mib {args.lss_kv_buffer_mib} given without --lss-sequence-parallel")
        return args

    world_size = _world_size(args, world_size)
    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    pp = int(getattr(args, "pipeline_model_parallel_size", 1) or 1)
    cp = int(getattr(args, "context_parallel_size", 1) or 1)
    if cp != 1:
        raise ValueError(f"--context-parallel-size {cp} conflicts with --lss-sequence-parallel: LSS "
                         "occupies Megatron's context-parallel group; use --lss-sequence-parallel-size")
    virtual = {name: getattr(args, name, None) for name in (
        "virtual_pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage",
        "num_virtual_stages_per_pipeline_rank")}
    if any(value not in (None, 1) for value in virtual.values()):
        raise ValueError(f"virtual pipeline stages ({', '.join(f'{k}={v}' for k, v in virtual.items() if v)}) "
                         "with --lss-sequence-parallel are not supported yet")

    sp = args.lss_sequence_parallel_size
    if sp is None:
        sp = world_size // (tp * pp)
    if not isinstance(sp, int) or sp < 1:
        raise ValueError(f"--lss-sequence-parallel-size must be a positive integer, got {sp!r}")
    if world_size % (sp * tp * pp) != 0:
        raise ValueError(
            f"--lss-sequence-parallel-size {sp} does not divide the world: "
            f"world_size({world_size}) % (sp({sp}) * tp({tp}) * pp({pp})) = "
            f"{world_size % (sp * tp * pp)} != 0"
        )
    ulysses = getattr(args, "lss_ulysses_size", 1)
    check_ulysses_size(ulysses, sp, setting="--lss-ulysses-size")
    _check_heads_per_rank(args, ulysses, tp)
    settings = attention_settings_from_args(args)  # every setting's flag checked, LSS_KV_BUFFER_MIB beside it too
    seq_length = getattr(args, "seq_length", None)
    layout = settings.layout
    chunks = sp if layout == "contiguous" else 2 * sp
    if seq_length is not None and ulysses > 1:
        from lss_plugin.sharding import check_seq_len  # the hybrid's rule: N and 2N/U (balanced)

        try:
            check_seq_len(seq_length, sp, layout, ulysses)
        except ValueError as err:
            raise ValueError(f"--seq-length {seq_length} with --lss-sequence-parallel-size {sp} and "
                             f"--lss-ulysses-size {ulysses}: {err}") from None
    elif seq_length is not None and seq_length % chunks != 0:
        raise ValueError(
            f"--seq-length {seq_length} is not divisible by {chunks} "
            f"({'N' if layout == 'contiguous' else '2N'} for the {layout} layout with "
            f"--lss-sequence-parallel-size {sp})"
        )
    if getattr(args, "sequence_parallel", False) and tp > 1 and seq_length is not None \
            and (seq_length // sp) % tp != 0:
        raise ValueError(
            f"--seq-length {seq_length} / --lss-sequence-parallel-size {sp} = {seq_length // sp} "
            f"local tokens are not divisible by --tensor-model-parallel-size {tp} (Megatron's "
            "--sequence-parallel splits each rank's tokens over the TP group)"
        )
    if args.lss_grad_averaging != "fused":
        raise ValueError(
            f"--lss-grad-averaging {args.lss_grad_averaging} is not supported with megatron-core's "
            "DistributedDataParallel, which reduces over the DP x CP group in one collective "
            "(the 'fused' mode)"
        )
    dropout = getattr(args, "attention_dropout", 0.0) or 0.0
    if dropout > 0:
        raise ValueError(f"--attention-dropout {dropout} is not supported by LSS attention yet; "
                         "set --attention-dropout 0")
    check_mask_args(args, lss=True)
    args.lss_sequence_parallel_size = sp
    return args


def check_mask_args(args: argparse.Namespace, lss: bool) -> None:
    """``--window-size``, ``--window-attn-skip-freq`` and ``--softmax-type`` (Megatron-LM's flags, read
    into megatron-core's TransformerConfig) as megatron-core reads them; with ``lss`` also what LSS
    refuses: a window reaching future keys of a causal GPT (``lss_plugin.megatron.masks``)."""
    from lss_plugin.megatron.masks import SOFTMAX_TYPES, check_window_config

    window = getattr(args, "window_size", None)
    try:
        check_window_config(window, getattr(args, "window_attn_skip_freq", None), getattr(args, "num_layers", None))
    except ValueError as err:
        raise ValueError(f"--window-size {window} / --window-attn-skip-freq: {err}") from None
    softmax_type = getattr(args, "softmax_type", "vanilla")
    if softmax_type not in SOFTMAX_TYPES:
        raise ValueError(f"--softmax-type {softmax_type!r} is not one of {SOFTMAX_TYPES}")
    if lss and window is not None and window[1] != 0:
        raise ValueError(
            f"--window-size {window[0]},{window[1]} with --lss-sequence-parallel: GPT attention is causal and "
            f"LSS takes only right = 0 ({window[0]},0): megatron-core's local attention would show future keys, "
            "TransformerEngine would drop them")


def _check_heads_per_rank(args, ulysses: int, tp: int) -> None:
    """The heads one TP rank attends must split over the Ulysses group (``check_ulysses_heads``),
    and ``--lss-kv-head-chunk`` must not exceed the KV heads a rank then gathers. A head count TP
    does not divide is left to the check that names TP."""
    heads, kv_heads = attention_heads(args)
    if heads is None or heads % tp or kv_heads % tp:
        return
    per_rank = kv_heads_per_rank(args)
    where = " after the all-to-all" if ulysses > 1 else ""
    check_kv_head_chunk(getattr(args, "lss_kv_head_chunk", None), per_rank,
                        setting=f"--lss-kv-head-chunk ({per_rank} key/value heads per rank{where})")


def attention_heads(args) -> tuple:
    """(query heads, KV heads) the flags give, (None, None) without ``num_attention_heads``.

    Megatron-LM spells GQA as ``--group-query-attention --num-query-groups G`` (without the first
    flag every head is its own group); the bundled script as ``--num-query-groups G``."""
    heads = getattr(args, "num_attention_heads", None)
    groups = getattr(args, "num_query_groups", None)
    if not getattr(args, "group_query_attention", True) or not groups:
        groups = heads
    return heads, groups


def kv_heads_per_rank(args) -> int:
    """KV heads one rank gathers over its LSS group: KV heads / TP, then, with ``--lss-ulysses-size``
    U > 1, replicated to lcm(., U) if U does not divide them and split over the Ulysses group.
    Raises ValueError naming the flags when U cannot split this TP rank's heads."""
    heads, kv_heads = attention_heads(args)
    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    ulysses = getattr(args, "lss_ulysses_size", 1)
    if ulysses == 1:
        return kv_heads // tp
    try:
        return check_ulysses_heads(heads // tp, kv_heads // tp, ulysses, setting="--lss-ulysses-size") // ulysses
    except ValueError as err:
        per_rank = f" over --tensor-model-parallel-size {tp} ({heads // tp} and {kv_heads // tp} per rank)" if tp > 1 else ""
        raise ValueError(f"--num-attention-heads {heads} with {kv_heads} key/value heads{per_rank}: {err}") from None


def _world_size(args, world_size):
    if world_size is not None:
        return int(world_size)
    if getattr(args, "world_size", None):
        return int(args.world_size)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))
