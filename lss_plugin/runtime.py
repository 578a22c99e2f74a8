"""Device and backend selection, and process-group start-up from torchrun's environment.

Nothing here hard-codes CUDA or NCCL: the backend follows the device that is available
(NCCL with GPUs, gloo otherwise), so the same code runs on a CPU laptop and a GPU cluster.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


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


def init_distributed(timeout_s: float | None = None, backend: str | None = None) -> None:
    """Initialise the default process group from torchrun's env vars (single process if absent).

    Idempotent: a process group that already exists is kept as it is.
    """
    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = backend or default_backend()
    device = default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=as_timedelta(timeout_s))
