"""Shard fingerprints hash the whole content, are remembered per user, and old stores' fingerprints still verify."""

from __future__ import annotations

import json
import os
import time

import pytest

import mcad_cache.store as store_mod
from mcad_cache.schema import SCHEMA_VERSION
from mcad_cache.sources import SourceShardsError, locate_shards, path_hints
from mcad_cache.store import (
    CacheMismatchError,
    CacheStore,
    fingerprint_cache_path,
    legacy_shard_fingerprint,
    shard_fingerprint,
    shard_fingerprints,
    source_list,
)

SIZE = 3 << 20  # larger than the legacy fingerprint's first and last MiB together


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    return tmp_path / "user-cache"


@pytest.fixture
def hashed(monkeypatch):
    """The paths whose content is read for a fingerprint, in order."""
    seen = []
    real = store_mod._content_fingerprint

    def counting(path):
        seen.append(os.path.abspath(path))
        return real(path)

    monkeypatch.setattr(store_mod, "_content_fingerprint", counting)
    return seen


def _shard(path, size: int = SIZE, age_s: float = 3600):
    """A shard last modified ``age_s`` ago (an older change than the racy window)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    _age(path, age_s)
    return path


def _age(path, age_s: float = 3600) -> None:
    when = time.time_ns() - int(age_s * 1e9)
    os.utime(path, ns=(when, when))


def _change_middle(path) -> None:
    with open(path, "r+b") as f:
        f.seek(SIZE // 2)
        byte = f.read(1)
        f.seek(SIZE // 2)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_byte_changed_in_the_middle_changes_the_fingerprint(tmp_path, user_cache):
    shard = _shard(tmp_path / "00000.tar")
    before, legacy_before = shard_fingerprint(str(shard)), legacy_shard_fingerprint(str(shard))
    assert before.startswith(f"b2:{SIZE}:")
    _change_middle(shard)
    _age(shard, 1800)  # even with an old mtime: the stat differs from the remembered one
    assert legacy_shard_fingerprint(str(shard)) == legacy_before  # what the old fingerprint missed
    assert shard_fingerprint(str(shard)) != before
    assert source_list([str(shard)])[0]["fingerprint"] == shard_fingerprint(str(shard))


def test_an_unchanged_shard_is_not_read_again(tmp_path, user_cache, hashed):
    shards = [str(_shard(tmp_path / f"{i:05d}.tar", size=4096)) for i in range(3)]
    first = shard_fingerprints(shards)
    assert hashed == shards and fingerprint_cache_path().is_file()
    assert shard_fingerprints(shards) == first and len(hashed) == 3  # all three from the cache
    with open(shards[1], "r+b") as f:
        f.write(b"changed")
    _age(shards[1])
    assert shard_fingerprints(shards) != first and hashed[3:] == [shards[1]]  # only the changed one is read


def test_a_shard_modified_just_before_it_was_hashed_is_hashed_again(tmp_path, hashed):
    shard = str(_shard(tmp_path / "00000.tar", size=4096, age_s=0))  # same stat may follow another change
    shard_fingerprint(shard)
    shard_fingerprint(shard)
    assert hashed == [shard, shard]


def test_a_corrupt_or_unwritable_cache_only_costs_a_recompute(tmp_path, user_cache, monkeypatch, hashed):
    shard = str(_shard(tmp_path / "00000.tar", size=4096))
    expected = shard_fingerprint(shard)
    fingerprint_cache_path().write_text("{not json")
    assert shard_fingerprint(shard) == expected and len(hashed) == 2
    assert json.loads(fingerprint_cache_path().read_text())["entries"]  # rewritten
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # its "mcad" directory cannot be made
    assert shard_fingerprint(shard) == expected and len(hashed) == 3
    assert blocker.read_text() == ""


def _legacy_manifest(shard, store) -> dict:
    return {"schema_version": SCHEMA_VERSION,
            "shards": [{"name": "00000", "fingerprint": legacy_shard_fingerprint(str(shard)),
                        **path_hints(shard, store)}]}


def test_an_old_format_fingerprint_still_verifies(tmp_path):
    shard = _shard(tmp_path / "data" / "00000.tar")
    store = tmp_path / "old.zarr"
    manifest = _legacy_manifest(shard, store)
    assert ":" in manifest["shards"][0]["fingerprint"] and not manifest["shards"][0]["fingerprint"].startswith("b2:")
    CacheStore.create_or_open(store, manifest)  # a store as the old code wrote it
    assert locate_shards(manifest, store) == {"00000": str(shard)}
    # `mcad cache` on the old store: this run's manifest holds the new fingerprint, and the store still opens
    run = {**manifest, "shards": [{**manifest["shards"][0], "fingerprint": shard_fingerprint(str(shard))}]}
    assert CacheStore.open(store, expected=run).manifest == manifest

    with open(shard, "r+b") as f:  # the old format still catches what it always caught
        f.write(b"changed")
    with pytest.raises(SourceShardsError, match="1 source shard.s. changed content"):
        locate_shards(manifest, store)
    with pytest.raises(CacheMismatchError, match="1 shard.s. changed content"):
        CacheStore.open(store, expected={**run, "shards": source_list([str(shard)])})


def test_a_new_store_records_and_checks_whole_content_fingerprints(tmp_path):
    shard = _shard(tmp_path / "data" / "00000.tar")
    store = tmp_path / "new.zarr"
    manifest = {"schema_version": SCHEMA_VERSION,
                "shards": [{**s, **path_hints(s["path"], store)} for s in source_list([str(shard)])]}
    CacheStore.create_or_open(store, manifest)
    assert locate_shards(manifest, store) == {"00000": str(shard)}
    _change_middle(shard)
    with pytest.raises(SourceShardsError, match="changed content"):
        locate_shards(manifest, store)
