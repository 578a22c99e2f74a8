"""The options each LSS attention name was registered with, readable without the attention function.

transformers' attention registries are process-global and keyed by ``attn_implementation`` name; this table
is keyed the same way. ``lss_plugin.hf.attention.register_lss_attention`` writes it; the attention, the batch
sharding (``shard_causal_lm_batch``, ``pad_for_layout``), the Trainer and ``deepspeed_initialize`` read it,
so data and attention agree on the layout and the group.
"""
from __future__ import annotations

from lss_plugin.sharding import chunks_per_rank

DEFAULT_NAME = "lss"

_OPTIONS: dict[str, object] = {}  # name -> lss_plugin.hf.attention.LSSHFOptions


def set_options(name: str, options) -> None:
    """Record (or replace) the options ``name`` runs with; ``register_lss_attention`` calls it."""
    _OPTIONS[name] = options


def is_registered(name) -> bool:
    """Whether ``name`` is an LSS attention name registered in this process."""
    return name in _OPTIONS


def lss_options(name: str = DEFAULT_NAME):
    """The options ``name`` was registered with; a ``KeyError`` naming the registered ones otherwise."""
    if name not in _OPTIONS:
        raise KeyError(f"attention implementation {name!r} is not registered by lss_plugin.hf "
                       f"(registered: {sorted(_OPTIONS)}); call register_lss_attention({name!r}, ...)")
    return _OPTIONS[name]


def options_for_config(config):
    """The options of ``config._attn_implementation``, else of ``"lss"``; None when neither is registered."""
    name = getattr(config, "_attn_implementation", None) or DEFAULT_NAME
    return _OPTIONS.get(name, _OPTIONS.get(DEFAULT_NAME))


def parts_per_sequence(sp_size: int, layout: str) -> int:
    """The global length must be a multiple of this (N for contiguous, 2N for balanced)."""
    return sp_size * chunks_per_rank(layout)
