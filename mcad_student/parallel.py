"""Data parallelism under torchrun: each rank encodes its share of the global batch, the loss sees all of it.

Every rank reads the same global batch (the stream is deterministic), encodes
the rows ``rank::world`` and all-gathers the student's outputs with autograd,
so each rank computes the *global-batch* loss, exactly as one process would.
The all-gather's backward sums the gradient of every rank's (identical) loss
into the owner's rows, which makes each rank's parameter gradient ``world``
times its share; averaging over ranks then gives the one-process gradient.

BatchNorm layers see only the local rows: with a BatchNorm image tower
(MobileViTv2) the result differs from one process unless they are synced;
``sync_batchnorm`` converts them where the backend supports it (CUDA).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Parallel:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Parallel:
        """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def local_rows(self, n: int) -> torch.Tensor:
        if n % self.world:
            raise ValueError(f"a batch of {n} does not split over {self.world} ranks; use a batch size divisible "
                             "by the world size (and blocks whose size it divides)")
        return torch.arange(self.rank, n, self.world)

    def gather(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """The global (n, ...) tensor in batch order from every rank's rows ``rank::world``, with autograd."""
        if self.world == 1:
            return local
        from torch.distributed.nn.functional import all_gather

        parts = all_gather(local)
        stacked = torch.stack(list(parts), dim=1)  # (n / world, world, ...): row i of rank r is batch row i*world+r
        return stacked.reshape(n, *local.shape[1:])

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Start every rank from rank 0's weights (seeded builds agree already; this makes it a guarantee)."""
        if self.world == 1:
            return
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor, src=0)

    def average_gradients(self, module: torch.nn.Module) -> None:
        if self.world == 1:
            return
        for param in module.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
