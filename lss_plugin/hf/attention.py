"""``attn_implementation="lss"`` for transformers models, through its public attention registries.

transformers (5.x) resolves a model's attention by name in two registries:
- ``AttentionInterface``: ``fn(module, query, key, value, attention_mask, *, dropout, scaling,
  is_causal=None, sliding_window=None, **kwargs) -> (out, weights)`` with query ``[b, H, s, d]`` and
  key/value ``[b, Hkv, s, d]`` (KV heads *not* repeated), ``out`` ``[b, s, H, d]``;
- ``AttentionMaskInterface``: builds the ``attention_mask`` the function above receives, from the
  model's mask pattern (``mask_function``), a 2-D padding mask, and the sliding window size.

Under LSS every rank holds ``s_local = L / N`` tokens of each sequence, so the model-side mask
machinery only ever sees local lengths. The mask function here therefore builds no mask: it checks
that the pattern is one ``lss_attention`` reproduces exactly (causal, a causal sliding window, causal
chunked attention; no padding) and returns ``None``; anything else (image-token overlays, bidirectional
patterns, ...) is refused with the setting to change. The attention function then runs
``lss_attention`` with the layer's own mask in global positions, read from the module and its config
(``lss_plugin.hf.layer_masks``): ``window=`` from the ``sliding_window`` it receives (or the layer's
``"sliding_attention"`` type), ``chunk=`` from a ``"chunked_attention"`` layer's
``config.attention_chunk_size`` (the function receives no chunk argument), ``softcap=`` as received
(Gemma 2), ``sinks=`` from ``s_aux`` (gpt-oss: the module's learnable ``sinks`` parameter, whose
gradient flows back through autograd and is then averaged like any weight's).
Both read this rank's data (its padding mask, its position ids), so neither raises alone: a refusal
is deferred to the ``lss_attention`` call's verdict, which raises it on every rank of the SP group
(``lss_plugin.verdict``).

Packed documents reach the attention function as transformers' FlashAttentionKwargs
(``cu_seq_lens_q``/``cu_seq_lens_k``, ``max_length_q``/``max_length_k``) holding the *global* boundaries
(``shard_causal_lm_batch`` puts them into ``model_inputs()``); they become ``lss_attention``'s
``cu_seqlens``. Different query and key boundaries are refused by name (``lss_plugin.hf.packing``).

Under a hybrid LSS x Ulysses topology (``init_topology(..., ulysses_size=U)``, or the DeepSpeed block's
``"ulysses_size"``) nothing changes here: ``group=None`` means the registered topology's
``SequenceGroups``, so ``lss_attention`` runs the all-to-all over heads inside each Ulysses group and
the fused gather across them, and position ids are checked against the hybrid's token layout.

The settings (``AttentionSettings``) and group of a registered name live in a small table
(``lss_plugin.hf.registry``; the registries themselves are process-global), so ``shard_causal_lm_batch``
can read the same layout the attention uses without importing it.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lss_plugin.attention import lss_attention
from lss_plugin.documents import host_bounds
from lss_plugin.hf.layer_masks import check_sinks, check_temperature_tuning, chunked_documents, layer_mask
from lss_plugin.hf.packing import FLASH_ATTN_KWARGS, boundaries_from_flash_kwargs
from lss_plugin.hf.registry import DEFAULT_NAME, is_registered, lss_options, options_for_config, set_options
from lss_plugin.masks import MaskSpec
from lss_plugin.options import AttentionSettings, settings_from_keywords
from lss_plugin.topology import resolve_sequence_groups, resolve_sp_group
from lss_plugin.verdict import defer


@dataclass(frozen=True)
class LSSHFOptions:
    """What a registered attention name runs with: the ``AttentionSettings`` handed to ``lss_attention``
    unchanged, and the group. ``group=None``: the registered topology's sequence groups (the hybrid
    LSS x Ulysses when it was built with ``ulysses_size`` > 1); a ProcessGroup: pure LSS over it; a
    ``SequenceGroups``: those groups."""

    settings: AttentionSettings = field(default_factory=AttentionSettings)
    group: object = None

    @property
    def layout(self) -> str:
        """The settings' layout (the batch sharding reads it)."""
        return self.settings.layout


def register_lss_attention(
    name: str = DEFAULT_NAME,
    *,
    group=None,
    settings: AttentionSettings | None = None,
    **setting_keywords,
) -> str:
    """Register ``name`` (default ``"lss"``) in transformers' attention and mask registries.

    Afterwards ``from_pretrained(..., attn_implementation=name)``, ``_from_config(config,
    attn_implementation=name)`` and ``model.set_attn_implementation(name)`` accept it. ``settings``
    (an ``AttentionSettings``) or its keywords (``layout=``, ``kv_backward=``, ``kv_head_chunk=``,
    ``kv_buffer_mib=``, ``kv_grad_dtype=``) fix what every call runs with. Calling it again replaces
    the options of ``name`` (register a second name for a second set of options). Returns ``name``.
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    if not isinstance(name, str) or not name or name in ("eager", "sdpa", "flex_attention") or "/" in name:
        raise ValueError(f"attention name must be a new plain name (not a built-in or hub kernel), got {name!r}")
    settings = settings_from_keywords(settings, setting_keywords, "register_lss_attention")
    set_options(name, LSSHFOptions(settings=settings, group=group))
    AttentionInterface.register(name, lss_attention_forward)
    AttentionMaskInterface.register(name, lss_attention_mask)
    return name


def check_model_runs_lss(model) -> None:
    """Refuse a transformers model whose class does not go through the attention registry
    (``_supports_attention_backend = False``: Bloom, MPT, ... with their own attention code, ALiBi
    among them): it accepts ``attn_implementation="lss"`` but would attend each rank's shard alone."""
    cls = type(model)
    if not getattr(cls, "_supports_attention_backend", True):
        raise ValueError(
            f"{cls.__name__} computes its attention itself (transformers' _supports_attention_backend=False), so "
            f"attn_implementation={getattr(getattr(model, 'config', None), '_attn_implementation', None)!r} would not "
            "run LSS: every rank would attend to its own shard only. LSS supports models whose attention goes "
            "through transformers' AttentionInterface")


def model_attention_settings(model) -> AttentionSettings | None:
    """The settings of the LSS name ``model`` (a transformers model) attends with; None when it does not
    use one registered here (read by ``lss_plugin.model_settings``)."""
    name = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return lss_options(name).settings if isinstance(name, str) and is_registered(name) else None


def _options_for(config) -> LSSHFOptions:
    return options_for_config(config) or LSSHFOptions()


def _sp_size(options: LSSHFOptions) -> int:
    return dist.get_world_size(resolve_sp_group(options.group))


# ---------------------------------------------------------------------------------------------
# Mask function: validate the requested pattern, build nothing.
# ---------------------------------------------------------------------------------------------

def _overlay_on_causal(mask_function):
    """The overlay of transformers' ``and_masks(overlay, causal_mask_function)`` (sliding window or
    chunked causal), else None.

    Recognised by structure (qualified names of the closures), so an unknown wrapper - packed
    sequences, image-token overlays - is never mistaken for one.
    """
    from transformers.masking_utils import causal_mask_function

    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return None
    cells = [c.cell_contents for c in (mask_function.__closure__ or ())]
    parts = next((c for c in cells if isinstance(c, tuple)), ())
    if len(parts) != 2 or parts[1] is not causal_mask_function:
        return None
    return parts[0] if getattr(parts[0], "__qualname__", "") in _OVERLAYS else None


# The overlays LSS reproduces on a causal mask (the layer's window / chunk comes from its config).
_OVERLAYS = ("sliding_window_overlay.<locals>.inner_mask", "chunked_overlay.<locals>.inner_mask")


def lss_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    config=None,
    **kwargs,
):
    """``AttentionMaskInterface`` entry: ``None`` (the layer's mask is applied inside LSS, in global
    positions: nothing per rank is recorded here, each layer's attention reads its own config); a refusal is
    deferred to the next ``lss_attention`` call's verdict (``lss_plugin.verdict.defer``), which then
    raises it on every rank of the SP group: the padding mask is this rank's alone, and raising here
    would leave the other ranks waiting in their first collective."""
    try:
        _check_mask_request(q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, config)
    except ValueError as err:
        defer(err)
    return None


def _check_mask_request(q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, config) -> None:
    from transformers.masking_utils import causal_mask_function

    model = type(config).__name__ if config is not None else "the model"
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            f"attn_implementation='lss' got an attention_mask with padding ({int((~attention_mask.bool()).sum())} "
            f"masked positions) for {model}: LSS applies the causal mask in global positions and does not take "
            "padding masks. Right-pad the batch and let lss_plugin.hf.shard_causal_lm_batch turn the padding "
            "into ignored labels (exact for every real token); left or interior padding is not supported."
        )
    if q_offset != 0 or kv_offset != 0 or kv_length != q_length:
        raise ValueError(
            f"attn_implementation='lss' is for training/prefill on sharded sequences without a KV cache "
            f"(got q_length={q_length}, kv_length={kv_length}, q_offset={q_offset}, kv_offset={kv_offset}); "
            "call the model with use_cache=False"
        )
    if mask_function is causal_mask_function:
        return
    if _overlay_on_causal(mask_function) is not None:  # the chunked overlay's left padding is 0: no padding mask
        return
    raise ValueError(
        f"attn_implementation='lss' cannot reproduce the mask pattern {model} asked for "
        f"({getattr(mask_function, '__qualname__', mask_function)!r}). LSS supports causal masks with the "
        "layer's sliding window or chunked attention (config.layer_types, sliding_window, attention_chunk_size); "
        "not bidirectional masks (config.is_causal=False), image-token overlays or other mask functions. "
        "Common causes: packed sequences detected from "
        "position_ids that restart or jump (pass the batch through lss_plugin.hf.shard_causal_lm_batch and call the "
        "model with its model_inputs(): the all-ones attention_mask keeps transformers from building a packed mask "
        "from one rank's positions, and packed documents travel as global cu_seq_lens_q/cu_seq_lens_k), or a "
        "model-specific mask overlay (image tokens)."
    )


# ---------------------------------------------------------------------------------------------
# Attention function.
# ---------------------------------------------------------------------------------------------

def _check_position_ids(position_ids, s_local: int, options: LSSHFOptions, cu_seqlens=None) -> None:
    """Positions must be this rank's global positions under the layout, or with packed documents
    (``cu_seqlens``) its positions inside their documents (catches unsharded defaults, and restarting
    positions that came without the global boundaries)."""
    if position_ids is None:
        return
    from lss_plugin.sharding import local_positions

    groups = resolve_sequence_groups(options.group)  # the hybrid's layout too, when the topology has one
    key = (s_local, options.layout, groups, None if cu_seqlens is None else host_bounds(cu_seqlens))
    last = _POSITIONS_PASSED[0] if _POSITIONS_PASSED else None
    if last is not None and last[0]() is position_ids and last[1:] == (position_ids._version, key):
        return  # the same tensor every layer of this forward already passed: no device read
    seq_len = s_local * groups.sp_size
    expected = local_positions(seq_len, groups, options.layout, device=position_ids.device, cu_seqlens=cu_seqlens)
    rows = position_ids.reshape(-1, position_ids.shape[-1])
    if rows.shape[-1] != s_local or not bool((rows == expected).all()):
        first = rows[0, : min(4, rows.shape[-1])].tolist()
        what = ("positions inside the documents of cu_seq_lens_q" if cu_seqlens is not None
                else "global positions (no cu_seq_lens_q/cu_seq_lens_k given: one document per row)")
        raise ValueError(
            f"position_ids {first}... on SP rank {groups.sp_rank} are not this rank's {what} "
            f"{expected[:4].tolist()}... under layout {options.layout!r}: pass the position_ids from "
            "lss_plugin.hf.shard_causal_lm_batch (for packed documents give it the whole batch's restarting "
            "position_ids; its model_inputs() carry the global boundaries)"
        )
    _POSITIONS_PASSED[:] = [(weakref.ref(position_ids), position_ids._version, key)]


_POSITIONS_PASSED: list = []  # [(weakref, _version, key)] of the last position_ids that passed


# Keyword arguments transformers passes that do not change the attention LSS computes (position_ids,
# the packed-document FlashAttentionKwargs and the sinks ``s_aux`` are handled separately). Any other
# keyword with a value - ``seq_idx``, KV-cache tables, additive biases - would be silently ignored:
# refused by name instead.
_NEUTRAL_KWARGS = frozenset({
    "position_ids", "output_attentions", "output_hidden_states", "output_router_logits", "num_items_in_batch",
    "use_cache", "cache_position", "past_key_values", "past_key_value", "layer_idx", "return_dict",
})


def _refuse_unknown_kwargs(kwargs: dict, model: str) -> None:
    active = sorted(name for name, value in kwargs.items()
                    if name not in _NEUTRAL_KWARGS and value is not None and value is not False)
    if active:
        raise ValueError(
            f"attn_implementation='lss' got attention arguments it does not implement from {model}: {active} "
            "(e.g. seq_idx, an additive bias); it would ignore them and compute "
            "a different attention, so it refuses instead"
        )


def lss_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry. query [b, H, s_local, d], key/value [b, Hkv, s_local, d] -> ([b, s_local, H, d], None).

    The layer's mask (``window``/``chunk``, ``lss_plugin.hf.layer_masks``), ``softcap`` and the sinks
    ``s_aux`` [H] go to ``lss_attention`` as they are; ``scaling`` carries e.g. Gemma's
    ``query_pre_attn_scalar ** -0.5``."""
    config = getattr(module, "config", None)
    options = _options_for(config)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    try:
        cu_seqlens, spec = _check_call(module, config, options, query, key, attention_mask, dropout, sliding_window,
                                       causal, s_aux, kwargs)
    except Exception as err:  # noqa: BLE001 - refused by lss_attention's verdict on every rank, not here alone
        defer(err)
        cu_seqlens, spec = None, MaskSpec(causal=causal)
    out = lss_attention(
        query.transpose(1, 2),  # [b, s_local, H, d]
        key.transpose(1, 2),  # [b, s_local, Hkv, d]: KV heads go through the gather un-repeated
        value.transpose(1, 2),
        group=options.group,
        causal=causal,
        softmax_scale=scaling,
        cu_seqlens=cu_seqlens,
        window=spec.window,
        chunk=spec.chunk,
        softcap=softcap,
        sinks=s_aux,  # [H] learnable: its gradient comes back through autograd
        settings=options.settings,
    )
    return out, None  # out [b, s_local, H, d]


def _check_call(module, config, options, query, key, attention_mask, dropout, sliding_window, causal, s_aux, kwargs):
    """The attention function's own checks of this rank's arguments: the global ``cu_seqlens`` the
    attention masks documents with (None: one document per row) and the layer's ``MaskSpec``."""
    model = type(config).__name__ if config is not None else type(module).__name__
    if attention_mask is not None:
        raise ValueError(
            f"attn_implementation='lss' received a materialised attention mask of shape "
            f"{tuple(attention_mask.shape)} in {model}: LSS applies the layer's mask itself; do not pass 4-D masks"
        )
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"attn_implementation='lss' needs as many keys as queries per rank (got {query.shape[2]} queries, "
            f"{key.shape[2]} keys in {model}): it does not support KV caches or cross-attention; "
            "call the model with use_cache=False"
        )
    if dropout:
        raise ValueError(
            f"attn_implementation='lss' has no attention dropout, but {model} asks for dropout={dropout} "
            "(config.attention_dropout / attn_pdrop): set it to 0.0 to train with LSS"
        )
    if kwargs.get("position_bias") is not None:
        raise ValueError(f"attn_implementation='lss' does not support additive position biases ({model})")
    if s_aux is not None:
        check_sinks(s_aux, query.shape[1], model)
    kwargs = dict(kwargs)
    packing = {name: kwargs.pop(name) for name in FLASH_ATTN_KWARGS if name in kwargs}
    _refuse_unknown_kwargs(kwargs, model)
    seq_len = query.shape[2] * _sp_size(options)
    check_temperature_tuning(module, seq_len, model)
    spec = layer_mask(module, config, sliding_window, causal, seq_len)
    cu_seqlens = boundaries_from_flash_kwargs(seq_len, **packing)  # global [n_docs + 1] or None
    _check_position_ids(kwargs.get("position_ids"), query.shape[2], options, cu_seqlens)
    if spec.chunk is not None and cu_seqlens is not None:
        # transformers' chunks restart at every packed document: more document boundaries, not chunk=
        bounds = host_bounds(cu_seqlens)
        cu_seqlens = chunked_documents(cu_seqlens, bounds, spec.chunk)
        spec = MaskSpec(causal=spec.causal, window=spec.window)
    return cu_seqlens, spec
