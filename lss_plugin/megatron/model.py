"""Build a megatron-core GPTModel (+ DistributedDataParallel) for LSS or Megatron's TP+SP baseline,
and move its state between the TP-sharded parameters and a full, layout-independent state dict.

The full state dict is what checkpoints hold: LSS parameters are replicated over SP x DP,
tensor-parallel shards are gathered along their ``partition_dim`` and pipeline stages are gathered
under global names (``decoder.layers.<global index>``), so a checkpoint written by any run (LSS
SP=4, SP=2 x DP=2, TP=2 x LSS=2, PP=2 x LSS=2, one rank) loads into any other with the same model
shape. Weights are drawn per parameter from ``(seed, global name)`` on the full shape, so every
layout also starts from the same numbers.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from lss_plugin.optim import full_param_states, load_param_state

VOCAB_SIZE = 256  # byte-level, as enwik8 models are


@dataclass(frozen=True)
class GPTShape:
    """What a checkpoint must agree on (the manifest's "model" section)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    max_position_embeddings: int
    position_embedding_type: str
    normalization: str
    swiglu: bool
    add_bias_linear: bool
    untie_embeddings_and_output_weights: bool
    vocab_size: int = VOCAB_SIZE
    # Attention masks and softmax (megatron-core's TransformerConfig fields; lss_plugin.megatron.masks).
    window_size: list | None = None  # [left, right]: a list, as the JSON manifest holds it
    window_attn_skip_freq: int | list | None = None
    softmax_type: str = "vanilla"

    @classmethod
    def from_args(cls, args) -> "GPTShape":
        return cls(
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads,
            num_query_groups=args.num_query_groups or args.num_attention_heads,
            ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size,
            max_position_embeddings=args.max_position_embeddings or args.seq_length,
            position_embedding_type=args.position_embedding_type,
            normalization=args.normalization,
            swiglu=bool(args.swiglu),
            add_bias_linear=not args.disable_bias_linear,
            untie_embeddings_and_output_weights=bool(args.untie_embeddings_and_output_weights),
            window_size=list(args.window_size) if getattr(args, "window_size", None) is not None else None,
            window_attn_skip_freq=getattr(args, "window_attn_skip_freq", None),
            softmax_type=getattr(args, "softmax_type", "vanilla"),
        )

    def as_dict(self) -> dict:
        return asdict(self)


def build_gpt_model(args, shape: GPTShape):
    """A megatron-core GPTModel wrapped in megatron-core DDP, on the default device.

    Call after ``parallel_state`` is initialised. This pipeline stage's part of the model (all of
    it with one stage); random weights redrawn from ``(args.seed, global name)`` on their full
    shape (``_init_from_names``), so every TP/SP/DP/PP layout starts from the same numbers.
    """
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from lss_plugin.megatron.parallel import lss_transformer_config_kwargs
    from lss_plugin.megatron.pipeline import configure_schedule
    from lss_plugin.megatron.rope import use_lss_rotary_embedding
    from lss_plugin.megatron.spec import get_gpt_layer_lss_spec_from_args

    lss = bool(args.lss_sequence_parallel)
    tp = args.tensor_model_parallel_size
    config_kwargs = dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        ffn_hidden_size=shape.ffn_hidden_size,
        normalization=shape.normalization,
        gated_linear_unit=shape.swiglu,
        activation_func=F.silu if shape.swiglu else F.gelu,
        add_bias_linear=shape.add_bias_linear,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        pipeline_dtype=torch.float32,
        # gloo has no coalesced p2p; separate isend/irecv pairs work on every backend.
        batch_p2p_comm=dist.get_backend() != "gloo",
        sequence_parallel=bool(args.sequence_parallel and tp > 1),
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        # Loss sums and a global token count, for LSS and the baseline alike (see parallel.py).
        calculate_per_token_loss=True,
        window_size=tuple(shape.window_size) if shape.window_size is not None else None,
        window_attn_skip_freq=shape.window_attn_skip_freq,
        softmax_type=shape.softmax_type,
    )
    if lss:
        config_kwargs.update(lss_transformer_config_kwargs(args.lss_sequence_parallel_size))
    config = TransformerConfig(**config_kwargs)
    spec = get_gpt_layer_lss_spec_from_args(args) if lss else get_gpt_layer_local_spec(
        normalization=shape.normalization)
    if not lss and getattr(args, "core_attention", "local") == "sdpa":
        import copy

        from lss_plugin.baselines.megatron import SDPADotProductAttention

        spec = copy.deepcopy(spec)  # the fused kernel LSS also attends with, for a fair baseline
        spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.max_position_embeddings,
        position_embedding_type=shape.position_embedding_type,
        share_embeddings_and_output_weights=not shape.untie_embeddings_and_output_weights,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    _init_from_names(model, config, args.seed)
    from lss_plugin.rng import seed_megatron_rng

    seed_megatron_rng(args.seed)  # after the weights: dropout streams of its own per LSS rank
    if lss:
        use_lss_rotary_embedding(model, args.lss_layout, args.lss_ulysses_size)
    from lss_plugin.runtime import default_device

    model.to(default_device())
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False,
        average_in_collective=False,
    )
    ddp_model = DistributedDataParallel(config, ddp_config, model)
    configure_schedule(config, ddp_model)
    return ddp_model


def _init_method(name: str, config):
    """megatron-core's init callable for a parameter of the local GPT spec (None: a constant)."""
    if name.endswith("bias") or "layernorm" in name or "norm." in name:
        return None  # zeros / ones, whatever the layout
    if name.startswith("embedding."):
        return config.embedding_init_method
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return config.output_layer_init_method
    return config.init_method


@torch.no_grad()
def _init_from_names(gpt_model, config, seed: int) -> None:
    """Redraw each random weight from ``(seed, global name)`` on its full shape; keep this shard.

    megatron-core draws weights in construction order from one generator, so a pipeline stage
    (which builds only its layers) would start from other numbers than one rank does.
    """
    for name, p in named_trainable(gpt_model):
        init = _init_method(name, config)
        if init is None:
            continue
        shape = list(p.shape)
        if _is_tp_sharded(p):
            shape[p.partition_dim] *= _tp_group_and_size()[1]
        full = torch.empty(shape, dtype=torch.float32)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            init(full)
        p.copy_(shard_tp(full, p).to(p.device, p.dtype))


# --------------------------------------------------------------------------------------------
# Full (TP-gathered) state

def _tp_group_and_size():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group(), \
        parallel_state.get_tensor_model_parallel_world_size()


def _is_tp_sharded(param) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False)) and getattr(param, "partition_dim", -1) >= 0


def gather_tp(tensor: torch.Tensor, param) -> torch.Tensor:
    """The full tensor of a TP-sharded ``param`` (or ``tensor`` itself if not sharded).

    Megatron splits the master tensor into ``world * stride`` chunks along ``partition_dim`` and
    gives TP rank r chunks r, r + world, ... (stride 2 for SwiGLU's [gate; up] fc1).
    """
    group, size = _tp_group_and_size()
    if size == 1 or not _is_tp_sharded(param):
        return tensor
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    pieces = [part.chunk(stride, dim=dim) for part in parts]  # pieces[rank][j] = chunk j*world+rank
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(size)], dim=dim)


def shard_tp(full: torch.Tensor, param) -> torch.Tensor:
    """This TP rank's shard of a full tensor for ``param`` (the inverse of ``gather_tp``)."""
    from megatron.core import parallel_state

    group, size = _tp_group_and_size()
    if size == 1 or not _is_tp_sharded(param):
        return full
    rank = parallel_state.get_tensor_model_parallel_rank()
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = full.chunk(size * stride, dim=dim)
    return torch.cat(chunks[rank::size], dim=dim)


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def named_trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    """``(global name, param)`` of the unwrapped GPTModel (this stage's part), in a fixed order.

    A pipeline stage numbers its layers from 0; the global name uses the layer's place in the
    whole model (``TransformerLayer.layer_number`` - 1), so names do not depend on the stage.
    """
    module = getattr(model, "module", model)
    layers = module.decoder.layers if getattr(module, "decoder", None) is not None else []

    def global_name(name):
        match = _LAYER.match(name)
        if match is None:
            return name
        layer = layers[int(match.group(1))].layer_number - 1
        return f"decoder.layers.{layer}.{name[match.end():]}"

    return [(global_name(n), p) for n, p in module.named_parameters() if p.requires_grad]


def _gather_stages(state: dict) -> dict:
    """The union of every pipeline stage's ``state`` (collective over the PP group)."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return state
    parts = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(parts, state, group=parallel_state.get_pipeline_model_parallel_group())
    return {k: v for part in parts for k, v in part.items()}


def full_model_state(model) -> dict:
    """Every parameter, TP-gathered, keyed by its global name (collective over TP and PP)."""
    return _gather_stages({name: gather_tp(p.detach(), p).cpu().clone() for name, p in named_trainable(model)})


def load_full_model_state(model, state: dict) -> None:
    params = dict(named_trainable(model))
    all_names = _gather_stages(dict.fromkeys(params))  # every stage's names (collective over PP)
    missing, unexpected = sorted(set(all_names) - set(state)), sorted(set(state) - set(all_names))
    if missing or unexpected:
        raise ValueError(f"model state does not fit this model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, p in params.items():
            shard = shard_tp(state[name], p)
            if shard.shape != p.shape:
                raise ValueError(f"{name}: checkpoint shard {tuple(shard.shape)} != parameter {tuple(p.shape)}")
            p.copy_(shard.to(p.device, p.dtype))


def full_optimizer_state(model, optimizer: torch.optim.Optimizer) -> dict:
    """Per-parameter optimizer state keyed by parameter name, TP-gathered (collective over TP, and
    over DP x CP for ``--use-distributed-optimizer``)."""
    states = full_param_states(optimizer)  # collective over a sharded optimizer's DP x CP group
    per_param = {}
    for name, p in named_trainable(model):
        state = states.get(p, {})
        per_param[name] = {
            k: (gather_tp(v, p).cpu().clone() if torch.is_tensor(v) and v.dim() > 0 else
                (v.cpu().clone() if torch.is_tensor(v) else v))
            for k, v in state.items()
        }
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"per_param": _gather_stages(per_param), "param_groups": groups}


def load_full_optimizer_state(model, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    params = dict(named_trainable(model))
    all_names = _gather_stages(dict.fromkeys(params))  # collective over PP
    for name, state in saved["per_param"].items():
        if name not in all_names:
            raise ValueError(f"optimizer state for unknown parameter {name!r}")
        if name not in params:
            continue  # another pipeline stage's parameter
        p = params[name]
        load_param_state(optimizer, p, {
            k: (shard_tp(v, p).to(p.device).clone() if torch.is_tensor(v) and v.dim() > 0 else v)
            for k, v in state.items()
        })
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"optimizer has {len(optimizer.param_groups)} param groups, checkpoint "
                         f"{len(saved['param_groups'])}")
    for group, hyper in zip(optimizer.param_groups, saved["param_groups"]):
        group.update(hyper)


def grads_of(model, names) -> dict:
    """The reduced gradients (``main_grad``) of the ``names`` this stage holds, TP-gathered."""
    params = dict(named_trainable(model))
    return {n: gather_tp(params[n].main_grad.detach(), params[n]).cpu().clone()
            for n in names if n in params}
