"""A full disk during an atomic write: a named error, the old file intact, and no scratch copy left to keep it full."""

from __future__ import annotations

import errno
import os

import pytest
from click.testing import CliRunner

import mcad_core.atomic as atomic
from mcad_core.atomic import atomic_dir, atomic_write_bytes, atomic_write_json, replace_output_dir
from mcad_core.errors import InputError, NoSpaceError
from pipeline.cli import main


def _full(code: int = errno.ENOSPC):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_in_atomic_write_names_the_path_and_leaves_no_scratch_copy(tmp_path, monkeypatch, code):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")
    monkeypatch.setattr(atomic.os, "fsync", _full(code))
    with pytest.raises(NoSpaceError) as err:
        atomic_write_bytes(path, b"x" * (3 << 20))
    assert isinstance(err.value, InputError) and str(err.value) == f"no space left on {path}"
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"] and path.read_bytes() == b"old"


def test_any_failure_in_atomic_write_removes_the_scratch_copy(tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):  # not a full disk: the error stays what it was
        atomic_write_json(tmp_path / "summary.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer", [atomic_dir, lambda path: replace_output_dir(path, "export")])
def test_full_disk_inside_a_directory_write_leaves_the_old_directory_and_no_scratch(tmp_path, writer):
    out = tmp_path / "out"
    with writer(out) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(NoSpaceError, match=f"no space left on {out}$"):
        with writer(out) as tmp:
            (tmp / "a").write_text("new")
            _full()()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "a").read_text() == "old"


def test_cli_full_disk_is_exit_3_with_the_path_and_no_traceback(tmp_path, tiny_world, tiny_clip, monkeypatch):
    out_json = tmp_path / "eval.json"
    monkeypatch.setattr(os, "fsync", _full())
    result = CliRunner().invoke(main, ["eval", "--shards", str(tiny_world / "test"), "--dual", tiny_clip[1].name,
                                       "--out", str(out_json)])
    assert result.exit_code == 3, result.output
    assert f"error: no space left on {out_json}" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
