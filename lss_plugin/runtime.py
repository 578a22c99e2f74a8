"""Device and backend selection, and process-group start-up from torchrun's environment.

Nothing here hard-codes CUDA or NCCL: the backend follows the device that is available
(NCCL with GPUs, gloo otherwise), so the same code runs on a CPU laptop and a GPU cluster.
"""
from __future__ import annotations

import datetime
import os
import secrets
import socket
import time

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0
# What ProcessGroupNCCL does when a collective fails or outlives the group's timeout: 1 = its watchdog
# aborts the communicator and tears the process down (the launcher then restarts the job). A failed
# NCCL collective leaves nothing to recover in-process; see docs/reliability.md.
NCCL_ERROR_ENV = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
NCCL_ERROR_DEFAULT = "1"


def set_nccl_error_handling() -> str | None:
    """Make NCCL's error handling explicit before the plugin creates an NCCL process group (read when a
    group is constructed): the user's ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` is kept, else 1 (tear down).
    Nothing for other backends. Returns the value in force (None without NCCL)."""
    if not (dist.is_available() and dist.is_nccl_available()):
        return None
    return os.environ.setdefault(NCCL_ERROR_ENV, NCCL_ERROR_DEFAULT)


def default_device() -> torch.device:
    """The device this process should compute on: its local GPU if there is one, else the CPU."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def default_backend() -> str:
    """NCCL when GPUs and NCCL are present, gloo otherwise (overridable with LSS_BACKEND)."""
    forced = os.environ.get("LSS_BACKEND")
    if forced:
        return forced
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def as_timedelta(timeout_s: float | None) -> datetime.timedelta:
    return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s))


# Variables by which a launcher announces the processes it started (torchrun and the deepspeed
# launcher: WORLD_SIZE; mpirun: the MPI ones, which DeepSpeed's own MPI discovery reads).
LAUNCHER_ENV = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def launched() -> bool:
    """Whether a launcher (torchrun, deepspeed, mpirun) started this process."""
    return any(name in os.environ for name in LAUNCHER_ENV)


def init_distributed(timeout_s: float | None = None, backend: str | None = None) -> None:
    """Initialise the default process group from the launcher's env vars, or as one process.

    Without a launcher this is a one-rank group on a free local port, and the env vars DeepSpeed
    checks (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) are set to match it, so that
    DeepSpeed does not fall back to MPI discovery. Idempotent: an existing group is kept.
    """
    if dist.is_initialized():
        return
    if not launched():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = backend or default_backend()
    if backend == "nccl":
        set_nccl_error_handling()
    device = default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = as_timedelta(timeout_s)
    store = attempt_store(timeout) if agent_store_shared() else None
    if store is None:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout, store=store,
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


# --------------------------------------------------------------------------------------------
# Restarts under torchrun: one store namespace per attempt
#
# torchrun's c10d rendezvous (torch >= 2.5) hands its workers the agent's TCPStore
# (TORCHELASTIC_USE_AGENT_STORE=True), and that store outlives a restart of the workers. The keys
# the previous attempt's process groups wrote (gloo's peer addresses, NCCL's unique id) are still
# there, so restarted workers may read them and connect to dead ports (pytorch #135712, #167288).
# TORCHELASTIC_RESTART_COUNT cannot name the attempt: each node's agent counts its own restarts,
# and a node restarted for a membership change does not count it. So the workers agree on a fresh
# random token through the store in a way stale keys cannot fool: each rank publishes a fresh
# nonce, and rank 0 answers under a key that contains it.

_KEY = "lss_plugin/attempt"
_POLL_S = 0.02


def agent_store_shared() -> bool:
    """Whether torchrun shares its rendezvous store (which survives restarts) with the workers."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def attempt_store(timeout: datetime.timedelta) -> dist.Store:
    """The launcher's store under a prefix that only this attempt's workers use."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    token = agree_on_token(store, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), timeout)
    return dist.PrefixStore(f"{_KEY}/{token}/", store)


def agree_on_token(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta) -> str:
    """A random token every rank of this attempt returns, read from ``store`` (shared with older
    attempts, whose keys may still be there).

    Rank r > 0 writes a fresh nonce to ``hello/r`` and waits for ``welcome/r/<nonce>``; rank 0
    answers every nonce it sees there (a stale one too: its answer is never read) until each rank
    has confirmed under ``joined/<token>``, a key no older attempt can have written.
    """
    if rank != 0:
        nonce = secrets.token_hex(8)
        store.set(f"{_KEY}/hello/{rank}", nonce)
        store.wait([f"{_KEY}/welcome/{rank}/{nonce}"], timeout)
        token = store.get(f"{_KEY}/welcome/{rank}/{nonce}").decode()
        store.add(f"{_KEY}/joined/{token}", 1)
        return token
    token = secrets.token_hex(8)
    answered: dict[int, bytes] = {}
    deadline = time.monotonic() + timeout.total_seconds()
    while store.add(f"{_KEY}/joined/{token}", 0) < world_size - 1:
        for r in range(1, world_size):
            key = f"{_KEY}/hello/{r}"
            if store.check([key]):
                nonce = store.get(key)
                if answered.get(r) != nonce:
                    store.set(f"{_KEY}/welcome/{r}/{nonce.decode()}", token)
                    answered[r] = nonce
        if time.monotonic() > deadline:
            joined = store.add(f"{_KEY}/joined/{token}", 0)
            silent = [r for r in range(1, world_size) if r not in answered]
            raise TimeoutError(f"rank 0 waited {timeout.total_seconds():g}s for the other "
                               f"{world_size - 1} ranks of this attempt: {joined} joined, no nonce "
                               f"ever from ranks {silent}")
        time.sleep(_POLL_S)
    return token


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a one-host rendezvous; the launchers here share it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
