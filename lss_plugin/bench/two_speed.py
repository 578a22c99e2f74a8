"""``python -m lss_plugin.bench.two_speed``: fast links inside a node, slow ones across (root).

Two simulated nodes x two ranks (``lss_plugin.cluster``): ranks of one node talk over their
namespace's loopback, unshaped; ranks of different nodes over a tc-shaped link (``--rates``, 1gbit and
200mbit by default). Per rate one launch runs the benchmark's model (``bench.model``, the same
kernel for every scheme) with each scheme, MHA and GQA: the hybrid ``lss_ulysses`` (U = ranks per
node: all-to-all inside a node, LSS's gather across), ``lss``, ``ulysses``, ``usp`` (Ulysses inside
the node, ring across), ``allgather_cp`` and ``ring``. Timing as in ``make bench``: warm-up, then
``--repetitions`` rounds in which every case runs ``--steps`` timed steps, cases in a rotated
order; a round's step time is its slowest rank's, ratios are paired per round.

Measured beside each step: the time each rank's thread was blocked in communication (a collective
call that returns when done, or a ``Work.wait()``), minus the weight-gradient all-reduce and
barriers, which ``plan_links`` leaves out too. "blocked" is the most-blocked rank's, which includes
waiting for peers that arrive later (4 ranks time-share 2 cores here); "comm" takes, per
collective call, the shortest time any rank spent in it (the last rank to arrive waits for the
transfer only), plus the rank's own point-to-point waits (the transfer not hidden behind compute),
largest over ranks: the figure held against the prediction. Medians over rounds. Predicted:
``plan_links.link_plan`` for the same scheme and shape, with the inside bandwidth measured on a
node's loopback and the across bandwidth the shaped rate; and once more with that rate divided
among the ranks of a node that send across at once (one shaped link per node here, one per rank
in plan.py). Writes
``two_speed.json``, ``two_speed.md`` and ``two_speed.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time

NODES, PER_NODE = 2, 2
SCHEMES = ("lss_ulysses", "lss", "ulysses", "usp", "allgather_cp", "ring")
# weight gradients (all of Megatron's finalize_model_grads, whose coalesced all-reduce is waited
# on through Work objects no wrapper sees), loss sums and the step's barriers
EXCLUDED = {"grad_sync", "all_reduce", "barrier"}


def _variant(scheme: str):
    from lss_plugin.bench.methods import Variant

    # LSS rows on plain "keep", no head chunks: the setting plan.py models
    return {"lss_ulysses": Variant("lss_ulysses", "balanced", "keep", ulysses=PER_NODE),
            "lss": Variant("lss", "balanced", "keep"),
            "ulysses": Variant("ulysses"),
            "usp": Variant("usp", "balanced", ulysses=PER_NODE),
            "allgather_cp": Variant("allgather_cp", "balanced"),
            "ring": Variant("ring", "balanced")}[scheme]


# Ranks of one node that send across at the same time, sharing the node's one shaped link: the
# rings of lss / allgather_cp / ring over all N ranks cross once per node (the boundary rank); the
# all-to-all of ulysses and the R-rank groups of usp's ring and the hybrid's LSS gather cross from
# every rank of the node at once. plan_links assumes a link per rank.
SENDERS_ACROSS = {"lss_ulysses": PER_NODE, "lss": 1, "ulysses": PER_NODE, "usp": PER_NODE, "allgather_cp": 1,
                  "ring": 1}


def _setup(scheme: str):
    from lss_plugin.plan import Setup

    n = NODES * PER_NODE
    return {"lss_ulysses": Setup("lss_ulysses", sp=n, ulysses=PER_NODE), "lss": Setup("lss", sp=n),
            "ulysses": Setup("ulysses", sp=n), "usp": Setup("usp", sp=n, ulysses=PER_NODE),
            "allgather_cp": Setup("allgather_cp", sp=n), "ring": Setup("ring", sp=n)}[scheme]


# --------------------------------------------------------------------------------------------
# Blocked time: every collective wrapper of bench.counters, and Work.wait

class BlockedTimer:
    """Seconds this rank's thread spent inside communication calls, by collective name."""

    def __init__(self):
        self.active = False
        self.section = None  # while set, every call counts under this name
        self.seconds: dict[str, float] = {}
        self.log: list[tuple[str, float]] = []  # every call in order: all ranks make the same calls

    def add(self, name: str, s: float) -> None:
        if self.active:
            name = self.section or name
            self.seconds[name] = self.seconds.get(name, 0.0) + s
            self.log.append((name, s))

    def counted(self) -> float:
        return sum(s for n, s in self.seconds.items() if n not in EXCLUDED)


TIMER = BlockedTimer()


def install_timer() -> None:
    """Time the outermost call of every wrapped collective and every ``Work.wait``."""
    import functools
    import threading

    import torch.distributed as dist

    from lss_plugin.bench import counters

    state = threading.local()
    names: dict[int, str] = {}  # id(Work) -> collective that returned it

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if getattr(state, "inside", False):
                return fn(*args, **kwargs)
            state.inside = True
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                state.inside = False
            TIMER.add(name, time.perf_counter() - t0)
            if isinstance(out, dist.Work):
                names[id(out)] = name
            return out
        wrapper.__lss_counting_wrapper__ = True
        return wrapper

    counters.wrap_collectives(timed)  # every collective, also where modules hold references
    wait = dist.Work.wait

    def timed_wait(self, *args, **kwargs):
        if getattr(state, "inside", False):  # the wait inside a blocking collective: timed there
            return wait(self, *args, **kwargs)
        t0 = time.perf_counter()
        try:
            return wait(self, *args, **kwargs)
        finally:
            TIMER.add(names.pop(id(self), "wait"), time.perf_counter() - t0)

    dist.Work.wait = timed_wait


# --------------------------------------------------------------------------------------------
# The ranks (run by torchrun in each node)

def _mark_grad_sync() -> None:
    """Calls inside Megatron's finalize_model_grads (the bench Trainer looks it up per step) count
    as grad_sync: the weight-gradient reduction, the same for every scheme and not modelled."""
    import functools
    import importlib

    # (the package re-exports the function under the module's name: import the module itself)
    module = importlib.import_module("megatron.core.distributed.finalize_model_grads")

    original = module.finalize_model_grads

    @functools.wraps(original)
    def finalize(*args, **kwargs):
        TIMER.section = "grad_sync"
        try:
            return original(*args, **kwargs)
        finally:
            TIMER.section = None

    module.finalize_model_grads = finalize


def worker(job: dict) -> dict:
    import torch.distributed as dist

    from lss_plugin.bench.context import Contexts
    from lss_plugin.bench.methods import method_of
    from lss_plugin.bench.run import Case, measure_case, timed_steps

    world = dist.get_world_size()
    _mark_grad_sync()
    contexts = Contexts()
    rows, live = [], []
    for scheme, attention, dims in job["cases"]:
        case = Case(_variant(scheme), dims, job["seq_len"], warmup=job["warmup"], steps=job["steps"],
                    attention=attention)
        row = {"scheme": scheme, "attention": attention, "variant": case.variant.name, "rounds": [],
               "blocked_rounds": [], "blocked_by_type": {}}
        try:
            res, trainer, batch = measure_case(case, world, contexts)
            row.update(loss=res.loss, comm=res.comm, error=res.error)
            live.append((row, case, trainer, batch))
        except Exception as e:  # noqa: BLE001 - a scheme that cannot run here is a row with its reason
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        if dist.get_rank() == 0:
            print(f"[two_speed] measured {scheme} {attention}: {row.get('error') or 'ok'}", flush=True)
    for rep in range(job["repetitions"]):
        shift = rep % max(1, len(live))
        for row, case, trainer, batch in live[shift:] + live[:shift]:
            contexts.get(method_of(case.variant).layout(world))
            TIMER.seconds, TIMER.log, TIMER.active = {}, [], True
            times = timed_steps(trainer, batch, case.steps)
            TIMER.active = False
            row["rounds"].append(statistics.median(times))
            row["blocked_rounds"].append(TIMER.counted() / case.steps)
            row.setdefault("call_logs", []).append([(n, t / case.steps) for n, t in TIMER.log])
            for n, s in TIMER.seconds.items():
                row["blocked_by_type"].setdefault(n, []).append(s / case.steps)
        if dist.get_rank() == 0:
            print(f"[two_speed] round {rep + 1}/{job['repetitions']} done, load {os.getloadavg()[0]:.2f}", flush=True)
    contexts.destroy()
    return {"rank": dist.get_rank(), "node": int(os.environ.get("GROUP_RANK", "0")), "rows": rows,
            "load_average": os.getloadavg()[0]}


def _worker_main(job_path: str) -> int:
    install_timer()  # before Megatron / DeepSpeed bind torch.distributed functions
    import torch
    import torch.distributed as dist

    from lss_plugin.runtime import init_distributed

    torch.set_num_threads(1)
    init_distributed(timeout_s=600)
    with open(job_path, "rb") as f:
        job = pickle.load(f)
    mine = worker(job)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        with open(job["out"], "wb") as f:
            pickle.dump(everyone, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


# --------------------------------------------------------------------------------------------
# The driver

def loopback_gbit(cluster, megabytes: int = 256) -> float:
    """Measured TCP throughput on node 0's loopback (the 'inside' bandwidth of the model)."""
    import subprocess

    code = (f"import socket,threading,time\n"
            f"s=socket.socket();s.bind(('127.0.0.1',0));s.listen();port=s.getsockname()[1]\n"
            f"def sink():\n c,_=s.accept()\n while c.recv(1<<20): pass\n"
            f"t=threading.Thread(target=sink);t.start();buf=b'x'*(1<<20)\n"
            f"c=socket.create_connection(('127.0.0.1',port));t0=time.perf_counter()\n"
            f"for _ in range({megabytes}): c.sendall(buf)\n"
            f"c.close();t.join();print({megabytes}*(1<<20)*8/(time.perf_counter()-t0)/1e9)")
    out = subprocess.run(cluster.exec_prefix(0) + [sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    return float(out.stdout.strip())


def rate_gbit(rate: str) -> float:
    units = {"tbit": 1e3, "gbit": 1.0, "mbit": 1e-3, "kbit": 1e-6, "bit": 1e-9}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise ValueError(f"rate {rate!r}")


def run_rate(rate: str, job: dict, workdir: str, timeout_s: float) -> tuple[list, float, list]:
    from lss_plugin.cluster.launch import Launch
    from lss_plugin.cluster.net import Cluster

    job = dict(job, out=os.path.join(workdir, f"out_{rate}.pkl"))
    job_path = os.path.join(workdir, f"job_{rate}.pkl")
    with open(job_path, "wb") as f:
        pickle.dump(job, f)
    log_dir = os.path.join(workdir, f"logs_{rate}")
    os.makedirs(log_dir, exist_ok=True)
    with Cluster(NODES, rate=rate) as cluster:
        inside = loopback_gbit(cluster)
        launch = Launch(cluster, PER_NODE, ["-m", "lss_plugin.bench.two_speed", "--worker", job_path],
                        log_dir=log_dir, env={"MALLOC_MMAP_THRESHOLD_": "65536"}).start()
        try:
            codes = launch.wait(timeout_s)
        finally:
            launch.stop()
    if not os.path.exists(job["out"]):
        tail = open(os.path.join(log_dir, "node0.log"), errors="replace").read()[-3000:]
        raise RuntimeError(f"the {rate} launch exited with {codes} and wrote no results:\n{tail}")
    with open(job["out"], "rb") as f:
        return pickle.load(f), inside, codes


P2P = {"send", "recv", "wait"}  # ("wait": on a Work of batch_isend_irecv, which no wrapper returns)


def comm_time(logs: list[list]) -> float | None:
    """Communication time of one round's step from every rank's calls (the same calls in the same
    order on every rank). A collective counts the shortest time any rank spent in it (a rank blocks
    for the transfer and for the peers that arrive later; the last to arrive waits for the transfer
    only); a point-to-point wait counts as the rank spent it (a receive blocks only for what the
    transfer did not do while the rank computed). The figure is the largest such sum over ranks.
    None when the ranks' call sequences differ."""
    if len({len(log) for log in logs}) != 1 or any([n for n, _ in log] != [n for n, _ in logs[0]] for log in logs):
        return None
    names = [n for n, _ in logs[0]]
    collective = sum(min(log[i][1] for log in logs) for i, n in enumerate(names) if n not in EXCLUDED | P2P)
    return collective + max(sum(t for n, t in log if n in P2P) for log in logs)


def median_or_none(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(per_rank: list, rate: str, inside_gbit: float, dims_for: dict, seq_len: int) -> list[dict]:
    from lss_plugin.plan import GPTSpec
    from lss_plugin.plan_links import Links, link_plan

    links = Links(NODES * PER_NODE, PER_NODE, inside_gbit, rate_gbit(rate), "gloo")
    rows = []
    for i, first in enumerate(per_rank[0]["rows"]):
        mine = [r["rows"][i] for r in per_rank]
        dims = dims_for[first["attention"]]
        spec = GPTSpec(dims.num_layers, dims.hidden_size, dims.num_heads, dims.num_kv_heads,
                       dims.ffn_hidden_size, dims.vocab_size, dims.max_positions)
        lp = link_plan(spec, seq_len, _setup(first["scheme"]), links)
        shared = Links(links.ranks, links.node, links.intra_gbit, links.inter_gbit / SENDERS_ACROSS[first["scheme"]],
                       links.backend)
        lp_shared = link_plan(spec, seq_len, _setup(first["scheme"]), shared)
        row = {"rate": rate, "scheme": first["scheme"], "attention": first["attention"], "variant": first["variant"],
               "error": next((m["error"] for m in mine if m.get("error")), None),
               "predicted_comm_s": None if lp.refused else lp.time_s,
               "predicted_inside_bytes": None if lp.refused else lp.inside_bytes,
               "predicted_across_bytes": None if lp.refused else lp.across_bytes,
               "predicted_refused": lp.refused,
               "predicted_shared_link_s": None if lp.refused else lp_shared.time_s}
        if not row["error"] and first["rounds"]:
            rounds = [max(m["rounds"][k] for m in mine) for k in range(len(first["rounds"]))]
            blocked = [max(m["blocked_rounds"][k] for m in mine) for k in range(len(first["rounds"]))]
            comm = [comm_time([m["call_logs"][k] for m in mine]) for k in range(len(first["rounds"]))]
            row.update(step_s=statistics.median(rounds), rounds_s=rounds, comm_s=median_or_none(comm), comm_rounds_s=comm,
                       blocked_s=statistics.median(blocked),
                       blocked_rounds_s=blocked, loss=first.get("loss"),
                       blocked_by_type={n: statistics.median(v) for n, v in first["blocked_by_type"].items()},
                       sent_bytes=first.get("comm", {}).get("sent_bytes"))
            if row["predicted_comm_s"] and row["comm_s"]:
                row["predicted_over_measured"] = row["predicted_comm_s"] / row["comm_s"]
                row["shared_over_measured"] = row["predicted_shared_link_s"] / row["comm_s"]
        rows.append(row)
    for attention in {r["attention"] for r in rows}:
        group = [r for r in rows if r["attention"] == attention and "step_s" in r]
        hybrid = next((r for r in group if r["scheme"] == "lss_ulysses"), None)
        predicted = [r for r in rows if r["attention"] == attention and r["predicted_comm_s"] is not None]
        fastest = min(predicted, key=lambda r: r["predicted_comm_s"])["scheme"] if predicted else None
        for r in rows:
            if r["attention"] == attention:
                r["predicted_fastest"] = fastest
        if hybrid:
            others = [r for r in group if r is not hybrid]
            if others:
                best = min(others, key=lambda r: r["step_s"])
                paired = statistics.median(b / h for b, h in zip(best["rounds_s"], hybrid["rounds_s"]))
                hybrid.update(best_other=best["scheme"], speedup_vs_best_other=paired)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Two speeds: {NODES} nodes x {PER_NODE} ranks, unshaped inside, shaped across", "",
             f"`{meta['command']}`  ", f"{meta['when']}, {meta['machine']}, torch {meta['torch']}; "
             f"load average during the runs: {meta['load']}. Model: {meta['dims']}, L = {meta['seq_len']}, "
             f"fp32, {meta['repetitions']} rounds x {meta['steps']} timed steps. Inside bandwidth "
             f"(measured on a node's loopback): {meta['inside_gbit']} Gbit/s.", "",
             "Step: median over rounds of the slowest rank. Blocked: the most-blocked rank's time inside "
             "communication per step (weight-gradient all-reduce and barriers excluded), waits for later peers "
             "included. Comm: per collective call the shortest time any rank spent in it (the transfer), plus "
             "the rank's own point-to-point waits (the transfer not hidden behind compute), largest over ranks. "
             "Predicted: `plan_links` (gloo), attention communication per step, no overlap, no latency. "
             "Hybrid speed-up: paired per round against the fastest other scheme.", "",
             "Predicted, shared link: the same with the across bandwidth divided among the ranks of a node that "
             "send across at once (one shaped link per node here; plan.py assumes one per rank).", "",
             "| across | attention | scheme | step ms | blocked ms | comm ms | predicted ms | predicted / comm | "
             "predicted, shared link ms | shared / comm | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ms = lambda x: "-" if x is None else f"{1000 * x:.1f}"  # noqa: E731
        note = r["error"].splitlines()[0][:80] if r.get("error") else ""
        if r.get("predicted_refused"):
            note = (note + " plan: " + r["predicted_refused"][:60]).strip()
        if r.get("speedup_vs_best_other"):
            note += f" {r['speedup_vs_best_other']:.2f}x vs {r['best_other']}"
        if r["scheme"] == r.get("predicted_fastest"):
            note += " (predicted fastest)"
        ratio = f"{r['predicted_over_measured']:.2f}" if r.get("predicted_over_measured") else "-"
        shared = f"{r['shared_over_measured']:.2f}" if r.get("shared_over_measured") else "-"
        lines.append(f"| {r['rate']} | {r['attention']} | {r['scheme']} | {ms(r.get('step_s'))} | "
                     f"{ms(r.get('blocked_s'))} | {ms(r.get('comm_s'))} | {ms(r.get('predicted_comm_s'))} | {ratio} | "
                     f"{ms(r.get('predicted_shared_link_s'))} | {shared} | {note.strip()} |")
    lines += ["", "Targets: where the plan predicts the hybrid fastest, it is >= 1.15x faster than the best other "
              "scheme; predicted within 30% of the measured comm time.", ""]
    for r in rows:
        if r["scheme"] == "lss_ulysses" and r.get("predicted_fastest") == "lss_ulysses" and r.get("speedup_vs_best_other"):
            ok = r["speedup_vs_best_other"] >= 1.15
            lines.append(f"- {r['rate']} {r['attention']}: hybrid {r['speedup_vs_best_other']:.2f}x vs "
                         f"{r['best_other']}: {'met' if ok else 'NOT met'}")
    for key, what in (("predicted_over_measured", "predicted"), ("shared_over_measured", "predicted, shared link,")):
        rated = [r for r in rows if r.get(key)]
        off = [r for r in rated if abs(r[key] - 1) > 0.3]
        lines.append(f"- {what} within 30% of comm: {len(rated) - len(off)} of {len(rated)} rows"
                     + (f"; off: {', '.join(r['rate'] + ' ' + r['attention'] + ' ' + r['scheme'] for r in off)}"
                        if off else ""))
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["rate"], r["attention"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (rate, attention) in zip(axes[0], panels):
        mine = [r for r in rows if r["rate"] == rate and r["attention"] == attention]
        xs = range(len(mine))
        w = 0.2
        for k, (key, label) in enumerate((("step_s", "step"), ("comm_s", "comm (measured)"),
                                          ("predicted_comm_s", "comm (plan.py)"),
                                          ("predicted_shared_link_s", "comm (plan.py, shared link)"))):
            ax.bar([x + (k - 1.5) * w for x in xs], [1000 * (r.get(key) or 0) for r in mine], w, label=label)
        ax.set_xticks(list(xs), [r["scheme"] for r in mine], rotation=35, ha="right")
        ax.set_title(f"{attention}, {rate} across")
        ax.set_ylabel("ms per step")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lss_plugin.bench.two_speed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/bench/two_speed")
    p.add_argument("--rates", default="1gbit,200mbit", help="tc rates of the links between nodes")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--gqa-kv-heads", type=int, default=2)
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps per case per round")
    p.add_argument("--repetitions", type=int, default=5, help="round-robin rounds")
    p.add_argument("--timeout-s", type=float, default=7200.0, help="per rate")
    p.add_argument("--quick", action="store_true", help="L = 1024, hidden 128, 2 rounds x 1 step: a smoke run")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.seq_len, args.hidden_size, args.repetitions, args.steps, args.warmup = 1024, 128, 2, 1, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return _worker_main(args.worker)
    from lss_plugin.bench.model import ModelDims
    from lss_plugin.cluster import net
    from lss_plugin.cluster.launch import install_signal_handlers

    reason = net.unavailable()
    if reason:
        print(f"lss_plugin.bench.two_speed: cannot simulate nodes here: {reason}", file=sys.stderr)
        return 3
    install_signal_handlers()
    dims_for = {"mha": ModelDims(args.num_layers, args.hidden_size, args.num_heads, args.num_heads,
                                 max_positions=args.seq_len),
                "gqa": ModelDims(args.num_layers, args.hidden_size, args.num_heads, args.gqa_kv_heads,
                                 max_positions=args.seq_len)}
    schemes = args.schemes.split(",")
    unknown = sorted(set(schemes) - set(SCHEMES))
    if unknown:
        raise SystemExit(f"unknown schemes {unknown}; known: {list(SCHEMES)}")
    job = {"cases": [(s, a, dims_for[a]) for a in dims_for for s in schemes], "seq_len": args.seq_len,
           "warmup": args.warmup, "steps": args.steps, "repetitions": args.repetitions}
    os.makedirs(args.out, exist_ok=True)
    rows, loads, inside = [], [], {}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="lss-two-speed-") as workdir:
        for rate in args.rates.split(","):
            print(f"--- {NODES} nodes x {PER_NODE} ranks, {rate} across: {len(job['cases'])} cases", flush=True)
            per_rank, inside[rate], codes = run_rate(rate, job, workdir, args.timeout_s)
            loads.append(per_rank[0]["load_average"])
            rows += summarize(per_rank, rate, inside[rate], dims_for, args.seq_len)
    import torch

    meta = {"command": " ".join(["python -m lss_plugin.bench.two_speed"] + (argv if argv is not None else sys.argv[1:])),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.platform()}, "
            f"{os.cpu_count()} CPUs", "torch": torch.__version__, "load": [round(x, 2) for x in loads],
            "dims": str(dims_for["mha"]).replace("ModelDims", "") + f", GQA kv heads {args.gqa_kv_heads}",
            "seq_len": args.seq_len, "repetitions": args.repetitions, "steps": args.steps,
            "inside_gbit": {k: round(v, 1) for k, v in inside.items()}, "wall_s": round(time.time() - started, 1)}
    paths = [os.path.join(args.out, f"two_speed.{ext}") for ext in ("json", "md", "png")]
    with open(paths[0], "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(markdown(meta, rows))
    plot(rows, paths[2])
    print(markdown(meta, rows))
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
