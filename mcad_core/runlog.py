"""A run's log file: what `mcad distill` or `mcad cache` did and when, one line per milestone.

``RunLog(path)`` is a context manager. For its duration the INFO (and higher) records of mcad's own
loggers (``MCAD_LOGGERS``) go to ``path`` as timestamped lines, appended, so a resumed run continues
the same file. The file is created only by ``open()``, which a run calls once its output exists (the
run directory, the store): a run refused before that writes no log. Records logged before ``open()``
are held (up to ``HELD_RECORDS``) and written first; a run that never opens the file drops them.
A run that ends with an exception gets a last line naming it (in the file only: the command line
reports the error itself).

What the console shows does not change: a logger below INFO (no `mcad -v`) is raised to INFO for the
run, and its records go on to the handlers above it only at the level they passed before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

# mcad's own loggers: INFO with `mcad -v`, and in a run's log file; everything else stays at WARNING.
MCAD_LOGGERS = ("mcad_core", "mcad_cache", "mcad_student", "mcad_world", "pipeline")
LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
HELD_RECORDS = 10_000  # records kept before the file opens; more are dropped (a run that never opens it)

log = logging.getLogger(__name__)


class _LogFile(logging.Handler):
    """Formatted lines appended to ``path`` once ``open()`` was called; held in memory until then."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(LINE_FORMAT))
        self.path = path
        self.stream = None
        self.held: list[str] = []

    def open(self) -> None:
        self.acquire()
        try:
            if self.stream is None:
                self.stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
                self._write(self.held)
                self.held = []
        finally:
            self.release()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if self.stream is not None:
                self._write([line])
            elif len(self.held) < HELD_RECORDS:
                self.held.append(line)
        except Exception:  # a log line must never stop a run (logging's own policy)
            self.handleError(record)

    def _write(self, lines: list[str]) -> None:
        self.stream.write("".join(line + "\n" for line in lines))
        self.stream.flush()

    def close(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.close()
                self.stream = None
        finally:
            self.release()
        super().close()


class _PassOn(logging.Handler):
    """Hands a record to the handlers above ``logger`` if its own logger would have emitted it before the run
    (``level_before``): what propagation did then."""

    def __init__(self, logger: logging.Logger, level_before: Callable[[str], int]) -> None:
        super().__init__()
        self.parent = logger.parent
        self.level_before = level_before

    def emit(self, record: logging.LogRecord) -> None:
        if self.parent is not None and record.levelno >= self.level_before(record.name):
            self.parent.handle(record)


class RunLog:
    """Log mcad's INFO records to ``path`` while the ``with`` block runs (see the module docstring)."""

    def __init__(self, path: str | Path, loggers: tuple[str, ...] = MCAD_LOGGERS) -> None:
        self.path = Path(path)
        self.loggers = loggers
        self._file = _LogFile(self.path)
        self._saved: list[tuple[logging.Logger, int, bool, _PassOn | None]] = []
        self._levels_before: dict[str, int] = {}  # of the loggers raised to INFO for the run

    @property
    def opened(self) -> bool:
        return self._file.stream is not None

    def open(self) -> None:
        """Create (or append to) the file now, with the records held so far; the run's output exists."""
        self._file.open()

    def __enter__(self) -> RunLog:
        for name in self.loggers:
            logger = logging.getLogger(name)
            saved = (logger, logger.level, logger.propagate)
            logger.addHandler(self._file)
            effective = logger.getEffectiveLevel()
            pass_on = None
            if effective > logging.INFO:
                self._levels_before[name] = logger.level
                logger.setLevel(logging.INFO)
                if logger.propagate:  # INFO would now reach the console: pass on what reached it before only
                    pass_on = _PassOn(logger, self._level_before)
                    logger.addHandler(pass_on)
                    logger.propagate = False
            self._saved.append((*saved, pass_on))
        return self

    def _level_before(self, name: str) -> int:
        """The effective level logger ``name`` had before the run raised some of mcad's loggers to INFO."""
        logger: logging.Logger | None = logging.getLogger(name)
        while logger is not None:
            level = self._levels_before.get(logger.name, logger.level)
            if level:
                return level
            logger = logger.parent
        return logging.NOTSET

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if error is not None and self.opened:
            self._file.handle(logging.makeLogRecord({
                "name": log.name, "levelno": logging.ERROR, "levelname": "ERROR",
                "msg": "stopped by %s: %s", "args": (kind.__name__, error)}))
        for logger, level, propagate, pass_on in reversed(self._saved):
            logger.removeHandler(self._file)
            if pass_on is not None:
                logger.removeHandler(pass_on)
            logger.setLevel(level)
            logger.propagate = propagate
        self._saved.clear()
        self._levels_before.clear()
        self._file.close()
