"""Which megatron-core release needs what: the one place the adapter's version differences live.

Supported: megatron-core 0.16.1 (Python < 3.12) and 0.17 to 0.19.x (Python >= 3.12, which those
releases require). CI tests 0.16.1 (``make test``) and 0.19.2 (``make test-megatron-latest``) side
by side. What the adapter uses and what changed between these releases:

| adapter part | 0.16.1 | 0.17.x, 0.18.x | 0.19.x |
| --- | --- | --- | --- |
| ``DotProductAttention.__init__/forward`` (LSS core attention) | same | same | same |
| ``get_gpt_layer_local_spec`` keywords the LSS spec passes | same | same | same |
| ``RotaryEmbedding.forward`` (LSS RoPE rows) | same | same | same |
| THD RoPE rows (``_apply_rotary_pos_emb_thd`` on one CP rank; ``LSSSelfAttention`` picks the same) | table of ``cu_seqlens[-1]`` rows: whole-sequence positions, else positions in each document | not checked | same rule (applied per document, same numbers) |
| ``Attention.forward`` with THD: squeezes q/k/v, RoPE with ``cu_seqlens``, output ``[t, 1, h]`` | same | not checked | same |
| ``PackedSeqParams`` fields LSS checks (``lss_plugin.megatron.packed``, read with defaults) | up to ``local_cp_size``, ``cp_group`` | not checked | also ``tokens_per_sample``, ``pad_between_seqs`` (refused when set), ``total_tokens``/``seq_idx`` (Mamba only) |
| ``initialize_model_parallel`` / CP group (registration) | same | same | same |
| ``TransformerConfig.window_size``/``window_attn_skip_freq``/``softmax_type``, ``is_layer_window_attention``, ``DotProductAttention.softmax_offset`` and its ``sharded_state_dict`` (``lss_plugin.megatron.masks``) | present | not checked | same |
| DDP ``start_grad_sync`` calls ``torch.cuda.current_stream()`` | no | only with overlap and several distributed-optimizer instances | on every reduction: the CPU shim must cover it |
| Megatron-LM ``pretrain_gpt.py`` builds the model with | ``gpt_builders.gpt_builder`` | (no patch) | ``GPTModelConfig`` + ``GPTModelBuilder`` |

So the differences are the rows the code below names: ``grad_sync_needs_cuda_stream`` (read by
``cpu_shim``) and ``megatron_lm_patch`` (which file of ``patches/`` fits the release's Megatron-LM
tag). ``python -m lss_plugin.megatron.compat`` prints both for the installed release.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

OLDEST_SUPPORTED = (0, 16, 1)
FIRST_UNTESTED = (0, 20, 0)
SUPPORTED_RANGE = "megatron-core 0.16.1 (Python < 3.12) or >=0.17,<0.20 (Python >= 3.12)"

# Megatron-LM release tag -> the patch for its pretrain_gpt.py (checked with `git apply --check`).
MEGATRON_LM_PATCHES = {
    (0, 16): "megatron_lm_core_v0.16.1.patch",
    (0, 19): "megatron_lm_core_v0.19.0.patch",
}


@dataclass(frozen=True)
class MegatronCoreTraits:
    """What the installed megatron-core release asks of the adapter."""

    version: tuple[int, int, int]
    # DistributedDataParallel's start_grad_sync calls torch.cuda.current_stream() before every
    # gradient reduction (from 0.19; 0.17/0.18 only with overlap + several optimizer instances).
    grad_sync_needs_cuda_stream: bool
    # File name in patches/ for this release's Megatron-LM tag; None: no patch for this release.
    megatron_lm_patch: str | None

    @classmethod
    def for_version(cls, version: tuple[int, int, int]) -> "MegatronCoreTraits":
        return cls(
            version=version,
            grad_sync_needs_cuda_stream=version >= (0, 19, 0),
            megatron_lm_patch=MEGATRON_LM_PATCHES.get(version[:2]),
        )


def parse_version(text: str) -> tuple[int, int, int]:
    """``"0.19.2"`` / ``"0.17.0rc0"`` -> ``(0, 19, 2)`` / ``(0, 17, 0)``."""
    parts = []
    for piece in text.split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def check_version(version: tuple[int, int, int]) -> None:
    """Refuse a release older than the oldest supported one; warn about an untested newer one."""
    shown = ".".join(map(str, version))
    if version < OLDEST_SUPPORTED:
        raise RuntimeError(
            f"megatron-core {shown} is older than lss_plugin supports: install {SUPPORTED_RANGE} "
            "(pip install 'lss_plugin[megatron]' picks the right one for your Python)"
        )
    if version >= FIRST_UNTESTED:
        warnings.warn(
            f"megatron-core {shown} is newer than lss_plugin was tested with ({SUPPORTED_RANGE})",
            stacklevel=2,
        )


@functools.lru_cache(maxsize=1)
def megatron_core_traits() -> MegatronCoreTraits:
    """Traits of the megatron-core that is imported (checked once: too old raises)."""
    # package_info, not the distribution's metadata: a Megatron-LM checkout on PYTHONPATH may
    # shadow an installed wheel of another release.
    from megatron.core.package_info import __version__

    version = parse_version(__version__)
    check_version(version)
    return MegatronCoreTraits.for_version(version)


def main() -> int:
    traits = megatron_core_traits()
    print(f"megatron-core {'.'.join(map(str, traits.version))} (supported: {SUPPORTED_RANGE})")
    print(f"CPU shim covers torch.cuda.current_stream: {traits.grad_sync_needs_cuda_stream}")
    print("Megatron-LM patch: "
          + (f"patches/{traits.megatron_lm_patch}" if traits.megatron_lm_patch else
             f"none for this release (there are {', '.join(MEGATRON_LM_PATCHES.values())})"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
