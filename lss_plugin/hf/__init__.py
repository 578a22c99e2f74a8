"""transformers integration: ``attn_implementation="lss"`` and sequence-sharded causal-LM batches.

Importing this package registers the ``"lss"`` attention (contiguous layout); call
``register_lss_attention("lss", layout="balanced", ...)`` to change its options.
``LSSTrainer`` (``transformers.Trainer`` switched to LSS by the DeepSpeed config) is imported on
first use, so the attention alone does not need accelerate.
"""
from lss_plugin.hf.attention import (
    LSSHFOptions,
    lss_attention_forward,
    lss_attention_mask,
    register_lss_attention,
)
from lss_plugin.hf.batch import (
    IGNORE_INDEX,
    LSSBatchLoader,
    LSSCausalLMCollator,
    ShardedBatch,
    causal_lm_loss,
    data_parallel_rows,
    pad_for_layout,
    sequence_parallel_sampler,
    shard_causal_lm_batch,
    shift_labels_for_causal_lm,
)
from lss_plugin.hf.deepspeed import deepspeed_initialize
from lss_plugin.hf.packing import flash_attn_kwargs, pack_windows, packed_boundaries
from lss_plugin.hf.models import build_causal_lm, small_causal_lm_config
from lss_plugin.hf.registry import lss_options

register_lss_attention()


def __getattr__(name):
    # The Trainer integration imports transformers.Trainer (and accelerate): only when asked for.
    if name in ("LSSTrainer", "shard_trainer_batch", "use_lss_attention"):
        from lss_plugin.hf import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IGNORE_INDEX", "LSSBatchLoader", "LSSTrainer", "LSSCausalLMCollator", "LSSHFOptions", "ShardedBatch", "build_causal_lm",
    "causal_lm_loss", "data_parallel_rows", "deepspeed_initialize", "flash_attn_kwargs", "lss_attention_forward", "lss_attention_mask", "lss_options", "pack_windows", "packed_boundaries", "pad_for_layout", "register_lss_attention",
    "sequence_parallel_sampler", "shard_causal_lm_batch", "shard_trainer_batch", "shift_labels_for_causal_lm", "small_causal_lm_config", "use_lss_attention",
]
