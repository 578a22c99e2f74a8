"""ZeRO stage 3 under LSS: partition every parameter over the whole SP x DP grid.

What DeepSpeed 0.19.8 does by itself, measured (tests/test_deepspeed.py, ZeRO 3 cases): when the
model was not built under ``deepspeed.zero.Init``, the stage-3 optimizer converts it with
``Init(data_parallel_group=mpu.get_data_parallel_group())`` (``parameter_offload.
_convert_to_zero_parameters``). With the LSS mpu that is the DP group only, so each parameter is
partitioned, and its gradient reduce-scattered, over the D ranks that see *different* sequences:
the N SP ranks of one sequence never combine their partial gradients (step-0 gradient norm 1.63x
(SP=4) and 1.36x (SP=2 x DP=2) the 1-rank engine's, SP replicas drifting apart). Ulysses does not
meet this because its mpu has no ``get_data_parallel_group``, so DeepSpeed falls back to the world.

The fix keeps the mpu's DP answer (the data sampler and batch-size arithmetic need it) and
converts the model first, over the grid group, with the config DeepSpeed will use; DeepSpeed then
finds every parameter already partitioned and keeps that group. The stage-3 optimizer reduces over
the partition group and divides by its size (reduce-scatter path) or by ``size /
sequence_parallel_size`` (contiguous all-reduce path, corrected in ``reduction``): an average over
SP x DP either way. A model the user built under ``zero.Init`` is kept if its partition group spans
the grid (``zero.Init``'s default, the world) and refused otherwise.
"""
from __future__ import annotations

import copy

import torch.distributed as dist


def partition_over_grid(model, mpu, ds_config: dict) -> None:
    """Convert ``model``'s parameters to ZeRO-3 parameters partitioned over ``mpu``'s SP x DP grid.

    Collective over the grid (every rank converts the same model). Parameters that are already
    ZeRO-3 parameters are left alone (``check_partition_groups`` judges them after initialize).
    """
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.partition_parameters import Init, is_zero_param

    if model is None or any(is_zero_param(p) for p in model.parameters()):
        return  # built under zero.Init: DeepSpeed converts any rest with the group of the converted ones
    # mpu: DeepSpeedConfig checks train_batch_size against the mpu's DP size, as the engine does.
    parsed = DeepSpeedConfig(copy.deepcopy(ds_config), mpu)
    # The engine casts parameters to the training dtype before its own conversion; partitions made
    # here keep the dtype they are made in, so cast first (as engine._cast_module_mixed_precision).
    dtype = torch.bfloat16 if parsed.bfloat16_config.enabled else torch.half if parsed.float16_config.enabled else None
    if dtype is not None:
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    Init(module=model, data_parallel_group=mpu.get_sequence_data_parallel_group(),
         config_dict_or_path=copy.deepcopy(ds_config), mpu=mpu, dtype=dtype)


def check_partition_groups(engine, grid_size: int) -> None:
    """Refuse a ZeRO-3 engine whose parameters are partitioned over less than the whole grid."""
    narrow = sorted({
        (name, dist.get_world_size(p.ds_process_group))
        for name, p in engine.module.named_parameters()
        if hasattr(p, "ds_process_group") and dist.get_world_size(p.ds_process_group) != grid_size
    })
    if narrow:
        name, size = narrow[0]
        raise RuntimeError(
            f"ZeRO 3 with \"lss_sequence_parallel\": parameter {name!r} (and {len(narrow) - 1} more) is partitioned "
            f"over {size} ranks, not the whole SP x DP grid of {grid_size}; its SP ranks would never average their "
            "gradients. Build the model under deepspeed.zero.Init() without data_parallel_group (the world), "
            "or let lss_plugin.deepspeed.initialize convert it"
        )
