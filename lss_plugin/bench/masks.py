"""Sliding windows: one LSS attention call, full causal against causal windows, same shapes (issue 28).

A causal window of W keys (the query's own included; ``lss_attention(window=(W - 1, 0))``) leaves
``W (W + 1) / 2 + (L - W) W`` of the ``L (L + 1) / 2`` causal (query, key) pairs, and LSS hands its
kernels only the key blocks that hold them (``lss_plugin.masks.key_blocks``). The communication is
unchanged (every rank still gathers every key: issue 28 computes less, the next issue sends less),
so the step time should fall with the pairs. Rows: ``lss`` and ``lss[window=W]``; pairs = the
mask's visible pairs (per head and sequence) and the kernels' block pairs (rows x keys of every
forward ``block_forward`` call, summed over ranks: what the kernels are handed, masked pairs
inside a block included); step time = forward + backward, the slowest rank per round, median
[IQR] over round-robin rounds, paired per round with ``lss``; and the collectives of one step.
"""
from __future__ import annotations

import os

import torch.distributed as dist

import lss_plugin
from lss_plugin.bench.packed import MiB, attention_inputs, attention_step, round_robin
from lss_plugin.bench.timing import quartiles

FULL = "lss"


def parse_windows(spec: str, seq_len: int) -> list[int]:
    """'L/8,256' -> [seq_len // 8, 256]: window sizes in keys, each in [1, seq_len]."""
    windows = []
    for item in spec.split(","):
        item = item.strip()
        w = seq_len // int(item[2:]) if item.upper().startswith("L/") else int(item)
        if not 1 <= w <= seq_len:
            raise ValueError(f"window {item!r} = {w} keys is outside [1, {seq_len}] (L = {seq_len})")
        windows.append(w)
    return windows


def variant_name(window: int | None) -> str:
    return FULL if window is None else f"lss[window={window}]"


def window_pairs(seq_len: int, window: int | None) -> int:
    """Visible (query, key) pairs of causal attention over ``seq_len`` tokens with a window of ``window``
    keys: query i sees ``min(i + 1, window)`` keys."""
    w = seq_len if window is None else min(window, seq_len)
    return w * (w + 1) // 2 + (seq_len - w) * w


class KernelPairs:
    """Counts the (query, key) pairs of every forward block ``lss_attention`` hands a kernel, per head
    (``rows x keys x heads of the call / heads``), by wrapping ``lss_plugin.attention.block_forward``."""

    def __init__(self, heads: int):
        self.heads, self.pairs = heads, 0

    def __enter__(self):
        import lss_plugin.attention as attention

        self._real = real = attention.block_forward

        def counted(q, k, *args, **kwargs):  # q [b, h, sq, d], k [b, hkv, sk, d]
            self.pairs += q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
            return real(q, k, *args, **kwargs)

        attention.block_forward = counted
        return self

    def __exit__(self, *exc):
        import lss_plugin.attention as attention

        attention.block_forward = self._real
        self.pairs //= self.heads


def _step(q, k, v, dout, window, layout):
    attention_step(q, k, v, dout, layout, **({} if window is None else {"window": (window - 1, 0)}))


def masks_worker(seq_len: int, heads: int, head_dim: int, windows: list, layout: str = "balanced",
                 warmup: int = 1, steps: int = 2, repetitions: int = 3) -> dict:
    """On every rank: time lss_attention forward + backward, full causal and each window, round-robin."""
    q, k, v, dout = attention_inputs(seq_len, heads, head_dim)
    cases = {variant_name(w): w for w in [None] + list(windows)}
    kernel_pairs = {}
    for name, window in cases.items():
        with KernelPairs(heads) as counter:
            _step(q, k, v, dout, window, layout)
        kernel_pairs[name] = counter.pairs  # this rank's queries, per head
    times, comm = round_robin({name: (lambda w=w: _step(q, k, v, dout, w, layout)) for name, w in cases.items()},
                              warmup, steps, repetitions)
    lss_plugin.destroy_topology()
    return {"rank": dist.get_rank(), "times": times, "comm": comm, "kernel_pairs": kernel_pairs,
            "windows": cases, "pairs": {name: window_pairs(seq_len, w) for name, w in cases.items()}}


def summarize(per_rank: list, seq_len: int, heads: int, head_dim: int, layout: str) -> list[dict]:
    """One row per variant; a round's time is its slowest rank (the step waits for it)."""
    first = per_rank[0]
    rounds = {name: [max(r["times"][name][i] for r in per_rank) for i in range(len(first["times"][name]))]
              for name in first["times"]}
    full_pairs = window_pairs(seq_len, None)
    kernel = {name: sum(r["kernel_pairs"][name] for r in per_rank) for name in first["kernel_pairs"]}
    rows = []
    for name, ts in rounds.items():
        q25, med, q75 = quartiles(ts)
        paired = None
        if name != FULL:
            paired = quartiles([a / b for a, b in zip(ts, rounds[FULL])])[1]
        rows.append({"variant": name, "window": first["windows"][name], "world_size": len(per_rank),
                     "seq_len": seq_len, "heads": heads, "head_dim": head_dim, "layout": layout,
                     "pairs": first["pairs"][name], "pairs_fraction": first["pairs"][name] / full_pairs,
                     "kernel_pairs": kernel[name], "kernel_pairs_fraction": kernel[name] / kernel[FULL],
                     "step_s": med, "step_s_q25": q25, "step_s_q75": q75, "round_step_s": ts,
                     "time_vs_full": paired, "calls": first["comm"][name]["calls"],
                     "sent_bytes": sum(first["comm"][name]["bytes"].values())})
    return rows


def table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    r0 = rows[0]
    lines = [f"Causal attention forward + backward with LSS, {r0['world_size']} ranks, L = {r0['seq_len']}, "
             f"{r0['heads']} heads x {r0['head_dim']}, layout {r0['layout']}, fp32; window W = W keys including the "
             "query's own. Pairs: the mask's visible (query, key) pairs / full causal; kernel pairs: rows x keys of "
             "the blocks handed to the kernels (all ranks) / full causal's; time: slowest rank per round, median "
             "[IQR]; time / full: paired per round.", "",
             "| variant | visible pairs | kernel pairs | step ms [IQR] | time / full | collectives (calls) | "
             "MiB (payload) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        calls = ", ".join(f"{k} {v}" for k, v in sorted(r["calls"].items()) if v)
        ratio = "-" if r["time_vs_full"] is None else f"{r['time_vs_full']:.3f}"
        lines.append(f"| {r['variant']} | {r['pairs']} ({r['pairs_fraction']:.3f}) | {r['kernel_pairs']} "
                     f"({r['kernel_pairs_fraction']:.3f}) | {r['step_s'] * 1e3:.1f} [{r['step_s_q25'] * 1e3:.1f}-"
                     f"{r['step_s_q75'] * 1e3:.1f}] | {ratio} | {calls} | {r['sent_bytes'] / MiB:.3f} |")
    return lines


def plot(out_dir: str, rows: list[dict]) -> list[str]:
    """masks.png: step time against the kernels' pairs, both relative to full causal; the diagonal is
    'time proportional to pairs'."""
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next(r for r in rows if r["variant"] == FULL)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="time proportional to pairs")
    for r in rows:
        x, y = r["kernel_pairs_fraction"], r["step_s"] / full["step_s"]
        err = [[y - r["step_s_q25"] / full["step_s"]], [r["step_s_q75"] / full["step_s"] - y]]
        ax.errorbar([x], [y], yerr=err, fmt="o", capsize=3)
        ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(6, -10), fontsize=8)
    ax.set_xlim(0, 1.1)
    ax.set_ylim(0, max(1.2, max(r["step_s_q75"] / full["step_s"] for r in rows) * 1.05))
    ax.set_xlabel("kernel (query, key) pairs / full causal")
    ax.set_ylabel("step time / full causal")
    ax.set_title(f"LSS sliding windows, {full['world_size']} ranks, L = {full['seq_len']}, "
                 f"{full['heads']}x{full['head_dim']}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, "masks.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
