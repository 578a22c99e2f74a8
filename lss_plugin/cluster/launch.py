"""One torchrun per simulated node, with c10d rendezvous on node 0, and teardown on every exit path.

``Launch(cluster, nproc, command)`` starts, in node i's namespace,

    torchrun --nnodes K --node-rank i --nproc-per-node P --rdzv-backend c10d
             --rdzv-endpoint 10.231.0.1:<port> --rdzv-id <run> --rdzv-conf is_host=<i==0> --local-addr <node i> --max-restarts R COMMAND

with GLOO_SOCKET_IFNAME (and NCCL's / TensorPipe's) naming the node's link, so ranks of different
nodes meet over the shaped link and ranks of one node over its loopback. ``--local-addr`` and
``--rdzv-conf is_host=`` matter: torchrun otherwise goes by the host name, which does not resolve to
the node's address inside a namespace.
With ``cluster=None`` it is one plain torchrun on this host (127.0.0.1), for machines without
namespaces. Each torchrun is its own process group: ``stop()`` ends them all (TERM, then KILL).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from lss_plugin.cluster.net import IFNAME, Cluster

RDZV_PORT = 29400


def torchrun_command(nnodes: int, node_rank: int, nproc: int, endpoint: str, run_id: str, local_addr: str,
                     max_restarts: int, command: list[str]) -> list[str]:
    # is_host: node 0 serves the rendezvous store. torchrun would guess it from the host name,
    # which inside a namespace does not resolve to the node's address.
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank", str(node_rank),
            "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--rdzv-id", run_id, "--rdzv-conf", f"is_host={int(node_rank == 0)}", "--local-addr", local_addr,
            "--max-restarts", str(max_restarts), *command]


@dataclass
class Launch:
    cluster: Cluster | None
    nproc: int
    command: list[str]
    max_restarts: int = 0
    log_dir: str | None = None  # node i's output to <log_dir>/node<i>.log (default: inherited)
    env: dict = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list, init=False)

    @property
    def nodes(self) -> int:
        return self.cluster.nodes if self.cluster else 1

    def start(self) -> "Launch":
        if self.cluster:
            endpoint, run_id = f"{self.cluster.addr(0)}:{RDZV_PORT}", f"lss{self.cluster.run_id}"
        else:
            from lss_plugin.runtime import free_port

            endpoint, run_id = f"127.0.0.1:{free_port()}", f"lss{os.getpid()}"
        for i in range(self.nodes):
            addr = self.cluster.addr(i) if self.cluster else "127.0.0.1"
            cmd = torchrun_command(self.nodes, i, self.nproc, endpoint, run_id, addr, self.max_restarts,
                                   self.command)
            env = dict(os.environ, **self.env)
            if self.cluster:
                cmd = self.cluster.exec_prefix(i) + cmd
                env.update(GLOO_SOCKET_IFNAME=IFNAME, NCCL_SOCKET_IFNAME=IFNAME, TP_SOCKET_IFNAME=IFNAME)
            out = open(os.path.join(self.log_dir, f"node{i}.log"), "ab") if self.log_dir else None
            try:
                self.procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                                   start_new_session=True))
            finally:
                if out:
                    out.close()
        return self

    def poll(self) -> list[int | None]:
        return [p.poll() for p in self.procs]

    def wait(self, timeout_s: float | None = None, on_tick=None) -> list[int]:
        """Wait until every node's torchrun exits; if one fails, the rest get 60 s, then stop()."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        failed_at = None
        while True:
            codes = self.poll()
            if all(c is not None for c in codes):
                return codes
            if on_tick:
                on_tick(self)
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = time.monotonic()
            if (failed_at is not None and time.monotonic() - failed_at > 60) or \
                    (deadline is not None and time.monotonic() > deadline):
                self.stop()
                return [p.poll() if p.poll() is not None else -9 for p in self.procs]
            time.sleep(0.2)

    def workers(self) -> dict[int, int]:
        """{global rank: pid} of the training processes running now (children of the torchruns)."""
        import psutil

        found = {}
        for p in self.procs:
            try:
                children = psutil.Process(p.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for child in children:
                try:
                    env = child.environ()
                    if "RANK" in env and "TORCHELASTIC_RUN_ID" in env and child.status() != psutil.STATUS_ZOMBIE:
                        found.setdefault(int(env["RANK"]), child.pid)  # the outermost process of a rank
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
        return found

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for p in self.procs:
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, sig)
                    except ProcessLookupError:
                        pass
            end = time.monotonic() + grace
            while time.monotonic() < end and any(p.poll() is None for p in self.procs):
                time.sleep(0.1)


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived (raised like KeyboardInterrupt, so cleanup runs)."""


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP raise like Ctrl-C does, so ``finally`` blocks tear the nodes down."""
    def handler(signum, _frame):
        raise Interrupted(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def run(nodes: int, nproc: int, command: list[str], *, rate: str | None = "1gbit", delay: str | None = None,
        max_restarts: int = 0, log_dir: str | None = None, timeout_s: float | None = None,
        use_netns: bool = True, on_tick=None) -> list[int]:
    """Set up the nodes, run ``command`` under torchrun on each, tear everything down; exit codes."""
    cluster = Cluster(nodes, rate=rate, delay=delay) if use_netns else None
    if not use_netns and nodes != 1:
        raise ValueError(f"without namespaces there is one node (this host), not {nodes}")
    launch = None
    try:
        if cluster:
            cluster.__enter__()
        launch = Launch(cluster, nproc, command, max_restarts=max_restarts, log_dir=log_dir).start()
        return launch.wait(timeout_s, on_tick=(lambda lt: on_tick(lt)) if on_tick else None)
    finally:
        if launch:
            launch.stop()
        if cluster:
            cluster.close()
