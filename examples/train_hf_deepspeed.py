#!/usr/bin/env python
"""Train a small transformers causal LM of any model_type under DeepSpeed with LSS attention.

    # 4 ranks, SP=2 x DP=2 (the "lss_sequence_parallel" block of the config sets SP and the layout)
    torchrun --nproc-per-node 4 examples/train_hf_deepspeed.py --model-type llama \\
        --deepspeed_config configs/ds_config_lss.json --train-iters 20 --seq-length 256
    # any causal-LM model_type transformers knows: gpt2, llama, mistral, qwen2, gpt_neox, phi3, ...
    # hybrid LSS x Ulysses: SP=4 (the block's "size") as 2 Ulysses groups of 2 ranks (all-to-all over
    # heads inside each, LSS's gather across them); written into the block as "ulysses_size"
    torchrun --nproc-per-node 4 examples/train_hf_deepspeed.py --model-type llama --num-kv-heads 2 \
        --deepspeed_config configs/ds_config_lss_sp4_zero2.json --ulysses-size 2

The model is ``AutoModelForCausalLM.from_config(AutoConfig.for_model(TYPE, small sizes),
attn_implementation="lss")`` on a byte vocabulary (256), trained on byte-level text
(``lss_plugin.data``: enwik8 with --data-path, else the gensim Wikipedia excerpt). The LSS lines:
``attn_implementation="lss"``, ``lss_plugin.hf.deepspeed_initialize`` in place of
``deepspeed.initialize``, and ``shard_causal_lm_batch`` for this rank's tokens. ``--metrics-file``
gets one JSON line per iteration (rank 0): iteration, loss, tokens_per_s, ms_per_iter, grad_norm, lr.

``--pack-documents`` packs each micro-batch into one row of documents, as transformers'
``DataCollatorWithFlattening`` does: every window and every Wikipedia page inside it (from
``--document-separator``, default ``<page>``, to the next) is a document; attention stays inside documents, positions restart at 0 for each, and no target crosses
a document (``lss_plugin.hf.pack_windows`` -> ``shard_causal_lm_batch``). The baseline (block
disabled) runs the same packed rows with transformers' own packed mask from the ``position_ids``.

``--window W`` writes W into the model config's own ``sliding_window`` (and ``use_sliding_window``
where the model has it); which layers slide is the model's ``layer_types`` (Mistral: all, gpt-oss and
Gemma 2: every other one); a model type without ``sliding_window`` is refused by name. ``--sinks``
states that the model's attention has learned sinks (gpt-oss' ``sinks``, passed as ``s_aux``); a model
type without them is refused by name. The baseline runs ``sdpa``, or ``eager`` for model types without
SDPA support (gpt-oss, Gemma 2).
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
    p.add_argument("--model-type", required=True, help="a transformers causal-LM model_type (llama, gpt2, mistral, ...)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", required=True,
                   help="DeepSpeed JSON config; an \"lss_sequence_parallel\" block with \"enabled\": false (or none) "
                        "trains the same model as plain DeepSpeed with sdpa attention (the baseline)")
    p.add_argument("--train-iters", type=int, default=20)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--metrics-file", default=None, help="JSON line per iteration (rank 0 appends)")
    p.add_argument("--data-path", default=None, help="a byte corpus such as enwik8 (default: the gensim excerpt)")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=None, help="GQA/MQA (model types with num_key_value_heads)")
    p.add_argument("--log-interval", type=int, default=1)
    p.add_argument("--pack-documents", action="store_true",
                   help="pack each micro-batch into one row of documents (windows and <page> elements), "
                        "no attention or targets across documents")
    p.add_argument("--document-separator", default="<page>",
                   help="with --pack-documents: the bytes that start a document (Python escapes, e.g. '\\n')")
    p.add_argument("--save", default=None, help="checkpoint directory")
    p.add_argument("--save-interval", type=int, default=0)
    p.add_argument("--load", default=None, help="resume from the last complete checkpoint in this directory (if any)")
    p.add_argument("--ulysses-size", type=int, default=None,
                   help="hybrid LSS x Ulysses: written into the config's \"lss_sequence_parallel\" block as "
                        "\"ulysses_size\" (must divide its \"size\" and the heads)")
    p.add_argument("--window", type=int, default=None,
                   help="the model config's sliding_window: W keys including the current one, on the model's "
                        "sliding layers (model types with sliding_window: mistral, gpt_oss, gemma2, ...)")
    p.add_argument("--sinks", action="store_true",
                   help="the model's attention has learned sinks (gpt_oss); refused for a model type without them")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None)  # deepspeed launcher
    args = p.parse_args(argv)
    if args.ulysses_size is not None:
        args.deepspeed_config = with_ulysses_size(args.deepspeed_config, args.ulysses_size)
    from lss_plugin.data import parse_separator

    args.separator = parse_separator(args.document_separator)
    for name in ("train_iters", "seq_length", "num_layers", "hidden_size", "num_heads", "log_interval", "window"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def with_ulysses_size(config_path: str, ulysses_size: int) -> dict:
    """The DeepSpeed config with ``"ulysses_size"`` in its enabled LSS block (checked as the block is)."""
    from lss_plugin.deepspeed import BLOCK_KEY, LSSConfig, load_config

    config = load_config(config_path)
    block = config.get(BLOCK_KEY)
    if not isinstance(block, dict) or block.get("enabled", True) is not True:
        raise ValueError(f"--ulysses-size {ulysses_size} needs an enabled \"{BLOCK_KEY}\" block in {config_path}")
    config = {**config, BLOCK_KEY: {**block, "ulysses_size": ulysses_size}}
    LSSConfig.from_ds_config(config)  # a size it does not divide is refused here, by name
    return config


def with_window(config, window: int | None):
    """The config with ``sliding_window = window`` on the model's own sliding layers; refused by name when
    the model type has no sliding window or no layer of it would slide."""
    if window is None:
        return config
    name = type(config).__name__
    if not hasattr(config, "sliding_window"):
        raise ValueError(f"--window {window}: {name} (model_type {config.model_type!r}) has no sliding_window; "
                         "model types with one: mistral, ministral, gpt_oss, gemma2, gemma3_text, qwen2, qwen3, ...")
    config.sliding_window = window
    if hasattr(config, "use_sliding_window"):  # Qwen2 / Qwen3: the window is off unless this is set
        config.use_sliding_window = True
    types = getattr(config, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        raise ValueError(f"--window {window}: {name}.layer_types {list(types)} has no sliding layer"
                         + (f" (max_window_layers={config.max_window_layers} of {config.num_hidden_layers} layers)"
                            if hasattr(config, "max_window_layers") else ""))
    return config


def check_sinks(model, sinks: bool) -> None:
    """--sinks names a property of the model type: its attention layers carry learned sink logits."""
    if sinks and not any(n.endswith(".sinks") for n, _ in model.named_parameters()):
        raise ValueError(f"--sinks: {type(model).__name__} has no learned attention sinks (gpt_oss has)")


def baseline_attention(config) -> str:
    """The one-process baseline's attention: sdpa, or eager for model classes without SDPA (gpt-oss, Gemma 2)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return "sdpa" if getattr(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], "_supports_sdpa", False) else "eager"


def train(args) -> list[dict]:
    import torch
    import torch.distributed as dist

    import lss_plugin.hf as hf
    from lss_plugin.data import load_byte_splits, sample_batch
    from lss_plugin.deepspeed import LSSConfig
    from lss_plugin.deepspeed import checkpoint as ds_checkpoint
    from lss_plugin.deepspeed.metrics import StepLoss

    # A disabled (or absent) block: the same script as plain DeepSpeed data parallelism, the baseline.
    enabled = LSSConfig.from_ds_config(args.deepspeed_config).enabled
    config = with_window(hf.small_causal_lm_config(
        args.model_type, hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads, max_positions=args.seq_length,
    ), args.window)
    model = hf.build_causal_lm(config, attn_implementation="lss" if enabled else baseline_attention(config),
                               seed=args.seed)
    check_sinks(model, args.sinks)  # the same on every rank, before any collective
    engine, _, _, _ = hf.deepspeed_initialize(args=args, model=model, model_parameters=model.parameters())
    topology = getattr(engine, "lss_topology", None)
    dp_size, dp_rank = (topology.dp_size, topology.dp_rank) if enabled else (dist.get_world_size(), dist.get_rank())
    rank0 = dist.get_rank() == 0
    splits = load_byte_splits(args.data_path)
    gas, micro = engine.gradient_accumulation_steps(), engine.train_micro_batch_size_per_gpu()
    global_batch = engine.train_batch_size()
    if rank0:
        params = sum(p.numel() for p in model.parameters())
        grid = (f"sp={topology.sp_size} (ulysses={topology.ulysses_size}) x dp={dp_size}, "
                f"layout={engine.lss_config.attention.layout}" if enabled
                else f"dp={dp_size} (no LSS)")
        print(f"train_hf_deepspeed: {type(model).__name__} ({params} parameters), {grid}, "
              f"ZeRO {engine.zero_optimization_stage()}, seq {args.seq_length}, global batch {global_batch}"
              f"{f', sliding_window {config.sliding_window}' if args.window else ''}{', sinks' if args.sinks else ''}"
              f"{f', packed documents (separator {args.separator!r})' if args.pack_documents else ''} | "
              f"data {splits.source}", flush=True)
    # resumes from the last complete checkpoint (none yet: from scratch), e.g. after torchrun restarted the job
    start = ds_checkpoint.load(engine, args.load)
    metrics = open(args.metrics_file, "a") if args.metrics_file and rank0 else None
    records = []
    try:
        for iteration in range(start + 1, args.train_iters + 1):
            t0 = time.perf_counter()
            window = sample_batch(splits.train, global_batch, args.seq_length, step=iteration, seed=args.seed)
            step_loss = StepLoss()  # this rank's loss sum and tokens over the micro-steps
            for micro_step in range(gas):
                first = (micro_step * dp_size + dp_rank) * micro
                rows = window[first:first + micro].to(engine.device)  # [micro, L + 1]: this DP rank's sequences
                if args.pack_documents:
                    inputs, labels = packed_inputs(rows, args.separator, enabled)
                elif enabled:
                    # Every position predicts the next byte; the labels are the window shifted by one,
                    # taken before the sequence is split, so segment boundaries are predicted too.
                    batch = hf.shard_causal_lm_batch(rows[:, :-1], shift_labels=rows[:, 1:]).to(engine.device)
                    inputs, labels = batch.model_inputs(), batch.shift_labels
                else:
                    inputs, labels = {"input_ids": rows[:, :-1]}, rows[:, 1:]
                logits = engine(**inputs).logits  # [micro, L/N, 256]
                # Normalised by the loss tokens of every rank: DeepSpeed's average is the global token mean.
                loss = hf.causal_lm_loss(logits, labels)
                engine.backward(loss.loss)
                engine.step()
                step_loss.add(loss)
            value, _ = step_loss.reduce()  # the global batch's token-mean loss
            elapsed = time.perf_counter() - t0
            norm = engine.get_global_grad_norm()
            record = {"iteration": iteration, "loss": value,
                      "tokens_per_s": global_batch * args.seq_length / elapsed, "ms_per_iter": 1000.0 * elapsed,
                      "grad_norm": None if norm is None else float(norm), "lr": engine.get_lr()[0]}
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at iteration {iteration}")
            records.append(record)
            if metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if rank0 and (iteration % args.log_interval == 0 or iteration == args.train_iters):
                print(f"iter {iteration:6d}/{args.train_iters} | loss {value:.5f} | "
                      f"{record['tokens_per_s']:9.1f} tokens/s | {record['ms_per_iter']:8.1f} ms/iter", flush=True)
            if args.save and args.save_interval and (iteration % args.save_interval == 0 or iteration == args.train_iters):
                ds_checkpoint.save(engine, args.save, iteration)
    finally:
        if metrics:
            metrics.close()
    return records


def packed_inputs(rows, separator: bytes, enabled: bool):
    """rows [micro, L + 1] -> model inputs and targets of one packed row [1, micro * L] (this rank's share under LSS)."""
    import lss_plugin.hf as hf
    from lss_plugin.documents import cu_seqlens_from_position_ids
    from lss_plugin.hf.packing import ignore_cross_document_targets

    packed = hf.pack_windows(rows, separator)
    if enabled:  # the global boundaries from the whole row, this rank's tokens and per-document positions
        batch = hf.shard_causal_lm_batch(**packed)
        return batch.model_inputs(), batch.shift_labels
    cu_seqlens = cu_seqlens_from_position_ids(packed["position_ids"])
    labels = ignore_cross_document_targets(packed["shift_labels"], cu_seqlens, hf.IGNORE_INDEX)
    # No attention_mask: transformers reads the restarting position_ids as packed documents itself.
    return {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"], "use_cache": False}, labels


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as err:
        print(f"train_hf_deepspeed: error: {err}", file=sys.stderr)
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
