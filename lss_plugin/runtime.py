"""Device and backend selection, and process-group start-up from torchrun's environment.

Nothing here hard-codes CUDA or NCCL: the backend follows the device that is available
(NCCL with GPUs, gloo otherwise), so the same code runs on a CPU laptop and a GPU cluster.
"""
from __future__ import annotations

import datetime
import os
import socket

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
    dist.init_process_group(backend=backend, timeout=as_timedelta(timeout_s))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a one-host rendezvous; the launchers here share it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
