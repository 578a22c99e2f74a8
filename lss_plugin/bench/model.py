"""One megatron-core GPTModel for every method; only the parallel scheme and core attention differ.

Every method builds the same ``GPTModel`` (megatron-core local spec, learned absolute positions,
LayerNorm, GELU MLP, tied embeddings, fp32, no dropout) in megatron-core DDP, with a torch AdamW on
``main_grad`` and ``finalize_model_grads`` (exactly the step ``lss_plugin.megatron.pretrain`` runs).
The core attention and the token split come from the method registry (``methods.py``).

The sequence-parallel methods all register their group where Megatron keeps context parallelism,
so megatron DDP averages their gradients over DP x SP the same way.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from lss_plugin.bench.methods import Variant, method_of, token_indices

__all__ = ["ModelDims", "Variant", "Trainer", "build_model", "make_batch"]


@dataclass(frozen=True)
class ModelDims:
    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 8
    num_kv_heads: int = 8
    ffn_hidden_size: int | None = None
    vocab_size: int = 256
    max_positions: int = 4096
    window: int | None = None  # a causal sliding window of this many keys on every layer (None: full causal)

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def build_model(variant: Variant, dims: ModelDims, world_size: int, context, link_gbit: float | None = None):
    """The DDP-wrapped GPTModel and its AdamW for ``variant`` on ``world_size`` ranks.

    ``context``: the active ``bench.context.ParallelContext`` of the method's parallel layout;
    ``link_gbit``: the configured rate of the link the launch runs behind (None: no limit).
    """
    import torch.nn.functional as F
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from lss_plugin.runtime import default_device

    method = method_of(variant)
    layout = method.layout(world_size)
    tp = layout.tp
    kwargs = dict(
        num_layers=dims.num_layers, hidden_size=dims.hidden_size,
        num_attention_heads=dims.num_heads, num_query_groups=dims.num_kv_heads,
        ffn_hidden_size=dims.ffn, normalization="LayerNorm", activation_func=F.gelu,
        add_bias_linear=True, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
        use_cpu_initialization=True, params_dtype=torch.float32, calculate_per_token_loss=True,
    )
    if layout.cp > 1 or layout.sp_group:
        kwargs["context_parallel_size"] = layout.cp
    if dims.window is not None:  # megatron-core's (left, right): the query and the window - 1 keys before it
        kwargs["window_size"] = (dims.window - 1, 0)
    config = TransformerConfig(**kwargs)
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="LayerNorm"))
    core = method.core_attention(variant, context, link_gbit)
    if core is not None:  # None: megatron-core's local DotProductAttention
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
    if variant.shard_optimizer:  # every DP x CP rank holds the same reduced grads: ZeRO-1 is exact
        from megatron.core import parallel_state

        from lss_plugin.optim import sharded_optimizer

        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        return model, sharded_optimizer(params, torch.optim.AdamW, group, lr=1e-4, foreach=False)
    return model, torch.optim.AdamW(params, lr=1e-4, foreach=False)


def make_batch(variant: Variant, seq_len: int, batch_size: int, vocab_size: int, world_size: int,
               seed: int = 0, doc_len: int | None = None) -> dict:
    """The same global batch [b, L+1] for every method; this rank's part of it. ``doc_len``: the
    sequence packs documents of about that many tokens (``bench.packed.packed_boundaries``, batch 1):
    their global boundaries ride as ``cu_seqlens`` (megatron-core's packed_seq_params)."""
    from megatron.core import parallel_state

    from lss_plugin.runtime import default_device

    g = torch.Generator().manual_seed(seed)
    window = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=g)
    tokens, labels = window[:, :-1], window[:, 1:]  # [b, L]
    positions = torch.arange(seq_len).unsqueeze(0).expand_as(tokens)
    idx = token_indices(variant, seq_len, parallel_state.get_context_parallel_rank(),
                        method_of(variant).layout(world_size).cp)
    if idx is not None:  # a sequence-parallel rank's tokens
        tokens, labels, positions = tokens[:, idx], labels[:, idx], positions[:, idx]  # [b, L/N]
    # Megatron TP+SP: every TP rank holds the whole sequence, or its CP part (the embedding scatters it).
    device = default_device()
    batch = {"tokens": tokens.contiguous().to(device), "labels": labels.contiguous().to(device),
             "position_ids": positions.contiguous().to(device)}
    if doc_len is not None:
        from lss_plugin.bench.packed import packed_boundaries

        if batch_size != 1:
            raise ValueError(f"packed documents (doc_len={doc_len}) take batch 1, got batch {batch_size}")
        batch["cu_seqlens"] = packed_boundaries(seq_len, doc_len).to(torch.int32).to(device)
    return batch


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
        packed = None
        if "cu_seqlens" in batch:  # global document boundaries, as LSS reads them (lss_plugin.megatron.packed)
            from megatron.core.packed_seq_params import PackedSeqParams

            cu = batch["cu_seqlens"]
            packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
        per_token = self.model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                               packed_seq_params=packed)
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
