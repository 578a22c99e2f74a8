"""Byte-level GPT pre-training with megatron-core: LSS sequence parallelism, Megatron's TP(+SP) and
pipeline stages, alone or combined (TP x LSS x DP x PP on Megatron's grid).

The engine of ``examples/pretrain_gpt_lss.py``: Megatron-LM flag names, a megatron-core
``GPTModel`` in megatron-core ``DistributedDataParallel``, and a torch AdamW on
``param.main_grad`` (``get_megatron_optimizer`` needs CUDA). Every rank draws the same global
batch from ``(seed, iteration)`` and keeps its rows (DP) and tokens (LSS), so a run is a function
of its flags, whatever the parallel layout: an LSS, TP or PP run reproduces the 1-rank losses.
Each iteration runs megatron-core's forward/backward schedule (``lss_plugin.megatron.pipeline``).
Packed documents follow Megatron-LM's ``--reset-attention-mask/--reset-position-ids/--eod-mask-loss``
(``_validate_documents``, ``local_microbatch``; docs/megatron.md#packed-documents).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from lss_plugin.megatron.args import (
    add_lss_args, attention_settings_from_args, check_mask_args, kv_heads_per_rank, validate_lss_args,
)
from lss_plugin.megatron.masks import SOFTMAX_TYPES, parse_layer_pattern, parse_window_size
from lss_plugin.options import resolve_kv_chunking
from lss_plugin.topology import ParallelDims


class _ArgFileParser(argparse.ArgumentParser):
    """Reads ``@file`` arguments as whitespace-separated flags, ``#`` starting a comment."""

    def convert_arg_line_to_args(self, arg_line: str):
        return arg_line.split("#", 1)[0].split()


def build_parser() -> argparse.ArgumentParser:
    p = _ArgFileParser(
        description="Byte-level GPT pre-training on megatron-core, with LSS, Megatron TP(+SP), PP, or a mix.",
        fromfile_prefix_chars="@",
    )
    g = p.add_argument_group("model (Megatron-LM names)")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--num-query-groups", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--position-embedding-type", choices=("learned_absolute", "rope"),
                   default="learned_absolute")
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm")
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--window-size", type=parse_window_size, default=None, metavar="LEFT,RIGHT",
                   help="sliding-window attention: a query at q sees keys q-LEFT..q+RIGHT (-1: unbounded; "
                        "a causal GPT under LSS takes RIGHT 0), e.g. 128,0")
    g.add_argument("--window-attn-skip-freq", type=parse_layer_pattern, default=None, metavar="N|PATTERN",
                   help="which layers attend fully: every N-th (N-1 windowed : 1 full), or a list of 1 "
                        "(window) / 0 (full) per layer such as '([1]*3+[0])*2' (default: every layer windowed)")
    g.add_argument("--softmax-type", choices=SOFTMAX_TYPES, default="vanilla",
                   help="'off-by-one': a zero logit in every softmax denominator; 'learnable': one learned "
                        "logit per head (megatron-core's softmax_offset), the attention sinks")
    g.add_argument("--core-attention", choices=("local", "sdpa"), default="local",
                   help="runs without LSS: megatron-core's local DotProductAttention (dense scores) or "
                        "torch's fused SDPA (lss_plugin.baselines.megatron.SDPADotProductAttention)")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=2)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro-batch-size x data-parallel size")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--train-iters", type=int, default=20)
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the AdamW state over Megatron's DP x CP group (under LSS: SP x DP), "
                        "ZeRO-1 with torch's ZeroRedundancyOptimizer (lss_plugin.optim); exact, since "
                        "every rank of that group holds the same reduced gradients")
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="pipeline stages (megatron-core's 1F1B schedule)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Megatron's sequence parallelism (with tensor parallelism)")
    g.add_argument("--timeout-s", type=float, default=None,
                   help="process-group timeout in seconds (a stuck collective fails, not hangs)")

    g = p.add_argument_group("packed documents (Megatron-LM names; EOD = lss_plugin.data.EOD_BYTE, which "
                             "ends every </page> of the Wikipedia XML)")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="no token attends across documents: under LSS each micro-batch (size 1) is one THD "
                        "packed sequence (PackedSeqParams, global cu_seqlens); without LSS megatron-core's "
                        "dense document mask")
    g.add_argument("--reset-position-ids", action="store_true",
                   help="positions restart at every document (RoPE: needs --lss-sequence-parallel and "
                        "--reset-attention-mask)")
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss where the input token is EOD")

    g = p.add_argument_group("data, evaluation, checkpoints, logging")
    g.add_argument("--data-path", default=None,
                   help="a byte file such as enwik8 (default: the bundled Wikipedia excerpt)")
    g.add_argument("--eval-interval", type=int, default=0, help="0: no evaluation during training")
    g.add_argument("--eval-iters", type=int, default=4)
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=0)
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--metrics-file", default=None, help="JSON line per iteration (rank 0 writes)")
    add_lss_args(p)
    return p


def parse_args(argv=None, world_size: Optional[int] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    return validate_args(args, world_size)


def validate_args(args: argparse.Namespace, world_size: Optional[int] = None) -> argparse.Namespace:
    """All checks that need no process group; raise ValueError naming the values."""
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    args.world_size = world_size
    validate_lss_args(args, world_size=world_size)
    check_mask_args(args, lss=args.lss_sequence_parallel)
    if args.lss_sequence_parallel and getattr(args, "core_attention", "local") != "local":
        raise ValueError(f"--core-attention {args.core_attention} applies to runs without "
                         "--lss-sequence-parallel (LSS brings its own core attention)")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    sp = args.lss_sequence_parallel_size if args.lss_sequence_parallel else 1
    # Names every factor (raises ValueError): tp(T) * sp(N) * pp(P) must divide the world.
    args.data_parallel_size = ParallelDims.from_sizes(sp, None, world_size, tp=tp, pp=pp).dp
    if args.num_layers % pp:
        raise ValueError(f"--num-layers {args.num_layers} is not divisible by "
                         f"--pipeline-model-parallel-size {pp}")
    if pp > 1 and not args.untie_embeddings_and_output_weights:
        raise ValueError(
            f"--pipeline-model-parallel-size {pp} needs --untie-embeddings-and-output-weights in "
            "this script (tied weights live on two stages; their full-state checkpointing is not "
            "implemented, and megatron-core 0.16 syncs them with .cuda())")
    if args.sequence_parallel and tp > 1 and args.seq_length % tp:
        raise ValueError(f"--seq-length {args.seq_length} is not divisible by "
                         f"--tensor-model-parallel-size {tp} (needed by --sequence-parallel)")
    if args.num_attention_heads % tp:
        raise ValueError(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
                         f"--tensor-model-parallel-size {tp}")
    groups = args.num_query_groups or args.num_attention_heads
    if args.num_attention_heads % groups or groups % tp:
        raise ValueError(f"--num-query-groups {groups} must divide --num-attention-heads "
                         f"{args.num_attention_heads} and be divisible by TP {tp}")
    _validate_documents(args)
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.max_position_embeddings < args.seq_length:
        raise ValueError(f"--max-position-embeddings {args.max_position_embeddings} < "
                         f"--seq-length {args.seq_length}")
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    if args.global_batch_size % per_step:
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} is not divisible by micro-batch-size("
            f"{args.micro_batch_size}) * data-parallel size({args.data_parallel_size}) = {per_step}")
    args.num_microbatches = args.global_batch_size // per_step
    if args.load is None and args.save is not None and os.path.isdir(args.save):
        pass  # a fresh run into an existing directory is allowed; --load picks up explicitly
    return args


def _validate_documents(args) -> None:
    """Packed documents as this script builds them (``local_microbatch``)."""
    lss = args.lss_sequence_parallel
    if args.reset_attention_mask and lss and args.micro_batch_size != 1:
        raise ValueError(f"--reset-attention-mask with --lss-sequence-parallel packs a micro-batch as one THD "
                         f"sequence: use --micro-batch-size 1 (got {args.micro_batch_size}; raise "
                         "--global-batch-size for more rows per step)")
    if args.reset_attention_mask and not lss and args.core_attention != "local":
        raise ValueError(f"--reset-attention-mask without --lss-sequence-parallel needs --core-attention local "
                         f"(megatron-core's dense document mask); --core-attention {args.core_attention} "
                         "reads no mask")
    if args.reset_position_ids and args.position_embedding_type == "rope" and not (lss and args.reset_attention_mask):
        raise ValueError("--reset-position-ids with --position-embedding-type rope needs --lss-sequence-parallel "
                         "and --reset-attention-mask: RoPE positions restart through the THD documents' "
                         "cu_seqlens, while megatron-core's GPTModel reads position_ids for learned_absolute only")


def uses_documents(args) -> bool:
    return bool(args.reset_attention_mask or args.reset_position_ids or args.eod_mask_loss)


# --------------------------------------------------------------------------------------------
# Set-up


def setup_parallel(args):
    """Initialise megatron-core parallel state (LSS as the CP group, or TP) and the RNG."""
    from megatron.core import parallel_state, tensor_parallel

    from lss_plugin.megatron.cpu_shim import apply_cpu_shim
    from lss_plugin.runtime import init_distributed

    apply_cpu_shim()
    init_distributed(timeout_s=args.timeout_s)
    from lss_plugin.megatron.parallel import destroy_lss_model_parallel, initialize_lss_model_parallel

    destroy_lss_model_parallel()  # a previous run's groups in this process, if any
    if args.lss_sequence_parallel:
        initialize_lss_model_parallel(args.lss_sequence_parallel_size, timeout_s=args.timeout_s,
                                      ulysses_size=args.lss_ulysses_size,
                                      tensor_model_parallel_size=args.tensor_model_parallel_size,
                                      pipeline_model_parallel_size=args.pipeline_model_parallel_size)
    else:
        kwargs = {"create_gloo_process_groups": dist.get_backend() != "gloo"}
        if args.timeout_s is not None:
            kwargs["distributed_timeout_minutes"] = max(1, math.ceil(args.timeout_s / 60))
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size, **kwargs)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    torch.manual_seed(args.seed)


def build_optimizer(model, args) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (Megatron's default grouping).

    ``--use-distributed-optimizer``: its state sharded over the DP x CP group, the group
    megatron-core's distributed optimizer shards over. megatron-core's own ``DistributedOptimizer``
    refuses CPU tensors (it accepts only ``torch.cuda.*Tensor`` parameters), so this script shards
    with torch's ZeroRedundancyOptimizer on every device (docs/megatron.md#distributed-optimizer).
    """
    from megatron.core import parallel_state

    from lss_plugin.megatron.model import named_trainable
    from lss_plugin.optim import sharded_optimizer

    decay, no_decay = [], []
    for name, p in named_trainable(model):
        (no_decay if p.dim() == 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    hyper = dict(lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, foreach=False)
    if args.use_distributed_optimizer:
        return sharded_optimizer(groups, torch.optim.AdamW,
                                 parallel_state.get_data_parallel_group(with_context_parallel=True), **hyper)
    return torch.optim.AdamW(groups, **hyper)


def lr_at(args, iteration: int) -> float:
    """Constant learning rate after a linear warm-up over ``--lr-warmup-iters``."""
    if args.lr_warmup_iters and iteration <= args.lr_warmup_iters:
        return args.lr * iteration / args.lr_warmup_iters
    return args.lr


# --------------------------------------------------------------------------------------------
# One step


def _rank_rows(global_batch: torch.Tensor, args) -> torch.Tensor:
    """This DP rank's rows of the global batch ``[G, L+1]`` -> ``[G/D, L+1]``."""
    from megatron.core import parallel_state

    d, D = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    rows = global_batch.shape[0] // D
    return global_batch[d * rows:(d + 1) * rows]


def local_microbatch(window: torch.Tensor, args, loss_mask_fn=None) -> dict:
    """tokens/labels/loss_mask/position_ids (+ attention_mask, packed_seq_params) for this rank from
    windows ``[b, L+1]``.

    Under LSS each tensor keeps this rank's ``L/N`` tokens in the chosen layout; every TP rank
    keeps the same tokens (with Megatron SP its embedding scatters them over the TP group).
    Documents (``--reset-*``, ``--eod-mask-loss``): megatron-core's GPT dataset masks and positions;
    under LSS ``--reset-attention-mask`` gives THD ``packed_seq_params`` with the window's global
    boundaries, without LSS megatron-core's dense ``attention_mask`` ``[b, 1, L, L]``.
    """
    from lss_plugin.megatron.batch import get_batch_on_this_lss_rank
    from lss_plugin.runtime import default_device

    from lss_plugin.data import EOD_BYTE
    from lss_plugin.megatron.packed import ltor_masks, packed_seq_params_from_eod

    tokens, labels = window[:, :-1], window[:, 1:]  # [b, L]
    loss_mask = (loss_mask_fn(tokens, labels) if loss_mask_fn else torch.ones_like(labels)).float()
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    attention_mask = packed_seq_params = None
    packed = args.reset_attention_mask and args.lss_sequence_parallel
    if uses_documents(args):  # megatron-core's GPT dataset masks and positions, EOD ending a document
        attention_mask, eod_loss_mask, position_ids = ltor_masks(
            tokens, EOD_BYTE, args.reset_position_ids, args.reset_attention_mask, args.eod_mask_loss,
            create_attention_mask=args.reset_attention_mask and not packed)  # [b, 1, L, L]: one device only
        loss_mask = loss_mask * eod_loss_mask
    device = default_device()
    if packed:  # the global boundaries, the same on every rank
        packed_seq_params = packed_seq_params_from_eod(tokens.to(device), EOD_BYTE, args.reset_position_ids)
    batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
    if args.lss_sequence_parallel:
        batch = get_batch_on_this_lss_rank(batch, args.lss_layout, ulysses_size=args.lss_ulysses_size)  # [b, L/N]
    batch = {k: v.contiguous().to(device) for k, v in batch.items()}
    batch["attention_mask"] = attention_mask.to(device) if attention_mask is not None else None
    batch["packed_seq_params"] = packed_seq_params
    return batch


def global_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over the DP x CP group of the last pipeline stage's values, on every rank.

    TP ranks hold identical loss sums; earlier stages hold none and receive the last stage's.
    """
    from megatron.core import parallel_state

    from lss_plugin.megatron.pipeline import last_stage_value
    from lss_plugin.runtime import default_device

    values = values.detach().to(default_device()).clone()
    dist.all_reduce(values, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return last_stage_value(values).cpu()


def clip_grad_norm(model, max_norm: float) -> float:
    """Global L2 norm of the reduced grads, clipped to ``max_norm`` if > 0 (Megatron's rule).

    As megatron-core's optimizer computes it (``get_main_grads_for_grad_norm`` and
    ``get_grad_norm_fp32``, which need CUDA): each rank sums the squares of the grads that are
    neither TP duplicates (replicated params count on TP rank 0 only) nor shared copies (a tied
    output weight on the last stage), then the sum is all-reduced over the model-parallel
    (TP x PP) group. LSS/DP replicas hold identical reduced grads, so no SP/DP reduction is needed.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    from lss_plugin.megatron.model import named_trainable
    from lss_plugin.runtime import default_device

    grads, sq = [], torch.zeros((), dtype=torch.float32, device=default_device())
    for _, p in named_trainable(model):
        grads.append(p.main_grad)
        if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p):
            sq = sq + p.main_grad.detach().float().pow(2).sum()
    model_parallel = parallel_state.get_model_parallel_group()
    if model_parallel.size() > 1:
        dist.all_reduce(sq, group=model_parallel)
    norm = float(sq.sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(scale)
    return norm


def train_step(model, optimizer, args, iteration: int, train_tokens, loss_mask_fn=None,
               probe_params=()) -> dict:
    """One iteration over the global batch; returns the global token-mean loss and probes.

    ``probes``: the reduced gradients of the ``probe_params`` this pipeline stage holds.
    """
    from lss_plugin.data import sample_batch
    from lss_plugin.megatron.model import grads_of, named_trainable
    from lss_plugin.megatron.pipeline import forward_backward

    model.train()
    model.zero_grad_buffer()
    optimizer.zero_grad(set_to_none=True)
    window = _rank_rows(sample_batch(train_tokens, args.global_batch_size, args.seq_length,
                                     step=iteration, seed=args.seed), args)
    microbatches = [local_microbatch(mb, args, loss_mask_fn) for mb in window.split(args.micro_batch_size)]
    # Forward/backward of this rank's loss *sums*, then (inside the schedule) the DP x CP
    # all-reduce of grads (megatron DDP), the TP all-reduce of sequence-parallel norms and the
    # division by the global number of loss tokens.
    totals = forward_backward(model, microbatches, args)
    probes = grads_of(model, probe_params)
    grad_norm = clip_grad_norm(model, args.clip_grad)
    lr = lr_at(args, iteration)
    for group in optimizer.param_groups:
        group["lr"] = lr
    for _, p in named_trainable(model):
        p.grad = p.main_grad.to(p.dtype)
    optimizer.step()
    totals = global_sum(totals)
    return {"loss": float(totals[0] / totals[1]), "num_tokens": int(totals[1]),
            "grad_norm": grad_norm, "lr": lr, "probes": probes}


@torch.no_grad()
def evaluate(model, args, valid_tokens) -> dict:
    """Validation loss and bits per character over ``--eval-iters`` batches, exact across ranks."""
    from lss_plugin.data import bits_per_character, eval_batches
    from lss_plugin.megatron.pipeline import forward_backward

    model.eval()
    totals = torch.zeros(2)
    for window in eval_batches(valid_tokens, args.global_batch_size, args.seq_length, args.eval_iters):
        microbatches = [local_microbatch(mb, args) for mb in _rank_rows(window, args).split(args.micro_batch_size)]
        totals += forward_backward(model, microbatches, args, forward_only=True)
    totals = global_sum(totals)
    model.train()
    if totals[1] == 0:
        raise ValueError(f"the validation split is too small for one batch of "
                         f"{args.global_batch_size} x {args.seq_length}")
    return {"val_loss": float(totals[0] / totals[1]),
            "val_bpc": bits_per_character(float(totals[0]), int(totals[1])),
            "val_tokens": int(totals[1])}


# --------------------------------------------------------------------------------------------
# Checkpoints


def _manifest(args, shape, splits) -> dict:
    return {
        "model": shape.as_dict(),
        "topology": {"world_size": args.world_size, "tp": args.tensor_model_parallel_size,
                     "pp": args.pipeline_model_parallel_size,
                     "lss_sp": args.lss_sequence_parallel_size if args.lss_sequence_parallel else 1,
                     "dp": args.data_parallel_size,
                     "lss_layout": args.lss_layout if args.lss_sequence_parallel else None,
                     "lss_ulysses": args.lss_ulysses_size},
        "data": {"source": os.path.basename(str(splits.source)), "sha256": splits.sha256},
    }


def save(model, optimizer, args, shape, splits, iteration: int) -> str:
    from lss_plugin.checkpoint import save_checkpoint
    from lss_plugin.megatron.model import full_model_state, full_optimizer_state

    from megatron.core import tensor_parallel

    from lss_plugin.rng import all_rank_rng_states

    manifest = _manifest(args, shape, splits)
    state = {  # gathered on every TP rank (collective); rank 0 writes
        "model": full_model_state(model),
        "optimizer": full_optimizer_state(model, optimizer),
        "iteration": iteration,
        # every rank's dropout streams (they differ per LSS, TP and PP rank): collective over the world
        "rng": all_rank_rng_states(manifest["topology"], tensor_parallel.get_cuda_rng_tracker()),
    }
    return save_checkpoint(args.save, iteration, state, manifest)


def load(model, optimizer, args, shape, splits) -> int:
    """Restore from ``--load``; returns the iteration to continue after (0 if none there)."""
    from lss_plugin.checkpoint import has_checkpoint, load_checkpoint
    from lss_plugin.megatron.model import load_full_model_state, load_full_optimizer_state

    if not has_checkpoint(args.load):
        _log(f"no checkpoint in {args.load}: starting from scratch")
        return 0
    iteration, state, _ = load_checkpoint(args.load, expected_manifest=_manifest(args, shape, splits))
    load_full_model_state(model, state["model"])
    load_full_optimizer_state(model, optimizer, state["optimizer"])
    _restore_rng(state.get("rng"), args, shape, splits, iteration)
    _log(f"loaded checkpoint iteration {iteration} from {args.load}")
    return int(iteration)


def _restore_rng(saved, args, shape, splits, iteration: int) -> None:
    """This rank's saved streams under the same layout; under another, fresh streams per rank
    from ``(seed + iteration)`` (the saved ones belong to other coordinates)."""
    from megatron.core import tensor_parallel

    from lss_plugin.rng import restore_rank_rng_state, seed_megatron_rng

    layout = _manifest(args, shape, splits)["topology"]
    if not restore_rank_rng_state(saved, layout, tensor_parallel.get_cuda_rng_tracker()):
        seed_megatron_rng(args.seed + iteration)
        _log(f"checkpoint RNG streams belong to another layout: dropout streams reseeded from "
             f"--seed {args.seed} + iteration {iteration}")


# --------------------------------------------------------------------------------------------
# The loop


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _log(msg: str) -> None:
    if _is_rank0():
        print(msg, flush=True)


def _kv_mode(args) -> str:
    """What each attention call runs: its KV heads per gather and keep/regather, "auto" resolved."""
    kv_heads = kv_heads_per_rank(args)  # after TP and the hybrid's all-to-all
    head_dim = args.hidden_size // args.num_attention_heads
    itemsize = 4  # this script trains in float32
    settings = attention_settings_from_args(args)  # what the layer spec hands every attention call
    chunk, mode = resolve_kv_chunking(settings.kv_head_chunk, settings.kv_backward, settings.kv_buffer_mib,
                                      args.micro_batch_size, args.seq_length, kv_heads, head_dim, itemsize,
                                      settings.link_gbit, dist.get_backend() if dist.is_initialized() else None)
    return mode if chunk == kv_heads else f"{mode} kv_head_chunk={chunk}/{kv_heads}"


def describe(args) -> str:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    tp_part = f"tp={tp}{'+sp' if args.sequence_parallel and tp > 1 else ''}"
    pp_part = f" x pp={pp}" if pp > 1 else ""
    if args.lss_sequence_parallel:
        sp, ulysses = args.lss_sequence_parallel_size, args.lss_ulysses_size
        hybrid = f" (ulysses={ulysses} x lss={sp // ulysses})" if ulysses > 1 else ""
        return (f"LSS {tp_part + ' x ' if tp > 1 else ''}sp={sp}{hybrid} x "
                f"dp={args.data_parallel_size}{pp_part} layout={args.lss_layout} "
                f"kv_backward={_kv_mode(args)}")
    return f"Megatron {tp_part} x dp={args.data_parallel_size}{pp_part}"


def train(args, loss_mask_fn: Optional[Callable] = None, probe_params=(), splits=None) -> list[dict]:
    """Run ``--train-iters`` iterations; returns one record per iteration (and eval records).

    ``loss_mask_fn(tokens, labels) -> mask [b, L]`` (global positions) lets a caller drop tokens
    from the loss; ``probe_params`` names parameters whose reduced gradient each record keeps.
    """
    from lss_plugin.data import load_byte_splits, with_document_ends
    from lss_plugin.megatron.model import GPTShape, build_gpt_model

    setup_parallel(args)
    shape = GPTShape.from_args(args)
    splits = splits if splits is not None else load_byte_splits(args.data_path)
    if uses_documents(args):
        splits = with_document_ends(splits)
    model = build_gpt_model(args, shape)
    optimizer = build_optimizer(model, args)
    start = load(model, optimizer, args, shape, splits) if args.load else 0
    _log(f"pretrain_gpt_lss: {describe(args)} | {shape.num_layers} layers, hidden "
         f"{shape.hidden_size}, seq {args.seq_length}, global batch {args.global_batch_size} | "
         f"data {splits.source}")
    metrics = open(args.metrics_file, "a") if args.metrics_file and _is_rank0() else None
    records = []
    tokens_per_iter = args.global_batch_size * args.seq_length
    try:
        for iteration in range(start + 1, args.train_iters + 1):
            t0 = time.perf_counter()
            out = train_step(model, optimizer, args, iteration, splits.train, loss_mask_fn, probe_params)
            elapsed = time.perf_counter() - t0
            record = {"iteration": iteration, "loss": out["loss"], "num_tokens": out["num_tokens"],
                      "grad_norm": out["grad_norm"], "lr": out["lr"],
                      "tokens_per_s": tokens_per_iter / elapsed, "ms_per_iter": 1000.0 * elapsed,
                      "mode": describe(args)}
            if not math.isfinite(out["loss"]):
                raise FloatingPointError(f"loss is {out['loss']} at iteration {iteration}")
            if args.eval_interval and (iteration % args.eval_interval == 0 or iteration == args.train_iters):
                record.update(evaluate(model, args, splits.valid))
            if metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if iteration % max(1, args.log_interval) == 0 or iteration == args.train_iters:
                extra = f" | val bpc {record['val_bpc']:.4f}" if "val_bpc" in record else ""
                _log(f"iter {iteration:6d}/{args.train_iters} | loss {out['loss']:.5f} | "
                     f"{record['tokens_per_s']:9.1f} tokens/s | {record['ms_per_iter']:8.1f} ms/iter | "
                     f"grad norm {out['grad_norm']:.3f}{extra}")
            record["probes"] = out["probes"]
            records.append(record)
            if args.save and args.save_interval and (
                    iteration % args.save_interval == 0 or iteration == args.train_iters):
                save(model, optimizer, args, shape, splits, iteration)
    finally:
        if metrics:
            metrics.close()
    return records


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as err:
        print(f"pretrain_gpt_lss: error: {err}", file=sys.stderr)
        return 2
    train(args)
    from lss_plugin.megatron.parallel import destroy_lss_model_parallel

    destroy_lss_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
