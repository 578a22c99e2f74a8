#!/usr/bin/env python
"""Train a small transformers causal LM of any model_type with ``Trainer``; LSS when the DeepSpeed config says so.

    # 4 ranks, SP=2 x DP=2: the "lss_sequence_parallel" block of the config switches LSS on
    torchrun --nproc-per-node 4 examples/finetune_hf_trainer.py --model-type llama --num-kv-heads 2 \\
        --deepspeed configs/ds_config_hf_trainer_lss.json --output_dir runs/hf_trainer \\
        --max_steps 20 --per_device_train_batch_size 2 --seq-length 256 --learning_rate 1e-3 \\
        --logging_steps 1 --report_to none --metrics-file runs/hf_trainer.jsonl
    # the baseline: the same command with a config whose block is absent or "enabled": false

Every ``TrainingArguments`` flag works (``HfArgumentParser``; dash and underscore spellings both
parse). The model is ``AutoModelForCausalLM.from_config(small config of --model-type)`` on a byte
vocabulary (256), trained on byte-level text (``lss_plugin.data``: enwik8 with --data-path, else the
gensim Wikipedia excerpt) cut into windows of --seq-length bytes (``labels`` = ``input_ids``, as any
causal-LM dataset). The one LSS line is ``LSSTrainer`` in place of ``Trainer``. ``--metrics-file``
gets one JSON line per optimizer step from rank 0 (``iteration``, ``loss`` of the global batch,
``grad_norm``, ``learning_rate``; ``eval_loss`` lines after evaluations); it makes the Trainer log
every step. ``--resume_from_checkpoint auto`` resumes from the last complete checkpoint in
``--output_dir`` (or starts from scratch when there is none): with ``--save_steps`` and ``torchrun
--max-restarts R`` a killed job goes on from its last checkpoint by itself.

``--pack-documents`` trains on documents instead of windows: the Wikipedia pages of the corpus
(``<page>`` ... up to the next; ``--document-separator '\\n'`` makes every line one), cut into pieces of
at most --seq-length bytes, packed by transformers' ``DataCollatorWithFlattening`` into one row per
micro-batch (``position_ids`` restart at 0 for each document, ``labels`` -100 at each document's first
token). The plain Trainer attends within documents through transformers' packed mask; ``LSSTrainer``
splits the packed row with the global boundaries.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments  # noqa: E402


@dataclass
class ExampleArguments:
    model_type: str = field(default="llama", metadata={"help": "a transformers causal-LM model_type (llama, gpt2, qwen2, ...)"})
    seq_length: int = field(default=256, metadata={"help": "bytes per training sequence (the whole sequence, before sharding)"})
    num_layers: int = field(default=2)
    hidden_size: int = field(default=64)
    num_heads: int = field(default=4)
    num_kv_heads: int | None = field(default=None, metadata={"help": "GQA/MQA (model types with num_key_value_heads)"})
    data_path: str | None = field(default=None, metadata={"help": "a byte corpus such as enwik8 (default: the gensim excerpt)"})
    eval_windows: int = field(default=32, metadata={"help": "validation windows evaluated (with --do_eval or --eval_strategy)"})
    metrics_file: str | None = field(default=None, metadata={"help": "JSON line per optimizer step (rank 0 appends)"})
    pack_documents: bool = field(default=False, metadata={
        "help": "train on documents (<= seq-length bytes) packed into one row per micro-batch by "
                "DataCollatorWithFlattening, no attention or targets across documents"})
    document_separator: str = field(default="<page>", metadata={
        "help": "with --pack-documents: the bytes that start a document (Python escapes, e.g. '\\n' for lines)"})
    model_config: str | None = field(default=None, metadata={
        "help": "JSON object of config fields for --model-type, e.g. "
                "'{\"sliding_window\": 8, \"layer_types\": [\"sliding_attention\", \"full_attention\"]}'"})
    attn_implementation: str = field(default="sdpa", metadata={
        "help": "the attention without LSS (eager for models whose sdpa path lacks a feature, e.g. gpt-oss sinks); "
                "LSSTrainer switches it to lss when the DeepSpeed config enables LSS"})

    @property
    def separator(self) -> bytes:
        from lss_plugin.data import parse_separator

        return parse_separator(self.document_separator)

    def __post_init__(self):
        for name in ("seq_length", "num_layers", "hidden_size", "num_heads", "eval_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


class ByteWindows(torch.utils.data.Dataset):
    """Consecutive windows of ``seq_length`` bytes: ``{"input_ids", "labels"}`` (labels unshifted, as transformers')."""

    def __init__(self, tokens, seq_length: int, limit: int | None = None):
        count = len(tokens) // seq_length
        self.tokens, self.seq_length = tokens, seq_length
        self.count = count if limit is None else min(count, limit)
        if self.count < 1:
            raise ValueError(f"{len(tokens)} bytes hold no window of {seq_length}")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        start = i * self.seq_length
        ids = torch.as_tensor(self.tokens[start:start + self.seq_length].astype("int64"))
        return {"input_ids": ids, "labels": ids.clone()}


class ByteDocuments(torch.utils.data.Dataset):
    """Documents of the byte stream (each from a ``separator`` to the next), cut into pieces of at most
    ``max_length`` bytes: ``{"input_ids"}`` of varying lengths, for ``DataCollatorWithFlattening``."""

    def __init__(self, tokens, max_length: int, separator: bytes, limit: int | None = None):
        from lss_plugin.data import document_spans

        self.tokens = tokens
        self.spans = document_spans(tokens, separator, max_length)[:limit]
        if not self.spans:
            raise ValueError(f"{len(tokens)} bytes hold no document")

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> dict:
        start, end = self.spans[i]
        return {"input_ids": self.tokens[start:end].astype("int64").tolist()}


class MetricsFile(TrainerCallback):
    """Rank 0 appends one JSON line per optimizer step (the Trainer is made to log every step)."""

    def __init__(self, path: str):
        self.path = path

    def on_step_end(self, args, state, control, **kwargs):
        control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        keys = ("loss", "grad_norm", "learning_rate", "eval_loss")
        record = {"iteration": state.global_step, **{k: logs[k] for k in keys if k in logs}}
        if len(record) > 1:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def last_good_checkpoint(output_dir: str, world_size: int) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` whose save finished, or None.

    The Trainer writes a checkpoint in place: model, optimizer (DeepSpeed's engine state, ending
    in a barrier), each rank's RNG state, then ``trainer_state.json`` from rank 0. A save cut short
    by a kill lacks the state file or a rank's RNG file; such a directory is passed over.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not os.path.isdir(output_dir):
        return None
    steps = sorted((int(name.rsplit("-", 1)[1]), name) for name in os.listdir(output_dir)
                   if name.startswith(PREFIX_CHECKPOINT_DIR + "-") and name.rsplit("-", 1)[1].isdigit())
    rng_files = {"rng_state.pth"} if world_size == 1 else {f"rng_state_{r}.pth" for r in range(world_size)}
    for step, name in reversed(steps):
        path = os.path.join(output_dir, name)
        try:
            with open(os.path.join(path, "trainer_state.json")) as f:
                if json.load(f).get("global_step") != step:
                    continue
        except (OSError, ValueError):
            continue
        if rng_files <= set(os.listdir(path)):
            return path
    return None


def parse_args(argv=None) -> tuple[ExampleArguments, TrainingArguments]:
    argv = list(sys.argv[1:] if argv is None else argv)
    from lss_plugin.runtime import agent_store_shared, init_distributed

    if agent_store_shared():
        # under torchrun: the plugin's process-group set-up, which survives restarts (accelerate's
        # and DeepSpeed's would read the previous attempt's rendezvous keys after a restart)
        init_distributed()
    flags = {a.split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    if ("__deepspeed" in flags and "__accelerator_config" not in flags and not torch.cuda.is_available()
            and int(os.environ.get("WORLD_SIZE", "1")) > 1):
        # CPU-only host: accelerate would see one process (see configure_accelerate_for_deepspeed).
        from lss_plugin.hf.trainer import configure_accelerate_for_deepspeed

        configure_accelerate_for_deepspeed()
        argv += ["--accelerator_config", '{"use_configured_state": true}']
    parser = HfArgumentParser((ExampleArguments, TrainingArguments))
    example, training = parser.parse_args_into_dataclasses(args=argv)
    return example, training


def run(example: ExampleArguments, training: TrainingArguments):
    """Train (and evaluate when asked); returns the (closed) trainer: ``trainer.state.log_history`` has the logs."""
    import lss_plugin.hf as hf
    from lss_plugin.data import load_byte_splits

    splits = load_byte_splits(example.data_path)
    config = hf.small_causal_lm_config(
        example.model_type, hidden_size=example.hidden_size, num_layers=example.num_layers,
        num_heads=example.num_heads, num_kv_heads=example.num_kv_heads, max_positions=example.seq_length,
        **(json.loads(example.model_config) if example.model_config else {}),
    )
    # Built with the default attention: LSSTrainer switches it to "lss" when the config enables LSS.
    model = hf.build_causal_lm(config, attn_implementation=example.attn_implementation, seed=training.seed)
    evaluating = training.do_eval or training.eval_strategy != "no"
    if example.pack_documents:
        from transformers import DataCollatorWithFlattening

        train = ByteDocuments(splits.train, example.seq_length, example.separator)
        valid = ByteDocuments(splits.valid, example.seq_length, example.separator, limit=example.eval_windows) \
            if evaluating else None
        collator = DataCollatorWithFlattening()
    else:
        train, collator = ByteWindows(splits.train, example.seq_length), None
        valid = ByteWindows(splits.valid, example.seq_length, limit=example.eval_windows) if evaluating else None
    trainer = hf.LSSTrainer(
        model=model,
        args=training,
        train_dataset=train,
        eval_dataset=valid,
        data_collator=collator,
        callbacks=[MetricsFile(example.metrics_file)] if example.metrics_file else None,
    )
    if trainer.is_world_process_zero():
        lss = trainer.lss_config
        mode = (f"LSS sp={lss.size} (ulysses={lss.ulysses_size}) x dp={trainer.lss_dims.dp}, layout={lss.attention.layout}"
                if lss.enabled else "plain Trainer (no enabled lss_sequence_parallel block)")
        params = sum(p.numel() for p in model.parameters())
        data = f"{len(train)} documents packed per micro-batch" if example.pack_documents else f"seq {example.seq_length}"
        print(f"finetune_hf_trainer: {type(model).__name__} ({params} parameters), {mode}, {data} "
              f"| data {splits.source}", flush=True)
    try:
        resume = training.resume_from_checkpoint
        if resume == "auto":  # the last complete checkpoint in --output_dir, or from scratch
            resume = last_good_checkpoint(training.output_dir, training.world_size)
            if trainer.is_world_process_zero():
                print(f"finetune_hf_trainer: resuming from {resume or 'scratch (no complete checkpoint)'}", flush=True)
        trainer.train(resume_from_checkpoint=resume)
        if training.do_eval:
            trainer.evaluate()  # logs eval_loss itself
        return trainer
    finally:
        trainer.close()


def main(argv=None):
    return run(*parse_args(argv))


if __name__ == "__main__":
    main()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: DeepSpeed sometimes aborts in it
