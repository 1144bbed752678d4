"""Process groups for sharded work: ``torchrun`` when launched by it, one process otherwise.

The engine is ``torch.distributed``; this module only decides how to join it and wraps
the two collectives the sharded sampler needs (gather small Python objects, a barrier).
A plain ``python`` run has no process group: :func:`launch` then yields a one-process
:class:`Context` whose collectives are trivial, so the same code serves both.

Backend: ``nccl`` for CUDA devices, ``gloo`` for the CPU.  CUDA-specific code (device
binding, NCCL) is reached only when a CUDA device was asked for, behind
:func:`cuda_device`, so CPU users never touch it.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Context", "DistributedError", "backend_for", "cuda_device", "launch", "launched"]

# Environment variables torchrun sets for every worker.
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Long enough for the slowest rank to finish its last shard while the others wait in a
# collective; a rank that dies is noticed by torchrun, which stops the others earlier.
DEFAULT_TIMEOUT = datetime.timedelta(hours=2)


class DistributedError(RuntimeError):
    """The process group cannot be set up as asked (bad device, missing GPUs, ...)."""


def launched() -> bool:
    """True inside a worker started by ``torchrun`` (its environment variables are set)."""
    return all(name in os.environ for name in _TORCHRUN_ENV)


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def cuda_device(local_rank: int, local_world_size: int) -> torch.device:
    """The GPU of this worker, ``cuda:<local rank>``, after checking there are enough."""
    if not torch.cuda.is_available():
        raise DistributedError("a CUDA device was requested but CUDA is not available here")
    count = torch.cuda.device_count()
    if local_world_size > count:
        raise DistributedError(
            f"{local_world_size} processes on this node but only {count} CUDA devices; "
            f"use torchrun --nproc_per_node={count} or fewer"
        )
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def _resolve_device(requested: str | torch.device, local_rank: int, local_world: int,
                    world: int) -> torch.device:
    try:
        device = torch.device("cuda" if str(requested) == "auto" and torch.cuda.is_available()
                              else "cpu" if str(requested) == "auto" else requested)
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"bad device {requested!r}: {exc}") from None
    if device.type == "cuda":
        if device.index is not None and world > 1:
            raise DistributedError(
                f"device {device} names one GPU, but {world} processes would share it; "
                "pass 'cuda' and every process takes the GPU of its local rank"
            )
        if device.index is None:
            return cuda_device(local_rank, local_world)
        return cuda_device(device.index, device.index + 1)
    if device.type != "cpu":
        raise DistributedError(f"device type {device.type!r} is not supported (cpu or cuda)")
    return device


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank, world size and its device.

    ``backend`` is None for a single process without a process group; collectives then
    act on this process alone.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (small picklable objects)."""
        if self.backend is None:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.backend is not None:
            dist.barrier()

    def describe(self) -> str:
        group = f"{self.world_size} processes, {self.backend}" if self.backend else "1 process"
        return f"rank {self.rank} of {group}, device {self.device}"


@contextmanager
def launch(device: str | torch.device = "cpu",
           timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Iterator[Context]:
    """Join torchrun's process group (if launched by it) for the duration of the block.

    ``device``: ``cpu``, ``cuda`` (each process takes ``cuda:<local rank>``), an explicit
    ``cuda:N`` (single process only) or ``auto`` (CUDA if available).  The group is
    destroyed on exit, also when the block raises.
    """
    if not launched():
        yield Context(device=_resolve_device(device, 0, 1, 1))
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    resolved = _resolve_device(device, local_rank, local_world, world)
    backend = backend_for(resolved)
    if dist.is_initialized():
        # Somebody (a caller's own launcher) set up the group already: use it, leave it.
        yield Context(rank, world, local_rank, resolved, dist.get_backend())
        return
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
    if resolved.type == "cuda":
        kwargs["device_id"] = resolved
    dist.init_process_group(**kwargs)
    try:
        yield Context(rank, world, local_rank, resolved, backend)
    finally:
        dist.destroy_process_group()
