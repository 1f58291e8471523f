"""Store equality for the tests that compare whole stores (resume, tasks, workers, precision)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a store by path."""
    root = zarr.open_group(str(path), mode="r")
    return {name: member[...] for name, member in root.members(max_depth=None) if isinstance(member, zarr.Array)}


def assert_same_store(a: Path, b: Path) -> None:
    """The two stores hold the same arrays, value for value."""
    left, right = store_arrays(a), store_arrays(b)
    assert sorted(left) == sorted(right)
    for name in left:
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)
