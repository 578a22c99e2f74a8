"""The main job end to end: `examples/demo.py` driving `examples/pretrain_gpt_lss.py` under torchrun.

One tiny demo on 2 ranks (LSS SP=2, then Megatron TP=2+SP) is shared by the tests below: its
metrics and checkpoints are the uninterrupted reference that resumed runs must reproduce.

Tolerances (float32 model):
- same parallel layout, resumed from a checkpoint: bit-identical losses (the same ops in the same
  order on CPU/gloo, and batches are a function of (seed, iteration) only);
- another layout (LSS vs TP, SP=2 vs SP=1 x DP=2, 1 rank vs 2): 1e-5 relative (reduction order).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from tests.distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "demo.py")
ITERS, SAVE_AT = 6, 3
DEMO_ARGV = [
    "--nproc", "2", "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
    "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4",  # 2 micro-batches
    "--train-iters", str(ITERS), "--save-interval", str(SAVE_AT), "--eval-interval", "3",
    "--eval-iters", "2", "--log-interval", "1",
]
FLOAT32_RTOL = 1e-5

needs_megatron = pytest.mark.skipif(
    importlib.util.find_spec("megatron") is None, reason="needs megatron-core (pip install .[megatron])"
)


def _load_demo_module():
    spec = importlib.util.spec_from_file_location("lss_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def _run(command: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run a demo or torchrun command; on timeout SIGTERM it (both stop their ranks) and fail."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"{' '.join(command[:4])} ... timed out after {timeout_s}s\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _metrics(path) -> dict[int, dict]:
    with open(path) as f:
        return {r["iteration"]: r for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = _run([sys.executable, DEMO, *DEMO_ARGV, "--output-dir", str(out)], timeout_s=420)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out, result.stdout


def _train(tmp_path, extra: list[str], nproc: int = 2) -> dict[int, dict]:
    """The demo's LSS command line (same model, data, seed) plus ``extra``; returns its metrics."""
    demo = _load_demo_module()
    args, _ = demo.parse_args(DEMO_ARGV + ["--output-dir", str(tmp_path)])
    metrics = tmp_path / "metrics.jsonl"
    command = demo.torchrun_command(nproc, demo.common_flags(args) + ["--metrics-file", str(metrics)] + extra)
    result = _run(command, timeout_s=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return _metrics(metrics)


@needs_megatron
def test_training_script_on_two_ranks_gives_the_one_rank_losses(tmp_path):
    """`examples/pretrain_gpt_lss.py` under torchrun as a user runs it: LSS SP=2 (balanced, RoPE)
    reproduces the per-iteration losses and validation BPC of the same flags on one rank."""
    flags = ["--position-embedding-type", "rope"]
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    one = _train(tmp_path / "one", flags, nproc=1)
    two = _train(tmp_path / "two", flags + ["--lss-sequence-parallel", "--lss-layout", "balanced"])
    assert sorted(one) == sorted(two) == list(range(1, ITERS + 1))
    assert two[1]["mode"] == "LSS sp=2 x dp=1 layout=balanced kv_backward=keep"
    for it in one:
        assert two[it]["loss"] == pytest.approx(one[it]["loss"], rel=FLOAT32_RTOL), it
    assert two[ITERS]["val_bpc"] == pytest.approx(one[ITERS]["val_bpc"], rel=FLOAT32_RTOL)


def _checkpoint_at(demo_dir, iteration, tmp_path):
    """A --load directory whose latest checkpoint is the demo's at ``iteration``."""
    name = f"iter_{iteration:07d}"
    target = tmp_path / "load"
    target.mkdir()
    shutil.copytree(demo_dir / "checkpoints" / "lss" / name, target / name)
    (target / "latest").write_text(name + "\n")
    return target


@needs_megatron
def test_demo_trains_lss_and_the_baseline_to_the_same_losses(demo_run):
    out, stdout = demo_run
    lss, base = _metrics(out / "lss_metrics.jsonl"), _metrics(out / "baseline_metrics.jsonl")
    assert sorted(lss) == sorted(base) == list(range(1, ITERS + 1))
    # A fresh byte-level model starts near the uniform loss ln(256) and learns.
    assert abs(lss[1]["loss"] - math.log(256)) < 0.1
    assert lss[ITERS]["loss"] < lss[1]["loss"] - 0.05
    for it in (3, 6):
        assert lss[it]["val_bpc"] == pytest.approx(lss[it]["val_loss"] / math.log(2), rel=1e-12)
        assert lss[it]["val_bpc"] == pytest.approx(base[it]["val_bpc"], rel=FLOAT32_RTOL)
    for it in lss:  # same initial weights and batches: LSS reproduces Megatron's TP+SP run
        assert lss[it]["loss"] == pytest.approx(base[it]["loss"], rel=FLOAT32_RTOL), it
    # What `make demo` promises: a comparison table, a PNG, a summary JSON, a checkpoint.
    assert "valid BPC" in stdout and "LSS SP=2 x DP=1" in stdout and "Megatron TP=2+SP x DP=1" in stdout
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == [] and set(summary["runs"]) == {"lss", "baseline"}
    assert summary["runs"]["lss"]["final_loss"] == lss[ITERS]["loss"]
    assert len(summary["runs"]["lss"]["peak_rss_mb_per_rank"]) == 2
    ckpt = out / "checkpoints" / "lss"
    assert (ckpt / "latest").read_text().strip() == f"iter_{ITERS:07d}"
    manifest = json.loads((ckpt / f"iter_{SAVE_AT:07d}" / "manifest.json").read_text())
    assert manifest["iteration"] == SAVE_AT and manifest["topology"]["lss_sp"] == 2
    assert manifest["model"]["hidden_size"] == 32


@needs_megatron
def test_resume_gives_the_same_losses_as_the_uninterrupted_run(demo_run, tmp_path):
    out, _ = demo_run
    reference = _metrics(out / "lss_metrics.jsonl")
    resumed = _train(tmp_path, ["--lss-sequence-parallel", "--lss-sequence-parallel-size", "2",
                                "--load", str(_checkpoint_at(out, SAVE_AT, tmp_path))])
    assert sorted(resumed) == list(range(SAVE_AT + 1, ITERS + 1))
    for it in resumed:  # same layout: bit-identical
        assert resumed[it]["loss"] == reference[it]["loss"], it
    assert resumed[ITERS]["val_bpc"] == reference[ITERS]["val_bpc"]


@needs_megatron
def test_a_checkpoint_written_with_sp2_resumes_with_sp1_dp2(demo_run, tmp_path):
    out, _ = demo_run
    reference = _metrics(out / "lss_metrics.jsonl")
    resumed = _train(tmp_path, ["--lss-sequence-parallel", "--lss-sequence-parallel-size", "1",
                                "--micro-batch-size", "1",  # global 4 = 2 DP ranks x 2 micro-batches of 1
                                "--load", str(_checkpoint_at(out, SAVE_AT, tmp_path))])
    assert sorted(resumed) == list(range(SAVE_AT + 1, ITERS + 1))
    assert {r["mode"] for r in resumed.values()} == {"LSS sp=1 x dp=2 layout=balanced kv_backward=keep"}
    for it in resumed:
        assert resumed[it]["loss"] == pytest.approx(reference[it]["loss"], rel=FLOAT32_RTOL), it
    assert resumed[ITERS]["val_bpc"] == pytest.approx(reference[ITERS]["val_bpc"], rel=FLOAT32_RTOL)


@needs_megatron
def test_the_training_script_refuses_a_checkpoint_of_another_model(demo_run, tmp_path):
    out, _ = demo_run
    demo = _load_demo_module()
    args, _ = demo.parse_args(DEMO_ARGV + ["--output-dir", str(tmp_path)])
    command = demo.torchrun_command(2, demo.common_flags(args) + [
        "--hidden-size", "64", "--lss-sequence-parallel", "--load", str(out / "checkpoints" / "lss")])
    result = _run(command, timeout_s=300)
    assert result.returncode != 0
    assert "model.hidden_size: checkpoint has 32, this run has 64" in result.stdout + result.stderr
    assert (out / "checkpoints" / "lss" / "latest").read_text().strip() == f"iter_{ITERS:07d}"  # untouched


def _evaluate_checkpoint(argv_cases: list[list[str]], checkpoint_dir: str) -> list[dict]:
    """In each rank: the training script's own evaluation of the checkpoint's weights, per case."""
    from lss_plugin.data import load_byte_splits
    from lss_plugin.megatron import pretrain
    from lss_plugin.megatron.model import GPTShape, build_gpt_model

    results = []
    for argv in argv_cases:
        args = pretrain.parse_args(argv + ["--load", checkpoint_dir])
        pretrain.setup_parallel(args)
        shape = GPTShape.from_args(args)
        splits = load_byte_splits(args.data_path)
        model = build_gpt_model(args, shape)
        assert pretrain.load(model, pretrain.build_optimizer(model, args), args, shape, splits) == ITERS
        results.append(pretrain.evaluate(model, args, splits.valid))
    return results


@needs_megatron
def test_bits_per_character_on_two_ranks_equal_the_one_rank_evaluation(demo_run):
    out, _ = demo_run
    demo = _load_demo_module()
    args, _ = demo.parse_args(DEMO_ARGV)
    flags = demo.common_flags(args)
    checkpoint = str(out / "checkpoints" / "lss")
    [single] = run_ranks(_evaluate_checkpoint, 1, [flags], checkpoint, timeout_s=300)[0]
    cases = [flags + ["--lss-sequence-parallel", "--lss-sequence-parallel-size", "2", "--lss-layout", layout]
             for layout in ("contiguous", "balanced")]
    per_rank = run_ranks(_evaluate_checkpoint, 2, cases, checkpoint, timeout_s=300)
    assert single["val_tokens"] == 2 * 4 * 64  # eval-iters x global batch x seq length
    for rank_results in per_rank:
        for result in rank_results:
            assert result["val_tokens"] == single["val_tokens"]
            assert result["val_bpc"] == pytest.approx(single["val_bpc"], rel=FLOAT32_RTOL)
    # And the training run's own evaluation at the end saw the same weights.
    trained = _metrics(out / "lss_metrics.jsonl")[ITERS]
    assert trained["val_bpc"] == pytest.approx(single["val_bpc"], rel=FLOAT32_RTOL)


def test_demo_refuses_sizes_that_do_not_divide_before_launching():
    demo = _load_demo_module()
    with pytest.raises(SystemExit, match="--sp-size 3 must divide --nproc 4"):
        demo.parse_args(["--nproc", "4", "--sp-size", "3"])
    with pytest.raises(SystemExit, match="--tp-size 4 must divide --nproc 2"):
        demo.parse_args(["--nproc", "2", "--tp-size", "4"])


def test_demo_reports_a_failed_run_and_stops(tmp_path):
    # 66 tokens do not split into 2N = 4 balanced chunks: the training script refuses on every rank.
    result = _run([sys.executable, DEMO, *DEMO_ARGV, "--seq-length", "66", "--lss-layout", "balanced",
                   "--output-dir", str(tmp_path)], timeout_s=300)
    assert result.returncode == 1
    assert "--seq-length 66 is not divisible by 4" in result.stdout
    assert "LSS SP=2 x DP=1 failed" in result.stderr and "lss.log" in result.stderr
    assert not (tmp_path / "baseline.log").exists()  # no point in the baseline after a failure
