"""The settings LSS accepts, and their checks: one definition for the core and every adapter.

``AttentionSettings`` holds what every ``lss_attention`` call of a model runs with; its field table
(``Spelling``: Megatron flag, DeepSpeed key, Python keyword) is what each adapter's parser reads.

No torch import, so argument and config validation (Megatron flags, the DeepSpeed block, the
transformers registration) can run before anything heavy is loaded. Messages name the setting
and the value; an adapter passes its own spelling of the setting (``--lss-layout``, ...).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

LAYOUTS = ("contiguous", "balanced")
# Under a causal mask the contiguous layout gives rank s of N a share (2s+1)/N^2 of the work, so
# the last rank sets the step; balanced gives every rank the same. Contiguous stays selectable
# (the LSS paper's layout). Balanced needs L divisible by 2N.
DEFAULT_LAYOUT = "balanced"
KV_BACKWARD_MODES = ("keep", "regather")  # what a call runs (and its signature carries)
AUTO = "auto"
KV_BACKWARD_SETTINGS = KV_BACKWARD_MODES + (AUTO,)  # "auto": regather exactly when K, V are chunked for memory
# The defaults of every integration: "auto" chunks K, V by heads (pipelined) once the whole-sequence
# K, V are large enough for chunking to pay (``auto_head_chunk``) and runs unchunked "keep" below
# that. Measured (docs/bench/overlap.md, 2 ranks, L = 8192): 0.93x the unchunked step on a fast
# link, 0.90x behind 1 Gbit/s, 0.20x its memory held between forward and backward.
DEFAULT_KV_BACKWARD = AUTO
DEFAULT_KV_HEAD_CHUNK = AUTO
# dK/dV reduce-scatter: "fp32" sends the float32 accumulators of half-precision inputs (exact sum
# of the ranks' fp32 partials, 2x the bytes); "input" rounds them to the input dtype first.
KV_GRAD_DTYPES = ("fp32", "input")
# How a call moves K, V (lss_plugin.exchange): "gather" all-gathers every token to every rank;
# "sparse" sends each rank only the tokens its queries read under the call's masks and documents,
# in one all-to-all with split sizes; "auto" (default) picks per call from the planned bytes.
KV_EXCHANGES = ("gather", "sparse")  # what a call runs (and its signature carries)
KV_EXCHANGE_SETTINGS = KV_EXCHANGES + (AUTO,)
DEFAULT_KV_EXCHANGE = AUTO
# "auto": the sparse exchange when its busiest rank moves at most this fraction of what the
# all-gather moves to each rank ((N - 1) / N of the sequence); the gather otherwise. Above it the
# all-to-all's per-peer messages buy little (NCCL's and gloo's all-gather are tuned for the dense
# case) and a full causal mask reads nearly everything anyway (rank 0 of the balanced layout holds
# the last chunk, which reads every earlier key: busiest 1.0). Measured behind 1 Gbit/s (4 ranks,
# docs/bench/exchange): a window of L/4 (busiest 0.56) ran the sparse step in 0.55x the gather's.
AUTO_SPARSE_FRACTION = 0.75


def check_choice(setting: str, value, allowed: tuple, listing=tuple) -> None:
    """``listing`` writes the allowed values as the adapter does (a tuple; the DeepSpeed block: a list)."""
    if value not in allowed:
        raise ValueError(f"{setting} must be one of {listing(allowed)}, got {value!r}")


def check_layout(layout: str, setting: str = "layout", listing=tuple) -> None:
    check_choice(setting, layout, LAYOUTS, listing)


def check_kv_backward(kv_backward: str, setting: str = "kv_backward", listing=tuple) -> None:
    check_choice(setting, kv_backward, KV_BACKWARD_SETTINGS, listing)


def check_kv_grad_dtype(kv_grad_dtype: str, setting: str = "kv_grad_dtype", listing=tuple) -> None:
    check_choice(setting, kv_grad_dtype, KV_GRAD_DTYPES, listing)


def check_kv_exchange(kv_exchange: str, setting: str = "kv_exchange", listing=tuple) -> None:
    check_choice(setting, kv_exchange, KV_EXCHANGE_SETTINGS, listing)


def check_kv_head_chunk(kv_head_chunk, kv_heads: int | None = None, setting: str = "kv_head_chunk",
                        spell=repr) -> None:
    """``None`` (all KV heads at once), ``"auto"`` (``auto_head_chunk``) or an integer in
    [1, kv_heads] (any positive one if unknown). ``spell`` writes "auto" and None as the adapter does."""
    if kv_head_chunk is None or kv_head_chunk == AUTO:
        return
    upper = kv_heads if kv_heads is not None else float("inf")
    if not isinstance(kv_head_chunk, int) or isinstance(kv_head_chunk, bool) or not 1 <= kv_head_chunk <= upper:
        allowed = f"an integer in [1, {kv_heads}] (key/value heads)" if kv_heads is not None else "a positive integer"
        raise ValueError(f"{setting} must be {allowed}, {spell(AUTO)} or {spell(None)}, got {kv_head_chunk!r}")


# -- kv_head_chunk="auto" ---------------------------------------------------------------------
# The pipelined schedule holds two head chunks of gathered K, V at once (the one attended, the
# next one arriving). "auto" keeps those two within AUTO_KV_FRACTION of the whole-sequence K, V,
# but never gathers less than AUTO_MIN_GATHER_BYTES at a time: smaller collectives and kernel
# calls cost more per byte than the memory they save is worth (so short sequences run unchunked).
# An explicit budget (``kv_buffer_mib=`` or LSS_KV_BUFFER_MIB) replaces both.
# A known link (``link_gbit``) replaces the size floor by a time floor: a gather is worth its fixed
# cost (launch and latency: some 50 us on NCCL, some 0.5 ms through gloo's threads and staging)
# once it keeps the wire busy ten times that long (AUTO_MIN_GATHER_SECONDS by backend), so behind a
# slow link "auto" chunks finer (the next chunk's transfer hides behind this chunk's compute), and
# on a fast one it gathers more at once where hiding buys little.
MiB = 2**20
KV_BUFFER_ENV = "LSS_KV_BUFFER_MIB"
AUTO_KV_FRACTION = 0.25
AUTO_MIN_GATHER_BYTES = 4 * MiB
AUTO_MIN_GATHER_SECONDS = {"nccl": 0.5e-3, "gloo": 5e-3}  # another backend: gloo's


def min_gather_seconds(backend: str | None) -> float:
    return AUTO_MIN_GATHER_SECONDS.get(backend or "gloo", AUTO_MIN_GATHER_SECONDS["gloo"])


def check_kv_buffer_mib(value, setting: str = "kv_buffer_mib") -> None:
    """``None`` or a finite number of MiB > 0."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{setting} must be a positive number of MiB (or None), got {value!r}")


def check_kv_buffer_budget(kv_buffer_mib, kv_head_chunk, setting: str = "kv_buffer_mib",
                           chunk_setting: str = "kv_head_chunk", spell=repr) -> None:
    """``check_kv_buffer_mib``, and a budget only with ``kv_head_chunk="auto"``: a numeric chunk or
    None (all KV heads) fixes the chunk, so a budget beside it would be ignored; refused naming both
    settings. Adapters pass their own spellings (``spell`` writes a chunk value as they do)."""
    check_kv_buffer_mib(kv_buffer_mib, setting)
    if kv_buffer_mib is not None and kv_head_chunk != AUTO:
        raise ValueError(f"{setting} ({kv_buffer_mib!r}) is the budget of {chunk_setting}={spell(AUTO)}, "
                         f"got {chunk_setting}={spell(kv_head_chunk)}")


def kv_buffer_mib_from_env(environ=None) -> float | None:
    """The budget of ``LSS_KV_BUFFER_MIB`` (unset or empty: None); a bad value is refused by name."""
    raw = (os.environ if environ is None else environ).get(KV_BUFFER_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = raw
    check_kv_buffer_mib(value, KV_BUFFER_ENV)
    return value


def check_kv_buffer_env(kv_head_chunk, chunk_setting: str = "kv_head_chunk", spell=repr, environ=None) -> None:
    """``LSS_KV_BUFFER_MIB`` is the budget of ``kv_head_chunk="auto"`` only: beside a numeric chunk or
    None (all KV heads) it would be ignored, so it is refused naming both (an explicit ``kv_buffer_mib``
    wins over it; with a fixed chunk that one is refused by ``check_kv_buffer_budget``)."""
    budget = kv_buffer_mib_from_env(environ)
    if budget is not None and kv_head_chunk != AUTO:
        raise ValueError(f"{KV_BUFFER_ENV}={budget:g} is the budget of {chunk_setting}={spell(AUTO)}, got "
                         f"{chunk_setting}={spell(kv_head_chunk)}: unset {KV_BUFFER_ENV} or use "
                         f"{chunk_setting}={spell(AUTO)}")


# -- AttentionSettings: the one holder of what every lss_attention call of a model runs with ----

@dataclass(frozen=True)
class Dialect:
    """How one adapter names the settings and writes their values in its errors."""

    spelling: str  # which name of a field's ``Spelling`` this adapter reads: "keyword" | "flag" | "key"
    quote: Callable[[str], str] = str  # the adapter's name as its errors write it (the block: "layout")
    spell: Callable[[Any], str] = repr  # a constant as the adapter writes it ("auto", None)
    listing: Callable[[tuple], Any] = tuple  # the allowed values of a choice

    def name(self, f) -> str:
        return self.quote(getattr(f.metadata["spelling"], self.spelling))


def _spell_flag_value(value) -> str:
    """A parsed flag value as typed on the command line (``--lss-kv-head-chunk all`` is None)."""
    return "all" if value is None else str(value)


KEYWORDS = Dialect("keyword")
FLAGS = Dialect("flag", spell=_spell_flag_value)
BLOCK_KEYS = Dialect("key", quote=lambda key: f'"{key}"', spell=json.dumps, listing=list)


def head_chunk_flag(value: str):
    """``--lss-kv-head-chunk``: a positive integer, 'all' (None: every KV head at once) or 'auto'."""
    if value == AUTO:
        return AUTO
    if value == "all":
        return None
    try:
        chunk = int(value)
        check_kv_head_chunk(chunk)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a positive integer, 'all' or 'auto', got {value!r}") from None
    return chunk


@dataclass(frozen=True)
class Spelling:
    """One setting in every adapter: the field table each adapter's parser iterates over."""

    flag: str  # Megatron command line (lss_plugin.megatron.args); the namespace attribute is its dest
    key: str  # DeepSpeed "lss_sequence_parallel" block (lss_plugin.deepspeed.config)
    keyword: str  # Python: lss_attention, LSSAttention, LSSAttentionOptions, register_lss_attention, the spec
    flag_type: Callable[[str], Any] = str  # how argparse reads the flag
    flag_choices: tuple | None = None
    flag_metavar: str | None = None

    @property
    def dest(self) -> str:
        """The argparse namespace attribute of ``flag`` (``--lss-kv-backward`` -> ``lss_kv_backward``)."""
        return self.flag.lstrip("-").replace("-", "_")


def _setting(default, doc: str, check: Callable, **spelling):
    """A field of AttentionSettings: its default, what it means, its check and its adapters' names."""
    return field(default=default, metadata={"doc": doc, "check": check, "spelling": Spelling(**spelling)})


def _check_layout(value, name: str, dialect: Dialect) -> None:
    check_layout(value, name, dialect.listing)


def _check_kv_backward(value, name: str, dialect: Dialect) -> None:
    check_kv_backward(value, name, dialect.listing)


def _check_head_chunk(value, name: str, dialect: Dialect) -> None:
    check_kv_head_chunk(value, None, name, dialect.spell)


def _check_buffer(value, name: str, dialect: Dialect) -> None:
    check_kv_buffer_mib(value, name)


def _check_grad_dtype(value, name: str, dialect: Dialect) -> None:
    check_kv_grad_dtype(value, name, dialect.listing)


def _check_exchange(value, name: str, dialect: Dialect) -> None:
    check_kv_exchange(value, name, dialect.listing)


def _check_link(value, name: str, dialect: Dialect) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a positive number of Gbit/s (or None), got {value!r}")


@dataclass(frozen=True, kw_only=True)
class AttentionSettings:
    """What every ``lss_attention`` call of a model runs with, fixed when the model is configured.

    One definition for the core and every adapter: each adapter builds this from its own flags, keys
    or keywords (``from_names``, errors in the adapter's spelling) and hands it to ``lss_attention``
    unchanged. Adding a setting is one field here: its ``Spelling`` is the line each adapter's parser
    reads. Not here: the process group, and what changes per call (causal, softmax_scale, cu_seqlens).
    """

    layout: str = _setting(
        DEFAULT_LAYOUT, check=_check_layout, flag="--lss-layout", key="layout", keyword="layout",
        flag_choices=LAYOUTS,
        doc="How a sequence is split over the SP ranks. balanced (default): 2N chunks, rank s holds chunks s "
            "and 2N-1-s (even causal work; L divisible by 2N); contiguous: rank s holds tokens "
            "[s*L/N, (s+1)*L/N) (the LSS paper's layout; L divisible by N).")
    kv_backward: str = _setting(
        DEFAULT_KV_BACKWARD, check=_check_kv_backward, flag="--lss-kv-backward", key="kv_backward",
        keyword="kv_backward", flag_choices=KV_BACKWARD_SETTINGS,
        doc="keep: the gathered K,V are kept for backward; regather: gathered again in backward (less memory, "
            "one more collective per layer); auto (default): regather exactly when K,V are gathered in head chunks "
            "for memory (not when only link_gbit chunked them).")
    kv_head_chunk: int | str | None = _setting(
        DEFAULT_KV_HEAD_CHUNK, check=_check_head_chunk, flag="--lss-kv-head-chunk", key="kv_head_chunk",
        keyword="kv_head_chunk", flag_type=head_chunk_flag,
        doc="KV heads gathered and attended at a time (pipelined: the next chunk's gather overlaps this one's "
            "attention); None (flag: 'all') for all KV heads at once; auto (default): chunks of a small fraction "
            "of the whole-sequence K,V once those are large, all heads below that (kv_buffer_mib or "
            "LSS_KV_BUFFER_MIB set a budget instead).")
    kv_buffer_mib: float | None = _setting(
        None, check=_check_buffer, flag="--lss-kv-buffer-mib", key="kv_buffer_mib", keyword="kv_buffer_mib",
        flag_type=float, flag_metavar="MIB",
        doc="Budget of kv_head_chunk auto, in MiB: the most KV heads per gather whose gathered K,V (two chunks in "
            "flight) fit it; wins over LSS_KV_BUFFER_MIB (None: that variable, else the default rule). Refused "
            "beside a numeric or all-heads kv_head_chunk, as LSS_KV_BUFFER_MIB is.")
    kv_grad_dtype: str = _setting(
        "fp32", check=_check_grad_dtype, flag="--lss-kv-grad-dtype", key="kv_grad_dtype", keyword="kv_grad_dtype",
        flag_choices=KV_GRAD_DTYPES,
        doc="dK/dV reduce-scatter of half-precision inputs: fp32 (default) sends the float32 sums (exact sum of "
            "the ranks' partials, 2x the bytes), input rounds them to the input dtype first (half the bytes); "
            "float32/float64 inputs send their own dtype either way.")
    link_gbit: float | None = _setting(
        None, check=_check_link, flag="--lss-link-gbit", key="link_gbit", keyword="link_gbit", flag_type=float,
        flag_metavar="GBIT",
        doc="The slowest link the SP group's K,V cross, in Gbit/s (configured: the interconnect's rate, or what "
            "lss_plugin.bench measures); kv_head_chunk auto then chunks so that each gather keeps that link busy "
            "for ten times a collective's fixed cost (0.5 ms on NCCL, 5 ms on gloo; finer behind slow links) "
            "instead of moving at least 4 MiB. "
            "None (default): the size rule. Only with kv_head_chunk auto and no budget, refused otherwise.")
    kv_exchange: str = _setting(
        DEFAULT_KV_EXCHANGE, check=_check_exchange, flag="--lss-kv-exchange", key="kv_exchange",
        keyword="kv_exchange", flag_choices=KV_EXCHANGE_SETTINGS,
        doc="How K,V move: gather all-gathers every token to every rank; sparse sends each rank only the tokens "
            "its queries read under the masks and documents (one all-to-all with split sizes, dK,dV back the "
            "same way); auto (default): sparse when its busiest rank moves at most 3/4 of what the gather "
            "moves to each rank, else gather.")

    def __post_init__(self) -> None:
        _check_settings({f.name: getattr(self, f.name) for f in fields(self)}, KEYWORDS)

    @classmethod
    def from_names(cls, values: Mapping[str, Any], dialect: Dialect = KEYWORDS) -> "AttentionSettings":
        """Settings from values under the adapter's names (``dialect.spelling``; absent: the default),
        checked with errors naming the adapter's spelling. Other names in ``values`` are not read."""
        found = {}
        for f in fields(cls):
            name = getattr(f.metadata["spelling"], dialect.spelling)
            if name in values:
                found[f.name] = values[name]
        _check_settings({**{f.name: f.default for f in fields(cls)}, **found}, dialect)
        return cls(**found)

    def names(self, dialect: Dialect = KEYWORDS) -> dict[str, Any]:
        """The values under the adapter's names (the DeepSpeed block's keys, ...)."""
        return {getattr(f.metadata["spelling"], dialect.spelling): getattr(self, f.name) for f in fields(self)}

    def differences(self, other: "AttentionSettings", dialect: Dialect = KEYWORDS) -> list[str]:
        """``name=this (other)`` for every setting that differs."""
        return [f"{dialect.name(f)}={getattr(self, f.name)!r} (not {getattr(other, f.name)!r})"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def setting_fields() -> tuple:
    """The field table: ``dataclasses.Field``s of AttentionSettings, with ``metadata["spelling"]`` and ``["doc"]``."""
    return fields(AttentionSettings)


def setting_names(dialect: Dialect = KEYWORDS) -> tuple[str, ...]:
    """Every setting's name in an adapter (the block's keys, the flags, the keywords)."""
    return tuple(getattr(f.metadata["spelling"], dialect.spelling) for f in fields(AttentionSettings))


def _check_settings(values: dict, dialect: Dialect) -> None:
    """Every field's own check, then the budget rules (which name two settings)."""
    table = {f.name: f for f in fields(AttentionSettings)}
    for name, value in values.items():
        table[name].metadata["check"](value, dialect.name(table[name]), dialect)
    buffer, chunk = dialect.name(table["kv_buffer_mib"]), dialect.name(table["kv_head_chunk"])
    check_kv_buffer_budget(values["kv_buffer_mib"], values["kv_head_chunk"], buffer, chunk, spell=dialect.spell)
    link = dialect.name(table["link_gbit"])
    if values["link_gbit"] is not None and (values["kv_head_chunk"] != AUTO or values["kv_buffer_mib"] is not None):
        fixed = (f"{chunk}={dialect.spell(values['kv_head_chunk'])}" if values["kv_head_chunk"] != AUTO
                 else f"{buffer}={values['kv_buffer_mib']!r}")
        raise ValueError(f"{link} ({values['link_gbit']!r}) sets how {chunk}={dialect.spell(AUTO)} chunks without a "
                         f"budget; with {fixed} it would be ignored")
    if values["kv_buffer_mib"] is None:
        check_kv_buffer_env(values["kv_head_chunk"], chunk, spell=dialect.spell)


def settings_from_keywords(settings: AttentionSettings | None, keywords: Mapping[str, Any],
                           where: str) -> AttentionSettings:
    """The compatibility layer of the Python entry points: ``settings=`` or the settings' keywords
    (``layout=``, ...), never both. ``where`` names the entry point in errors."""
    if settings is not None:
        if not isinstance(settings, AttentionSettings):
            raise TypeError(f"{where}: settings must be an AttentionSettings, got {type(settings).__name__}")
        if keywords:
            raise TypeError(f"{where}: pass settings=AttentionSettings(...) or the keywords {sorted(keywords)}, "
                            "not both")
        return settings
    known = {f.metadata["spelling"].keyword for f in fields(AttentionSettings)}
    unknown = sorted(set(keywords) - known)
    if unknown:
        raise TypeError(f"{where} got unexpected keyword argument(s) {unknown} (settings: {sorted(known)})")
    return AttentionSettings.from_names(keywords)


def auto_head_chunk(kv_heads: int, head_bytes: int, budget_bytes: float | None = None,
                    link_gbit: float | None = None, backend: str | None = None) -> int:
    """KV heads per gather for ``kv_head_chunk="auto"``: a divisor of ``kv_heads``, so every gather
    has the same size. Pure, from values every rank shares (the chunk is a signature size field).

    ``head_bytes``: the gathered K and V of one KV head over the whole sequence
    (``2 * batch * L * head_dim * itemsize``). Two chunks are alive at once (one when unchunked).
    Without ``budget_bytes``: the largest chunk whose two buffers stay within ``AUTO_KV_FRACTION``
    of the whole K, V (``kv_heads * head_bytes``), raised to the smallest one moving at least
    ``AUTO_MIN_GATHER_BYTES``, or, with ``link_gbit``, to the smallest one keeping that link busy
    for ``AUTO_MIN_GATHER_SECONDS[backend]``. With a budget: the largest chunk whose buffers fit it;
    ValueError when not even one head at a time fits.
    """
    divisors = [c for c in range(1, kv_heads + 1) if kv_heads % c == 0]

    def held(c):  # gathered K, V alive at once under the pipelined schedule
        return (1 if c == kv_heads else 2) * c * head_bytes

    if budget_bytes is not None:
        fitting = [c for c in divisors if held(c) <= budget_bytes]
        if not fitting:
            twice = " twice (the chunk attended and the next one arriving)" if kv_heads > 1 else ""
            raise ValueError(
                f"kv_buffer_mib / {KV_BUFFER_ENV} = {budget_bytes / MiB:g} MiB is below the least gathered "
                f"K, V an lss_attention call can hold here: {held(1) / MiB:g} MiB, one KV head of the whole "
                f"sequence{twice}, at this batch, sequence length, head dim and dtype")
        return max(fitting)
    lean = max([c for c in divisors if held(c) <= AUTO_KV_FRACTION * kv_heads * head_bytes] or [1])
    floor = AUTO_MIN_GATHER_BYTES if link_gbit is None else min_gather_seconds(backend) * link_gbit * 1e9 / 8
    return min(c for c in divisors if c >= lean and c * head_bytes >= min(floor, kv_heads * head_bytes))


def resolve_kv_chunking(kv_head_chunk, kv_backward, kv_buffer_mib, batch: int, seq_len: int, kv_heads: int,
                        head_dim: int, itemsize: int, link_gbit: float | None = None,
                        backend: str | None = None) -> tuple[int, str]:
    """(KV heads per gather, "keep" | "regather") as an ``lss_attention`` call runs its settings.

    "auto" chunks follow ``auto_head_chunk`` from the shapes (the same on every rank) and the budget:
    ``kv_buffer_mib``, else ``LSS_KV_BUFFER_MIB``, else the default rule (with ``link_gbit``, its
    time floor). ``kv_backward="auto"`` regathers exactly when K, V are gathered in chunks for
    memory: keeping every chunk for backward would hold the whole-sequence K, V again, which is what
    chunking is for not to do. Chunks that only the link asked for (the size rule alone would gather
    everything at once: the whole K, V is small) are kept: regathering them would put 50% more K, V
    bytes on the slow link the chunks are meant to hide. Adapters call this to print what "auto"
    will run."""
    if kv_buffer_mib is None:
        check_kv_buffer_env(kv_head_chunk)  # the variable may have been set since the settings were checked
    if kv_head_chunk == AUTO:
        budget = kv_buffer_mib if kv_buffer_mib is not None else kv_buffer_mib_from_env()
        if budget is not None and link_gbit is not None:  # an explicit kv_buffer_mib was refused with it already
            raise ValueError(f"link_gbit ({link_gbit!r}) sets how kv_head_chunk='auto' chunks without a budget; "
                             f"with {KV_BUFFER_ENV}={budget:g} it would be ignored: unset one of them")
        head_bytes = 2 * batch * seq_len * head_dim * itemsize  # gathered K and V of one KV head
        chunk = auto_head_chunk(kv_heads, head_bytes, None if budget is None else budget * MiB,
                                None if budget is not None else link_gbit, backend)
        for_memory = budget is not None or auto_head_chunk(kv_heads, head_bytes) < kv_heads
    else:
        chunk = kv_head_chunk or kv_heads
        for_memory = True  # a chunk the user fixed: chunking is what they asked for
    if kv_backward == AUTO:
        kv_backward = "regather" if chunk < kv_heads and for_memory else "keep"
    return chunk, kv_backward


# -- hybrid LSS x Ulysses ---------------------------------------------------------------------
# The SP group of N = U x R ranks: all-to-all over heads inside Ulysses groups of U consecutive
# ranks, LSS's fused gather across the R ranks with the same index in each (lss_plugin.ulysses).

def check_ulysses_size(ulysses_size, sp_size: int, setting: str = "ulysses_size") -> int:
    """The LSS group size R = sp_size / ulysses_size, or a ValueError naming both values."""
    if not isinstance(ulysses_size, int) or isinstance(ulysses_size, bool) or ulysses_size < 1:
        raise ValueError(f"{setting} must be a positive integer, got {ulysses_size!r}")
    if sp_size % ulysses_size != 0:
        raise ValueError(f"{setting} ({ulysses_size}) must divide the sequence-parallel size ({sp_size})")
    return sp_size // ulysses_size


def ulysses_kv_heads(num_kv_heads: int, ulysses_size: int) -> int:
    """KV heads after replication for the all-to-all: Hkv when U divides it, else lcm(Hkv, U).

    lcm is the least count that splits evenly over U ranks with every KV head repeated the same
    number of times, so each rank holds whole GQA groups (its H / U query heads and their KV heads)."""
    return math.lcm(num_kv_heads, ulysses_size)


def check_ulysses_heads(num_heads: int, num_kv_heads: int, ulysses_size: int, setting: str = "ulysses_size") -> int:
    """KV heads the all-to-all carries (``ulysses_kv_heads``), or a ValueError naming the values.

    Query heads must divide by U (each rank attends H / U of them). KV heads divisible by U are
    split; otherwise they are replicated to lcm(Hkv, U), which needs H % lcm(Hkv, U) == 0 (it
    follows from H % U == 0 and H % Hkv == 0, both checked by name here)."""
    if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({num_kv_heads})")
    if num_heads % ulysses_size != 0:
        raise ValueError(f"{setting} ({ulysses_size}) must divide the number of query heads ({num_heads}): "
                         f"each rank of a Ulysses group attends heads / {setting} of them")
    replicated = ulysses_kv_heads(num_kv_heads, ulysses_size)
    if num_heads % replicated != 0:
        raise ValueError(f"{setting} ({ulysses_size}) with {num_kv_heads} key/value heads needs them replicated to "
                         f"lcm = {replicated}, which must divide the query heads ({num_heads})")
    return replicated
