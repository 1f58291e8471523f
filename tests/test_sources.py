"""A store finds its shards and tokenizer by content, wherever they and the store now live."""

from __future__ import annotations

import os
import shutil

import pytest

from mcad_cache.sources import (
    SourceShardsError,
    TokenizerMismatchError,
    locate_shards,
    locate_tokenizer,
    path_hints,
)
from mcad_cache.store import CacheStore, manifest_differences, shard_fingerprint
from mcad_student.data import CacheBatches


def _moved_store(tmp_path, tiny_cache):
    """A copy of the tiny store; its shards stay where they were."""
    store = tmp_path / "elsewhere" / "store.zarr"
    shutil.copytree(tiny_cache, store)
    return store


def test_store_and_shards_moved_together_are_found(tmp_path):
    """The store-relative hint finds shards that moved with the store; the absolute hint no longer exists."""
    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    shard = root / "data" / "00000.tar"
    shard.write_bytes(b"x" * 2048)
    manifest = {"shards": [{"name": "00000", "fingerprint": shard_fingerprint(str(shard)),
                            **path_hints(shard, root / "cache" / "s.zarr")}]}
    moved = tmp_path / "moved"
    shutil.move(root, moved)
    assert locate_shards(manifest, moved / "cache" / "s.zarr") == {"00000": str(moved / "data" / "00000.tar")}
    with pytest.raises(SourceShardsError, match="1 source shard"):
        locate_shards(manifest, tmp_path / "cache" / "s.zarr")


def test_stage2_runs_from_another_directory_with_a_moved_store(tmp_path, tiny_cache, monkeypatch):
    store = _moved_store(tmp_path, tiny_cache)
    monkeypatch.chdir(tmp_path)
    stream = CacheBatches(os.path.relpath(store), batch_size=8, image_size=32, seed=0, fused=True)
    assert len(stream.block(0)) > 0


def test_moved_shards_are_found_with_shards_dir_and_checked(tmp_path, tiny_cache, tiny_world):
    shards = tmp_path / "new_home"
    shutil.copytree(tiny_world / "train", shards)
    stream = CacheBatches(tiny_cache, 8, 32, 0, True, shards_dir=shards)
    assert set(stream.paths.values()) == {str(p) for p in shards.glob("*.tar")}

    with open(shards / "00001.tar", "r+b") as f:  # same name, other content
        f.seek(700)
        f.write(b"changed!")
    (shards / "00002.tar").unlink()
    with pytest.raises(SourceShardsError) as err:
        CacheBatches(tiny_cache, 8, 32, 0, True, shards_dir=shards)
    assert "1 source shard(s) not found" in str(err.value) and "00002" in str(err.value)
    assert "1 source shard(s) changed content" in str(err.value) and "00001" in str(err.value)


def test_identity_ignores_where_the_data_lives(tiny_cache):
    stored = CacheStore.open(tiny_cache).manifest
    moved = {**stored,
             "shards": [{**s, "path": "/new/" + s["name"] + ".tar", "store_relative": "x"} for s in stored["shards"]],
             "tokenizer": {**stored["tokenizer"], "path": "/new/tokenizer", "store_relative": "y"}}
    assert manifest_differences(stored, moved) == []
    reordered = {**stored, "shards": stored["shards"][::-1]}
    assert manifest_differences(stored, reordered)


def test_tokenizer_is_found_by_override_and_checked_by_hash(tmp_path, tiny_cache, tokenizer_dir):
    manifest = CacheStore.open(tiny_cache).manifest
    assert manifest["tokenizer"]["local"] is True
    copy = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, copy)
    assert locate_tokenizer(manifest, tiny_cache, copy) == str(copy)
    gone = {**manifest, "tokenizer": {**manifest["tokenizer"], "path": str(tmp_path / "nowhere"),
                                       "store_relative": "../nowhere"}}
    with pytest.raises(SourceShardsError, match="--tokenizer DIR"):
        locate_tokenizer(gone, tiny_cache)
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace('"red"', '"rot"'))
    with pytest.raises(TokenizerMismatchError):
        locate_tokenizer(manifest, tiny_cache, copy)


def test_distill_refuses_changed_sources_before_the_run_directory_exists(tmp_path, tiny_cache, tiny_world):
    from click.testing import CliRunner

    from pipeline.cli import main

    shards = tmp_path / "moved_shards"
    shutil.copytree(tiny_world / "train", shards)
    with open(shards / "00000.tar", "r+b") as f:  # other images under the same keys
        f.seek(900)
        f.write(b"other pixels")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["distill", "--store", str(tiny_cache), "--out", str(out), "--shards",
                                       str(shards), "--eval-shards", str(tiny_world / "test"), "--steps", "1"])
    assert result.exit_code == 3, result.output
    assert "changed content since the store was made: 00000" in result.output
    assert not out.exists()
