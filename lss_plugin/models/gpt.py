"""A small reference GPT in plain PyTorch whose attention is LSS.

Pre-LN blocks, learned absolute position embeddings or RoPE, tied or untied output head, GQA.
With ``lss=None`` it is an ordinary single-process model (the reference the tests compare
against); with ``LSSAttentionOptions`` every rank runs its own tokens and attention gathers K, V.
Positions are always *global* position ids, so a shard embeds and rotates its tokens exactly as
the whole sequence would. Packed documents: ``cu_seqlens`` (global boundaries, ``lss_plugin.documents``)
keeps attention inside each document, and the positions are then each token's position inside its
document (``lss_plugin.local_positions(..., cu_seqlens=cu)``). Under a hybrid LSS x Ulysses topology
(``ulysses_size`` U > 1) attention is the hybrid and positions follow its layout; query heads must divide
by U (``lss_plugin.options.check_ulysses_heads``).

Masks of today's open models (``lss_plugin.masks``): ``window=W`` is transformers' ``sliding_window`` (W keys
including the query's own, ``lss_attention(window=(W - 1, 0))``) on the layers ``layer_types`` marks
``"sliding_attention"`` (default: every layer when ``window`` is set); ``sinks=True`` gives every layer one
learned logit per head in its softmax denominator (gpt-oss), a parameter ``attn.sinks`` [num_heads] trained
and averaged like any weight. The one-process model computes the same masked attention densely.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lss_plugin.attention import lss_attention
from lss_plugin.masks import MaskSpec, dense_hidden
from lss_plugin.options import AttentionSettings, settings_from_keywords
from lss_plugin.sharding import local_positions


SLIDING, FULL = "sliding_attention", "full_attention"  # transformers' layer_types names


@dataclass
class GPTConfig:
    vocab_size: int = 256  # bytes, as enwik8 models use
    max_seq_length: int = 1024
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: MHA; fewer heads: GQA/MQA
    ffn_hidden_size: int | None = None  # None: 4 * hidden_size
    position_embedding: str = "learned"  # "learned" or "rope"
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    layernorm_eps: float = 1e-5
    init_std: float = 0.02
    window: int | None = None  # transformers' sliding_window: W keys including the query's own
    layer_types: tuple[str, ...] | None = None  # per layer "sliding_attention" | "full_attention"; None: all sliding
    sinks: bool = False  # a learned sink logit per head and layer (gpt-oss), initialised to 0

    def __post_init__(self):
        self.num_kv_heads = self.num_kv_heads or self.num_heads
        self.ffn_hidden_size = self.ffn_hidden_size or 4 * self.hidden_size
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.position_embedding not in ("learned", "rope"):
            raise ValueError(f"position_embedding must be 'learned' or 'rope', got {self.position_embedding!r}")
        if self.window is not None and (not isinstance(self.window, int) or isinstance(self.window, bool)
                                        or self.window < 1):
            raise ValueError(f"window must be a positive number of keys (sliding_window), got {self.window!r}")
        if self.layer_types is None:
            self.layer_types = (SLIDING if self.window is not None else FULL,) * self.num_layers
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= {SLIDING, FULL}:
            raise ValueError(f"layer_types must be {self.num_layers} (num_layers) of {SLIDING!r} / {FULL!r}, "
                             f"got {self.layer_types!r}")
        if SLIDING in self.layer_types and self.window is None:
            raise ValueError(f"layer_types {self.layer_types!r} has {SLIDING!r} layers but window is None")

    def layer_window(self, layer: int) -> tuple[int, int] | None:
        """``lss_attention``'s ``window`` of layer ``layer``: ``(W - 1, 0)`` on sliding layers, else None."""
        return MaskSpec.sliding(self.window).window if self.layer_types[layer] == SLIDING else None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class LSSAttentionOptions:
    """How the model's attention runs LSS: the process group and the ``AttentionSettings`` every layer
    hands ``lss_attention`` unchanged. ``group=None``: the registered topology's ``SequenceGroups``
    (hybrid when it has ulysses_size > 1). ``settings=`` or the settings' keywords (``layout=``, ...),
    checked here, before any forward."""

    def __init__(self, group=None, settings: AttentionSettings | None = None, **setting_keywords):
        self.group = group
        self.settings = settings_from_keywords(settings, setting_keywords, "LSSAttentionOptions")

    def __repr__(self) -> str:
        return f"LSSAttentionOptions(group={self.group!r}, settings={self.settings!r})"


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [s, head_dim / 2] for the given global positions."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=position_ids.device) / head_dim)
    angles = position_ids.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, s, h, d] rotated pairwise (first half, second half) by the angles of its positions."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, lss: LSSAttentionOptions | None, layer: int = 0):
        super().__init__()
        self.config, self.lss = config, lss
        c = config
        self.window = c.layer_window(layer)  # (left, right) or None
        self.qkv = nn.Linear(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.sinks = nn.Parameter(torch.zeros(c.num_heads)) if c.sinks else None  # [H] logits

    @property
    def lss_attention_settings(self) -> AttentionSettings | None:
        """What this layer's ``lss_attention`` calls run with; None: one-process SDPA (``lss_plugin.model_settings``)."""
        return None if self.lss is None else self.lss.settings

    def forward(self, x, rope, cu_seqlens=None):  # x [b, s, hidden]
        c = self.config
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split(
            [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim], dim=-1
        )
        q = q.view(b, s, c.num_heads, c.head_dim)
        k = k.view(b, s, c.num_kv_heads, c.head_dim)
        v = v.view(b, s, c.num_kv_heads, c.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.lss is None:  # one process, whole sequence: the reference
            out = _reference_attention(q, k, v, self.window, self.sinks, cu_seqlens)
        else:
            out = lss_attention(q, k, v, group=self.lss.group, causal=True, cu_seqlens=cu_seqlens,
                                window=self.window, sinks=self.sinks, settings=self.lss.settings)
        return self.proj(out.reshape(b, s, c.hidden_size))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, lss, layer: int = 0):
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.attn = SelfAttention(config, lss, layer)
        self.ln_mlp = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden_size, config.ffn_hidden_size), nn.GELU(),
            nn.Linear(config.ffn_hidden_size, config.hidden_size),
        )

    def forward(self, x, rope, cu_seqlens=None):
        x = x + self.attn(self.ln_attn(x), rope, cu_seqlens)
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, lss: LSSAttentionOptions | None = None):
        super().__init__()
        self.config, self.lss = config, lss
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos_embed = (
            nn.Embedding(config.max_seq_length, config.hidden_size) if config.position_embedding == "learned" else None
        )
        self.blocks = nn.ModuleList(Block(config, lss, layer) for layer in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=config.init_std / math.sqrt(2 * config.num_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [b, s_local], position_ids [s_local] (global positions, or positions inside the documents
        of ``cu_seqlens`` [n_docs + 1], global boundaries of packed documents) -> logits [b, s_local, V]."""
        b, s = input_ids.shape
        if position_ids is None:
            if self.lss is not None or cu_seqlens is not None:
                raise ValueError("an LSS model or packed documents need the position_ids of the tokens "
                                 "(lss_plugin.local_positions)")
            position_ids = torch.arange(s, device=input_ids.device)
        if self.lss is not None:
            _check_global_positions(position_ids, s, self.lss, cu_seqlens)
        if position_ids.numel() and int(position_ids.max()) >= self.config.max_seq_length:
            raise ValueError(
                f"position {int(position_ids.max())} exceeds max_seq_length {self.config.max_seq_length}"
            )
        x = self.embed(input_ids)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)[None]
        else:
            rope = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for block in self.blocks:
            x = block(x, rope, cu_seqlens)
        x = self.ln_f(x)
        weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(x, weight)


def _reference_attention(q, k, v, window, sinks, cu_seqlens):
    """Causal attention of the whole sequence in one process: q [b, s, H, d], k, v [b, s, Hkv, d] -> [b, s, H, d].

    Plain causal attention and documents run SDPA as before; sinks need the row's denominator, so a
    layer with sinks runs the softmax itself with the sink as one extra column that carries no value."""
    b, s, h, d = q.shape
    mask = None
    if window is not None or cu_seqlens is not None:
        mask = ~_reference_hidden(cu_seqlens, s, window, q.device)  # [s, s] True = attend
    if sinks is None:
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=mask is None,
            enable_gqa=k.shape[2] != h,
        ).transpose(1, 2)
    if mask is None:
        mask = ~_reference_hidden(None, s, None, q.device)
    rep = h // k.shape[2]  # GQA: query head i reads key/value head i // rep, as SDPA's enable_gqa
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)  # [b, H, s, s]
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.to(scores.dtype).view(1, h, 1, 1).expand(b, h, s, 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]  # the sink's share is dropped
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def _reference_hidden(cu_seqlens: torch.Tensor | None, seq_len: int, window: tuple[int, int] | None,
                      device) -> torch.Tensor:
    """[s, s] boolean, True where key j is hidden from query i: causal, inside documents, inside the window."""
    from lss_plugin.documents import check_cu_seqlens

    bounds = (0, seq_len)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, seq_len)
        bounds = tuple(int(x) for x in cu_seqlens)
    return dense_hidden(seq_len, bounds, MaskSpec(causal=True, window=window), device)


def _check_global_positions(position_ids: torch.Tensor, s_local: int, lss: LSSAttentionOptions,
                            cu_seqlens: torch.Tensor | None = None) -> None:
    """Positions must be this rank's global positions under the layout attention masks with.

    Anything else (local positions, another layout) embeds or rotates tokens as if they stood
    elsewhere while the causal mask uses the layout: a different model, without an error. The
    check is rank-local; a rank whose positions are right meets the error as its peers' timeout.
    """
    from lss_plugin.topology import resolve_sequence_groups

    groups = resolve_sequence_groups(lss.group)  # the hybrid LSS x Ulysses layout when the topology has one
    layout = lss.settings.layout
    expected = local_positions(s_local * groups.sp_size, groups, layout, device=position_ids.device,
                               cu_seqlens=cu_seqlens)
    if position_ids.shape != expected.shape or not torch.equal(position_ids, expected):
        raise ValueError(
            f"position_ids {position_ids.reshape(-1)[:4].tolist()}... (shape {tuple(position_ids.shape)}) on SP rank "
            f"{groups.sp_rank} are not this rank's global positions {expected[:4].tolist()}... under layout "
            f"{layout!r}: pass lss_plugin.local_positions(seq_len, layout={layout!r})"
        )
