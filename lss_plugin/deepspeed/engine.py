"""``initialize``: ``deepspeed.initialize`` with LSS sequence parallelism switched on by the config.

The one change a DeepSpeed user makes is an ``"lss_sequence_parallel"`` block in the JSON config
and ``lss_plugin.deepspeed.initialize`` in place of ``deepspeed.initialize``; arguments and the
returned ``(engine, optimizer, training_dataloader, lr_scheduler)`` are the same. The engine
additionally carries ``engine.lss_config``, ``engine.lss_topology`` and ``engine.lss_mpu``.
"""
from __future__ import annotations

import torch.distributed as dist

from lss_plugin.deepspeed.config import BLOCK_KEY, LSSConfig, LSSConfigError, deepspeed_view, load_config
from lss_plugin.deepspeed.mpu import LSSMpu
from lss_plugin.deepspeed.reduction import install_lss_gradient_averaging
from lss_plugin.deepspeed.zero3 import check_partition_groups, partition_over_grid
from lss_plugin.rng import fork_sequence_parallel_rng
from lss_plugin.runtime import agent_store_shared, as_timedelta, init_distributed, launched
from lss_plugin.topology import init_topology

TORCH_DISTRIBUTED_DEFAULT_PORT = 29500


def initialize(
    args=None,
    model=None,
    optimizer=None,
    model_parameters=None,
    training_data=None,
    lr_scheduler=None,
    distributed_port: int = TORCH_DISTRIBUTED_DEFAULT_PORT,
    mpu=None,
    dist_init_required=None,
    collate_fn=None,
    config=None,
    mesh_param=None,
    config_params=None,
):
    """Drop-in for ``deepspeed.initialize`` that reads the ``"lss_sequence_parallel"`` block.

    With the block enabled it builds the LSS SP x DP topology, hands DeepSpeed an ``LSSMpu``
    and makes the engine average gradients over SP and DP. Without it (or ``enabled: false``)
    this is ``deepspeed.initialize`` on the config minus the block.
    """
    import deepspeed

    if not dist.is_initialized() and (not launched() or agent_store_shared()):
        # One plain `python` process: a one-rank group instead of DeepSpeed's MPI discovery.
        # Under torchrun's shared rendezvous store: the plugin's start-up, which survives restarts
        # (deepspeed.init_distributed would read the previous attempt's keys).
        init_distributed()
    config = _resolve_config(args, config, config_params)
    lss = LSSConfig.from_ds_config(config)
    ds_config = deepspeed_view(config)
    # DeepSpeed refuses a config in both args.deepspeed_config and config=: it gets the parsed view
    # through config=, and args (whose local_rank DeepSpeed updates) keeps its path afterwards.
    from_args = getattr(args, "deepspeed_config", None) if args is not None else None
    if from_args is not None:
        args.deepspeed_config = None
    try:
        passthrough = dict(
            args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
            training_data=training_data, lr_scheduler=lr_scheduler, distributed_port=distributed_port,
            dist_init_required=dist_init_required, collate_fn=collate_fn, config=ds_config,
        )
        if not lss.enabled:
            return deepspeed.initialize(mpu=mpu, mesh_param=mesh_param, **passthrough)
        return _initialize_lss(deepspeed, lss, config, passthrough, model, mpu, mesh_param)
    finally:
        if from_args is not None:
            args.deepspeed_config = from_args


def _initialize_lss(deepspeed, lss: LSSConfig, config: dict, passthrough: dict, model, mpu, mesh_param):
    stage = _refuse_unsupported(lss, model, mpu, mesh_param, passthrough["config"])
    _init_distributed(passthrough["distributed_port"], passthrough["dist_init_required"], lss.timeout_s)
    lss.check_world(dist.get_world_size(), config)  # before any group exists: same error on every rank
    heads = attention_heads(model)
    if heads is not None:
        lss.check_heads(*heads, model=type(model).__name__)
    if model is not None:
        lss.check_model_attention(model)
    topology = init_topology(lss.size, timeout_s=lss.timeout_s, ulysses_size=lss.ulysses_size)
    lss_mpu = LSSMpu(topology)
    if stage == 3:
        partition_over_grid(model, lss_mpu, passthrough["config"])
    engine, engine_optimizer, dataloader, scheduler = deepspeed.initialize(mpu=lss_mpu, **passthrough)
    fork_sequence_parallel_rng(topology.sp_rank)  # the weights are built: dropout streams of its own per SP rank
    if stage == 3:
        check_partition_groups(engine, lss_mpu.get_sequence_data_parallel_world_size())
    description = install_lss_gradient_averaging(engine, topology, lss.grad_averaging)
    engine.lss_config, engine.lss_topology, engine.lss_mpu = lss, topology, lss_mpu
    from deepspeed.utils import log_dist

    hybrid = f" (ulysses={topology.ulysses_size} x lss={topology.lss_size})" if topology.ulysses_size > 1 else ""
    log_dist(f"LSS sequence parallelism: sp={topology.sp_size}{hybrid} x dp={topology.dp_size}, layout={lss.attention.layout}, "
             f"kv_backward={lss.attention.kv_backward}; {description}", ranks=[0])
    return engine, engine_optimizer, dataloader, scheduler


# Where a model's config spells its query and key/value head counts: transformers (GPT-2's n_head is
# mapped to num_attention_heads by transformers itself), then lss_plugin.models.gpt.GPTConfig.
_HEAD_FIELDS = (("num_attention_heads", "num_key_value_heads"), ("num_heads", "num_kv_heads"))


def attention_heads(model) -> tuple[int, int] | None:
    """(query heads, key/value heads) from ``model.config``, or None when the model does not say.

    Lets the block's ``ulysses_size`` be checked against the heads before any group exists; a model
    that does not say is checked by ``lss_attention`` itself on its first call (same error on every rank).
    """
    config = getattr(model, "config", None)
    for heads_field, kv_field in _HEAD_FIELDS:
        heads = getattr(config, heads_field, None)
        if isinstance(heads, int) and not isinstance(heads, bool):
            kv_heads = getattr(config, kv_field, None)
            return heads, kv_heads if isinstance(kv_heads, int) and kv_heads > 0 else heads
    return None


def _resolve_config(args, config, config_params) -> dict:
    """The config as a dict, wherever DeepSpeed would have found it (args, config, config_params)."""
    from_args = getattr(args, "deepspeed_config", None) if args is not None else None
    if from_args is not None:
        if config is not None:
            raise ValueError(
                "a DeepSpeed config was given twice: args.deepspeed_config="
                f"{from_args!r} and config=...; pass one (as deepspeed.initialize requires)"
            )
        config = from_args
    if config is None:
        config = config_params
    if config is None:
        raise ValueError("DeepSpeed requires a config: pass config=... or --deepspeed_config")
    return load_config(config)


def _refuse_unsupported(lss: LSSConfig, model, mpu, mesh_param, ds_config) -> int:
    """Refuse by name what LSS cannot make exact; returns the ZeRO stage."""
    if mpu is not None or mesh_param is not None:
        raise LSSConfigError(
            f"lss_plugin.deepspeed.initialize builds the mpu from the \"lss_sequence_parallel\" block; "
            f"got mpu={mpu!r}, mesh_param={mesh_param!r}: tensor/pipeline parallel mpus do not compose with it yet"
        )
    op = ds_config.get("gradient_allreduce_op", "mean")
    if op != "mean":
        raise LSSConfigError(
            f'"gradient_allreduce_op" = {op!r}: LSS averages gradients over SP and DP, remove it or set "mean"'
        )
    zero = ds_config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    lss.grad_averaging_for_stage(stage)  # "two_stage" under ZeRO 1-3 is refused by name
    for key, off in (("zero_hpz_partition_size", 1), ("mics_shard_size", -1)):
        if zero.get(key, off) not in (off, None):
            # Secondary partitions (hpZ) and MiCS shard groups reduce over groups of their own,
            # which the LSS correction has not been checked against.
            raise LSSConfigError(
                f'"zero_optimization.{key}" = {zero[key]!r} is not supported with "{BLOCK_KEY}" '
                f"(its gradient reduction over sub-groups is not checked against a 1-rank engine): remove it"
            )
    try:
        from deepspeed.pipe import PipelineModule
    except ImportError:  # pragma: no cover - depends on the DeepSpeed build
        PipelineModule = ()
    if isinstance(model, PipelineModule):
        raise LSSConfigError("LSS sequence parallelism does not support DeepSpeed pipeline parallelism (PipelineModule)")
    return stage


def _init_distributed(distributed_port, dist_init_required, timeout_s) -> None:
    """DeepSpeed's own process-group start-up (launcher env, MPI discovery), with the LSS timeout."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(
        dist_backend=get_accelerator().communication_backend_name(),
        distributed_port=distributed_port,
        dist_init_required=dist_init_required,
        timeout=as_timedelta(timeout_s),
    )
