"""Shards are untrusted input: reading one runs no code, and its problems are named, not hidden.

- members the tool does not use (pickles, torch files, numpy arrays) are never decoded;
- file names found in a shard directory are opened as local files, never as pipes or urls;
- duplicate sample keys are caught in stage 1 (embed pass, and again when a block is read);
- a shard that failed under ``warn`` is retried by the next run;
- a truncated tar is reported as truncated, with what is known about the loss.
"""

from __future__ import annotations

import gzip
import io
import pickle
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mcad_cache.store import CacheStore
from mcad_cache import job as cache_job
from mcad_cache.job import PASSES, run_cache
from mcad_cache.config import CacheConfig
from mcad_core.dist import explicit_place
from mcad_core.shards import DuplicateKeyError, ReadStats, ShardReadError, iter_samples, list_shards, load_split

SINGLE = explicit_place(0, 1)


class _CreatesFileWhenLoaded:
    """Pickles to ``open(marker, "w")``: loading it creates the marker file, which is what the tests look for."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _jpeg(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(out, format="JPEG")
    return out.getvalue()


def _good(key: str, **extra: bytes) -> dict:
    return {"__key__": key, "jpg": _jpeg(), "txt": f"caption {key}".encode(), "json": b"{}", **extra}


def _write(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def _torch_bytes(obj) -> bytes:
    out = io.BytesIO()
    torch.save(obj, out)
    return out.getvalue()


def _npy_object_array() -> bytes:
    out = io.BytesIO()
    np.save(out, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return out.getvalue()


# ------------------------------------------------------- 1. only used fields are decoded


@pytest.fixture
def hostile_shard(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """One good sample carrying members each of which would create a marker file if decoded."""
    markers = {ext: tmp_path / f"decoded_{ext.replace('.', '_')}" for ext in ("pyd", "pickle", "pkl", "pth", "pyd.gz")}
    payload = {ext: pickle.dumps(_CreatesFileWhenLoaded(markers[ext])) for ext in ("pyd", "pickle", "pkl")}
    payload["pth"] = _torch_bytes(_CreatesFileWhenLoaded(markers["pth"]))
    payload["pyd.gz"] = gzip.compress(pickle.dumps(_CreatesFileWhenLoaded(markers["pyd.gz"])))
    # An object array: webdataset's .npy decoder refuses it, so decoding it would skip the good sample.
    payload["npy"] = _npy_object_array()
    shard = _write(tmp_path / "00000.tar", [_good("a", **payload), _good("b")])
    return shard, markers


def test_unused_members_are_never_decoded(hostile_shard) -> None:
    shard, markers = hostile_shard
    stats = ReadStats()
    samples = list(iter_samples([str(shard)], policy="raise", stats=stats))
    split = load_split([str(shard)], policy="raise")
    assert [s.key for s in samples] == split.keys == ["a", "b"]
    assert stats.samples_ok == 2 and stats.skipped == 0
    assert samples[0].captions == ["caption a"] and samples[0].image.mode == "RGB" and samples[0].meta == {}
    assert not [str(m) for m in markers.values() if m.exists()]


def test_used_fields_still_report_corruption(tmp_path: Path) -> None:
    shard = _write(tmp_path / "00000.tar", [
        _good("ok0"),
        {**_good("badimg"), "jpg": b"\xff\xd8 not a jpeg"},
        {**_good("badjson"), "json": b"{not json"},
        {**_good("badtxt"), "txt": b"\xff\xfe\xfa"},
        {"__key__": "onlypickle", "pyd": pickle.dumps(1)},
    ])
    stats = ReadStats()
    keys = [s.key for s in iter_samples([str(shard)], policy="warn", stats=stats)]
    assert keys == ["ok0"]
    assert set(stats.records) == {(str(shard), "badimg", "corrupt_image"), (str(shard), "badjson", "corrupt_field"),
                                  (str(shard), "badtxt", "corrupt_field"), (str(shard), "onlypickle", "missing_image")}
    with pytest.raises(ShardReadError, match="corrupt_image") as err:
        list(iter_samples([str(shard)], policy="raise"))
    assert err.value.key == "badimg"


def test_png_and_webp_images_are_rgb(tmp_path: Path) -> None:
    def encoded(fmt: str) -> bytes:
        out = io.BytesIO()
        Image.new("L", (8, 8), 90).save(out, format=fmt)
        return out.getvalue()

    shard = _write(tmp_path / "00000.tar", [{"__key__": "p", "png": encoded("PNG"), "txt": b"x"},
                                           {"__key__": "w", "webp": encoded("WEBP"), "txt": b"y"}])
    samples = list(iter_samples([str(shard)]))
    assert [(s.key, s.image.mode) for s in samples] == [("p", "RGB"), ("w", "RGB")]


# ------------------------------------------------------- 2. directory entries are local files


PIPE_NAME = "pipe:touch MARKER;cat 00000.tar;#.tar"


@pytest.fixture
def shard_dir_with_pipe_name(tmp_path: Path) -> Path:
    """00000.tar, plus a valid tar literally named like a webdataset ``pipe:`` url (with its own sample)."""
    out = tmp_path / "shards"
    out.mkdir()
    _write(out / "00000.tar", [_good("plain0")])
    _write(out / PIPE_NAME, [_good("pipefile0")])
    _write(out / "file:00000.tar", [_good("filecolon0")])  # gopen would open 00000.tar for this name
    return out


@pytest.mark.parametrize("how", ["dot", "relative", "absolute"])
def test_directory_entries_are_opened_as_local_files(shard_dir_with_pipe_name: Path, monkeypatch, how) -> None:
    directory = shard_dir_with_pipe_name
    monkeypatch.chdir(directory if how == "dot" else directory.parent)
    spec = {"dot": ".", "relative": "shards", "absolute": str(directory)}[how]
    shards = list_shards(spec)
    assert len(shards) == 3
    keys = [s.key for s in iter_samples(shards)]
    # Each file yields its own sample: nothing ran as a shell command, nothing was read in a file's place.
    assert sorted(keys) == ["filecolon0", "pipefile0", "plain0"]
    assert not (directory / "MARKER").exists() and not (directory.parent / "MARKER").exists()


def test_an_existing_local_file_is_never_run_as_a_pipe(shard_dir_with_pipe_name: Path, monkeypatch) -> None:
    monkeypatch.chdir(shard_dir_with_pipe_name)
    assert [s.key for s in iter_samples([PIPE_NAME])] == ["pipefile0"]
    assert list_shards(PIPE_NAME) and [s.key for s in iter_samples(list_shards(PIPE_NAME))] == ["pipefile0"]
    assert not Path("MARKER").exists()


def test_explicit_pipe_spec_still_works(shard_dir_with_pipe_name: Path, monkeypatch) -> None:
    """A pipe: spec the caller passes on purpose (no such file exists) is still webdataset's to open."""
    monkeypatch.chdir(shard_dir_with_pipe_name)
    assert [s.key for s in iter_samples(["pipe:cat 00000.tar"])] == ["plain0"]


# ------------------------------------------------------- stage 1 (tiny teachers)


@pytest.fixture()
def cache_cfg(tmp_path, tiny_world, tokenizer_dir, tiny_clip, tiny_blip) -> CacheConfig:
    return CacheConfig(
        shards=str(tiny_world / "train"), store=tmp_path / "cache.zarr", teachers_dir=None,
        dual=(tiny_clip[1].name,), single=tiny_blip[1].name, tokenizer=str(tokenizer_dir),
        source_size=32, views=1, k=5, block_shards=2, batch_size=16, itm_batch_size=40,
        integration_dim=8, integration_steps=5,
    )


def _copy_shards(cfg: CacheConfig, out: Path, names: list[str]) -> Path:
    out.mkdir()
    for name in names:
        shutil.copy(Path(cfg.shards) / name, out / name)
    return out


# ------------------------------------------------------- 3. duplicate keys


@pytest.fixture
def duplicate_shards(cache_cfg: CacheConfig, tmp_path: Path) -> Path:
    """00000, 00001, and 00002 = a copy of 00000: every key of 00002 was seen in 00000."""
    out = _copy_shards(cache_cfg, tmp_path / "dup", ["00000.tar", "00001.tar"])
    shutil.copy(out / "00000.tar", out / "00002.tar")
    return out


def test_duplicate_keys_across_shards_raise(cache_cfg, duplicate_shards) -> None:
    cfg = replace(cache_cfg, shards=str(duplicate_shards), on_error="raise")
    expected = r"00002\.tar \(key 000000000\): first read from shard .*00000\.tar"
    with pytest.raises(DuplicateKeyError, match=expected) as err:
        run_cache(cfg, ["embed"], SINGLE, progress=False)
    assert (err.value.key, err.value.reason) == ("000000000", "duplicate_key")


def test_duplicate_keys_are_counted_skips_under_warn(cache_cfg, duplicate_shards) -> None:
    cfg = replace(cache_cfg, shards=str(duplicate_shards), on_error="warn")
    summary = run_cache(cfg, ["embed"], SINGLE, progress=False)
    status = CacheStore.open(cfg.store).shard_status("00002")
    assert status["samples"] == 0 and status["skipped_by_reason"] == {"duplicate_key": 16}
    assert status["skipped"] == status["skipped_samples"] == 16 and summary.samples == 32
    assert summary.skipped_samples == summary.bad_samples == 16
    assert "16 skipped samples" in "\n".join(summary.lines())


def test_duplicate_key_inside_one_shard(cache_cfg, tmp_path: Path) -> None:
    out = tmp_path / "one"
    out.mkdir()
    _write(out / "00000.tar", [_good(f"k{i}") for i in range(6)] + [_good("k2")])
    cfg = replace(cache_cfg, shards=str(out), source_size=16, block_shards=1, on_error="raise")
    with pytest.raises(DuplicateKeyError, match="k2"):
        run_cache(cfg, ["embed"], SINGLE, progress=False)
    run_cache(replace(cfg, on_error="warn", store=tmp_path / "warn.zarr"), ["embed"], SINGLE, progress=False)
    store = CacheStore.open(tmp_path / "warn.zarr")
    assert list(store.shard_group("00000")["keys"][...]) == [f"k{i}" for i in range(6)]
    assert store.shard_status("00000")["skipped_by_reason"] == {"duplicate_key": 1}


def test_block_pass_catches_duplicates_between_embed_tasks(cache_cfg, tmp_path) -> None:
    # One block [00000, 00001] of two copies of one shard, embedded by two tasks: neither task sees both.
    shards = _copy_shards(cache_cfg, tmp_path / "two", ["00000.tar"])
    shutil.copy(shards / "00000.tar", shards / "00001.tar")
    cfg = replace(cache_cfg, shards=str(shards), on_error="raise")
    for rank in range(2):
        run_cache(cfg, ["embed"], explicit_place(rank, 2), progress=False)
    with pytest.raises(DuplicateKeyError, match=r"shard 00001 \(key 000000000\): first read from shard 00000") as err:
        run_cache(cfg, ["search"], SINGLE, progress=False)
    assert (err.value.key, err.value.first, err.value.second) == ("000000000", "00000", "00001")


# ------------------------------------------------------- 4. failed shards are retried


def test_failed_shard_is_retried_and_its_block_redone(cache_cfg, tmp_path, monkeypatch) -> None:
    shards = _copy_shards(cache_cfg, tmp_path / "retry", ["00000.tar", "00001.tar"])
    cfg = replace(cache_cfg, shards=str(shards), on_error="warn")
    real = cache_job.read_shard

    def flaky(shard, *args, **kwargs):
        if shard.endswith("00001.tar"):
            raise OSError("transient: the file server went away")
        return real(shard, *args, **kwargs)

    monkeypatch.setattr(cache_job, "read_shard", flaky)
    first = run_cache(cfg, ["embed", "search"], SINGLE, progress=False)  # warn: finishes with 00001 empty
    assert first.shards_failed == ["00001"]
    store = CacheStore.open(cfg.store)
    assert store.shard_status("00001")["failed"] and store.block_group("b00000")["i2t/ids"].shape[0] == 16

    monkeypatch.setattr(cache_job, "read_shard", real)
    again = run_cache(cfg, PASSES, SINGLE, progress=False)
    assert again.shards_embedded == 1 and again.shards_skipped_done == 1 and not again.shards_failed
    status = store.shard_status("00001")
    assert status["samples"] == 16 and "failed" not in status
    assert store.block_group("b00000")["i2t/ids"].shape[0] == 32  # the block was searched again, with 00001


def test_retry_checks_keys_against_a_done_shard_between(cache_cfg, tmp_path, monkeypatch) -> None:
    # 00000 and 00002 fail first; 00001 is done. On the retry 00002 (a copy of 00001) is read in a thread
    # after 00000: its keys must still be checked against 00001's, which only the store holds.
    shards = _copy_shards(cache_cfg, tmp_path / "between", ["00000.tar", "00001.tar"])
    shutil.copy(shards / "00001.tar", shards / "00002.tar")
    cfg = replace(cache_cfg, shards=str(shards), on_error="warn", block_shards=3)
    real = cache_job.read_shard

    def flaky(shard, *args, **kwargs):
        if not shard.endswith("00001.tar"):
            raise OSError("transient")
        return real(shard, *args, **kwargs)

    monkeypatch.setattr(cache_job, "read_shard", flaky)
    assert run_cache(cfg, ["embed"], SINGLE, progress=False).shards_failed == ["00000", "00002"]
    monkeypatch.setattr(cache_job, "read_shard", real)
    again = run_cache(cfg, ["embed"], SINGLE, progress=False)
    assert again.shards_embedded == 2 and again.shards_skipped_done == 1 and not again.shards_failed
    store = CacheStore.open(cfg.store)
    assert store.shard_status("00000")["samples"] == 16
    assert store.shard_status("00002")["samples"] == 0
    assert store.shard_status("00002")["skipped_by_reason"] == {"duplicate_key": 16}


# ------------------------------------------------------- 5. truncated tars


def _cut_at_header(src: Path, dst: Path, member_index: int) -> None:
    with tarfile.open(src) as tar:
        start = tar.getmembers()[member_index].offset
    dst.write_bytes(src.read_bytes()[:start])


def test_truncation_is_reported_with_samples_read(tiny_world: Path, tmp_path: Path) -> None:
    src = tiny_world / "train" / "00000.tar"
    at_header, mid_member = tmp_path / "00000.tar", tmp_path / "00001.tar"
    _cut_at_header(src, at_header, 3 * 7)  # exactly after sample 6: nothing of sample 7 is left
    with tarfile.open(src) as tar:
        member = tar.getmembers()[3 * 5 + 1]
    mid_member.write_bytes(src.read_bytes()[: member.offset_data + member.size // 2])
    stats = ReadStats()
    keys = [s.key for s in iter_samples([str(at_header), str(mid_member)], policy="warn", stats=stats)]
    assert len(keys) == 7 + 5
    [first, second] = stats.truncated
    assert (first.shard, first.samples_read, first.key, first.cut_sample) == (str(at_header), 7, "000000006", False)
    assert (second.shard, second.samples_read, second.key, second.cut_sample) == (str(mid_member), 5, "000000005",
                                                                                   True)
    # The shard-level event is not a skipped sample; the one sample cut in half is.
    assert stats.samples_skipped == 1
    assert "truncated after 7 samples" in first.describe() and "count unknown" in first.describe()
    assert "000000005" in second.describe()


def test_cache_summary_names_truncated_shards(cache_cfg, tmp_path) -> None:
    shards = _copy_shards(cache_cfg, tmp_path / "cut", ["00000.tar", "00001.tar"])
    _cut_at_header(Path(cache_cfg.shards) / "00001.tar", shards / "00001.tar", 3 * 4)
    cfg = replace(cache_cfg, shards=str(shards), on_error="warn")
    summary = run_cache(cfg, ["embed"], SINGLE, progress=False)
    status = CacheStore.open(cfg.store).shard_status("00001")
    # One skip event (the shard), no skipped sample: the unknown rest is reported as truncation, not as "1 skipped".
    assert status["samples"] == 4 and status["skipped"] == 1 and status["skipped_samples"] == 0
    assert status["truncated"]["samples_read"] == 4 and "count unknown" in status["truncated"]["message"]
    text = "\n".join(summary.lines())
    assert "0 skipped samples" in text
    assert "TRUNCATED" in text and "00001.tar truncated after 4 samples" in text
