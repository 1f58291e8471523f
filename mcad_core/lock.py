"""Writer locks: one process at a time writes a store or a run directory; a second is refused at once.

A ``WriterLock`` is an exclusive ``flock`` on a small lock file next to what it guards
(``<parent>/.<name>.lock<suffix>``), taken without waiting. The kernel drops a flock when its
holder exits, however it exits, so a lock left by a killed process never blocks a re-run: a stale
lock is recovered by construction, with no pid checks or timeouts. After taking the lock the
holder writes who it is (pid, host, command line, start time) into the file, so a refused writer
can say which process to wait for or stop. The file is removed on release.

flock works across processes on one machine and, on Linux, across NFS clients (the kernel
emulates it with byte-range locks there); it does not reach across machines on every shared
filesystem, which is why the holder's host is part of the message.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path

from mcad_core.errors import InputError

_HOLDER_MAX_BYTES = 16 * 1024
_HOLDER_WAIT_SECONDS = 0.5  # how long a refused writer waits for a new holder to record itself


class WriterBusyError(InputError):
    """What a writer wants to write is being written by another process (named in the message)."""

    def __init__(self, what: str, holder: dict | None, lock_path: Path) -> None:
        self.what, self.holder, self.lock_path = what, holder, lock_path
        super().__init__(f"{what} is being written by {describe_holder(holder)}; wait for it or stop it")


def describe_holder(holder: dict | None) -> str:
    """``pid 1234 on host X since <time>, started as `mcad cache ...``` from a lock file's record."""
    if not holder:
        return "another process (it has not recorded itself in the lock file yet)"
    since = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {when}, "
            f"started as `{holder.get('command', '?')}`")


def lock_path(target: str | Path, suffix: str = "") -> Path:
    """The lock file that guards ``target``: a hidden sibling, outside the directory it guards."""
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}.lock{suffix}"


def holder_record() -> dict:
    """Who this process is, as a lock file records it."""
    argv = list(sys.argv) or ["?"]
    argv[0] = os.path.basename(argv[0])
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(argv), "started": time.time()}


class WriterLock(AbstractContextManager):
    """An exclusive, non-blocking writer lock on ``target`` (see the module docstring).

    ``suffix`` tells apart locks on parts of one target (e.g. one per cache task rank); ``what``
    names the target in the refusal message (default: its path). Entering raises
    ``WriterBusyError`` when another open lock file holds it; nothing else is touched.
    """

    def __init__(self, target: str | Path, suffix: str = "", what: str | None = None) -> None:
        self.target = Path(os.path.abspath(target))
        self.path = lock_path(self.target, suffix)
        self.what = what or str(self.target)
        self._fd: int | None = None
        self._made_dirs: list[Path] = []

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> WriterLock:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this WriterLock")
        while True:
            self._make_parent()
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # the parent was removed by a releasing holder: make it again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._remove_made_dirs()
                raise WriterBusyError(self.what, self._read_holder(), self.path) from None
            except BaseException:
                os.close(fd)
                raise
            # A releasing holder unlinks the file before it unlocks: if ours is no longer the file at
            # the path, a newer writer may hold the one that is, so start again on that one.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        try:
            data = json.dumps(holder_record(), sort_keys=True).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file, then unlock (in this order, see ``acquire``); a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        finally:
            os.close(fd)  # closing the only descriptor of the open file releases the flock
        self._remove_made_dirs()

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _make_parent(self) -> None:
        """Create the missing parents of the lock file, remembering them so that release can remove them."""
        missing = []
        for parent in [self.path.parent, *self.path.parent.parents]:
            if parent.exists():
                break
            missing.append(parent)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._made_dirs = missing + [d for d in self._made_dirs if d not in missing]

    def _remove_made_dirs(self) -> None:
        """Remove the directories the lock made, if they are still empty (what a run created stays)."""
        for directory in self._made_dirs:  # deepest first
            try:
                directory.rmdir()
            except OSError:
                break
        self._made_dirs = []

    def _read_holder(self) -> dict | None:
        """The holder's record, waiting briefly for a holder that has just taken the lock to write it."""
        deadline = time.monotonic() + _HOLDER_WAIT_SECONDS
        while True:
            try:
                with open(self.path, "rb") as handle:
                    record = json.loads(handle.read(_HOLDER_MAX_BYTES))
                if isinstance(record, dict):
                    return record
            except (OSError, ValueError):
                pass
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def main_rank_writer_lock(target: str | Path, what: str | None = None) -> AbstractContextManager:
    """A ``WriterLock`` on ``target`` for the launcher's rank 0, a no-op context for the other ranks.

    For directories that only rank 0 writes (a distill run directory): the rank is torchrun's
    ``RANK`` when ``WORLD_SIZE`` > 1, as ``mcad_student.parallel.Parallel.from_env`` reads it.
    """
    world = os.environ.get("WORLD_SIZE", "").strip()
    rank = os.environ.get("RANK", "").strip()
    if world.isdigit() and int(world) > 1 and rank.isdigit() and int(rank) != 0:
        return contextlib.nullcontext()
    return WriterLock(target, what=what)
