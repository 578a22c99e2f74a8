"""``transformers.Trainer`` with LSS sequence parallelism, switched on by the DeepSpeed config.

    from lss_plugin.hf import LSSTrainer          # in place of transformers.Trainer
    trainer = LSSTrainer(model=model, args=TrainingArguments(..., deepspeed="ds_config_lss.json"),
                         train_dataset=train, eval_dataset=valid)
    trainer.train()

Without an enabled ``"lss_sequence_parallel"`` block in ``args.deepspeed`` this *is* ``Trainer``.
With it, the Trainer follows the pattern transformers/accelerate use for DeepSpeed-Ulysses (ALST:
``ParallelismConfig(sp_backend="deepspeed")``), with LSS parts in each place:

- attention: the model's ``attn_implementation`` becomes ``"lss"`` with the block's layout and
  K/V options (ALST: ``UlyssesSPAttentionHF.register_with_transformers``); with the block's
  ``"ulysses_size"`` it runs the hybrid LSS x Ulysses over the topology the engine builds, and the
  batches follow the hybrid's token layout (``shard_causal_lm_batch`` takes the topology's groups);
- DeepSpeed: accelerate's ``Accelerator._prepare_deepspeed`` calls ``deepspeed.initialize`` itself
  and only knows how to hand it the Ulysses mpu. For the duration of that one call
  ``deepspeed.initialize`` is ``lss_plugin.hf.deepspeed_initialize``, which reads the block from
  the ``config_params`` accelerate passes, builds the SP x DP topology and the ``LSSMpu`` and makes
  the engine average gradients over SP and DP (``lss_plugin.deepspeed``);
- data: the prepared ``DataLoader``'s ``BatchSamplerShard`` counts data-parallel ranks, so the SP
  ranks of one sequence read the same rows (ALST instead all-gathers every rank's rows in
  ``UlyssesSPDataLoaderAdapter``); each global micro-batch ``[b, L]`` is right-padded to a length
  the layout can split and cut into this rank's ``[b, L/N]`` by ``shard_causal_lm_batch`` (labels
  shifted before sharding, global ``position_ids``). Packed documents (``data_collator=
  DataCollatorWithFlattening()``, with or without ``return_flash_attn_kwargs``) are split the same
  way, with the global boundaries from the whole row's restarting ``position_ids``;
- batch sizes: ``Trainer.get_total_train_batch_size`` and DeepSpeed's ``train_batch_size``
  (``"auto"``) are ``per_device_train_batch_size * gradient_accumulation_steps * dp``;
- loss: the token mean over the whole optimizer step (all micro-batches, all ranks), as a plain
  Trainer with ``average_tokens_across_devices=True`` computes it: every rank backpropagates its
  loss sum times ``world / tokens``, DeepSpeed's average over the grid makes the mean. With
  ``average_tokens_across_devices=False`` the count is per DP shard, as plain DDP does;
- evaluation reports ``eval_loss``, the token mean of each DP shard's batch as a plain Trainer
  does per rank.

Whatever this cannot do exactly is refused by name before any collective runs (see
``_refuse_unsupported``).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist
from transformers import Trainer

from lss_plugin.comm import all_reduce_sum
from lss_plugin.deepspeed.config import LSSConfig, LSSConfigError, load_config
from lss_plugin.hf.attention import check_model_runs_lss, register_lss_attention
from lss_plugin.hf.registry import DEFAULT_NAME, is_registered, lss_options, parts_per_sequence
from lss_plugin.hf.batch import IGNORE_INDEX, pad_for_layout, shard_causal_lm_batch
from lss_plugin.hf.packing import FLASH_ATTN_KWARGS
from lss_plugin.loss import cross_entropy_sum
from lss_plugin.runtime import as_timedelta, default_backend
from lss_plugin.topology import ParallelDims, get_topology

# The batch keys the Trainer integration knows how to split along the sequence; position_ids and the
# FlashAttentionKwargs are those of packed documents (DataCollatorWithFlattening).
SHARDABLE_KEYS = ("input_ids", "attention_mask", "labels", "shift_labels", "position_ids", *FLASH_ATTN_KWARGS)


def lss_config_of(args) -> LSSConfig:
    """The ``"lss_sequence_parallel"`` block of ``args.deepspeed`` (disabled without DeepSpeed)."""
    if args is None or not getattr(args, "deepspeed", None):
        return LSSConfig(enabled=False)
    hf_config = getattr(args, "hf_deepspeed_config", None)
    return LSSConfig.from_ds_config(hf_config.config if hf_config is not None else args.deepspeed)


class LSSTrainer(Trainer):
    """``Trainer`` that trains with LSS when ``args.deepspeed`` holds an enabled ``"lss_sequence_parallel"`` block."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lss_config = lss_config_of(self.args)
        if not self.lss_config.enabled:
            return
        world = self.args.world_size
        dp = self.lss_config.check_world(world)
        self.lss_dims = ParallelDims(sp=self.lss_config.size, dp=dp, world_size=world,
                                     ulysses=self.lss_config.ulysses_size)
        coords = self.lss_dims.coords(self.args.process_index)
        self.lss_dp_rank, self.lss_sp_rank = coords.dp, coords.sp
        _refuse_unsupported(self)
        _resolve_train_batch_size(self.args, dp)
        self.lss_attn_implementation = use_lss_attention(self.model, self.lss_config)
        # The loss is computed here from the logits (as ALST's deepspeed_sp_compute_loss does) and is
        # already normalised over the whole accumulated step: the Trainer must not divide it again.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = True
        _route_deepspeed_initialize(self.accelerator)

    @property
    def lss_enabled(self) -> bool:
        return self.lss_config.enabled

    # -- model ---------------------------------------------------------------------------------
    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        if self.lss_enabled:
            use_lss_attention(model, self.lss_config)
        return model

    # -- data ----------------------------------------------------------------------------------
    def get_total_train_batch_size(self, args) -> int:
        if not self.lss_enabled:
            return super().get_total_train_batch_size(args)
        return self._train_batch_size * args.gradient_accumulation_steps * self.lss_dims.dp

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        return self._shard_over_data_parallel(loader) if self.lss_enabled else loader

    def get_eval_dataloader(self, eval_dataset=None):
        loader = super().get_eval_dataloader(eval_dataset)
        if not self.lss_enabled:
            return loader
        if not self.args.dataloader_drop_last:
            _refuse_uneven_eval(loader.dataset, self.args.eval_batch_size, self.lss_dims.dp)
        return self._shard_over_data_parallel(loader)

    def _shard_over_data_parallel(self, loader):
        """accelerate deals batches out over every process; under LSS only the DP ranks differ."""
        if self.lss_dims.sp == 1:
            return loader
        from accelerate.data_loader import BatchSamplerShard

        batch_sampler = getattr(loader, "batch_sampler", None)
        if not isinstance(batch_sampler, BatchSamplerShard):
            raise ValueError(
                f"LSSTrainer needs a map-style dataset whose batches accelerate deals out with a BatchSamplerShard; "
                f"got a {type(loader).__name__} with batch sampler {type(batch_sampler).__name__} (IterableDataset "
                "or dispatch_batches=True): the SP ranks of a sequence would read different rows"
            )
        batch_sampler.num_processes = self.lss_dims.dp
        batch_sampler.process_index = self.lss_dp_rank
        return loader

    def shard_batch(self, inputs: dict) -> dict:
        """A global micro-batch ``{input_ids [b, L], ...}`` -> this rank's model inputs ``[b, L/N]`` + ``shift_labels``."""
        return shard_trainer_batch(inputs, self.lss_attn_implementation, self.lss_config.size)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not self.lss_enabled:
            return batch_samples, num_items_in_batch
        sharded = [self.shard_batch(batch) for batch in batch_samples]
        # Loss tokens of the whole optimizer step over the loss group (one scalar all-reduce per step,
        # as the Trainer's own count): the denominator of the global token mean.
        count = torch.tensor([float(sum(int((b["shift_labels"] != IGNORE_INDEX).sum()) for b in sharded))],
                             dtype=torch.float64, device=device)
        all_reduce_sum(count, self._loss_group())
        return sharded, count[0]

    # -- loss ----------------------------------------------------------------------------------
    def _loss_group(self):
        """Ranks whose tokens share one denominator: all of them (the default), or one DP shard's SP group."""
        return dist.group.WORLD if self.args.average_tokens_across_devices else get_topology().sp_group

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.lss_enabled:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if "shift_labels" not in inputs:
            raise ValueError("LSSTrainer.compute_loss expects a batch from LSSTrainer.shard_batch (with shift_labels)")
        inputs = dict(inputs)
        shift_labels = inputs.pop("shift_labels")  # [b, L/N]
        outputs = model(**inputs)
        loss_sum, num_tokens = cross_entropy_sum(outputs.logits, shift_labels)  # logits [b, L/N, V]
        group = self._loss_group()
        if num_items_in_batch is None:  # called outside the training loop: this micro-batch only
            count = torch.tensor([float(num_tokens)], dtype=torch.float64, device=loss_sum.device)
            all_reduce_sum(count, group)
            num_items_in_batch = count[0]
        total = float(num_items_in_batch)
        # DeepSpeed averages gradients over the grid: a uniform weight world/total on every rank makes
        # that average the gradient of sum(losses)/total, cross-rank LSS terms included.
        loss = loss_sum * (dist.get_world_size(group) / total) if total > 0 else loss_sum * 0.0
        return (loss, outputs) if return_outputs else loss

    # -- evaluation ------------------------------------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not self.lss_enabled:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(self.shard_batch(inputs))
        shift_labels = inputs.pop("shift_labels")
        with torch.no_grad():
            loss_sum, num_tokens = cross_entropy_sum(model(**inputs).logits, shift_labels)
            pair = torch.stack([loss_sum.detach().to(torch.float64),
                                torch.tensor(float(num_tokens), dtype=torch.float64, device=loss_sum.device)])
            all_reduce_sum(pair, get_topology().sp_group)  # this DP shard's token mean, as a plain rank reports
            loss = pair[0] / pair[1] if pair[1] > 0 else torch.zeros_like(pair[0])
        # Logits stay sharded along the sequence: evaluation under LSS reports the loss only.
        return loss.to(torch.float32), None, None

    def predict(self, *args, **kwargs):
        if self.lss_enabled:
            raise ValueError(
                "LSSTrainer.predict: under LSS every rank holds logits for L/N positions only, so there are no "
                "whole-sequence predictions to return; use trainer.evaluate() for eval_loss, or predict without "
                'the "lss_sequence_parallel" block'
            )
        return super().predict(*args, **kwargs)

    # -- teardown --------------------------------------------------------------------------------
    def close(self) -> None:
        """Release this run's DeepSpeed engine, LSS process groups and accelerate's state (only needed to
        start another Trainer in this process; the default process group stays)."""
        from accelerate.state import AcceleratorState

        mpu = getattr(self.model_wrapped, "lss_mpu", None)
        self.accelerator.free_memory()  # destroys the DeepSpeed engine
        if mpu is not None:
            mpu.destroy()
        if self.lss_enabled:
            from lss_plugin.topology import destroy_topology, is_topology_initialized

            if is_topology_initialized():
                destroy_topology()
        AcceleratorState._reset_state(reset_partial_state=False)


def configure_accelerate_for_deepspeed(timeout_s: float | None = None):
    """Start accelerate's process state for DeepSpeed on an explicit backend (gloo on CPU, NCCL on GPU).

    accelerate (1.15) picks the backend from the accelerator it finds; on a host without GPUs it
    finds none, and its ``PartialState`` then reports one process even though DeepSpeed starts a
    process group of all of them (every rank would train on every batch as rank 0). Call this
    before building ``TrainingArguments`` and pass ``accelerator_config={"use_configured_state": True}``
    (``examples/finetune_hf_trainer.py`` does both on CPU-only hosts). Returns the ``PartialState``.
    """
    from accelerate import PartialState

    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what TrainingArguments sets for this call too
    try:
        return PartialState(backend=default_backend(), timeout=as_timedelta(timeout_s))
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous


# ---------------------------------------------------------------------------------------------
# Pieces (usable without subclassing: a Trainer subclass of your own can call them).

def use_lss_attention(model, lss: LSSConfig) -> str:
    """Register the block's options and point ``model`` at them; returns the attention name.

    A model already on an LSS name (``register_lss_attention("my_lss", ...)``) keeps it, with the
    block's options; any other attention becomes ``"lss"``.
    """
    check_model_runs_lss(model)
    current = getattr(getattr(model, "config", None), "_attn_implementation", None)
    name = current if is_registered(current) else DEFAULT_NAME
    register_lss_attention(name, settings=lss.attention)
    if current != name:
        if not hasattr(model, "set_attn_implementation"):
            raise ValueError(
                f"LSSTrainer switches the model's attention to {name!r}, but {type(model).__name__} is not a "
                "transformers PreTrainedModel (no set_attn_implementation)"
            )
        model.set_attn_implementation(name)
    return name


def shard_trainer_batch(inputs: dict, attn_implementation: str, sp_size: int) -> dict:
    """Right-pad a collated global micro-batch to a length the layout splits, then shard it (no communication)."""
    unknown = sorted(set(inputs) - set(SHARDABLE_KEYS))
    if unknown:
        raise ValueError(
            f"LSSTrainer splits {list(SHARDABLE_KEYS)} along the sequence, but the batch also has {unknown}: "
            "remove them in the data collator (e.g. DataCollatorWithFlattening(return_seq_idx=False))"
        )
    if "input_ids" not in inputs:
        raise ValueError(f"LSSTrainer needs input_ids in every batch, got keys {sorted(inputs)}")
    # right padding is exact: under a causal mask no real token sees it, its labels are ignored
    inputs = pad_for_layout(inputs, parts_per_sequence(sp_size, lss_options(attn_implementation).layout))
    if inputs.get("shift_labels") is not None:  # already the target of every position: it wins over labels
        inputs.pop("labels", None)
    batch = shard_causal_lm_batch(**inputs, attn_implementation=attn_implementation)
    return {**batch.model_inputs(), "shift_labels": batch.shift_labels}


def _refuse_unsupported(trainer) -> None:
    """Settings LSSTrainer cannot honour exactly, by name (same verdict on every rank, no collective)."""
    args = trainer.args
    problems = []
    pc = getattr(args, "parallelism_config", None)
    if pc is not None and any((getattr(pc, f"{axis}_size", 1) or 1) > 1 for axis in ("sp", "cp", "tp")):
        problems.append(f"args.parallelism_config (sp_size={pc.sp_size}, cp_size={pc.cp_size}, tp_size={pc.tp_size}): "
                        "ALST/ring context parallelism and LSS would both split the sequence")
    autotp = (args.hf_deepspeed_config.config.get("tensor_parallel") or {}).get("autotp_size", 0) or 0
    if autotp > 1:
        problems.append(f'DeepSpeed "tensor_parallel.autotp_size" = {autotp}: LSS does not compose with AutoTP yet')
    if args.label_smoothing_factor:
        problems.append(f"label_smoothing_factor={args.label_smoothing_factor}: the LSS loss is plain cross entropy")
    for name in ("compute_loss_func", "compute_metrics", "preprocess_logits_for_metrics"):
        if getattr(trainer, name, None) is not None:
            problems.append(f"{name}=...: logits are split along the sequence under LSS (eval reports eval_loss only)")
    if args.train_sampling_strategy == "batch_rebalance":
        problems.append("train_sampling_strategy='batch_rebalance': its sampler deals rows to every rank, "
                        "not to data-parallel ranks")
    if trainer.eval_dataset is not None and not args.dataloader_drop_last:  # checked again in get_eval_dataloader
        datasets = trainer.eval_dataset.values() if isinstance(trainer.eval_dataset, dict) else [trainer.eval_dataset]
        for dataset in datasets:
            _refuse_uneven_eval(dataset, args.eval_batch_size, trainer.lss_dims.dp)
    if args.include_num_input_tokens_seen == "non_padding":
        problems.append("include_num_input_tokens_seen='non_padding': sharded batches carry no padding mask "
                        "(use 'all')")
    if problems:
        raise LSSConfigError(
            'LSSTrainer with "lss_sequence_parallel" cannot honour: ' + "; ".join(problems)
        )


def _resolve_train_batch_size(args, dp: int) -> None:
    """DeepSpeed ``train_batch_size`` counts DP ranks only: ``"auto"`` resolves to micro * gas * dp.

    transformers fills ``"auto"`` with ``world_size * micro * gas`` when the arguments are built and
    records an explicit value that differs from it as a mismatch; both count SP ranks as if they
    read different rows, so the value and that one check are redone here.
    """
    hf_config = args.hf_deepspeed_config
    micro, gas = args.per_device_train_batch_size, args.gradient_accumulation_steps
    expected = micro * gas * dp
    given = load_config(args.deepspeed).get("train_batch_size", "auto")
    if given != "auto" and given != expected:
        raise LSSConfigError(
            f'DeepSpeed "train_batch_size" = {given!r}, but per_device_train_batch_size({micro}) * '
            f"gradient_accumulation_steps({gas}) * data-parallel ranks({dp} = world_size({args.world_size}) / "
            f'lss size({args.world_size // dp})) = {expected}: set it to "auto" or {expected}'
        )
    hf_config.config["train_batch_size"] = expected
    hf_config.mismatches = [m for m in hf_config.mismatches if not m.startswith("- ds train_batch_size=")]


def _refuse_uneven_eval(dataset, eval_batch_size: int, dp: int) -> None:
    """accelerate completes a last partial eval batch with repeated rows and cuts the gathered losses
    by rank order, which under LSS (SP ranks repeat each DP shard) would keep the wrong ones."""
    if not hasattr(dataset, "__len__"):
        return
    rows, step = len(dataset), eval_batch_size * dp
    if rows % step:
        raise ValueError(
            f"LSSTrainer evaluation needs the eval dataset length ({rows}) to be a multiple of "
            f"per_device_eval_batch_size({eval_batch_size}) * data-parallel ranks({dp}) = {step}, "
            "or dataloader_drop_last=True"
        )


def _route_deepspeed_initialize(accelerator) -> None:
    """Make this accelerator's DeepSpeed preparation build the engine with LSS (topology, mpu, averaging)."""
    prepare = getattr(accelerator, "_prepare_deepspeed", None)
    if prepare is None:
        import accelerate

        raise RuntimeError(f"accelerate {accelerate.__version__} has no Accelerator._prepare_deepspeed: "
                           "LSSTrainer was written against accelerate 1.x (tested: 1.15.0)")
    if getattr(prepare, "lss_routed", False):
        return

    @functools.wraps(prepare)
    def prepare_with_lss(*objects):
        import deepspeed

        from lss_plugin.hf.deepspeed import deepspeed_initialize

        # accelerate reads deepspeed.initialize when the call starts and passes model, optimizer, scheduler
        # and config_params (the whole config, block included); lss_plugin.deepspeed.initialize takes the
        # same. It calls deepspeed.initialize itself, so the original is back in place before it runs.
        original = deepspeed.initialize

        def initialize_with_lss(**kwargs):
            deepspeed.initialize = original
            return deepspeed_initialize(**kwargs)

        deepspeed.initialize = initialize_with_lss
        try:
            return prepare(*objects)
        finally:
            deepspeed.initialize = original

    prepare_with_lss.lss_routed = True
    accelerator._prepare_deepspeed = prepare_with_lss
