"""Packed documents: one LSS attention call with and without document boundaries, same shapes.

The sequence of length L is packed with documents of a typical length (lengths drawn around it
with a fixed seed, the last one cut at L). LSS computes only each document's (query, key) pairs,
so the time of a causal forward + backward should follow the pairs computed while the
communication stays the same (one fused all-gather, one reduce-scatter). Rows report, per document
length: pairs computed / the unpacked causal pairs (all ranks), this rank's step time (median
[IQR] over round-robin rounds, paired with the unpacked row), and the collectives sent.
"""
from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist

import lss_plugin
from lss_plugin.bench.timing import quartiles, sync_ranks
from lss_plugin.documents import visible_pairs

MiB = 2**20


def packed_boundaries(seq_len: int, doc_len: int | None, seed: int = 0) -> torch.Tensor:
    """Boundaries of documents whose lengths are drawn uniformly in [doc_len/2, 3 doc_len/2]."""
    if doc_len is None:
        return torch.tensor([0, seq_len])
    gen = torch.Generator().manual_seed(seed)
    bounds = [0]
    while bounds[-1] < seq_len:
        n = int(torch.randint(max(1, doc_len // 2), doc_len * 3 // 2 + 1, (1,), generator=gen))
        bounds.append(min(seq_len, bounds[-1] + n))
    return torch.tensor(bounds)


def attention_inputs(seq_len: int, heads: int, head_dim: int):
    """Registers an LSS topology over the whole world; this rank's q, k, v (requiring grad) and dout
    [1, seq_len / N, heads, head_dim] on the rank's device."""
    lss_plugin.init_topology(dist.get_world_size())
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator().manual_seed(dist.get_rank())
    s_local = seq_len // dist.get_world_size()
    q, k, v, dout = (torch.randn(1, s_local, heads, head_dim, generator=gen).to(device) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout


def attention_step(q, k, v, dout, layout: str, **masks) -> None:
    """One causal lss_attention forward + backward (``masks``: its cu_seqlens / window keywords)."""
    out = lss_plugin.lss_attention(q, k, v, causal=True, layout=layout, **masks)
    out.backward(dout)
    q.grad = k.grad = v.grad = None


def packed_worker(seq_len: int, heads: int, head_dim: int, doc_lens: list, layout: str = "balanced",
                  warmup: int = 1, steps: int = 2, repetitions: int = 3) -> dict:
    """On every rank: time lss_attention forward + backward for each document length, round-robin."""
    q, k, v, dout = attention_inputs(seq_len, heads, head_dim)
    cases = {str(n): packed_boundaries(seq_len, n).to(q.device) for n in doc_lens}
    times, comm = round_robin({name: (lambda cu=cu: attention_step(q, k, v, dout, layout, cu_seqlens=cu))
                               for name, cu in cases.items()}, warmup, steps, repetitions)
    return {"rank": dist.get_rank(), "times": times, "comm": comm,
            "pairs": {name: visible_pairs(tuple(cu.tolist()), causal=True) for name, cu in cases.items()},
            "documents": {name: cu.numel() - 1 for name, cu in cases.items()}}


def round_robin(cases: dict, warmup: int, steps: int, repetitions: int) -> tuple[dict, dict]:
    """Time every ``cases[name]()`` (one step on every rank) in round-robin rounds, the order rotated each
    round -> (times: name -> per round the median of its steps, comm: name -> one step's collectives)."""
    comm = {}
    for name, step in cases.items():
        for _ in range(warmup):
            step()
        with lss_plugin.record_collectives() as rec:
            step()
        comm[name] = {"calls": dict(rec.calls), "bytes": dict(rec.bytes)}
    times = {name: [] for name in cases}
    names = list(cases)
    for r in range(repetitions):
        for name in names[r % len(names):] + names[:r % len(names)]:
            step_s = []
            for _ in range(steps):
                sync_ranks()
                t0 = time.perf_counter()
                cases[name]()
                sync_ranks()
                step_s.append(time.perf_counter() - t0)
            times[name].append(statistics.median(step_s))
    return times, comm


def summarize(per_rank: list, seq_len: int, heads: int, head_dim: int, layout: str) -> list[dict]:
    """One row per document length; a round's time is its slowest rank (the step waits for it)."""
    world = len(per_rank)
    first = per_rank[0]
    full_pairs = first["pairs"]["None"] if "None" in first["pairs"] else seq_len * (seq_len + 1) // 2
    rounds = {name: [max(r["times"][name][i] for r in per_rank) for i in range(len(first["times"][name]))]
              for name in first["times"]}
    rows = []
    for name, ts in rounds.items():
        q25, med, q75 = quartiles(ts)
        paired = None
        if "None" in rounds and name != "None":
            paired = statistics.median(a / b for a, b in zip(ts, rounds["None"]))
        rows.append({"doc_len": None if name == "None" else int(name), "documents": first["documents"][name],
                     "world_size": world, "seq_len": seq_len, "heads": heads, "head_dim": head_dim,
                     "layout": layout, "pairs": first["pairs"][name],
                     "pairs_fraction": first["pairs"][name] / full_pairs,
                     "step_s": med, "step_s_q25": q25, "step_s_q75": q75, "time_vs_unpacked": paired,
                     "calls": first["comm"][name]["calls"], "sent_bytes": sum(first["comm"][name]["bytes"].values())})
    return rows


def table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    r0 = rows[0]
    lines = [f"Causal attention forward + backward, {r0['world_size']} ranks, L = {r0['seq_len']}, "
             f"{r0['heads']} heads x {r0['head_dim']}, layout {r0['layout']}, fp32; documents of the typical "
             "length (drawn in [n/2, 3n/2]). Pairs: (query, key) pairs computed / unpacked causal; time: "
             "slowest rank per round, median [IQR]; time / unpacked: paired per round.", "",
             "| document length | documents | pairs computed | skipped | step ms [IQR] | time / unpacked | "
             "collectives (calls) | MiB sent |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        calls = ", ".join(f"{k} {v}" for k, v in sorted(r["calls"].items()) if v)
        ratio = "-" if r["time_vs_unpacked"] is None else f"{r['time_vs_unpacked']:.3f}"
        lines.append(f"| {'one (unpacked)' if r['doc_len'] is None else r['doc_len']} | {r['documents']} | "
                     f"{r['pairs_fraction']:.3f} | {1 - r['pairs_fraction']:.1%} | {r['step_s'] * 1e3:.1f} "
                     f"[{r['step_s_q25'] * 1e3:.1f}-{r['step_s_q75'] * 1e3:.1f}] | {ratio} | {calls} | "
                     f"{r['sent_bytes'] / MiB:.3f} |")
    return lines


def plot(out_dir: str, rows: list[dict]) -> list[str]:
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["unpacked" if r["doc_len"] is None else str(r["doc_len"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["pairs_fraction"] for r in rows], width=0.4, label="pairs computed / unpacked")
    base = rows[0]["step_s"] if rows[0]["doc_len"] is None else max(r["step_s"] for r in rows)
    ax.bar([x + 0.2 for x in xs], [r["step_s"] / base for r in rows], width=0.4, label="step time / unpacked")
    ax.set_xticks(list(xs), labels)
    ax.set_xlabel("typical document length")
    ax.set_title(f"packed documents, {rows[0]['world_size']} ranks, L = {rows[0]['seq_len']}")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = os.path.join(out_dir, "packed.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
