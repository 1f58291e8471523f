"""Data parallelism under torchrun: each rank encodes its share of the global batch, the loss sees all of it.

Every rank plans the same global batch (the stream is deterministic) but
renders views, tokens and target rows only for its positions ``rank::world``
(``CacheBatches(rank=, world=)``). It encodes those rows and all-gathers the
student's outputs with autograd, and the target rows without, so each rank
computes the *global-batch* loss, exactly as one process would. The
all-gather's backward sums the gradient of every rank's (identical) loss into
the owner's rows, which makes each rank's parameter gradient ``world`` times
its share; averaging over ranks (one all-reduce of all gradients) then gives
the one-process gradient.

The backend follows the device: NCCL with each rank bound to its GPU
(``cuda:LOCAL_RANK`` by default, ``resolve_device``), gloo on CPU.

BatchNorm layers see only the local rows and are not synced: with a BatchNorm
image tower (the MobileViTv2 preset) a multi-rank run differs from one process.
The default ``vit`` student has LayerNorms only, so its runs are unaffected.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mcad_core.dist import PlacementError, local_rank


class ParallelSetupError(ValueError):
    """A setting this process cannot run with: a device the machine lacks, a batch that does not split over ranks."""


class DeviceUnavailableError(ParallelSetupError):
    """The requested device (or a precision on it) is not available on this machine."""


class UnevenBatchError(ParallelSetupError):
    """Some batch of the run does not split evenly over the torchrun ranks."""


def resolve_device(spec: str, local: int | None = None) -> torch.device:
    """The torch device of a ``DistillConfig.device``: "auto" is ``cuda:<local rank>`` when CUDA is available, else
    the CPU; "cuda" is ``cuda:<local rank>``; "cpu" and "cuda:N" as given. ``local``: the local rank (None: from
    the launcher's environment, ``mcad_core.dist.local_rank``).

    A CUDA device this machine cannot give is a DeviceUnavailableError naming it, raised before any work.
    """
    if spec == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if spec in ("auto", "cuda"):
        try:
            spec = f"cuda:{local_rank() if local is None else local}"
        except PlacementError as err:
            raise DeviceUnavailableError(f"device {spec}: cannot tell this rank's GPU, {err}") from err
    device = torch.device(spec)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        built = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no usable GPU"
        raise DeviceUnavailableError(f"device {spec}: CUDA is not available here (torch {torch.__version__}, "
                                     f"{built}); use --device cpu, or auto to take a GPU only when there is one")
    count = torch.cuda.device_count()
    if device.index is None or device.index >= count:
        raise DeviceUnavailableError(f"device {spec}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
                                     " (with auto or cuda, the index is the local rank: start at most that many "
                                     "ranks per machine)")
    return device


def local_rows(n: int, rank: int, world: int) -> torch.Tensor:
    """Batch positions ``rank::world`` of a batch of ``n``: one rank's share."""
    if n % world:
        raise UnevenBatchError(f"a batch of {n} does not split over {world} ranks; use a batch size divisible by the "
                               "world size (and blocks whose size it divides)")
    return torch.arange(rank, n, world)


def check_split(batch_size: int, block_sizes: Sequence[int], world: int) -> None:
    """Refuse, before the first step, a run whose batches would not split evenly over ``world`` ranks.

    A block of ``n`` images gives batches of ``batch_size`` and a last one of ``n % batch_size`` (random and
    neighbour batching alike); a last batch of one image is skipped by the loop, so it needs no split.
    """
    if world <= 1:
        return
    if batch_size % world:
        raise UnevenBatchError(f"batch_size {batch_size} does not split over {world} ranks; use a multiple of {world}")
    uneven = sorted({n % batch_size for n in block_sizes if n % batch_size > 1 and (n % batch_size) % world})
    if uneven:
        raise UnevenBatchError(f"blocks end in batches of {uneven} images, which do not split over {world} ranks; "
                               f"use a batch size that divides the blocks' sizes, or another number of ranks")


@dataclass(frozen=True)
class Parallel:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device | None = None) -> Parallel:
        """Join the torchrun process group when WORLD_SIZE > 1, with the backend ``device`` needs: NCCL bound to
        that GPU (``torch.cuda.set_device`` and the group's ``device_id``) for a CUDA device, else gloo."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            if device is not None and device.type == "cuda":
                torch.cuda.set_device(device)
                dist.init_process_group("nccl", device_id=device)
            else:
                dist.init_process_group("gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def local_rows(self, n: int) -> torch.Tensor:
        return local_rows(n, self.rank, self.world)

    def gather(self, local: torch.Tensor, n: int, grad: bool = True) -> torch.Tensor:
        """The global (n, ...) tensor in batch order from every rank's rows ``rank::world``; with autograd unless
        ``grad`` is False (targets)."""
        if self.world == 1:
            return local
        if grad:
            from torch.distributed.nn.functional import all_gather

            parts = all_gather(local)
        else:
            parts = [torch.empty_like(local) for _ in range(self.world)]
            dist.all_gather(parts, local.contiguous())
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
        """Every gradient summed over ranks and divided by ``world``, in one all-reduce per dtype (not per tensor)."""
        if self.world == 1:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for param in module.parameters():
            if param.grad is not None:
                by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
