"""A transformers model under DeepSpeed with LSS: one call in place of ``deepspeed.initialize``.

    model = AutoModelForCausalLM.from_config(config, attn_implementation="lss")
    engine, optimizer, _, scheduler = lss_plugin.hf.deepspeed_initialize(model=model, config="ds.json")

``lss_plugin.deepspeed.initialize`` reads the ``"lss_sequence_parallel"`` block, builds the SP x DP
topology and the mpu and makes the engine average gradients over SP and DP. This wrapper then
points the model's attention at that configuration first: the block's ``AttentionSettings`` (its
layout and kv_* keys) become the settings of the model's LSS attention name, so the attention, the
batch sharding (``shard_causal_lm_batch``) and the DeepSpeed block can never disagree (and
``lss_plugin.deepspeed.initialize``'s check of the model's attention against the block passes).
"""
from __future__ import annotations

from lss_plugin.hf.attention import check_model_runs_lss, register_lss_attention
from lss_plugin.hf.registry import DEFAULT_NAME, is_registered


def deepspeed_initialize(model=None, *, attn_implementation: str | None = None, **kwargs):
    """``lss_plugin.deepspeed.initialize(model=model, **kwargs)`` for a transformers model.

    The model must already use an LSS attention (``attn_implementation="lss"`` at construction,
    or ``model.set_attn_implementation("lss")``); ``attn_implementation`` overrides which name.
    Refused before DeepSpeed starts if the model uses another attention while the block enables LSS.
    """
    import lss_plugin.deepspeed as lds

    config = getattr(model, "config", None)
    name = attn_implementation or getattr(config, "_attn_implementation", None)
    block = _block(kwargs)
    if block is not None and block.enabled and not is_registered(name):
        raise ValueError(
            f"the DeepSpeed config enables \"lss_sequence_parallel\" but the model's attention is {name!r}: "
            f"build it with attn_implementation={DEFAULT_NAME!r} or call model.set_attn_implementation({DEFAULT_NAME!r})"
        )
    if block is not None and block.enabled:
        check_model_runs_lss(model)
        # before the engine exists: lds.initialize compares the model's attention settings with the block's
        register_lss_attention(name, settings=block.attention)
    return lds.initialize(model=model, **kwargs)


def _block(kwargs):
    """The parsed LSS block, or None when the config is not reachable here (DeepSpeed will say why)."""
    from lss_plugin.deepspeed import LSSConfig

    config = kwargs.get("config") or kwargs.get("config_params")
    args = kwargs.get("args")
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None)
    if config is None:
        return None
    return LSSConfig.from_ds_config(config)
