"""Where this process sits in a batch job: its rank and the world size, read from the launcher's environment.

Stage 1 runs as many independent tasks (a Slurm array, Slurm tasks, or torchrun workers). Each task must work out,
without talking to the others, which shards are its own. The launcher already says so in environment variables;
this module reads them in one place, refuses anything inconsistent (a wrong placement silently skips or repeats
shards), and splits a list of items by the result. Stdlib only, so it is cheap to import from the CLI.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

SOURCES = ("single", "torchrun", "slurm-array", "slurm-tasks", "explicit")


class PlacementError(ValueError):
    """The environment (or a CLI override) describes an impossible or half-specified task placement."""


@dataclass(frozen=True)
class TaskPlace:
    """This task's ``rank`` in ``[0, world_size)`` and which launcher ``source`` said so (for logs)."""

    rank: int
    world_size: int
    source: str

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise PlacementError(f"unknown placement source {self.source!r}; expected one of {SOURCES}")
        _check_range(self.rank, self.world_size, f"rank={self.rank}", f"world_size={self.world_size}")


def _check_range(rank: int, world_size: int, rank_what: str, world_what: str) -> None:
    """Raise unless ``0 <= rank < world_size``; the ``*_what`` strings name the inputs in the message."""
    if world_size < 1:
        raise PlacementError(f"world size must be >= 1, got {world_what}")
    if not 0 <= rank < world_size:
        raise PlacementError(f"rank must be in [0, {world_size}), got {rank_what} with {world_what}")


def _get(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value, or None when unset or blank (``RANK= mcad ...`` is a common way to clear one)."""
    value = env.get(name)
    if value is None or not value.strip():
        return None
    return value


def _int(env: Mapping[str, str], name: str) -> int:
    """The variable as an integer; a PlacementError naming it when it is not one."""
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise PlacementError(f"{name}={value!r} is not an integer") from None


def _pair(env: Mapping[str, str], rank_name: str, world_name: str, check: bool = True) -> tuple[int, int] | None:
    """``(rank, world)`` from two partner variables; None if both are unset, an error if only one is.

    ``check=False`` skips the range check, for callers that offset the first value before checking it.
    """
    has_rank, has_world = _get(env, rank_name) is not None, _get(env, world_name) is not None
    if not has_rank and not has_world:
        return None
    if has_rank != has_world:
        present, missing = (rank_name, world_name) if has_rank else (world_name, rank_name)
        raise PlacementError(f"{present}={env[present]!r} is set but {missing} is not; set both or neither")
    rank, world = _int(env, rank_name), _int(env, world_name)
    if check:
        _check_range(rank, world, f"{rank_name}={rank}", f"{world_name}={world}")
    return rank, world


def _slurm_tasks(env: Mapping[str, str]) -> tuple[int, int] | None:
    """``(SLURM_PROCID, SLURM_NTASKS)``, or None when neither is set.

    The batch step of a job submitted without ``--ntasks`` has ``SLURM_PROCID=0`` but no ``SLURM_NTASKS``; that
    is one task, not a half-specified pair. Any other procid without ntasks is an error.
    """
    batch_step = _get(env, "SLURM_NTASKS") is None and _get(env, "SLURM_PROCID") is not None
    if batch_step and _int(env, "SLURM_PROCID") == 0:
        return 0, 1
    return _pair(env, "SLURM_PROCID", "SLURM_NTASKS")


def _slurm_array(env: Mapping[str, str]) -> tuple[int, int] | None:
    """``(array_rank, array_count)`` from ``SLURM_ARRAY_TASK_*``, or None outside an array job.

    Array ids are whatever ``--array`` said (``--array=1-16`` starts at 1), so the rank is the id minus
    ``SLURM_ARRAY_TASK_MIN``. Ids must be contiguous: with ``--array=0-30:2`` or ``--array=1,5,9`` the ids minus
    the minimum are not ``0..count-1`` and tasks would overlap or leave shards out, so that is refused up front
    (every task fails the same way, rather than only the ones whose id happens to be too large).
    """
    pair = _pair(env, "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", check=False)
    if pair is None:
        return None
    task_id, count = pair
    low = _int(env, "SLURM_ARRAY_TASK_MIN") if _get(env, "SLURM_ARRAY_TASK_MIN") is not None else 0
    if _get(env, "SLURM_ARRAY_TASK_MAX") is not None:
        high = _int(env, "SLURM_ARRAY_TASK_MAX")
        if high - low + 1 != count:
            raise PlacementError(
                f"array task ids are not contiguous: SLURM_ARRAY_TASK_MIN={low}, SLURM_ARRAY_TASK_MAX={high}, "
                f"SLURM_ARRAY_TASK_COUNT={count}; submit with a plain range such as --array=0-{count - 1}")
    rank = task_id - low
    _check_range(rank, count, f"SLURM_ARRAY_TASK_ID={task_id} minus SLURM_ARRAY_TASK_MIN={low} = {rank}",
                 f"SLURM_ARRAY_TASK_COUNT={count}")
    return rank, count


def task_place(env: Mapping[str, str] | None = None) -> TaskPlace:
    """This task's placement, read from ``env`` (default ``os.environ``).

    Precedence, most specific launcher first:

    1. torchrun: ``RANK`` / ``WORLD_SIZE``. torchrun inside a Slurm allocation also sees ``SLURM_*``; its own
       variables describe the actual worker processes, so they win.
    2. Slurm array: ``SLURM_ARRAY_TASK_ID`` / ``SLURM_ARRAY_TASK_COUNT`` (rank offset by ``SLURM_ARRAY_TASK_MIN``).
       If each array element also runs several tasks (``SLURM_NTASKS > 1``, started with ``srun``), the two
       combine: ``rank = array_rank * ntasks + procid`` and ``world = array_count * ntasks``.
    3. Slurm tasks: ``SLURM_PROCID`` / ``SLURM_NTASKS``.
    4. Otherwise a single task, ``(0, 1)``.

    Raises PlacementError (naming the variables and values) for non-integers, a variable without its partner,
    ``world_size < 1`` or a rank outside ``[0, world_size)``.
    """
    env = os.environ if env is None else env
    torchrun = _pair(env, "RANK", "WORLD_SIZE")
    if torchrun is not None:
        return TaskPlace(*torchrun, source="torchrun")
    array = _slurm_array(env)
    tasks = _slurm_tasks(env)
    if array is not None:
        array_rank, array_count = array
        procid, ntasks = tasks if tasks is not None else (0, 1)
        return TaskPlace(array_rank * ntasks + procid, array_count * ntasks, source="slurm-array")
    if tasks is not None:
        return TaskPlace(*tasks, source="slurm-tasks")
    return TaskPlace(0, 1, source="single")


def local_rank(env: Mapping[str, str] | None = None) -> int:
    """This task's index among the tasks on its machine, which picks its GPU (``cuda:<local rank>``).

    torchrun's ``LOCAL_RANK``, else Slurm's ``SLURM_LOCALID``, else 0 (one task per machine). A value that is
    not a non-negative integer is a PlacementError naming the variable.
    """
    env = os.environ if env is None else env
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if _get(env, name) is not None:
            value = _int(env, name)
            if value < 0:
                raise PlacementError(f"{name}={value} is negative; a local rank counts from 0")
            return value
    return 0


def explicit_place(rank: int, world_size: int) -> TaskPlace:
    """A placement given on the command line (``--rank/--world-size``), checked like one from the environment."""
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise PlacementError(f"{name}={value!r} is not an integer")
    return TaskPlace(rank, world_size, source="explicit")


def partition(items: Sequence[T], place: TaskPlace) -> list[T]:
    """This task's share of ``items``: every ``world_size``-th item starting at ``rank``.

    Why strided (``items[rank::world_size]``) rather than contiguous blocks:

    - balanced: shares differ in length by at most one, and shards written in order (which often differ in size
      or content towards the end) are spread over all tasks instead of landing on the last one;
    - deterministic and independent: each task computes its own share from ``(rank, world_size)`` and the item
      list alone, with no coordination, so the shares are disjoint and together cover every item exactly once;
    - stable for reruns: a re-submitted task with the same placement gets the same shards back.

    Every task must pass the same list in the same order (e.g. the sorted output of ``list_shards``).
    Ranks past the end of a short list (``world_size > len(items)``) get an empty share.
    """
    return [items[i] for i in range(place.rank, len(items), place.world_size)]
