"""One training (or evaluation) pass through megatron-core's forward/backward schedules.

``get_forward_backward_func()`` picks the schedule: no pipelining with one stage, 1F1B across
``--pipeline-model-parallel-size`` stages otherwise. LSS needs nothing special from the schedule:
activations move between stages as ``[L/N (/T with Megatron SP), b, h]`` tensors (the schedule
divides the sequence by the CP size, where LSS is registered), and each stage's attention layers
gather K, V over the LSS group of that stage.

Loss: per-token sums with ``calculate_per_token_loss`` (the loss function returns the masked sum,
the token count and both for logging); the schedule adds the counts and hands them to
``finalize_model_grads``, which broadcasts them from the last stage and divides every gradient
by the global count.

CPU: megatron-core 0.16's schedules allocate their token counter with ``device="cuda"``;
``_cpu_schedules`` redirects that one allocation when CUDA is absent (kept here rather than in
``cpu_shim`` because only the schedules need it). On gloo, p2p send/recv run one op at a time:
``build_gpt_model`` turns ``batch_p2p_comm`` off (gloo has no coalesced p2p, and the batched path
calls ``torch.cuda.synchronize()``).
"""
from __future__ import annotations

import functools
import types

import torch
import torch.distributed as dist


class _TorchOnCpu(types.ModuleType):
    """``torch`` as the schedules module sees it: ``zeros(device="cuda")`` lands on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


def _cpu_schedules():
    """megatron-core's schedules module, its ``device="cuda"`` allocations on the CPU if no CUDA."""
    from megatron.core.pipeline_parallel import schedules

    if not torch.cuda.is_available() and not isinstance(schedules.torch, _TorchOnCpu):
        schedules.torch = _TorchOnCpu("torch")
    return schedules


def configure_schedule(config, model) -> None:
    """TransformerConfig fields the schedules read (set once, after the model is built)."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Last stage: (loss sum to back-propagate, token count, [sum, count] for logging)."""
    loss_sum = (per_token_loss.float() * loss_mask).sum()
    count = loss_mask.sum()
    return loss_sum, count.to(torch.int), torch.stack([loss_sum.detach(), count.detach().float()])


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    # Every stage gets the micro-batch; GPTModel reads tokens on the first, labels on the last.
    per_token = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"],
                      packed_seq_params=batch.get("packed_seq_params"))  # [b, s]
    return per_token, functools.partial(_loss_func, batch["loss_mask"])


def forward_backward(model, microbatches: list[dict], args, forward_only: bool = False) -> torch.Tensor:
    """Run the schedule over ``microbatches``; returns ``[loss sum, token count]`` of this rank.

    Gradients are finalised (DP x CP reduction, TP norm all-reduce, division by the global token
    count) inside the schedule. Ranks off the last stage return zeros: see ``last_stage_value``.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    _cpu_schedules()
    store = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        forward_only=forward_only,
    )
    totals = torch.zeros(2)
    for pair in store:  # one [sum, count] per micro-batch, on the last stage only
        totals += pair.cpu()
    return totals


def last_stage_value(values: torch.Tensor) -> torch.Tensor:
    """``values`` of the last pipeline stage, on every stage (broadcast over the PP group)."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return values
    from lss_plugin.runtime import default_device

    out = values.to(default_device()).clone()
    dist.broadcast(out, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return out.cpu()
