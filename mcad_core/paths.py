"""Paths as results name them."""

from __future__ import annotations

from pathlib import Path


def relative_to_cwd(path: str | Path) -> str:
    """``path`` relative to the working directory when it lies inside it, else as given (absolute paths stay
    absolute): committed results and configs then name no machine's directories."""
    absolute, cwd = Path(path).absolute(), Path.cwd()
    return str(absolute.relative_to(cwd)) if absolute.is_relative_to(cwd) else str(path)
