"""The error families the ``mcad`` command maps to exit codes, in one place.

- ``InputError`` (exit 3): a bad or missing input (store, shards, teacher, checkpoint), a
  resource another process holds, or a full disk. The message names the input and what to do.
- ``ValueError`` raised while a command checks its options (exit 2) stays a ``click.UsageError``
  at the command itself.

Library code raises these; only ``pipeline.cli`` turns them into exit codes.
"""

from __future__ import annotations

import errno


class InputError(Exception):
    """A bad or missing input, or one another process holds: ``mcad`` exits 3 with the message."""

    exit_code = 3


class NoSpaceError(InputError, OSError):
    """The disk under ``path`` filled up while writing it; the partial file was removed."""

    def __init__(self, path, detail: str = ""):
        self.path = path
        super().__init__(errno.ENOSPC, f"no space left on {path}" + (f" ({detail})" if detail else ""))

    def __str__(self) -> str:
        return self.args[1]


def is_no_space(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) is a full disk or quota."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


def no_space_path(err: BaseException) -> str | None:
    """The file a full-disk error names, if any."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return getattr(err, "path", None) or err.filename
        err = err.__cause__ or err.__context__
    return None
