"""Writer locks: a second writer of a store or run directory is refused before it touches anything."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import mcad_cache.job as cache_job
from mcad_cache.job import PASSES
from mcad_cache.store import writer_locks
from mcad_core.errors import InputError
from mcad_core.lock import WriterBusyError, WriterLock, lock_path, main_rank_writer_lock
from pipeline.cli import main

_HOLD = """
import sys, time
from mcad_core.lock import WriterLock
lock = WriterLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def _never_load(*args, **kwargs):
    raise AssertionError("a refused run must not load teachers")


def test_a_second_holder_is_refused_with_the_holder_named(tmp_path):
    target = tmp_path / "store.zarr"
    with WriterLock(target, what=f"cache store {target}") as lock:
        record = json.loads(lock.path.read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        # flock locks belong to an open file description: a second WriterLock conflicts even in this process
        with pytest.raises(WriterBusyError) as err:
            WriterLock(target, what=f"cache store {target}").acquire()
    message = str(err.value)
    assert isinstance(err.value, InputError)
    assert f"cache store {target} is being written by pid {os.getpid()} on host {socket.gethostname()}" in message
    assert "started as `" in message and message.endswith("wait for it or stop it")
    assert not target.exists()


def test_release_removes_the_lock_file_and_the_directories_it_made(tmp_path):
    target = tmp_path / "a" / "b" / "run"
    with WriterLock(target) as lock:
        assert lock.path == lock_path(target) and lock.path.parent == target.parent
        assert lock.path.is_file()
    assert list(tmp_path.iterdir()) == []
    with WriterLock(target):  # a released lock is free again
        target.mkdir()
    assert list((tmp_path / "a" / "b").iterdir()) == [target]  # what the holder made stays


def test_a_lock_held_by_a_killed_process_is_taken_at_once(tmp_path):
    target = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(target)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WriterBusyError, match=f"pid {holder.pid} on host"):
            WriterLock(target).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdout.close()
    assert lock_path(target).exists()  # the killed holder could not clean up ...
    start = time.monotonic()
    with WriterLock(target) as lock:  # ... and its lock does not block the re-run
        assert time.monotonic() - start < 1.0
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_cache_locks_let_ranked_tasks_work_together_and_refuse_copies(tmp_path):
    store = tmp_path / "cache.zarr"
    with writer_locks(store, 0, 2, ["embed"]), writer_locks(store, 1, 2, ["embed"]):
        with pytest.raises(WriterBusyError, match=r"embed task 1 of 2"):
            with writer_locks(store, 1, 2, ["embed"]):
                pass
        with writer_locks(store, 0, 1, ["search", "rescore", "fuse", "integrate"]):  # the block job's own lock
            with pytest.raises(WriterBusyError, match=r"block passes"):
                with writer_locks(store, 0, 1, ["integrate"]):
                    pass
    with writer_locks(store, 0, 1, PASSES):  # one task doing everything takes both kinds
        with pytest.raises(WriterBusyError, match="embed task 0 of 1"):
            with writer_locks(store, 0, 1, ["embed"]):
                pass
        with pytest.raises(WriterBusyError, match="block passes"):
            with writer_locks(store, 0, 1, ["fuse"]):
                pass
    assert list(tmp_path.iterdir()) == []


def test_cli_cache_is_refused_before_it_touches_the_store(tmp_path, tiny_world, monkeypatch):
    monkeypatch.setattr(cache_job, "load_teacher_set", _never_load)
    store = tmp_path / "cache.zarr"
    with writer_locks(store, 0, 1, PASSES):
        result = CliRunner().invoke(main, ["cache", "--shards", str(tiny_world / "train"), "--store", str(store)])
        assert result.exit_code == 3, result.output
        assert f"error: cache store {store} (embed task 0 of 1) is being written by pid {os.getpid()}" in result.output
        assert "wait for it or stop it" in result.output and "Traceback" not in result.output
        assert not store.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.zarr.lock-blocks", ".cache.zarr.lock-r0of1"]


def test_cli_distill_is_refused_before_it_writes_anything(tmp_path, monkeypatch, tiny_cache, tiny_world):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    with main_rank_writer_lock(out):  # the inputs are good (a missing one is named first): the lock refuses
        result = CliRunner().invoke(main, ["distill", "--store", str(tiny_cache), "--out", str(out),
                                           "--batch-size", "8", "--device", "cpu", "--eval-shards",
                                           str(tiny_world / "val")])
    assert result.exit_code == 3, result.output
    assert f"error: run directory {out} is being written by pid {os.getpid()}" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_only_rank_zero_locks_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with main_rank_writer_lock(tmp_path / "run"):
        assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("RANK", "0")
    with main_rank_writer_lock(tmp_path / "run") as lock:
        assert isinstance(lock, WriterLock) and lock.held
