#!/usr/bin/env python
"""Pre-train a byte-level megatron-core GPT with LSS sequence parallelism, Megatron's TP+SP, or both.

    # LSS: every sequence split across 4 ranks
    torchrun --nproc-per-node 4 examples/pretrain_gpt_lss.py @configs/megatron_gpt_small_lss.args
    # the same model with Megatron's tensor + sequence parallelism
    torchrun --nproc-per-node 2 examples/pretrain_gpt_lss.py @configs/megatron_gpt_small_tp_sp.args
    # both: TP = 2 (+ Megatron SP) x LSS = 2; add --pipeline-model-parallel-size P for stages
    torchrun --nproc-per-node 4 examples/pretrain_gpt_lss.py @configs/megatron_gpt_small_lss_tp.args
    # hybrid LSS x Ulysses: all-to-all over heads inside ranks 0-1 and 2-3, LSS's gather across them
    torchrun --nproc-per-node 4 examples/pretrain_gpt_lss.py @configs/megatron_gpt_small_lss.args --lss-ulysses-size 2
    # packed documents (Wikipedia pages end at an EOD byte): no attention across them, positions
    # restart, no loss at EOD inputs; under LSS one THD sequence per micro-batch, global cu_seqlens
    torchrun --nproc-per-node 4 examples/pretrain_gpt_lss.py @configs/megatron_gpt_small_lss.args \
        --reset-attention-mask --reset-position-ids --eod-mask-loss --micro-batch-size 1

Flags follow Megatron-LM (--num-layers, --seq-length, --tensor-model-parallel-size,
--pipeline-model-parallel-size, --reset-attention-mask, --reset-position-ids, --eod-mask-loss, ...) plus
--lss-* (see lss_plugin/megatron/args.py), --metrics-file, --timeout-s. Runs on GPUs (NCCL) or
CPUs (gloo, with the megatron-core CPU shim). `--help` lists everything.
"""
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# megatron-core warns at import about missing TransformerEngine/apex; the local path needs neither.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

from lss_plugin.megatron.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
