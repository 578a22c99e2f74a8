"""Let megatron-core (0.16.1 to 0.19.x) run on a machine without CUDA (gloo, CPU tensors).

megatron-core assumes a GPU in a handful of places that have nothing to do with the maths:
the device it allocates on (``torch.cuda.current_device()``), the CUDA RNG it forks for
tensor-parallel regions, a torch LayerNorm that refuses ``sequence_parallel``, and (from 0.19)
the CUDA stream DDP waits on before reducing gradients. This shim redirects those to the CPU
(what each release needs: ``lss_plugin.megatron.compat``). It is applied only when CUDA is
absent, so on a GPU machine it is a no-op and megatron-core runs unmodified.

Not covered (use alternatives on CPU): ``get_megatron_optimizer`` (use a torch optimizer on
``param.main_grad``; its distributed optimizer: ``lss_plugin.optim``), ``overlap_grad_reduce`` (CUDA streams), TransformerEngine and apex kernels.
"""
from __future__ import annotations

import functools
import logging

import torch

from lss_plugin.megatron.compat import megatron_core_traits

_APPLIED = False


def _cpu_device(*_args, **_kwargs):
    # Every megatron-core allocation "on the current device" lands on the CPU.
    return "cpu"


def _cpu_get_rng_state(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed):
    # The CPU generator directly: torch.manual_seed itself calls torch.cuda.manual_seed_all.
    torch.default_generator.manual_seed(int(seed))


@functools.lru_cache(maxsize=8)
def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    """megatron-core's ``get_default_causal_mask`` (True = masked), on the CPU."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_sliding_window_causal_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    """megatron-core's ``get_sliding_window_causal_mask`` (True = masked), on the CPU."""
    kept = torch.ones(sq, skv, dtype=torch.bool).triu(skv - sq - window_size[0]).tril(skv - sq + window_size[1])
    return ~kept


class SequenceParallelTorchNorm:
    """megatron-core's WrappedTorchNorm without its ``sequence_parallel`` refusal.

    With Megatron's sequence parallelism a norm sees only this rank's tokens, so its weight
    gradient is partial: the params are marked ``.sequence_parallel`` and megatron-core's
    ``finalize_model_grads`` sums them over the tensor-parallel group (what apex/TE norms do).
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm=False,
                zero_centered_gamma=False, normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma is not supported by the torch LayerNorm")
        kind = config.normalization
        if kind == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif kind == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization {kind!r} is not supported on CPU (LayerNorm, RMSNorm)")
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm


class _SameGeneratorFilter(logging.Filter):
    """Drop the tracker's "CPU RNG state changed within GPU RNG context" warning: under the shim
    the "GPU" RNG *is* the CPU generator, so forking it changes the CPU state by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def apply_cpu_shim() -> bool:
    """Patch megatron-core for CPU-only execution. Returns True if the shim is (now) active.

    Returns False, changing nothing, when CUDA is available. Idempotent. Call it before building
    any megatron-core model (importing megatron-core itself is fine either way). Raises
    RuntimeError for a megatron-core older than the adapter supports (``compat``), on any machine.
    """
    global _APPLIED
    traits = megatron_core_traits()  # refuses an unsupported megatron-core, GPU or not
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True

    torch.cuda.current_device = _cpu_device
    torch.cuda.manual_seed = _cpu_manual_seed
    torch.cuda.get_rng_state = _cpu_get_rng_state
    torch.cuda.set_rng_state = _cpu_set_rng_state

    if traits.grad_sync_needs_cuda_stream:
        # DDP's start_grad_sync waits on the current stream for CUDA-graph events before every
        # reduction; torch's CPU stream has the same (no-op) wait_event/wait_stream.
        torch.cuda.current_stream = torch.cpu.current_stream

    from megatron.core.tensor_parallel import random as mcore_random

    # random.py calls these module-level helpers by name when forking the TP RNG tracker.
    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    logging.getLogger(mcore_random.__name__).addFilter(_SameGeneratorFilter())

    # The unfused softmax builds its causal and sliding-window masks with device="cuda".
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    transformer_utils.get_default_causal_mask = _cpu_default_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_default_causal_mask
    transformer_utils.get_sliding_window_causal_mask = _cpu_sliding_window_causal_mask
    fused_softmax.get_sliding_window_causal_mask = _cpu_sliding_window_causal_mask

    # The local (non-TE) specs and the transformer block pick their norm class from module
    # globals (LNImpl, LayerNormImpl, and WrappedTorchNorm itself, which the RMSNorm branch of
    # LocalSpecProvider.layer_norm re-assigns): swap in the sequence-parallel-capable norm in
    # every megatron-core module loaded so far, the GPT ones imported here first.
    import sys

    from megatron.core.models import backends  # noqa: F401
    from megatron.core.models.gpt import gpt_layer_specs  # noqa: F401
    from megatron.core.transformer import transformer_block  # noqa: F401
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("megatron.core") or module_name.endswith("torch_norm"):
            continue
        for name in ("WrappedTorchNorm", "LNImpl", "LayerNormImpl"):
            if getattr(module, name, None) is WrappedTorchNorm:
                setattr(module, name, SequenceParallelTorchNorm)
    _APPLIED = True
    return True


def is_cpu_shim_applied() -> bool:
    return _APPLIED
