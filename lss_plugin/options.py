"""The settings LSS accepts, and their checks: one definition for the core and every adapter.

No torch import, so argument and config validation (Megatron flags, the DeepSpeed block, the
transformers registration) can run before anything heavy is loaded. Messages name the setting
and the value; an adapter passes its own spelling of the setting (``--lss-layout``, ...).
"""
from __future__ import annotations

LAYOUTS = ("contiguous", "balanced")
# Under a causal mask the contiguous layout gives rank s of N a share (2s+1)/N^2 of the work, so
# the last rank sets the step; balanced gives every rank the same. Contiguous stays selectable
# (the LSS paper's layout). Balanced needs L divisible by 2N.
DEFAULT_LAYOUT = "balanced"
KV_BACKWARD_MODES = ("keep", "regather")
# dK/dV reduce-scatter: "fp32" sends the float32 accumulators of half-precision inputs (exact sum
# of the ranks' fp32 partials, 2x the bytes); "input" rounds them to the input dtype first.
KV_GRAD_DTYPES = ("fp32", "input")


def check_choice(setting: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{setting} must be one of {allowed}, got {value!r}")


def check_layout(layout: str, setting: str = "layout") -> None:
    check_choice(setting, layout, LAYOUTS)


def check_kv_backward(kv_backward: str, setting: str = "kv_backward") -> None:
    check_choice(setting, kv_backward, KV_BACKWARD_MODES)


def check_kv_grad_dtype(kv_grad_dtype: str, setting: str = "kv_grad_dtype") -> None:
    check_choice(setting, kv_grad_dtype, KV_GRAD_DTYPES)


def check_kv_head_chunk(kv_head_chunk, kv_heads: int | None = None, setting: str = "kv_head_chunk") -> None:
    """``None`` (all KV heads at once) or an integer in [1, kv_heads] (any positive one if unknown)."""
    if kv_head_chunk is None:
        return
    upper = kv_heads if kv_heads is not None else float("inf")
    if not isinstance(kv_head_chunk, int) or isinstance(kv_head_chunk, bool) or not 1 <= kv_head_chunk <= upper:
        allowed = f"an integer in [1, {kv_heads}] (key/value heads)" if kv_heads is not None else "a positive integer"
        raise ValueError(f"{setting} must be {allowed} or None, got {kv_head_chunk!r}")
