"""K simulated nodes on one machine: network namespaces joined by shaped veth links to one bridge.

    switch namespace  lss-<id>-sw : bridge ``lssbr``, one veth end per node (no address)
    node namespace    lss-<id>-<i>: ``lo`` (unshaped: ranks of one node talk here) and ``lssnet0``
                                    10.231.0.<i+1>/24, shaped with tc (rate, optional delay)

Everything lives in namespaces this module creates, the bridge too, so the host's own namespace
(its interfaces, addresses, routes, firewall) is never touched. The /24 exists only on the nodes'
``lssnet0`` and no namespace has a default route: nothing can leave the machine. Each direction of
a node-to-node transfer passes one shaper (the sender's egress). Needs root (CAP_SYS_ADMIN for
``ip netns add``) and the ``ip`` and ``tc`` commands. Names carry the creating process id, so
parallel runs do not collide and leftovers of dead runs are recognised and removed.
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

PREFIX = "lss-"
SUBNET = "10.231.0"  # /24, private (RFC 1918), assigned only inside the node namespaces
IFNAME = "lssnet0"  # the node's link to the others, the same name in every node namespace
BRIDGE = "lssbr"
_RATE = re.compile(r"^\d+(\.\d+)?(bit|kbit|mbit|gbit|tbit)$")
_DELAY = re.compile(r"^\d+(\.\d+)?(us|ms|s)$")
_NAME = re.compile(rf"^{re.escape(PREFIX)}(\d+)([a-z]+)-(sw|\d+)$")
_serial = itertools.count()


class NamespaceError(RuntimeError):
    """Namespaces, links or shaping could not be set up here."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NamespaceError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[:300]}")
    return proc


def shaping_commands(dev: str, rate: str | None, delay: str | None = None, netns: str | None = None) -> list[list[str]]:
    """``tc`` commands limiting ``dev``'s egress to ``rate`` (tc syntax: 1gbit, 200mbit), after a
    netem ``delay`` (10ms) if given. The token bucket's burst is 256 KiB, as in bench.netns."""
    if rate is not None and not _RATE.match(rate):
        raise ValueError(f"rate {rate!r} is not a tc rate such as 1gbit or 200mbit")
    if delay is not None and not _DELAY.match(delay):
        raise ValueError(f"delay {delay!r} is not a tc time such as 500us or 2ms")
    tc = ["tc"] if netns is None else ["ip", "netns", "exec", netns, "tc"]
    tbf = ["tbf", "rate", rate, "burst", "256kb", "latency", "100ms"] if rate else None
    if delay is None:
        return [tc + ["qdisc", "add", "dev", dev, "root"] + tbf] if tbf else []
    cmds = [tc + ["qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", delay]]
    if tbf:
        cmds.append(tc + ["qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:"] + tbf)
    return cmds


def namespaces() -> list[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete this module's namespaces whose creating process is gone; returns their names."""
    stale = [ns for ns in namespaces() if (m := _NAME.match(ns)) and not _alive(int(m.group(1)))]
    for ns in stale:
        _kill_inside(ns)
        _run("ip", "netns", "delete", ns, check=False)
    return stale


def _kill_inside(ns: str) -> None:
    pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass


def unavailable() -> str | None:
    """None when namespaces can be made here (probed by making one), else the reason."""
    missing = [c for c in ("ip", "tc") if shutil.which(c) is None]
    if missing:
        return f"command(s) not found: {', '.join(missing)}"
    probe = f"{PREFIX}{os.getpid()}probe-{next(_serial)}"
    proc = _run("ip", "netns", "add", probe, check=False)
    if proc.returncode != 0:
        return f"`ip netns add` failed (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()[:200]}"
    _run("ip", "netns", "delete", probe, check=False)
    return None


@dataclass
class Cluster:
    """``nodes`` namespaces on one bridge; links shaped to ``rate`` (+ ``delay``) between nodes.

    Use as a context manager: set up on entry, everything deleted on exit (and by ``close()``,
    which is idempotent and also safe after a partial set-up)."""

    nodes: int
    rate: str | None = "1gbit"
    delay: str | None = None
    run_id: str = field(default_factory=lambda: f"{os.getpid()}{'abcdefghijklmnopqrstuvwxyz'[next(_serial) % 26]}")
    created: list[str] = field(default_factory=list, init=False)

    def __post_init__(self):
        if not 1 <= self.nodes <= 250:
            raise ValueError(f"nodes must be 1..250, got {self.nodes}")
        shaping_commands(IFNAME, self.rate, self.delay)  # validates rate and delay before any set-up

    def ns(self, i: int) -> str:
        return f"{PREFIX}{self.run_id}-{i}"

    @property
    def switch(self) -> str:
        return f"{PREFIX}{self.run_id}-sw"

    def addr(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def exec_prefix(self, i: int) -> list[str]:
        """Prefix a command with this to run it in node ``i``."""
        return ["ip", "netns", "exec", self.ns(i)]

    def __enter__(self) -> "Cluster":
        try:
            self.up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def up(self) -> None:
        remove_stale()
        sw = self.switch
        self._add_ns(sw)
        _run("ip", "-n", sw, "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "-n", sw, "link", "set", BRIDGE, "up")
        for i in range(self.nodes):
            node = self.ns(i)
            self._add_ns(node)
            _run("ip", "-n", node, "link", "set", "lo", "up")
            # created inside the switch namespace, one end moved into the node and renamed there
            port, inner = f"port{i}", f"tmp{self.run_id}"[:15]
            _run("ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", inner)
            _run("ip", "-n", sw, "link", "set", inner, "netns", node)
            _run("ip", "-n", node, "link", "set", inner, "name", IFNAME)
            _run("ip", "-n", sw, "link", "set", port, "master", BRIDGE)
            _run("ip", "-n", sw, "link", "set", port, "up")
            # on-link /24 only: no gateway, no default route
            _run("ip", "-n", node, "addr", "add", f"{self.addr(i)}/24", "dev", IFNAME)
            _run("ip", "-n", node, "link", "set", IFNAME, "up")
            for cmd in shaping_commands(IFNAME, self.rate, self.delay, netns=node):
                _run(*cmd)

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self.created.append(name)

    def close(self) -> None:
        """Kill whatever still runs in the namespaces and delete them (veths and bridge go with them)."""
        while self.created:
            name = self.created.pop()
            _kill_inside(name)
            _run("ip", "netns", "delete", name, check=False)
