"""The ``"lss_sequence_parallel"`` block of a DeepSpeed JSON config, validated.

DeepSpeed ignores top-level keys it does not know, so a typo in this block would silently train
without LSS. Everything here is therefore checked strictly: unknown keys are an error naming
them, every value is type- and range-checked, and DeepSpeed's own ``sequence_parallel_size``
may not contradict ``size``. All checks run before any process group or collective exists.

``"ulysses_size": U`` (default 1) makes the SP group of ``size`` = N ranks the hybrid LSS x Ulysses:
all-to-all over heads inside each run of U consecutive ranks, LSS's fused K/V gather across the N/U
runs (``lss_plugin.topology``). N stays the sequence-parallel size everywhere DeepSpeed looks
(``sequence_parallel_size``, the mpu, the gradient average); U only changes how attention moves
data inside that group, so it must divide N and the model's heads (``check_heads``).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any

from lss_plugin.options import (
    BLOCK_KEYS, AttentionSettings, check_ulysses_heads, check_ulysses_size, setting_names,
)

BLOCK_KEY = "lss_sequence_parallel"
GRAD_AVERAGING_MODES = ("auto", "two_stage", "fused")
# DeepSpeed keys that describe the same grid as the block; they must agree with it.
DEEPSPEED_GRID_KEYS = ("sequence_parallel_size", "data_parallel_size")


class LSSConfigError(ValueError):
    """An ``lss_sequence_parallel`` block (or the config around it) is invalid."""


@dataclass(frozen=True)
class LSSConfig:
    """What the block says. ``enabled=False`` (or no block) means: plain DeepSpeed.

    The attention keys ("layout", "kv_backward", "kv_head_chunk", "kv_buffer_mib", "kv_grad_dtype": the
    ``key`` of each ``AttentionSettings`` field) become ``attention``; the others are the grid's."""

    enabled: bool = False
    size: int = 1  # sequence-parallel ranks per sequence (N)
    grad_averaging: str = "auto"  # "two_stage": SP then DP (ZeRO 0 only); "fused": one SP x DP reduction
    timeout_s: float | None = None  # timeout of the LSS process groups
    ulysses_size: int = 1  # U: Ulysses all-to-all inside runs of U consecutive SP ranks, LSS across them
    attention: AttentionSettings = field(default_factory=AttentionSettings)  # what every lss_attention call runs

    GRID_FIELDS = ("enabled", "size", "grad_averaging", "timeout_s", "ulysses_size")

    def __post_init__(self) -> None:
        where = f'"{BLOCK_KEY}"'
        if not isinstance(self.enabled, bool):
            raise LSSConfigError(f'{where}: "enabled" must be true or false, got {self.enabled!r}')
        if not _is_positive_int(self.size):
            raise LSSConfigError(f'{where}: "size" must be a positive integer, got {self.size!r}')
        if self.grad_averaging not in GRAD_AVERAGING_MODES:
            raise LSSConfigError(f'{where}: "grad_averaging" must be one of {list(GRAD_AVERAGING_MODES)}, '
                                 f'got {self.grad_averaging!r}')
        if self.timeout_s is not None and (
            isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or self.timeout_s <= 0
        ):
            raise LSSConfigError(f'{where}: "timeout_s" must be a positive number or null, got {self.timeout_s!r}')
        if not isinstance(self.attention, AttentionSettings):
            raise LSSConfigError(f"{where}: attention must be an AttentionSettings, got {self.attention!r}")
        with _as_config_error():
            check_ulysses_size(self.ulysses_size, self.size, setting=f'{where}: "ulysses_size"')

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Every key the block accepts."""
        return cls.GRID_FIELDS + setting_names(BLOCK_KEYS)

    @classmethod
    def from_dict(cls, block: dict[str, Any] | None) -> "LSSConfig":
        """Parse the block itself (``None``: no block, LSS disabled)."""
        if block is None:
            return cls(enabled=False)
        if not isinstance(block, dict):
            raise LSSConfigError(f'"{BLOCK_KEY}" must be a JSON object, got {type(block).__name__}: {block!r}')
        unknown = sorted(set(block) - set(cls.keys()))
        if unknown:
            raise LSSConfigError(
                f'"{BLOCK_KEY}" has unknown key(s) {unknown}; allowed keys are {list(cls.keys())}'
            )
        with _as_config_error(f'"{BLOCK_KEY}": '):
            attention = AttentionSettings.from_names(block, BLOCK_KEYS)  # the attention keys, spelled as keys
        grid = {key: value for key, value in block.items() if key in cls.GRID_FIELDS}
        # A block that is present but silent about "enabled" means the user wants LSS.
        return cls(**{"enabled": True, **grid}, attention=attention)

    @classmethod
    def from_ds_config(cls, config: dict[str, Any] | str | os.PathLike) -> "LSSConfig":
        """Parse the block out of a whole DeepSpeed config (a dict or a JSON file path).

        Also refuses a DeepSpeed ``sequence_parallel_size`` that differs from ``size``: two
        sequence-parallel schemes on one grid cannot both be right.
        """
        config = load_config(config)
        lss = cls.from_dict(config.get(BLOCK_KEY))
        ds_sp = config.get("sequence_parallel_size")
        if ds_sp is not None:
            effective = lss.size if lss.enabled else 1
            if ds_sp != effective:
                # DeepSpeed's key is its own Ulysses degree; under the hybrid it still counts every
                # rank of one sequence (N), the Ulysses runs inside it are "ulysses_size".
                hybrid = (f', ulysses_size={lss.ulysses_size}; "sequence_parallel_size" counts every rank of one '
                          f'sequence, the Ulysses degree is "ulysses_size"') if lss.ulysses_size > 1 else ""
                raise LSSConfigError(
                    f'DeepSpeed "sequence_parallel_size" = {ds_sp!r} contradicts "{BLOCK_KEY}" '
                    f'(enabled={lss.enabled}, size={lss.size}{hybrid}): remove it or set it to {effective}'
                )
        return lss

    def check_world(self, world_size: int, config: dict[str, Any] | None = None) -> int:
        """The data-parallel size on ``world_size`` ranks; errors name the whole product."""
        if world_size % self.size != 0:
            raise LSSConfigError(
                f'"{BLOCK_KEY}": size {self.size} does not divide the world size {world_size}'
            )
        dp = world_size // self.size
        ds_dp = (config or {}).get("data_parallel_size")
        if ds_dp is not None and ds_dp != dp:
            raise LSSConfigError(
                f'DeepSpeed "data_parallel_size" = {ds_dp!r} contradicts "{BLOCK_KEY}": '
                f"world_size({world_size}) / size({self.size}) = {dp}"
            )
        return dp

    def check_heads(self, num_heads: int, num_kv_heads: int | None = None, model: str = "the model") -> None:
        """Refuse (by name, no communication) heads the Ulysses all-to-all cannot split over ``ulysses_size``."""
        if self.ulysses_size == 1:
            return
        with _as_config_error(f"{model} ({num_heads} query heads, {num_kv_heads or num_heads} key/value heads): "):
            check_ulysses_heads(num_heads, num_heads if num_kv_heads is None else num_kv_heads, self.ulysses_size,
                                setting=f'"{BLOCK_KEY}": "ulysses_size"')

    def check_model_attention(self, model) -> None:
        """The block's attention keys are applied by the model's own modules: refuse (by name, no
        communication) a model whose LSS attention runs other settings, or one-process attention."""
        from lss_plugin.model_settings import check_model_attention

        with _as_config_error():
            check_model_attention(model, self.attention, f'the "{BLOCK_KEY}" block', BLOCK_KEYS)

    def grad_averaging_for_stage(self, zero_stage: int) -> str:
        """The averaging an engine at this ZeRO stage does; refuses "two_stage" where it cannot be."""
        return resolve_grad_averaging(self.grad_averaging, zero_stage)

    def to_dict(self) -> dict[str, Any]:
        """The block as its keys."""
        return {**{name: getattr(self, name) for name in self.GRID_FIELDS}, **self.attention.names(BLOCK_KEYS)}


def resolve_grad_averaging(setting: str, zero_stage: int, two_stage_blocker: str | None = None) -> str:
    """"auto" / "two_stage" / "fused" -> the mode the engine uses; "two_stage" is refused by name
    where the engine cannot honour it.

    ZeRO 1-3 partition gradients over the whole SP x DP grid, so their reduction is one collective
    over it ("fused"); two stages (SP, then DP) exist only without ZeRO, and only when LSS reduces the
    parameters' own gradients (``two_stage_blocker`` says why not, e.g. the bf16 optimizer's copies).
    """
    blocker = f"ZeRO stage {zero_stage} reduces each gradient partition in one collective over SP x DP" \
        if zero_stage != 0 else two_stage_blocker
    if setting == "auto":
        return "fused" if blocker else "two_stage"
    if setting == "two_stage" and blocker:
        raise LSSConfigError(
            f'"{BLOCK_KEY}": "grad_averaging" = "two_stage" cannot be honoured: {blocker}. '
            'Use "fused" or "auto" (the same average in one collective)'
        )
    return setting


def load_config(config: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """A DeepSpeed config as a dict: a dict is returned as is, a path is read as JSON."""
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, os.PathLike)) and os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            loaded = json.load(f)
        if not isinstance(loaded, dict):
            raise LSSConfigError(f"DeepSpeed config {config} is not a JSON object")
        return loaded
    raise LSSConfigError(f"expected a DeepSpeed config dict or the path of a JSON file, got {config!r}")


def deepspeed_view(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` for DeepSpeed itself: without the LSS block and without the grid keys.

    DeepSpeed would turn ``sequence_parallel_size`` + ``data_parallel_size`` into a device mesh of
    its own; the LSS mpu describes the grid instead (both were checked against the block).
    """
    view = copy.deepcopy(config)
    view.pop(BLOCK_KEY, None)
    for key in DEEPSPEED_GRID_KEYS:
        view.pop(key, None)
    return view


@contextlib.contextmanager
def _as_config_error(prefix: str = ""):
    """The shared option checks raise ValueError; the block's errors are LSSConfigError (same message)."""
    try:
        yield
    except LSSConfigError:
        raise
    except ValueError as err:
        raise LSSConfigError(prefix + str(err)) from None


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
