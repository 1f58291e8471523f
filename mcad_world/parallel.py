"""Data parallelism over CPU cores inside one process, for the CLIP teachers' contrastive step.

On a small CPU, one training step run with two intra-op threads is only 1.3x
faster than with one: each operator of a width-128 transformer is too small to
split well. Two halves of the batch, each encoded by its own Python thread with
one intra-op thread, keep both cores busy for the whole step (torch releases the
GIL inside operators). The contrastive loss still needs every feature of the
global batch, so the step goes:

1. ``forward``: each worker encodes its slice of the batch; the slices' outputs
   are joined into leaf tensors (detached, requiring grad), one per output;
2. the caller computes the loss on those leaves and calls ``backward(loss)``,
   which back-propagates the loss to the leaves, then lets each worker
   back-propagate its slice of the leaves' gradients through its own graph.

The graphs of the slices share only the parameters. Each worker returns its
slice's parameter gradients (``torch.autograd.grad``) and they are added to
``.grad`` in slice order after the loss's own, so a step's result does not
depend on which thread finished first. It equals the one-graph step up to
float rounding (the products run on smaller blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import torch


def _one_intra_op_thread() -> None:
    torch.set_num_threads(1)


class SplitBatch:
    """``workers`` threads, each encoding one contiguous slice of every batch with one intra-op thread.

    ``parameters`` are those whose gradients the slices' graphs reach (the trained ones).
    """

    def __init__(self, workers: int, parameters: Iterable[torch.nn.Parameter]) -> None:
        if workers < 2:
            raise ValueError(f"SplitBatch needs at least 2 workers, got {workers}")
        self.workers = workers
        self._params = [p for p in parameters if p.requires_grad]
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="split-batch", initializer=_one_intra_op_thread)
        self._parts: list[tuple[torch.Tensor, ...]] = []
        self._leaves: tuple[torch.Tensor, ...] = ()

    def forward(self, encode: Callable[..., tuple[torch.Tensor, ...]], *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``encode(*slice)`` on each worker's slice of ``batch``; its outputs joined as leaves that require grad."""
        slices = zip(*(tensor.chunk(self.workers) for tensor in batch), strict=True)
        self._parts = list(self._pool.map(lambda args: encode(*args), slices))
        self._leaves = tuple(torch.cat([part[i].detach() for part in self._parts]).requires_grad_()
                             for i in range(len(self._parts[0])))
        return self._leaves

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` to the leaves of the last ``forward``, then each slice through its own graph."""
        if not self._parts:
            raise RuntimeError("SplitBatch.backward without a forward to go back through")
        loss.backward()
        sizes = [len(part[0]) for part in self._parts]
        grads = [leaf.grad.split(sizes) for leaf in self._leaves]
        jobs = [(part, [g[k] for g in grads]) for k, part in enumerate(self._parts)]
        self._parts, self._leaves = [], ()
        for slice_grads in self._pool.map(
            lambda job: torch.autograd.grad(job[0], self._params, job[1], allow_unused=True), jobs
        ):
            for param, grad in zip(self._params, slice_grads, strict=True):
                if grad is not None:
                    param.grad = grad if param.grad is None else param.grad.add_(grad)

    def close(self) -> None:
        self._pool.shutdown()

