"""The main job, end to end: byte-level GPT pretraining with LSS, next to Megatron's TP+SP baseline.

    python examples/demo.py                      # what `make demo` runs
    python examples/demo.py --train-iters 300 --seq-length 512 --data-path /data/enwik8

1. Fetches the training text once (the enwik8 file given with --data-path, else the Wikipedia
   excerpt shipped in the gensim wheel, via `pip download`, checksummed and cached).
2. Trains a small GPT with examples/pretrain_gpt_lss.py under torchrun, twice on the same data,
   seed and number of steps:
     lss       --lss-sequence-parallel, SP x DP ranks (default SP=2 x DP=2 on 4 ranks)
     baseline  Megatron tensor parallelism + its sequence parallelism, TP x DP (default TP=2 x DP=2),
               with the fused SDPA core attention (the flash kernel LSS attends with), so tokens/s
               compare parallel schemes, not kernels (--baseline-core-attention local: the dense one)
3. Prints a comparison (final training loss, validation bits per character, tokens/s, peak RSS
   per rank) read from each run's metrics JSON lines, and writes a loss-curve PNG and a summary
   JSON into --output-dir (default runs/demo).

CPU: 4 processes with gloo. GPUs present: one process per GPU (up to --nproc) with NCCL; the
training script picks its device and backend itself. Flags this demo does not know are passed
through to both training runs unchanged (e.g. --lss-kv-backward regather).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # runnable as `python examples/demo.py` from a checkout
    sys.path.insert(0, ROOT)

from lss_plugin.options import DEFAULT_LAYOUT, LAYOUTS  # noqa: E402 - needs ROOT on the path

TRAIN_SCRIPT = os.path.join(HERE, "pretrain_gpt_lss.py")
RUNS = ("lss", "baseline")
STYLES = {"lss": "-", "baseline": "--"}  # dashed on top: the curves coincide when LSS is exact


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default=os.path.join("runs", "demo"))
    p.add_argument("--data-path", default=None,
                   help="enwik8 (or any byte file); default: the Wikipedia excerpt in gensim==4.4.0")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks per run (default: 4 on CPU, the number of GPUs up to 4 on GPU)")
    p.add_argument("--sp-size", type=int, default=None,
                   help="LSS ranks per sequence (default 2 when --nproc is even, else 1); DP = nproc / SP")
    p.add_argument("--tp-size", type=int, default=None,
                   help="baseline tensor-parallel size (default: the same as --sp-size, so DP matches)")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--num-query-groups", type=int, default=None, help="GQA groups (default: MHA)")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x DP")
    p.add_argument("--train-iters", type=int, default=150)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr-warmup-iters", type=int, default=None,
                   help="linear warm-up of the learning rate (default: a tenth of --train-iters)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--position-embedding-type", default="learned_absolute", choices=("learned_absolute", "rope"))
    p.add_argument("--lss-layout", default=DEFAULT_LAYOUT, choices=LAYOUTS)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--eval-interval", type=int, default=None,
                   help="default: a fifth of --train-iters (5 evaluations, the last at the end)")
    p.add_argument("--eval-iters", type=int, default=4, help="validation batches per evaluation")
    p.add_argument("--skip-baseline", action="store_true", help="train only the LSS run")
    p.add_argument("--baseline-core-attention", choices=("sdpa", "local"), default="sdpa",
                   help="the baseline's core attention: torch's fused SDPA (the flash kernel LSS attends "
                        "with too: a fair throughput comparison) or megatron-core's dense local one")
    p.add_argument("--save-interval", type=int, default=None,
                   help="LSS run checkpoint interval (default: --train-iters, one checkpoint at the end)")
    p.add_argument("--no-save", action="store_true", help="write no checkpoint of the LSS run")
    args, passthrough = p.parse_known_args(argv)
    return _fill_defaults(args), passthrough


def _fill_defaults(args):
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.nproc is None:
        args.nproc = min(gpus, 4) if gpus else 4
    if args.sp_size is None:
        args.sp_size = 2 if args.nproc % 2 == 0 else 1
    if args.tp_size is None:
        args.tp_size = args.sp_size
    for name, size in (("--sp-size", args.sp_size), ("--tp-size", args.tp_size)):
        if size < 1 or args.nproc % size != 0:
            raise SystemExit(f"{name} {size} must divide --nproc {args.nproc}")
    dp = args.nproc // args.sp_size
    if args.nproc // args.tp_size != dp and not args.skip_baseline:
        print(f"note: LSS has DP={dp}, the baseline DP={args.nproc // args.tp_size}; the global batch "
              "is the same, the split differs", flush=True)
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.eval_interval is None:
        args.eval_interval = max(1, args.train_iters // 5)
    if args.lr_warmup_iters is None:
        args.lr_warmup_iters = args.train_iters // 10
    if args.save_interval is None:
        args.save_interval = args.train_iters
    args.devices = f"{gpus} GPU(s)" if gpus else "CPU"
    return args


# ---------------------------------------------------------------------------------------------
# Launching

def common_flags(args) -> list[str]:
    flags = [
        "--num-layers", args.num_layers, "--hidden-size", args.hidden_size,
        "--num-attention-heads", args.num_attention_heads,
        "--seq-length", args.seq_length, "--max-position-embeddings", args.seq_length,
        "--micro-batch-size", args.micro_batch_size, "--global-batch-size", args.global_batch_size,
        "--lr", args.lr, "--lr-warmup-iters", args.lr_warmup_iters,
        "--train-iters", args.train_iters, "--seed", args.seed,
        "--position-embedding-type", args.position_embedding_type,
        "--log-interval", args.log_interval, "--eval-interval", args.eval_interval,
        "--eval-iters", args.eval_iters,
    ]
    if args.num_query_groups:
        flags += ["--num-query-groups", args.num_query_groups]
    if args.data_path:
        flags += ["--data-path", args.data_path]
    return [str(f) for f in flags]


def run_flags(args, run: str) -> list[str]:
    out = os.path.abspath(args.output_dir)
    flags = ["--metrics-file", os.path.join(out, f"{run}_metrics.jsonl")]
    if run == "lss":
        flags += ["--lss-sequence-parallel", "--lss-sequence-parallel-size", str(args.sp_size),
                  "--lss-layout", args.lss_layout]
        if not args.no_save:
            flags += ["--save", os.path.join(out, "checkpoints", run), "--save-interval", str(args.save_interval)]
    else:
        flags += ["--tensor-model-parallel-size", str(args.tp_size),
                  "--core-attention", args.baseline_core_attention]
        if args.tp_size > 1:
            flags += ["--sequence-parallel"]
    return flags


def torchrun_command(nproc: int, script_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            TRAIN_SCRIPT, *script_args]


class RSSWatcher(threading.Thread):
    """Peak resident memory of each rank process under torchrun, sampled every ``interval_s``.

    On Linux it reads the kernel's high-water mark (VmHWM), which is the true peak up to the last
    sample; elsewhere the current RSS, so short spikes between samples can be missed.
    """

    def __init__(self, launcher_pid: int, interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.launcher_pid, self.interval_s = launcher_pid, interval_s
        self.peak_mb: dict[int, float] = {}
        self._done = threading.Event()

    def run(self):
        try:
            import psutil
        except ImportError:
            return
        try:
            launcher = psutil.Process(self.launcher_pid)
        except psutil.Error:
            return
        while not self._done.wait(self.interval_s):
            try:
                children = launcher.children(recursive=True)
            except psutil.Error:
                return
            for child in children:
                try:
                    rank = int(child.environ().get("RANK", "-1"))
                    mb = _high_water_mark_mb(child.pid) or child.memory_info().rss / 2**20
                except (psutil.Error, ValueError):
                    continue
                if rank >= 0:
                    self.peak_mb[rank] = max(self.peak_mb.get(rank, 0.0), mb)

    def stop(self):
        self._done.set()
        self.join(timeout=5)


def _high_water_mark_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


_WARNING_HEADER = re.compile(r"^\S+:\d+: \w*Warning: ")


class WarningFilter:
    """Recognises Python warnings (``file:line: XWarning: msg`` + the indented source line)."""

    def __init__(self):
        self._after_header = False

    def is_warning(self, line: str) -> bool:
        if _WARNING_HEADER.match(line):
            self._after_header = True
            return True
        was_after, self._after_header = self._after_header, False
        return was_after and line.startswith("  ")


def launch(run: str, command: list[str], log_path: str, env: dict) -> tuple[int, float, dict]:
    """Run ``command``, echo its output with a ``[run]`` prefix and keep a log; returns (code, seconds, rss)."""
    print(f"\n=== {run}: {' '.join(command[3:])}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, env=env, cwd=ROOT)
        watcher = RSSWatcher(proc.pid)
        watcher.start()
        warnings = WarningFilter()
        try:
            for line in proc.stdout:
                log.write(line)
                if not warnings.is_warning(line):  # kept in the log, not on the console
                    print(f"[{run}] {line}", end="", flush=True)
            code = proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM (see main), a broken pipe: never orphan the ranks
            proc.terminate()  # torchrun passes SIGTERM on to its workers and waits for them
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            watcher.stop()
    return code, time.perf_counter() - start, dict(sorted(watcher.peak_mb.items()))


# ---------------------------------------------------------------------------------------------
# Reading the metrics

def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarise(records: list[dict], elapsed_s: float, polled_rss_mb: dict) -> dict:
    """Final loss, last validation BPC, training tokens/s and peak RSS per rank of one run.

    Records are the training script's metrics lines: ``iteration``, ``loss``, ``tokens_per_s``
    every iteration, ``val_loss``/``val_bpc`` on evaluation iterations, and optionally
    ``peak_rss_mb_per_rank``; without the latter, the RSS polled by this demo is used.
    """
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_bpc" in r]
    speeds = [float(r["tokens_per_s"]) for r in train if "tokens_per_s" in r]
    steady = speeds[1:] or speeds  # the first iteration includes warm-up
    rss = {}
    for r in records:
        for rank, mb in enumerate(r.get("peak_rss_mb_per_rank") or []):
            rss[rank] = max(rss.get(rank, 0.0), float(mb))
    rss_source = ("from the metrics" if rss else
                  "sampled by the demo every 0.5 s (on Linux the kernel's high-water mark, VmHWM)")
    rss = rss or polled_rss_mb
    return {
        "final_loss": train[-1]["loss"] if train else None,
        "valid_bpc": evals[-1]["val_bpc"] if evals else None,
        "tokens_per_s": sum(steady) / len(steady) if steady else None,
        "peak_rss_mb_per_rank": [rss[k] for k in sorted(rss)],
        "peak_rss_source": rss_source,
        "wall_clock_s": elapsed_s,
        "loss_curve": [(r["iteration"], r["loss"]) for r in train],
        "bpc_curve": [(r["iteration"], r["val_bpc"]) for r in evals],
    }


def _fmt(value, spec):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def comparison_table(summaries: dict, labels: dict, kernels: dict) -> str:
    rows = [("run", "attention kernel", "final loss", "valid BPC", "tokens/s", "peak RSS/rank (MB)", "wall (s)")]
    for run, s in summaries.items():
        rss = s["peak_rss_mb_per_rank"]
        rows.append((labels[run], kernels[run], _fmt(s["final_loss"], ".4f"), _fmt(s["valid_bpc"], ".4f"),
                     _fmt(s["tokens_per_s"], ".0f"), " ".join(f"{m:.0f}" for m in rss) or "-",
                     _fmt(s["wall_clock_s"], ".0f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_curves(summaries: dict, labels: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bpc) = plt.subplots(1, 2, figsize=(10, 4))
    for run, s in summaries.items():
        if s["loss_curve"]:
            it, loss = zip(*s["loss_curve"])
            ax_loss.plot(it, loss, STYLES[run], label=labels[run])
        if s["bpc_curve"]:
            it, bpc = zip(*s["bpc_curve"])
            ax_bpc.plot(it, bpc, STYLES[run], marker="o", label=labels[run])
    ax_loss.set(xlabel="iteration", ylabel="training loss (nats/byte)", title="Training loss")
    ax_bpc.set(xlabel="iteration", ylabel="bits per character", title="Validation BPC")
    for ax in (ax_loss, ax_bpc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args, passthrough = parse_args(argv)
    # A SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so launch() stops torchrun and its ranks.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if not os.path.exists(TRAIN_SCRIPT):
        print(f"error: the training script {TRAIN_SCRIPT} is missing", file=sys.stderr)
        return 2
    if importlib.util.find_spec("megatron") is None:
        print("error: megatron-core is not installed in this Python; run `make demo` (it sets up "
              "the venv) or `pip install -e '.[megatron,bench]'`", file=sys.stderr)
        return 2
    from lss_plugin.data import DataUnavailableError, load_byte_splits

    os.makedirs(args.output_dir, exist_ok=True)
    # Fetch the text once here, so the ranks find it in the cache instead of racing to download.
    try:
        splits = load_byte_splits(args.data_path)
    except (DataUnavailableError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"data: {splits.source} ({splits.num_bytes:,} bytes, sha256 {splits.sha256[:12]}...): "
          f"train {len(splits.train):,} / valid {len(splits.valid):,} / test {len(splits.test):,}", flush=True)

    dp_lss, dp_base = args.nproc // args.sp_size, args.nproc // args.tp_size
    labels = {"lss": f"LSS SP={args.sp_size} x DP={dp_lss}",
              "baseline": f"Megatron TP={args.tp_size}{'+SP' if args.tp_size > 1 else ''} x DP={dp_base}"}
    kernels = {"lss": "fused (flash, LSS block kernel)",
               "baseline": "fused (flash, torch SDPA)" if args.baseline_core_attention == "sdpa"
               else "dense (megatron local)"}
    runs = ("lss",) if args.skip_baseline else RUNS
    print(f"model: {args.num_layers} layers, hidden {args.hidden_size}, {args.num_attention_heads} heads, "
          f"seq {args.seq_length}, global batch {args.global_batch_size}, {args.train_iters} iterations "
          f"on {args.nproc} ranks ({args.devices})", flush=True)

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # ranks share the cores; more threads only oversubscribe
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    summaries, failed = {}, []
    for run in runs:
        metrics_path = os.path.join(os.path.abspath(args.output_dir), f"{run}_metrics.jsonl")
        if os.path.exists(metrics_path):
            os.remove(metrics_path)  # a stale file from an earlier demo would mix into this one
        command = torchrun_command(args.nproc, common_flags(args) + run_flags(args, run) + passthrough)
        code, elapsed, polled_rss = launch(run, command, os.path.join(args.output_dir, f"{run}.log"), env)
        if code != 0:
            failed.append(run)
            log_path = os.path.join(args.output_dir, run + ".log")
            print(f"\n{labels[run]} failed (exit code {code}); its log: {log_path}", file=sys.stderr, flush=True)
            break  # the comparison needs both; report what finished
        summaries[run] = summarise(read_metrics(metrics_path), elapsed, polled_rss)

    if summaries:
        print("\n" + comparison_table(summaries, labels, kernels))
        sources = {s["peak_rss_source"] for s in summaries.values()}
        print(f"peak RSS: {', '.join(sorted(sources))}")
        gap = None
        if len(summaries) == 2:
            lss, base = (dict(summaries["lss"]["loss_curve"]), dict(summaries["baseline"]["loss_curve"]))
            common = sorted(set(lss) & set(base))
            if common:
                # Same initial weights and batches: the runs differ only by float rounding.
                gap = max(abs(lss[i] - base[i]) for i in common)
                print(f"largest |loss(LSS) - loss(baseline)| over {len(common)} iterations: {gap:.2e}")
        png = os.path.join(args.output_dir, "loss_curve.png")
        if importlib.util.find_spec("matplotlib") is None:
            png = "no loss-curve PNG (pip install matplotlib)"
        else:
            plot_curves(summaries, labels, png)
        summary_path = os.path.join(args.output_dir, "summary.json")
        with open(summary_path, "w") as f:
            json.dump({"data": {"source": splits.source, "sha256": splits.sha256, "bytes": splits.num_bytes},
                       "settings": {k: v for k, v in vars(args).items()}, "passthrough": passthrough,
                       "labels": labels, "attention_kernels": kernels, "runs": summaries,
                       "max_loss_gap": gap, "failed": failed}, f, indent=2)
        print(f"wrote {png}, {summary_path} and the metrics JSON lines in {args.output_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
