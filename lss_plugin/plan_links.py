"""Attention communication by link class (inside / across node groups) and the scheme it predicts fastest.

Node groups are U consecutive ranks of the SP group of N = U x R ranks (U = the Ulysses size: the
hybrid puts its Ulysses groups on them). Every figure is a PREDICTION; nothing is run.

What is sent: the collectives of ``lss_plugin.plan.collectives`` for the attention of each scheme
(``tests/test_plan.py`` checks their bytes against the benchmark's measured counters), per layer
and training step (forward + backward). The weight-gradient all-reduce is the same for every
scheme (all replicate the weights over SP) and is left out.

Where it goes (per rank; the receiving rank decides the class):
- all-gather / reduce-scatter: a ring over the group's ranks in rank order, as a single NCCL ring
  and gloo's ``AllgatherRing`` run them: each call, every rank sends (n-1)/n of the assembled
  buffer to its successor (the counters' bandwidth-optimal convention). ``backend="gloo"``: gloo's
  reduce-scatter (torch 2.13) sends what an all-reduce sends, 2 (n-1)/n (the baselines' reduce-scatters;
  LSS's dK,dV go as an all-to-all there, ``lss_plugin.comm``, routed as one): measured on a private
  loopback, 4 ranks, 16 MiB fp32 buffer, bytes per rank / buffer = 0.751 all-gather, 1.502
  reduce-scatter, 1.502 all-reduce, 0.751 all-to-all (docs/benchmark.md, "Which scheme?");
- all-to-all: pairwise, each rank sends payload / n to every other member;
- ring attention: each hop, one packed block to the successor in the ring group.
The figure per class is the busiest rank's. It is every rank's, except for a ring over the whole SP
group spanning several node groups: there the 1 rank in U at a node-group boundary sends everything
across and the others everything inside.

Time: the two link classes run concurrently within a collective (it ends when its busiest link
does: a ring step waits for its slowest hop); collectives run one after another, without overlap
with each other or with compute:  t = sum_c max(inside_c / B_intra, across_c / B_inter), B per
rank and direction. Not modelled: per-call latency (calls per layer are reported), compute,
overlap, and topology-aware collectives (NCCL multi-rail rings or a hierarchical all-gather could
cut LSS's bytes across by up to U; gloo does not).

Closed forms per layer and step (b batch, d head dim, e itemsize, e_g the dK,dV itemsize: 4 for
half inputs unless kv_grad_dtype="input", s = L / N tokens per rank, G = Hkv, or lcm(Hkv, U) when U
does not divide Hkv, S = ``lss_plugin.signature.SIGNATURE_BYTES``, a call signature per rank in
every LSS gather):
- lss: gathers x (2 b L Hkv d e + S N) + 2 b L Hkv d e_g, times (N-1)/N, all inside at R = 1,
  all across at U = 1, else on inside hops and on the boundary hops (gathers: 1 keep, 2 regather);
- allgather_cp: 6 b L Hkv d e x (N-1)/N, routed as lss; no signatures, never keeps K,V;
- ulysses (H, Hkv divisible by N): A = 2 (2H + 2Hkv) b s d e; inside (U-1)/N A, across (N-U)/N A;
- usp (H, Hkv divisible by U): inside (U-1)/U A, across (3R-2) x 2 b s Hkv d e (ring sends);
- lss_ulysses (H divisible by U): inside (U-1)/U x (2 (2H + 2G) b s d e + S U) (the signature rows
  ride in the forward q, k, v all-to-all), across (R-1)/R x (gathers x (2 b L (G/U) d e + S R) +
  2 b L (G/U) d e_g);
- ring: (3N-2) x 2 b s Hkv d e, across on the boundary rank (every step waits for it).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from lss_plugin.options import check_ulysses_size
from lss_plugin.plan import BACKENDS, Collective, GPTSpec, Setup, setup_label, plan

# plan.Collective.group of attention collectives; LSS's verdict ("verdict": 96 bytes per rank per call,
# latency rather than bandwidth) is left out of the link model
ATTENTION_GROUPS = ("sp", "ulysses", "strided")
TIE = 1e-3  # times within 0.1% are a tie, won by the scheme listed first (simpler, fewer calls)
INSIDE, ACROSS = "inside", "across"


@dataclass(frozen=True)
class Links:
    """SP group of ``ranks`` = N ranks in node groups of ``node`` = U consecutive ranks, with
    per-rank bandwidths (Gbit/s, each direction) inside and across node groups."""

    ranks: int
    node: int
    intra_gbit: float
    inter_gbit: float
    backend: str = "nccl"  # "gloo": its reduce-scatter sends as much as an all-reduce

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        check_ulysses_size(self.node, self.ranks, setting="ulysses")  # U: the node-group size too
        if self.intra_gbit <= 0 or self.inter_gbit <= 0:
            raise ValueError(f"bandwidths must be > 0 Gbit/s, got intra {self.intra_gbit}, "
                             f"inter {self.inter_gbit}")

    def bytes_per_s(self, link: str) -> float:
        return (self.intra_gbit if link == INSIDE else self.inter_gbit) * 1e9 / 8

    def groups(self, kind: str) -> list[list[int]]:
        """Every group of ``kind`` (``plan.Collective.group``), members in rank order."""
        n, u = self.ranks, self.node
        if kind == "sp":
            return [list(range(n))]
        if kind == "ulysses":
            return [[g * u + i for i in range(u)] for g in range(n // u)]
        if kind == "strided":
            return [[g * u + i for g in range(n // u)] for i in range(u)]
        raise ValueError(f"no link routing for group {kind!r}")


@dataclass
class LinkTerm:
    """One collective of a scheme: the busiest rank's bytes per class and the time it takes."""

    type: str
    what: str
    group: str
    calls: int
    inside_bytes: int
    across_bytes: int
    time_s: float
    dominant_link: str


@dataclass
class LinkPlan:
    scheme: str
    setup: Setup
    terms: list = field(default_factory=list)
    refused: str | None = None  # why the scheme cannot run this model, if it cannot

    @property
    def runs(self) -> bool:
        return self.refused is None

    @property
    def inside_bytes(self) -> int:
        return sum(t.inside_bytes for t in self.terms)

    @property
    def across_bytes(self) -> int:
        return sum(t.across_bytes for t in self.terms)

    @property
    def calls(self) -> int:
        return sum(t.calls for t in self.terms)

    @property
    def time_s(self) -> float:
        return sum(t.time_s for t in self.terms)

    def link_time_s(self, links: Links, link: str) -> float:
        return (self.inside_bytes if link == INSIDE else self.across_bytes) / links.bytes_per_s(link)

    def dominant(self, links: Links) -> dict | None:
        """The largest term: this scheme's collectives of one type over one group kind, summed,
        on the link class that limits them (what, link, bytes, time_s)."""
        kinds: dict = {}
        for t in self.terms:
            kinds.setdefault((t.type, t.group), []).append(t)
        best = None
        for (kind, _), terms in kinds.items():
            ulysses = kind == "all_to_all" and not any(t.what.startswith("packed") for t in terms)  # not LSS's dK,dV
            whats = ("q, k, v, out and their gradients" if ulysses
                     else ", ".join(dict.fromkeys(t.what.split(" (")[0] for t in terms)))
            for link in (ACROSS, INSIDE):  # equal times: name the link across
                nbytes = sum(t.inside_bytes if link == INSIDE else t.across_bytes for t in terms)
                time_s = nbytes / links.bytes_per_s(link)
                if best is None or time_s > best["time_s"]:
                    plural = "s" if sum(t.calls for t in terms) > 1 else ""
                    best = {"what": f"{kind.replace('_', '-')}{plural} of {whats}", "link": link,
                            "bytes": nbytes, "time_s": time_s}
        return best

    def to_dict(self, links: Links) -> dict:
        out = {"scheme": self.scheme, "runs": self.runs, "refused": self.refused, "setup": asdict(self.setup)}
        if self.runs:
            out.update(inside_bytes=self.inside_bytes, across_bytes=self.across_bytes, calls=self.calls,
                       inside_time_s=self.link_time_s(links, INSIDE),
                       across_time_s=self.link_time_s(links, ACROSS), time_s=self.time_s,
                       terms=[asdict(t) for t in self.terms])
        return out


def sent_by_link(c: Collective, links: Links) -> tuple[int, int]:
    """(inside, across) bytes the busiest rank sends for all ``c.calls`` calls of ``c``."""
    inside: dict[int, int] = {}
    across: dict[int, int] = {}
    node = links.node
    if c.wire_bytes is not None:  # split sizes: which peer gets how much is the exchange plan's, not routed here
        raise ValueError(f"{c.what}: the sparse K/V exchange is not routed over node groups (kv_exchange='gather' only)")
    for members in links.groups(c.group):
        n = len(members)
        if n != c.group_size:
            raise ValueError(f"{c.what}: group {c.group!r} has {n} ranks, the collective {c.group_size}")
        for i, src in enumerate(members):
            if c.type in ("all_gather", "reduce_scatter"):  # ring: all of it to the successor
                sends = [(members[(i + 1) % n], c.total_wire(links.backend))]  # gloo reduce-scatter: all-reduce's
            elif c.type == "all_to_all":  # pairwise: one n-th of the input to every peer
                sends = [(dst, c.payload_bytes // n * c.calls) for dst in members if dst != src]
            elif c.type == "send":  # ring attention: one block per hop to the successor
                sends = [(members[(i + 1) % n], c.total_sent)] if n > 1 else []
            elif c.type == "recv":
                sends = []
            else:
                raise ValueError(f"no link routing for a {c.type} ({c.what})")
            for dst, nbytes in sends:
                side = inside if dst // node == src // node else across
                side[src] = side.get(src, 0) + nbytes
    return max(inside.values(), default=0), max(across.values(), default=0)


def link_plan(spec: GPTSpec, seq_len: int, setup: Setup, links: Links) -> LinkPlan:
    """The attention collectives of ``setup`` routed over ``links``; refused with the reason when
    ``lss_plugin.plan.plan`` refuses the setting (heads not divisible, say)."""
    if setup.sp != links.ranks or setup.backend != links.backend:
        raise ValueError(f"setup sp({setup.sp}) and backend {setup.backend!r} must be the links' ranks "
                         f"N={links.ranks} and backend {links.backend!r}")
    label = setup_label(setup).rsplit(" sp", 1)[0]
    try:
        collectives = plan(spec, seq_len, setup).collectives
    except ValueError as e:
        return LinkPlan(label, setup, refused=str(e))
    out = LinkPlan(label, setup)
    for c in collectives:
        if c.group not in ATTENTION_GROUPS or c.type == "recv":
            continue
        inside, across = sent_by_link(c, links)
        t_in, t_across = inside / links.bytes_per_s(INSIDE), across / links.bytes_per_s(ACROSS)
        out.terms.append(LinkTerm(c.type, c.what, c.group, c.calls, inside, across, max(t_in, t_across),
                                  INSIDE if t_in >= t_across else ACROSS))
    return out


def candidate_setups(links: Links, dtype_bytes: int = 2, batch_size: int = 1,
                     kv_grad_dtype: str = "fp32") -> list[Setup]:
    """Every scheme worth comparing on ``links``, simplest first (ties go to the earlier one).

    U = 1 leaves out lss_ulysses (= lss) and usp (= ring); U = N leaves out usp (= ulysses) and
    lss_ulysses[regather] (no LSS group left to regather over).
    """
    n, u = links.ranks, links.node
    common = dict(sp=n, dtype_bytes=dtype_bytes, batch_size=batch_size, backend=links.backend)
    lss = dict(common, kv_grad_dtype=kv_grad_dtype)
    out = [Setup("lss", **lss), Setup("lss", kv_backward="regather", **lss), Setup("ulysses", **common)]
    if u > 1:
        out.append(Setup("lss_ulysses", ulysses=u, **lss))
        if u < n:
            out += [Setup("lss_ulysses", ulysses=u, kv_backward="regather", **lss),
                    Setup("usp", ulysses=u, **common)]
    return out + [Setup("allgather_cp", **common), Setup("ring", **common)]


def compare(spec: GPTSpec, seq_len: int, links: Links, **setting) -> list[LinkPlan]:
    return [link_plan(spec, seq_len, s, links) for s in candidate_setups(links, **setting)]


def fastest(plans: list[LinkPlan]) -> LinkPlan | None:
    """The quickest scheme that runs; of schemes within ``TIE`` of it, the first listed."""
    runnable = [p for p in plans if p.runs]
    if not runnable:
        return None
    quickest = min(p.time_s for p in runnable)
    return next(p for p in runnable if p.time_s <= quickest * (1 + TIE))


def _term_words(p: LinkPlan, links: Links) -> str:
    t = p.dominant(links)
    if t is None:
        return "no communication"
    gbit = links.intra_gbit if t["link"] == INSIDE else links.inter_gbit
    return f"the {t['what']} {t['link']} node groups ({t['bytes'] / 2**20:.2f} MiB per rank at {gbit:g} Gbit/s)"


def why(plans: list[LinkPlan], links: Links) -> str:
    """One sentence: the predicted winner, the best scheme of another method, and the term that
    dominates each."""
    best = fastest(plans)
    if best is None:
        return "no scheme can run this model on these ranks"
    # the runner-up is another method: the winner's own keep / regather twin says nothing new
    nxt = fastest([p for p in plans if p.setup.method != best.setup.method])
    if nxt is None:
        return f"{best.scheme} is the only scheme that can run; its largest term is {_term_words(best, links)}"
    tie = (f" (a tie within {TIE:.1%}: {best.scheme} is listed first, {best.calls} calls against {nxt.calls})"
           if nxt.time_s <= best.time_s * (1 + TIE) else "")
    return (f"{best.scheme} is predicted fastest, {best.time_s * 1e3:.3f} ms against {nxt.time_s * 1e3:.3f} ms "
            f"for {nxt.scheme} (the best other method){tie}: its largest term is {_term_words(best, links)}, where "
            f"{nxt.scheme}'s is {_term_words(nxt, links)}")


def table(spec: GPTSpec, seq_len: int, links: Links, plans: list[LinkPlan]) -> str:
    r = links.ranks // links.node
    lines = [f"PREDICTION (cost model, nothing measured) - attention communication per rank, "
             f"{spec.num_layers} layer(s), one training step",
             f"  heads {spec.num_heads}/{spec.hkv} kv, head dim {spec.head_dim}, L = {seq_len:,}; N = "
             f"{links.ranks} ranks in {r} node groups of U = {links.node}; inside {links.intra_gbit:g} "
             f"Gbit/s, across {links.inter_gbit:g} Gbit/s; {links.backend}",
             f"  {'scheme':24} {'runs':>4} {'inside MiB':>11} {'across MiB':>11} {'calls':>6} "
             f"{'t_in ms':>9} {'t_across ms':>11} {'t ms':>9}"]
    best = fastest(plans)
    for p in plans:
        if not p.runs:
            lines.append(f"  {p.scheme:24} {'no':>4}  {p.refused}")
            continue
        mark = "  <- fastest" if p is best else ""
        lines.append(f"  {p.scheme:24} {'yes':>4} {p.inside_bytes / 2**20:11.3f} {p.across_bytes / 2**20:11.3f} "
                     f"{p.calls:6d} {p.link_time_s(links, INSIDE) * 1e3:9.3f} "
                     f"{p.link_time_s(links, ACROSS) * 1e3:11.3f} {p.time_s * 1e3:9.3f}{mark}")
    lines.append("  t = sum over collectives of max(inside / intra, across / inter): the two link classes "
                 "concurrent within a collective, collectives in sequence; no latency, compute or overlap.")
    lines.append("  " + why(plans, links) + ".")
    return "\n".join(lines)


def report(spec: GPTSpec, seq_len: int, links: Links, as_json: bool = False, **setting) -> str:
    plans = compare(spec, seq_len, links, **setting)
    if not as_json:
        return table(spec, seq_len, links, plans)
    best = fastest(plans)
    return json.dumps({"prediction": True, "spec": asdict(spec), "seq_len": seq_len, "links": asdict(links),
                       "schemes": [p.to_dict(links) for p in plans],
                       "fastest": best.scheme if best else None, "why": why(plans, links)}, indent=1)
