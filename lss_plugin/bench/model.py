"""One megatron-core GPTModel for every method; only the parallel scheme differs.

Every method builds the same ``GPTModel`` (megatron-core local spec, learned absolute positions,
LayerNorm, GELU MLP, tied embeddings, fp32, no dropout) in megatron-core DDP, with a torch AdamW on
``main_grad`` and ``finalize_model_grads`` (exactly the step ``lss_plugin.megatron.pretrain`` runs):

- ``single``          1 rank, the whole sequence, Megatron's local ``DotProductAttention``;
- ``megatron_tp_sp``  tensor parallel over N ranks + Megatron sequence parallelism, local spec;
- ``lss``             the plugin's Megatron spec (``LSSDotProductAttention``) over the CP group;
- ``ulysses``         the same CP group, core attention = DeepSpeed ``DistributedAttention``;
- ``ring``            the same CP group, core attention = ring attention (``lss_plugin.baselines``);
- ``lss_tp``          TP = 2 with Megatron SP inside each TP pair, LSS over the other N/2 ranks
                      (each TP rank gathers its own KV heads over its CP group).

The sequence-parallel methods all register their group where Megatron keeps context parallelism,
so megatron DDP averages their gradients over DP x SP the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

METHODS = ("single", "megatron_tp_sp", "lss", "ulysses", "ring", "lss_tp")
SP_METHODS = ("lss", "ulysses", "ring", "lss_tp")
LSS_TP_SIZE = 2  # lss_tp: tensor-parallel size; LSS takes the remaining N / 2 ranks


def parallel_sizes(method: str, world_size: int) -> tuple[int, int]:
    """``(tp, cp)`` of a method on ``world_size`` ranks (cp = the sequence-parallel group)."""
    if method == "lss_tp":
        if world_size % LSS_TP_SIZE:
            raise ValueError(f"lss_tp needs a world size divisible by tp({LSS_TP_SIZE}), got {world_size}")
        return LSS_TP_SIZE, world_size // LSS_TP_SIZE
    if method == "megatron_tp_sp":
        return world_size, 1
    return 1, world_size if method in SP_METHODS else 1


@dataclass(frozen=True)
class ModelDims:
    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 8
    num_kv_heads: int = 8
    ffn_hidden_size: int | None = None
    vocab_size: int = 256
    max_positions: int = 4096

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class Variant:
    """A method and its options: ``lss`` has a layout and a K/V backward mode."""

    method: str
    layout: str = "contiguous"
    kv_backward: str = "keep"
    kv_head_chunk: int | None = None  # lss only: gather K,V this many KV heads at a time

    @property
    def name(self) -> str:
        if self.method == "lss_tp":
            default = (self.layout, self.kv_backward, self.kv_head_chunk) == ("contiguous", "keep", None)
            return "lss_tp" if default else "lss_tp" + Variant("lss", self.layout, self.kv_backward,
                                                               self.kv_head_chunk).name[3:]
        if self.method == "lss":
            chunk = f",chunk{self.kv_head_chunk}" if self.kv_head_chunk else ""
            return f"lss[{self.kv_backward},{self.layout}{chunk}]"
        return self.method


def _sp_core_attention(kind: str):
    """A Megatron core-attention class running ring or Ulysses attention over the CP group."""
    from lss_plugin.megatron.attention import _CAUSAL, LSSDotProductAttention

    class SPCoreAttention(LSSDotProductAttention):
        # Same constructor checks and [s, b, h, d] contract as the LSS core attention.
        _kind = kind

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None):
            mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
            causal = mask_type in _CAUSAL
            q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s_local, h, d]
            if self._kind == "ring":
                from lss_plugin.baselines.ring import ring_attention

                out = ring_attention(q, k, v, group=self.sp_group, causal=causal,
                                     softmax_scale=self.softmax_scale, layout=self.lss_layout)
            else:
                if not hasattr(self, "_ulysses"):
                    from lss_plugin.baselines.ulysses import UlyssesAttention

                    self._ulysses = UlyssesAttention(self.sp_group, causal=causal,
                                                     softmax_scale=self.softmax_scale)
                out = self._ulysses(q.contiguous(), k.contiguous(), v.contiguous())
            s_local, batch = query.shape[0], query.shape[1]
            return out.transpose(0, 1).reshape(s_local, batch, self.hidden_size_per_partition)

    SPCoreAttention.__name__ = f"{kind.capitalize()}CoreAttention"
    return SPCoreAttention


def setup_parallel(variant: Variant, world_size: int, timeout_s: float = 120.0) -> None:
    """megatron-core parallel state for this method (destroying the previous one)."""
    from megatron.core import parallel_state, tensor_parallel

    from lss_plugin.megatron.cpu_shim import apply_cpu_shim

    apply_cpu_shim()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    minutes = max(1, math.ceil(timeout_s / 60))
    tp, cp = parallel_sizes(variant.method, world_size)
    if variant.method in SP_METHODS:
        from lss_plugin.megatron.parallel import initialize_lss_model_parallel

        initialize_lss_model_parallel(cp, timeout_s=timeout_s, tensor_model_parallel_size=tp)
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, distributed_timeout_minutes=minutes,
            create_gloo_process_groups=dist.get_backend() != "gloo")
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)


def build_model(variant: Variant, dims: ModelDims, world_size: int):
    """The DDP-wrapped GPTModel and its AdamW for ``variant`` on ``world_size`` ranks."""
    import torch.nn.functional as F
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from lss_plugin.runtime import default_device

    method = variant.method
    tp, cp = parallel_sizes(method, world_size)
    kwargs = dict(
        num_layers=dims.num_layers, hidden_size=dims.hidden_size,
        num_attention_heads=dims.num_heads, num_query_groups=dims.num_kv_heads,
        ffn_hidden_size=dims.ffn, normalization="LayerNorm", activation_func=F.gelu,
        add_bias_linear=True, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
        use_cpu_initialization=True, params_dtype=torch.float32, calculate_per_token_loss=True,
    )
    if method in SP_METHODS:
        kwargs["context_parallel_size"] = cp
    config = TransformerConfig(**kwargs)
    if method in ("lss", "lss_tp"):
        from lss_plugin.megatron.spec import get_gpt_layer_lss_spec

        spec = get_gpt_layer_lss_spec(normalization="LayerNorm", layout=variant.layout,
                                      kv_backward=variant.kv_backward,
                                      kv_head_chunk=variant.kv_head_chunk)
    else:
        import copy

        spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="LayerNorm"))
        if method in ("ring", "ulysses"):
            core = _sp_core_attention(method)
            core.lss_layout = variant.layout
            spec.submodules.self_attention.submodules.core_attention = core
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=dims.vocab_size,
                     max_sequence_length=dims.max_positions,
                     position_embedding_type="learned_absolute",
                     share_embeddings_and_output_weights=True)
    model.to(default_device())
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False,
        average_in_collective=False)
    model = DistributedDataParallel(config, ddp_config, model)
    params = [p for p in model.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    return model, optimizer


def make_batch(variant: Variant, seq_len: int, batch_size: int, vocab_size: int, world_size: int,
               seed: int = 0) -> dict:
    """The same global batch [b, L+1] for every method; this rank's part of it."""
    from megatron.core import parallel_state

    from lss_plugin.runtime import default_device
    from lss_plugin.sharding import local_token_indices

    g = torch.Generator().manual_seed(seed)
    window = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=g)
    tokens, labels = window[:, :-1], window[:, 1:]  # [b, L]
    positions = torch.arange(seq_len).unsqueeze(0).expand_as(tokens)
    if variant.method in SP_METHODS:
        rank = parallel_state.get_context_parallel_rank()
        idx = local_token_indices(seq_len, rank, parallel_state.get_context_parallel_world_size(),
                                  variant.layout)
        tokens, labels, positions = tokens[:, idx], labels[:, idx], positions[:, idx]  # [b, L/N]
    # Megatron TP+SP: every TP rank holds the whole sequence, or its CP part (the embedding scatters it).
    device = default_device()
    return {"tokens": tokens.contiguous().to(device), "labels": labels.contiguous().to(device),
            "position_ids": positions.contiguous().to(device)}


class Trainer:
    """forward / backward / gradient reduction / optimizer step, split so memory can be marked."""

    def __init__(self, model, optimizer):
        self.model = model
        self.optimizer = optimizer
        self.params = [p for p in model.module.parameters() if p.requires_grad]

    def zero(self) -> None:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=True)

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        per_token = self.model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return per_token.float().sum(), torch.tensor(float(per_token.numel()))

    def backward(self, loss_sum, num_tokens) -> None:
        """Backward and gradient reduction."""
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        loss_sum.backward()
        # DP x CP all-reduce (megatron DDP), TP all-reduce of sequence-parallel norm grads,
        # division by the global token count: the same call for every method.
        finalize_model_grads([self.model], num_tokens=num_tokens.clone())

    def optimizer_step(self) -> None:
        for p in self.params:
            p.grad = p.main_grad
        self.optimizer.step()

    def backward_and_step(self, loss_sum, num_tokens) -> None:
        self.backward(loss_sum, num_tokens)
        self.optimizer_step()

    def step(self, batch) -> float:
        self.zero()
        loss_sum, n = self.forward(batch)
        self.backward_and_step(loss_sum, n)
        return float(loss_sum.detach()) / float(n)

    def static_tensors(self):
        """Parameters, their main_grad buffers and optimizer state (exist outside a step)."""
        from lss_plugin.bench.memory import optimizer_state_tensors

        yield from self.params
        yield from (p.main_grad for p in self.params if getattr(p, "main_grad", None) is not None)
        yield from self.model.module.buffers()
        yield from optimizer_state_tensors(self.optimizer)
        # Megatron's global memory buffer (its local attention's score matmul) persists across steps.
        from megatron.core import parallel_state

        buffers = getattr(parallel_state, "_GLOBAL_MEMORY_BUFFER", None)
        yield from getattr(buffers, "buffer", {}).values()
