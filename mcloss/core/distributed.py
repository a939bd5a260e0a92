"""Single-process or torchrun execution: ranks, device per rank, and the few collectives training and export need."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mcloss.core.device import resolve_device
from mcloss.core.errors import MclossError
from mcloss.core.processes import die_with_parent

__all__ = ["DistContext", "launched_by_torchrun"]


def launched_by_torchrun() -> bool:
    """True when RANK/WORLD_SIZE/LOCAL_RANK say this process is one of several (torchrun or similar)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


@dataclass
class DistContext:
    """Who this process is: rank, world size and local rank (0, 1, 0 outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device_name: str = "auto") -> tuple[DistContext, torch.device]:
        """Resolve the device and, under torchrun, join the process group (nccl on CUDA, gloo on CPU).

        A rank dies with its launcher (its parent, the torchrun agent), even when that is killed with SIGKILL,
        instead of running on beside a re-run: see :func:`mcloss.core.processes.die_with_parent`. (A launcher
        that died before this point holds the rendezvous store, so joining the group fails.)
        """
        if not launched_by_torchrun():
            return cls(), resolve_device(device_name)
        die_with_parent()
        device = resolve_device(device_name)
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            if local >= torch.cuda.device_count():
                raise MclossError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices are visible")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        return cls(rank, world, local), device

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks in place (no-op for one process)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (objects travel between our own processes only)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank, as DDP does before each forward."""
        if self.enabled:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (if this context joined one)."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
