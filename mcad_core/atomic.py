"""Atomic writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mcad_core.errors import NoSpaceError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def _scratch(tmp: Path, path: Path) -> Iterator[None]:
    """On any failure inside, remove the scratch copy ``tmp``; a full disk becomes ``NoSpaceError(path)``.

    A scratch copy left behind by a failed write keeps a full disk full (a checkpoint's is
    megabytes), so it goes whatever the failure, Ctrl-C included. A failing removal never hides
    the error that caused it.
    """
    try:
        yield
    except BaseException as err:
        with contextlib.suppress(OSError):
            _remove(tmp)
        if isinstance(err, OSError) and err.errno in _NO_SPACE and not isinstance(err, NoSpaceError):
            raise NoSpaceError(path) from err
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a scratch copy; on failure the old file stays and no scratch copy."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with _scratch(tmp, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with _scratch(tmp, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The names atomic_write_bytes and atomic_dir give their scratch copies: ``.<name>.tmp-<writer pid>``.
TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Remove the scratch files and directories that killed writers left in ``directory``; returns them.

    A writer killed inside atomic_write_bytes or atomic_dir leaves ``.<name>.tmp-<pid>`` behind (a
    torch checkpoint's is megabytes) and nothing else ever removes it. Only entries whose writer pid
    is no longer alive are removed, so a live writer's scratch copy (this process's included) is never
    pulled from under it, even if two processes share the directory. A reused pid only keeps a stale
    entry a while longer, which is harmless. Only ``directory`` itself is scanned, not its children.
    """
    directory = Path(directory)
    removed = []
    for entry in directory.iterdir() if directory.is_dir() else ():
        match = TEMPORARY_NAME.match(entry.name)
        if match is None or _pid_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (signal 0 checks without signalling)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OverflowError:  # not a pid this machine can have
        return False
    return True


# ------------------------------------------------------------- command outputs

OUTPUT_MARKER = ".mcad-output.json"  # in every directory a command replaces as a whole: which command made it
OUTPUT_MARKER_FORMAT = 1
_MARKER_MAX_BYTES = 64 * 1024


class OutputDirError(RuntimeError):
    """A command's output directory may not be written: replacing it would delete something it did not make."""


def output_command(path: str | Path) -> str | None:
    """The command whose output ``path`` is (from its ``OUTPUT_MARKER``), or None: no or unreadable marker."""
    marker = Path(path) / OUTPUT_MARKER
    if not marker.is_file():
        return None
    try:
        with open(marker, "rb") as handle:
            record = json.loads(handle.read(_MARKER_MAX_BYTES))
    except (OSError, ValueError):
        return None
    command = record.get("command") if isinstance(record, dict) else None
    return command if isinstance(command, str) else None


def check_output_dir(path: str | Path, command: str, inputs: Iterable[str | Path] = ()) -> Path:
    """``path`` resolved, if ``command`` may replace it; else ``OutputDirError``, and nothing is touched.

    Writing an output replaces the whole directory, so only what cannot be lost is accepted: a
    missing path, an empty directory, or an earlier output of the same command (its marker says
    so). Anything else may be a user's data, so it is refused rather than deleted. The output must
    also keep clear of ``inputs``: equal to or around one, the replacement would delete it; inside
    one, the output would change (or, copying it, grow into) the input.
    """
    out = Path(path).resolve()
    for item in inputs:
        source = Path(item).resolve()
        if out == source or source.is_relative_to(out) or out.is_relative_to(source):
            relation = "is" if out == source else "contains" if source.is_relative_to(out) else "is inside"
            raise OutputDirError(f"output directory {out} {relation} the input {source}; choose an --out "
                                 "outside the inputs")
    if not out.exists():
        return out
    if not out.is_dir():
        raise OutputDirError(f"output directory {out} exists and is not a directory; choose another --out "
                             "or remove it yourself")
    if not any(out.iterdir()):
        return out
    made_by = output_command(out)
    if made_by != command:
        what = (f"the output of `mcad {made_by}`" if made_by
                else f"not an output of `mcad {command}` (no {OUTPUT_MARKER})")
        raise OutputDirError(f"output directory {out} is not empty and is {what}; `mcad {command}` would delete it. "
                             "Choose a new or empty --out, or remove it yourself if it is disposable")
    return out


@contextmanager
def replace_output_dir(path: str | Path, command: str, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a scratch directory that becomes ``command``'s output ``path`` only if the block succeeds.

    ``check_output_dir`` runs before anything is written (so a refused output costs nothing) and
    again just before the swap, in case ``path`` changed during the work. The scratch directory is
    a hidden sibling (the name ``remove_stale_temporaries`` knows), marked with ``OUTPUT_MARKER``;
    the old output is renamed aside before the new one is renamed in, so no moment has neither.
    """
    inputs = list(inputs)
    out = check_output_dir(path, command, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with _scratch(tmp, out):
        _remove(tmp)
        tmp.mkdir()
        yield tmp
        record = {"command": command, "format": OUTPUT_MARKER_FORMAT}
        (tmp / OUTPUT_MARKER).write_text(json.dumps(record, sort_keys=True) + "\n")
        _fsync_tree(tmp)
        check_output_dir(out, command, inputs)
        _swap_in(tmp, out)


def _swap_in(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is renamed aside first and removed after."""
    old = out.with_name(f".{out.name}.old.tmp-{os.getpid()}")
    _remove(old)
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(new, out)
    except OSError:
        if old.exists():
            os.replace(old, out)
        raise
    fsync_dir(out.parent)
    _remove(old)


def _fsync_tree(root: Path) -> None:
    for child in root.rglob("*"):
        if child.is_file() and not child.is_symlink():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())


def _remove(path: Path) -> None:
    """Remove a scratch path of ours (a directory tree, or a file or link in its place)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
