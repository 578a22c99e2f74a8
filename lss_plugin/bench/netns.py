"""A slow link on one host: the ranks run in a private network namespace with a rate-limited loopback.

``launch_with_link(gbit, ...)`` re-runs ``launch`` in a child process started as
``unshare -n bash -c 'ip link set lo up && tc qdisc add dev lo root tbf rate <G>gbit burst 256kb
latency 100ms && exec python -m lss_plugin.bench.netns IN OUT'``: all ranks and their rendezvous
store share that namespace's loopback, so every byte between ranks passes one token bucket of G
Gbit/s (inter-node bandwidth as seen from one host). It needs root (or CAP_NET_ADMIN and user
namespaces) and the ``unshare``, ``ip`` and ``tc`` commands; ``link_unavailable()`` says why not.
Several namespaces with fast links inside and slow ones between: ``lss_plugin.cluster``.
"""
from __future__ import annotations

import os
import pickle
import shlex
import shutil
import subprocess
import sys
import tempfile


def _shell(gbit: float, command: str) -> list[str]:
    from lss_plugin.cluster.net import shaping_commands  # the same token bucket as the simulated nodes' links

    shape = " && ".join(shlex.join(cmd) for cmd in shaping_commands("lo", f"{gbit:g}gbit"))
    return ["unshare", "-n", "bash", "-c", f"ip link set lo up && {shape} && {command}"]


def link_unavailable() -> str | None:
    """None when a rate-limited private loopback can be set up here, else the reason."""
    missing = [c for c in ("unshare", "ip", "tc", "bash") if shutil.which(c) is None]
    if missing:
        return f"command(s) not found: {', '.join(missing)}"
    probe = subprocess.run(_shell(1, "true"), capture_output=True, text=True)
    if probe.returncode != 0:
        return (f"`unshare -n` + `tc qdisc ... tbf` failed (needs root or CAP_NET_ADMIN): "
                f"{(probe.stderr or probe.stdout).strip()[:200]}")
    return None


def launch_with_link(gbit: float, fn, world_size: int, *args, **kwargs) -> list:
    """``bench.launch.launch(fn, world_size, *args, **kwargs)`` with the ranks behind a G Gbit/s link."""
    with tempfile.TemporaryDirectory(prefix="lss-bench-netns-") as tmp:
        job, out = os.path.join(tmp, "job.pkl"), os.path.join(tmp, "out.pkl")
        with open(job, "wb") as f:
            pickle.dump((fn, world_size, args, kwargs), f)
        cmd = f"exec {shlex.quote(sys.executable)} -m lss_plugin.bench.netns {shlex.quote(job)} {shlex.quote(out)}"
        # gloo binds to the interface of the host name, which this namespace does not have
        env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
        code = subprocess.run(_shell(gbit, cmd), env=env).returncode
        if not os.path.exists(out):
            raise RuntimeError(f"the {world_size}-rank launch behind a {gbit:g} Gbit/s link exited with "
                               f"code {code} and wrote no results")
        with open(out, "rb") as f:
            status, payload = pickle.load(f)
    if status != "ok":
        raise RuntimeError(payload)
    return payload


def _main(job: str, out: str) -> int:
    from lss_plugin.bench.launch import launch

    with open(job, "rb") as f:
        fn, world_size, args, kwargs = pickle.load(f)
    try:
        result = ("ok", launch(fn, world_size, *args, **kwargs))
    except Exception as e:  # noqa: BLE001 - handed to the parent, which raises it
        result = ("error", f"{type(e).__name__}: {e}")
    with open(out, "wb") as f:
        pickle.dump(result, f)
    return 0 if result[0] == "ok" else 1


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:3]))
