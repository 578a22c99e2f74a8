#!/usr/bin/env python
"""Train the reference byte-level GPT under DeepSpeed, with LSS sequence parallelism from the config.

    # 4 ranks, SP=2 x DP=2 (the "lss_sequence_parallel" block of the config sets SP)
    torchrun --nproc-per-node 4 examples/train_gpt_deepspeed.py --deepspeed_config configs/ds_config_lss.json
    # the same with DeepSpeed's launcher (on a CPU host too: --num_gpus is the number of ranks)
    OMP_NUM_THREADS=1 deepspeed --num_gpus 4 examples/train_gpt_deepspeed.py --deepspeed_config configs/ds_config_lss.json

The one LSS-specific line is ``lss_plugin.deepspeed.initialize`` in place of
``deepspeed.initialize``. Batch sizes come from the DeepSpeed config (``train_batch_size``
sequences per iteration, split over DP ranks and micro-batches); every sequence is split over the
SP ranks. ``--metrics-file`` gets one JSON line per iteration (rank 0): iteration, loss (the
token mean over the whole global batch of the step), loss_tokens, tokens_per_s, ms_per_iter,
grad_norm, lr. With ``"enabled": false`` in the block (or no block) the same script is plain
DeepSpeed data parallelism: the baseline. Without a launcher it runs as one plain process:

    python examples/train_gpt_deepspeed.py --deepspeed_config configs/ds_config_baseline.json

``--pack-documents`` packs each micro-batch's rows into one sequence of documents: every row and
every Wikipedia page inside it (from ``--document-separator``, default ``<page>``, to the next) is a
document. Attention stays inside documents (``cu_seqlens``, global boundaries, to ``lss_attention``;
the baseline masks the same with SDPA), positions restart at 0 for each and no target crosses one.

``--window W`` gives every layer a sliding window of W keys including the current one (transformers'
``sliding_window``; ``lss_attention(window=(W - 1, 0))``), ``--full-attention-every N`` keeps every N-th
layer full (gpt-oss / Gemma 2 alternate with N = 2); ``--sinks`` gives every layer one learned sink
logit per head (gpt-oss), trained and averaged like any weight. The baseline computes the same masks
densely.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", required=True,
                   help="DeepSpeed JSON config, optionally with an \"lss_sequence_parallel\" block")
    p.add_argument("--train-iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--metrics-file", default=None, help="JSON line per iteration (rank 0 appends)")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--data-path", default=None, help="a byte corpus such as enwik8 (default: the gensim excerpt)")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=None)
    p.add_argument("--position-embedding", choices=("learned", "rope"), default="learned")
    p.add_argument("--ignore-byte", type=int, default=None,
                   help="leave targets equal to this byte out of the loss (e.g. 10: newlines); ranks then hold "
                        "different numbers of loss tokens and the loss stays the global token mean")
    p.add_argument("--log-interval", type=int, default=1)
    p.add_argument("--pack-documents", action="store_true",
                   help="pack each micro-batch into one sequence of documents (rows and <page> elements), "
                        "no attention or targets across documents")
    p.add_argument("--document-separator", default="<page>",
                   help="with --pack-documents: the bytes that start a document (Python escapes, e.g. '\\n')")
    p.add_argument("--window", type=int, default=None,
                   help="sliding window: each query attends to the W latest keys, its own included")
    p.add_argument("--full-attention-every", type=int, default=None,
                   help="with --window: every N-th layer (the N-th, 2N-th, ...) keeps full causal attention")
    p.add_argument("--sinks", action="store_true", help="a learned attention sink logit per head in every layer")
    p.add_argument("--save", default=None, help="checkpoint directory (engine.save_checkpoint)")
    p.add_argument("--save-interval", type=int, default=0)
    p.add_argument("--load", default=None, help="resume from the latest checkpoint in this directory")
    # The deepspeed launcher passes --local_rank; torchrun sets LOCAL_RANK.
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None)
    args = p.parse_args(argv)
    for name in ("train_iters", "seq_length", "num_layers", "hidden_size", "num_heads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("window", "full_attention_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.full_attention_every is not None and args.window is None:
        raise ValueError(f"--full-attention-every {args.full_attention_every} needs --window")
    if args.ignore_byte is not None and not 0 <= args.ignore_byte <= 255:
        raise ValueError(f"--ignore-byte must be a byte value 0-255, got {args.ignore_byte}")
    from lss_plugin.data import parse_separator

    args.separator = parse_separator(args.document_separator)
    return args


class Sharder:
    """This rank's rows (DP, micro-batch) and tokens (SP, layout) of a global batch."""

    def __init__(self, engine, seq_length: int):
        import torch.distributed as dist

        self.topology = getattr(engine, "lss_topology", None)
        self.layout = engine.lss_config.attention.layout if self.topology is not None else None
        self.dp_size = self.topology.dp_size if self.topology is not None else dist.get_world_size()
        self.dp_rank = self.topology.dp_rank if self.topology is not None else dist.get_rank()
        self.micro = engine.train_micro_batch_size_per_gpu()
        self.seq_length = seq_length
        self.positions = self._token_indices(seq_length)
        self.packed_indices = self._token_indices(self.micro * seq_length)

    def _token_indices(self, length: int):
        """Which of ``length`` tokens this rank holds (all of them without LSS)."""
        if self.topology is None:
            import torch

            return torch.arange(length)
        from lss_plugin.sharding import check_seq_len, local_token_indices

        # the block's "ulysses_size": the hybrid LSS x Ulysses lays tokens out per Ulysses group
        u = self.topology.ulysses_size
        check_seq_len(length, self.topology.sp_size, self.layout, u)
        return local_token_indices(length, self.topology.sp_rank, self.topology.sp_size, self.layout, u)

    def _rows(self, batch, micro_step: int):
        first = (micro_step * self.dp_size + self.dp_rank) * self.micro
        return batch[first:first + self.micro]

    def micro_batch(self, batch, micro_step: int):
        """batch [gas * dp * micro, L + 1] -> inputs, labels [micro, L/N], positions [L/N]."""
        rows = self._rows(batch, micro_step)
        return rows[:, :-1][:, self.positions], rows[:, 1:][:, self.positions], self.positions

    def packed_micro_batch(self, batch, micro_step: int, separator: bytes):
        """The micro-batch's rows packed into one sequence of documents (``lss_plugin.hf.pack_windows``) ->
        inputs, labels [1, micro * L / N], positions inside documents [micro * L / N], global cu_seqlens."""
        from lss_plugin.documents import cu_seqlens_from_position_ids
        from lss_plugin.hf.packing import ignore_cross_document_targets, pack_windows
        from lss_plugin.loss import IGNORE_INDEX

        packed = pack_windows(self._rows(batch, micro_step), separator)  # [1, micro * L] each
        cu_seqlens = cu_seqlens_from_position_ids(packed["position_ids"])  # the whole sequence's boundaries
        labels = ignore_cross_document_targets(packed["shift_labels"], cu_seqlens, IGNORE_INDEX)
        idx = self.packed_indices
        return packed["input_ids"][:, idx], labels[:, idx], packed["position_ids"][0, idx], cu_seqlens


def mask_labels(labels, ignore_byte):
    """Targets equal to ``ignore_byte`` -> IGNORE_INDEX (left out of the loss)."""
    from lss_plugin.loss import IGNORE_INDEX

    return labels if ignore_byte is None else labels.masked_fill(labels == ignore_byte, IGNORE_INDEX)


def layer_types(args):
    """--window's layers: all sliding, or every --full-attention-every-th layer full (None: the config's default)."""
    from lss_plugin.models.gpt import FULL, SLIDING

    if args.window is None or args.full_attention_every is None:
        return None
    return tuple(FULL if (i + 1) % args.full_attention_every == 0 else SLIDING for i in range(args.num_layers))


def build_model(args, lss):
    from lss_plugin.models.gpt import GPT, GPTConfig, LSSAttentionOptions

    config = GPTConfig(vocab_size=256, max_seq_length=args.seq_length, hidden_size=args.hidden_size,
                       num_layers=args.num_layers, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                       position_embedding=args.position_embedding, window=args.window,
                       layer_types=layer_types(args), sinks=args.sinks)
    return GPT(config, lss=LSSAttentionOptions(settings=lss.attention) if lss.enabled else None)


def train(args) -> list[dict]:
    import torch
    import torch.distributed as dist

    import lss_plugin.deepspeed as lds
    from lss_plugin.data import load_byte_splits, sample_batch
    from lss_plugin.deepspeed import checkpoint as ds_checkpoint
    from lss_plugin.deepspeed.metrics import StepLoss
    from lss_plugin.loss import sharded_cross_entropy

    lss = lds.LSSConfig.from_ds_config(args.deepspeed_config)
    torch.manual_seed(args.seed)
    model = build_model(args, lss)
    # DeepSpeed's convention: the config travels in args.deepspeed_config.
    engine, _, _, _ = lds.initialize(args=args, model=model, model_parameters=model.parameters())
    rank0 = dist.get_rank() == 0
    sharder = Sharder(engine, args.seq_length)
    splits = load_byte_splits(args.data_path)
    gas = engine.gradient_accumulation_steps()
    global_batch = engine.train_batch_size()  # sequences per iteration
    # resumes from the last complete checkpoint (none yet: from scratch), e.g. after torchrun restarted the job
    start = ds_checkpoint.load(engine, args.load)
    topology = getattr(engine, "lss_topology", None)
    # The loss is normalised by the loss tokens of every rank (the SP x DP grid = the world), so
    # DeepSpeed's average over SP x DP is the global token mean even when ranks hold different
    # numbers of loss tokens (--ignore-byte). Accumulated micro-steps weigh equally, as in DeepSpeed.
    loss_group = dist.group.WORLD if dist.get_world_size() > 1 else None
    if rank0:
        grid = (f"sp={topology.sp_size} (ulysses={topology.ulysses_size}) x dp={topology.dp_size}" if topology
                else f"dp={dist.get_world_size()} (no LSS)")
        packed = f", packed documents (separator {args.separator!r})" if args.pack_documents else ""
        masks = (f", window {args.window} on layers {model.config.layer_types}" if args.window else "") + \
            (", sinks" if args.sinks else "")
        print(f"train_gpt_deepspeed: {grid}, ZeRO {engine.zero_optimization_stage()}, {args.num_layers} layers, "
              f"hidden {args.hidden_size}, seq {args.seq_length}, global batch {global_batch}{packed}{masks} | "
              f"data {splits.source}", flush=True)
    metrics = open(args.metrics_file, "a") if args.metrics_file and rank0 else None
    records = []
    try:
        for iteration in range(start + 1, args.train_iters + 1):
            t0 = time.perf_counter()
            batch = sample_batch(splits.train, global_batch, args.seq_length, step=iteration, seed=args.seed)
            step_loss = StepLoss()  # this rank's loss sum and tokens over the micro-steps
            for micro_step in range(gas):
                packing = {}
                if args.pack_documents:
                    inputs, labels, positions, cu_seqlens = sharder.packed_micro_batch(batch, micro_step, args.separator)
                    packing = {"cu_seqlens": cu_seqlens.to(engine.device)}
                else:
                    inputs, labels, positions = sharder.micro_batch(batch, micro_step)
                labels = mask_labels(labels, args.ignore_byte)
                logits = engine(inputs.to(engine.device), positions.to(engine.device), **packing)  # [b, s_local, 256]
                out = sharded_cross_entropy(logits, labels.to(engine.device), group=loss_group)
                engine.backward(out.loss)
                engine.step()
                step_loss.add(out)
            loss, step_tokens = step_loss.reduce()  # the global batch's token-mean loss
            elapsed = time.perf_counter() - t0
            norm = engine.get_global_grad_norm()
            record = {"iteration": iteration, "loss": loss, "loss_tokens": step_tokens,
                      "tokens_per_s": global_batch * args.seq_length / elapsed, "ms_per_iter": 1000.0 * elapsed,
                      "grad_norm": None if norm is None else float(norm), "lr": engine.get_lr()[0]}
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at iteration {iteration}")
            records.append(record)
            if metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if rank0 and (iteration % max(1, args.log_interval) == 0 or iteration == args.train_iters):
                print(f"iter {iteration:6d}/{args.train_iters} | loss {loss:.5f} | "
                      f"{record['tokens_per_s']:9.1f} tokens/s | {record['ms_per_iter']:8.1f} ms/iter", flush=True)
            if args.save and args.save_interval and (iteration % args.save_interval == 0 or iteration == args.train_iters):
                ds_checkpoint.save(engine, args.save, iteration)
    finally:
        if metrics:
            metrics.close()
    return records


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as err:
        print(f"train_gpt_deepspeed: error: {err}", file=sys.stderr)
        return 2
    train(args)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: DeepSpeed sometimes aborts in it
