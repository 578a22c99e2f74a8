"""Which ``AttentionSettings`` a model's LSS attention runs with, read from the model itself.

A framework adapter that is configured apart from the model (the DeepSpeed block) must not
believe its own settings while the model runs others: this walks the model and compares.
Modules that run ``lss_attention`` say what with, through an ``lss_attention_settings`` attribute
(``LSSAttention``, the bundled GPT's attention: None when it runs one-process attention,
``LSSDotProductAttention``); a transformers model through the settings registered for its
``attn_implementation`` (``lss_plugin.hf.attention``). A model that calls ``lss_attention`` some
other way is not seen here. No communication: the model is the same on every rank.
"""
from __future__ import annotations

import sys

from lss_plugin.options import AttentionSettings, Dialect, KEYWORDS


def attention_settings_in(model) -> dict[str, AttentionSettings | None]:
    """``{module path: settings}`` of every module of ``model`` that says what its attention runs with
    (None: a module that could run LSS attention but runs one-process attention)."""
    hf = sys.modules.get("lss_plugin.hf.attention")  # nothing is registered unless the HF adapter was imported
    found = {}
    for path, module in model.named_modules():
        if hasattr(module, "lss_attention_settings"):
            found[path or type(module).__name__] = module.lss_attention_settings
        elif hf is not None and hasattr(getattr(module, "config", None), "_attn_implementation"):
            settings = hf.model_attention_settings(module)
            if settings is not None:
                found[path or type(module).__name__] = settings
    return found


def check_model_attention(model, expected: AttentionSettings, source: str, dialect: Dialect = KEYWORDS) -> None:
    """Refuse (ValueError naming the modules and settings) a ``model`` whose LSS attention runs other
    settings than ``expected`` (what ``source`` says, spelled in ``dialect``), or none at all."""
    problems = []
    for path, settings in attention_settings_in(model).items():
        if settings is None:
            problems.append(f"{path} runs one-process attention (no LSS options)")
        elif settings != expected:
            problems.append(f"{path} runs {', '.join(settings.differences(expected, dialect))}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; ... ({len(problems)} modules)" if len(problems) > 3 else "")
        raise ValueError(f"{type(model).__name__}'s attention does not run what {source} says: {shown}. Build the "
                         f"model from the same settings (e.g. LSSAttentionOptions(settings=<config>.attention)) "
                         "or change the config")
