"""The benchmark's methods: how each one splits the model and the sequence, and its core attention.

One ``Method`` per parallel scheme, registered in ``METHODS`` by name; adding a method is one
``register(Method(...))`` call (its variants, parallel layout, core attention, token split). A
TP x LSS method (``lss_tp``) is ``layout=lambda n: Layout(tp=2, cp=n // 2, sp_group=True)`` with LSS's
core attention and token split.
Every headline method attends with a fused kernel: torch's SDPA (flash) for ``single`` and
``megatron_tp_sp``, LSS's LSE-merging block kernel (``lss_plugin.kernels``) for LSS, ring,
all-gather CP and USP, SDPA inside DeepSpeed-Ulysses. Megatron's dense local attention runs only
in extra rows whose variant name says ``unfused``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

@dataclass(frozen=True)
class Variant:
    """A method and its options.

    ``layout``: which global positions an SP rank holds; ``kv_backward``/``kv_head_chunk``: LSS's
    K/V backward mode and head chunking; ``kernel``: ``fused`` or ``unfused`` (Megatron's dense
    local attention, extra rows only); ``ulysses``: USP's Ulysses group size; ``shard_optimizer``:
    AdamW state sharded over the DP x CP group (``lss_plugin.optim``, ZeRO-1), suffix ``+zero1``;
    ``kv_exchange``: LSS's K/V exchange, gather | sparse | auto (None: the settings' default), in the name
    when given.
    """

    method: str
    layout: str = "contiguous"
    kv_backward: str = "keep"
    kv_head_chunk: int | str | None = None  # "auto": lss_plugin.options.auto_head_chunk
    kernel: str = "fused"
    ulysses: int | None = None
    shard_optimizer: bool = False
    kv_exchange: str | None = None

    @property
    def name(self) -> str:
        return self._base_name + ("+zero1" if self.shard_optimizer else "")

    @property
    def _base_name(self) -> str:
        exchange = f",{self.kv_exchange}" if self.kv_exchange else ""
        if self.method == "lss":
            if self.kv_head_chunk == "auto" and self.kv_backward == "auto":
                return f"lss[auto,{self.layout}{exchange}]"  # the defaults of every integration
            chunk = f",chunk{self.kv_head_chunk}" if self.kv_head_chunk else ""
            return f"lss[{self.kv_backward},{self.layout}{chunk}{exchange}]"
        if self.method in ("usp", "lss_ulysses"):
            return f"{self.method}[u{self.ulysses}{exchange}]"
        return self.method + ("[unfused]" if self.kernel == "unfused" else "")


@dataclass(frozen=True)
class Layout:
    """How a method spreads the model over the ranks of one launch (TP fastest, then CP).

    ``sp_group``: the CP ranks form a sequence-parallel group registered as Megatron's CP group
    (``lss_plugin.megatron.parallel.initialize_lss_model_parallel``); otherwise plain Megatron
    parallel state (Megatron sequence parallelism whenever tp > 1). ``ulysses``: that SP group is
    registered as the hybrid LSS x Ulysses with Ulysses groups of this many ranks.
    """

    tp: int = 1
    cp: int = 1
    sp_group: bool = False
    ulysses: int = 1


def tensor_parallel(world_size: int) -> Layout:
    return Layout(tp=world_size)


def sequence_parallel(world_size: int) -> Layout:
    return Layout(cp=world_size, sp_group=True)


@dataclass(frozen=True)
class Method:
    """How one method runs on the benchmark's megatron-core GPTModel.

    layout:          world_size -> ``Layout`` (TP and CP sizes)
    variants:        (world_size, quick) -> the variants to run on that many ranks
    core_attention:  (variant, context, link_gbit) -> the core-attention class for the layer spec, or
                     None for megatron-core's local (dense) DotProductAttention; ``link_gbit``: the
                     rate of the launch's limited link (None: no limit), which LSS's auto chunking is told
    token_indices:   (variant, seq_len, cp_rank, cp_size) -> global positions of the rank's tokens,
                     or None: every rank holds the whole sequence (TP / one device)
    kernel:          what attends, for the tables
    """

    name: str
    layout: Callable[[int], Layout]
    variants: Callable[[int, bool], list]
    core_attention: Callable
    token_indices: Callable | None
    kernel: str

    @property
    def splits_sequence(self) -> bool:
        return self.token_indices is not None

    @property
    def runs_lss(self) -> bool:
        """Attends with ``lss_attention``: its collectives go through ``lss_plugin.comm`` (timed for the
        hidden fraction)."""
        return self.core_attention is _lss_attention


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def method_of(variant: Variant) -> Method:
    try:
        return METHODS[variant.method]
    except KeyError:
        raise ValueError(f"unknown method {variant.method!r}; known: {sorted(METHODS)}") from None


def sp_methods() -> tuple[str, ...]:
    return tuple(name for name, m in METHODS.items() if m.splits_sequence)


def variants_for(methods, world_size: int, quick: bool = False) -> list[Variant]:
    """Every variant of ``methods`` that runs on ``world_size`` ranks."""
    out = []
    for name in methods:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
        out += METHODS[name].variants(world_size, quick)
    return out


# -- the core attentions ---------------------------------------------------------------------

def _sdpa_or_local(variant, context, link_gbit=None):
    if variant.kernel == "unfused":
        return None  # megatron-core's local DotProductAttention (dense scores)
    from lss_plugin.baselines.megatron import SDPADotProductAttention

    return SDPADotProductAttention


def _lss_attention(variant, context, link_gbit=None):
    from lss_plugin.megatron.attention import configured_lss_attention

    return configured_lss_attention(**lss_keywords(variant, link_gbit))


def lss_keywords(variant: Variant, link_gbit: float | None = None) -> dict:
    """The LSS settings keywords ``variant`` runs with. Behind a rate-limited link, auto chunking is told
    the configured rate (``link_gbit``); a fixed chunk runs as named (LSS refuses link_gbit beside it)."""
    out = dict(layout=variant.layout, kv_backward=variant.kv_backward, kv_head_chunk=variant.kv_head_chunk)
    if variant.kv_exchange is not None:
        out["kv_exchange"] = variant.kv_exchange
    if link_gbit is not None and variant.kv_head_chunk == "auto":
        out["link_gbit"] = link_gbit
    return out


def _sp_baseline(variant, context, link_gbit=None):
    from lss_plugin.baselines.megatron import sp_core_attention

    groups = context.usp_groups(variant.ulysses) if variant.method == "usp" else None
    return sp_core_attention(variant.method, layout=variant.layout, ulysses_groups=groups)


def _layout_indices(variant, seq_len, sp_rank, sp_size):
    from lss_plugin.sharding import local_token_indices

    return local_token_indices(seq_len, sp_rank, sp_size, variant.layout)


def _hybrid_indices(variant, seq_len, sp_rank, sp_size):
    from lss_plugin.sharding import local_token_indices

    return local_token_indices(seq_len, sp_rank, sp_size, variant.layout, ulysses_size=variant.ulysses)


def _usp_indices(variant, seq_len, sp_rank, sp_size):
    from lss_plugin.baselines.usp import usp_token_indices

    return usp_token_indices(seq_len, sp_rank, sp_size, variant.ulysses)


def usp_ulysses_size(world_size: int) -> int | None:
    """USP's Ulysses group size: half the ranks (a 2 x N/2 hybrid); None below 4 ranks, where
    USP would be plain Ulysses or plain ring."""
    return world_size // 2 if world_size >= 4 and world_size % 2 == 0 else None


# -- the methods -----------------------------------------------------------------------------

register(Method(
    "single", tensor_parallel,
    lambda n, quick: [Variant("single"), Variant("single", kernel="unfused")] if n == 1 else [],
    _sdpa_or_local, None, "torch SDPA (flash)"))
register(Method(
    "megatron_tp_sp", tensor_parallel,
    lambda n, quick: [Variant("megatron_tp_sp")] + ([] if quick else [Variant("megatron_tp_sp", kernel="unfused")])
    if n > 1 else [],
    _sdpa_or_local, None, "torch SDPA (flash), the TP rank's heads"))


def _lss_variants(n, quick):
    if quick:
        return [Variant("lss", "balanced", "keep"), Variant("lss", "contiguous", "regather")]
    out = [Variant("lss", layout, mode) for layout in ("contiguous", "balanced") for mode in ("keep", "regather")]
    if n == 1:  # one rank: the layouts differ in kernel calls only; keep the timing targets' variant
        out = [v for v in out if v.layout == "contiguous" or v.kv_backward == "keep"]
    return out + [Variant("lss", "contiguous", "regather", kv_head_chunk=1),  # the memory-lean extreme
                  LSS_DEFAULT_VARIANT]


# What lss_attention and every adapter run when not told otherwise (balanced, "auto" chunks).
LSS_DEFAULT_VARIANT = Variant("lss", "balanced", "auto", kv_head_chunk="auto")


register(Method("lss", sequence_parallel, _lss_variants, _lss_attention, _layout_indices,
                "lss_plugin.kernels block_forward/backward (LSE merge)"))
register(Method(
    "ulysses", sequence_parallel, lambda n, quick: [Variant("ulysses")] if n > 1 else [],
    _sp_baseline, _layout_indices, "torch SDPA (flash) inside DeepSpeed DistributedAttention"))
register(Method(
    "ring", sequence_parallel, lambda n, quick: [Variant("ring", "balanced")] if n > 1 else [],
    _sp_baseline, _layout_indices, "lss_plugin.kernels block_forward/backward (LSE merge)"))
register(Method(
    "allgather_cp", sequence_parallel, lambda n, quick: [Variant("allgather_cp", "balanced")] if n > 1 else [],
    _sp_baseline, _layout_indices, "lss_plugin.kernels block_forward/backward (LSE merge)"))
register(Method(
    "usp", sequence_parallel,
    lambda n, quick: [Variant("usp", "balanced", ulysses=usp_ulysses_size(n))] if usp_ulysses_size(n) else [],
    _sp_baseline, _usp_indices, "lss_plugin.kernels block_forward/backward (LSE merge) in the ring"))

# lss_ulysses (issue 17): the hybrid with USP's split (Ulysses groups of half the ranks, LSS across
# the two halves), on the default LSS settings; from 4 ranks up, as USP.
register(Method(
    "lss_ulysses", lambda n: Layout(cp=n, sp_group=True, ulysses=usp_ulysses_size(n) or 1),
    lambda n, quick: ([Variant("lss_ulysses", "balanced", "auto", kv_head_chunk="auto", ulysses=usp_ulysses_size(n))]
                      if usp_ulysses_size(n) else []),
    _lss_attention, _hybrid_indices,
    "lss_plugin.kernels block_forward/backward (LSE merge) on H/U heads after the all-to-all"))

LSS_TP_SIZE = 2  # lss_tp: tensor-parallel size; LSS takes the remaining N / 2 ranks
register(Method(
    # TP = 2 with Megatron SP inside each TP pair, LSS over the other N / 2 ranks (each TP rank
    # gathers its own KV heads over its CP group); from 4 ranks up, so LSS has >= 2 ranks.
    "lss_tp", lambda n: Layout(tp=LSS_TP_SIZE, cp=n // LSS_TP_SIZE, sp_group=True),
    lambda n, quick: [Variant("lss_tp")] if n >= 2 * LSS_TP_SIZE and n % LSS_TP_SIZE == 0 else [],
    _lss_attention, _layout_indices,
    "lss_plugin.kernels block_forward/backward (LSE merge), the TP rank's heads"))

DEFAULT_METHODS = tuple(METHODS)


def token_indices(variant: Variant, seq_len: int, cp_rank: int, cp_size: int) -> torch.Tensor | None:
    """Global positions of this rank's tokens, or None when the rank holds the whole sequence."""
    m = method_of(variant)
    return None if m.token_indices is None else m.token_indices(variant, seq_len, cp_rank, cp_size)
