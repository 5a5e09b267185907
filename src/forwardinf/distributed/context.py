"""Which process am I: rank and world size under ``torchrun``, and the few collectives we need.

``torchrun --nproc-per-node N ...`` starts N processes with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``
in their environment; :func:`init_distributed` joins them into a ``torch.distributed`` process
group (gloo on CPU, nccl on GPU). Outside torchrun it returns a one-process context, so the same
code runs either way.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """``rank`` of this process among ``world_size``; ``owns_group`` if we created the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """The device this rank should compute on: its own GPU under nccl, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def agree(self, error: BaseException | None) -> None:
        """Collective: every rank reports whether it failed; if any did, every rank raises.

        A failing rank re-raises its own error; the others raise ``RuntimeError`` naming the
        failing ranks. Without this, a rank that fails leaves the others waiting at a barrier.
        """
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        flag = torch.zeros(self.world_size, dtype=torch.int32,
                           device=self.device if self.backend == "nccl" else "cpu")
        flag[self.rank] = int(error is not None)
        dist.all_reduce(flag)
        if error is not None:
            raise error
        failed = flag.nonzero().flatten().tolist()
        if failed:
            raise RuntimeError(f"rank(s) {failed} of {self.world_size} failed; see their error messages")

    def close(self) -> None:
        """Destroy the process group if :func:`init_distributed` created it."""
        if self.owns_group and dist.is_initialized():
            # Leave together: a gloo rank that tears its group down while a peer is still writing
            # its outputs can abort the peer at exit ("terminate called without an active exception").
            dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(backend: str | None = None, timeout_minutes: float = 60.0) -> DistContext:
    """Join the process group described by torchrun's environment, or a one-process context.

    ``backend``: None picks nccl when CUDA is available and gloo otherwise. A group that is
    already initialised (by the caller) is reused and left open.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local, dist.get_backend(), owns_group=False)
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistContext(dist.get_rank(), dist.get_world_size(), local, backend, owns_group=True)
