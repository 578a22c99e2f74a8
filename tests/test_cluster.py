"""Simulated nodes (network namespaces) and restarts under torchrun --max-restarts.

- across 2 namespaces x 1 rank: LSS attention against one-process attention, float64, 1e-10
  relative to the reference's largest magnitude (skipped where `ip netns add` fails, with the reason);
- a node's addresses and routes exist only inside it, and the host's are unchanged;
- a plain torchrun --max-restarts 1 (no extra environment) restarts a killed gloo job
  (torch 2.13's shared rendezvous store otherwise hands the new workers the old addresses);
- the Megatron example, one rank SIGKILLed after a random iteration, resumes from its last
  checkpoint and logs the same per-iteration losses as an uninterrupted run (fp32, 1e-6 relative).
"""
import json
import os
import signal
import subprocess
import sys

import pytest

from lss_plugin.cluster import net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REASON = None


def _namespaces_or_skip():
    global _REASON
    if _REASON is None:
        _REASON = net.unavailable() or ""
    if _REASON:
        print(f"skipped: network namespaces unavailable: {_REASON}")
        pytest.skip(f"network namespaces unavailable: {_REASON}")


def _run(args, timeout_s, cwd=ROOT):
    """Run a command; on timeout TERM it (the simulator then tears its nodes down), then KILL."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"{' '.join(args)} did not finish in {timeout_s}s:\n{out[-3000:]}")
    finally:
        net.remove_stale()  # namespaces of a simulator that died without cleaning up
    return proc.returncode, out


def _mine():
    return [ns for ns in net.namespaces() if ns.startswith(net.PREFIX)]


def test_nodes_are_private_and_removed():
    _namespaces_or_skip()
    host_before = subprocess.run(["ip", "-brief", "addr"], capture_output=True, text=True).stdout
    routes_before = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    with net.Cluster(2, rate="200mbit") as cluster:
        for i in range(2):
            routes = subprocess.run(["ip", "-n", cluster.ns(i), "route"], capture_output=True, text=True).stdout
            assert routes.split() == ["10.231.0.0/24", "dev", net.IFNAME, "proto", "kernel", "scope", "link",
                                      "src", cluster.addr(i)], routes  # no default route, nothing else
            qdisc = subprocess.run(["ip", "netns", "exec", cluster.ns(i), "tc", "qdisc", "show", "dev", net.IFNAME],
                                   capture_output=True, text=True).stdout
            assert "tbf" in qdisc and "200Mbit" in qdisc, qdisc
        assert subprocess.run(["ip", "-brief", "addr"], capture_output=True, text=True).stdout == host_before
        assert subprocess.run(["ip", "route"], capture_output=True, text=True).stdout == routes_before
        names = [cluster.ns(0), cluster.ns(1), cluster.switch]
        assert set(names) <= set(net.namespaces())
    assert not set(names) & set(net.namespaces())


def test_lss_exact_across_two_nodes(tmp_path):
    _namespaces_or_skip()
    out = tmp_path / "check.json"
    code, log = _run([sys.executable, "-m", "lss_plugin.cluster", "run", "--nodes", "2", "--nproc-per-node", "1",
                      "--rate", "1gbit", "--", "-m", "lss_plugin.cluster.check", str(out)], timeout_s=180)
    assert code == 0, log[-3000:]
    result = json.loads(out.read_text())
    print({r["rank"]: r["errors"] for r in result["ranks"]})
    assert sorted(r["node_rank"] for r in result["ranks"]) == [0, 1]  # one rank in each namespace
    assert all(r["ifname"] == net.IFNAME for r in result["ranks"])
    assert result["max_error"] <= 1e-10, result
    assert not [ns for ns in _mine() if ns.startswith(f"{net.PREFIX}{os.getpid()}")]


_PLAIN = """
import os, signal, sys, torch, torch.distributed as dist
from lss_plugin.runtime import init_distributed
init_distributed(timeout_s=60)
rank, attempt = dist.get_rank(), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
for step in range(4):
    t = torch.full((3,), float(rank + 1))
    dist.all_reduce(t)
    if step == 1 and rank == 1 and attempt == 0:
        os.kill(os.getpid(), signal.SIGKILL)
print(f"rank {rank} attempt {attempt} sum {t[0].item()}", flush=True)
dist.destroy_process_group()
"""


def test_plain_torchrun_restart(tmp_path):
    script = tmp_path / "plain.py"
    script.write_text(_PLAIN)
    env_extra = [k for k in os.environ if k.startswith("TORCH_DISABLE_SHARE")]
    assert not env_extra, f"the test must run without {env_extra}"
    code, log = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
                      "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", str(script)], timeout_s=150)
    assert code == 0, log[-3000:]
    assert "rank 0 attempt 1 sum 3.0" in log and "rank 1 attempt 1 sum 3.0" in log, log[-3000:]


def test_megatron_example_resumes_after_kill(tmp_path):
    """One kill, plain torchrun on this host (2 ranks, LSS SP = 2), checkpoints every 2 iterations; seed 7 kills after iteration 3, between two checkpoints."""
    summary = tmp_path / "soak.json"
    code, log = _run([
        sys.executable, "-m", "lss_plugin.cluster", "soak", "--no-netns", "--nodes", "1", "--nproc-per-node", "2",
        "--kills", "1", "--seed", "7", "--workdir", str(tmp_path / "work"), "--json", str(summary), "--",
        os.path.join(ROOT, "examples", "pretrain_gpt_lss.py"), "@" + os.path.join(ROOT, "configs", "megatron_gpt_small_lss.args"),
        "--num-layers", "2", "--seq-length", "128", "--max-position-embeddings", "128", "--train-iters", "6",
        "--lr-warmup-iters", "2", "--save", "{ckpt}", "--load", "{ckpt}", "--save-interval", "2",
        "--metrics-file", "{metrics}"], timeout_s=300)
    print(log[-1500:])
    result = json.loads(summary.read_text())
    assert len(result["kills"]) == 1 and result["kills"][0].get("resumed_at") is not None, result
    assert result["kills"][0]["steps_lost"] <= 2, result  # at most the iterations since the checkpoint
    assert result["iterations"] == 6 and not result["missing_iterations"], result
    assert result["max_rel_loss_diff"] <= 1e-6, result
    assert code == 0, log[-3000:]


def test_soak_targets_and_comm_time():
    """The soak's kill targets fall one in each stretch of the run; the two-speed benchmark's comm
    time takes the last-arriving rank per collective plus each rank's own point-to-point waits."""
    import random

    from lss_plugin.bench.two_speed import comm_time
    from lss_plugin.cluster.soak import spread_targets

    for seed in range(20):
        targets = spread_targets(random.Random(seed), 30, 5)
        assert all(1 + 29 * k // 5 <= t < 1 + 29 * (k + 1) // 5 for k, t in enumerate(targets)), targets
    logs = [[("all_gather", 0.5), ("recv", 0.1), ("grad_sync", 9.0), ("all_to_all", 0.25)],
            [("all_gather", 0.2), ("recv", 0.3), ("grad_sync", 8.0), ("all_to_all", 0.75)]]
    assert comm_time(logs) == pytest.approx(0.2 + 0.25 + 0.3)  # collectives' minima + rank 1's own receive
    assert comm_time([logs[0], logs[1][:2]]) is None  # different calls on the ranks: no pairing
