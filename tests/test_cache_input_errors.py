"""Stage 1's input errors: each is named (exit 2 for an option, 3 for an input), and leaves nothing half-made.

- an option the run would refuse later (the fusion rule's a, the device, the pixel limit) fails first;
- ``--on-error raise`` on a bad sample or a truncated tar is one clean message naming shard and key, counted
  once; a store this run created and embedded nothing into is removed;
- a shard that is no tar at all is named, not blamed on k;
- a member repeated inside one sample skips that sample only, never the whole shard;
- keys that would be paths ('/', '..', absolute) are refused;
- images over the pixel limit are refused from their header, never decoded;
- `mcad cache-info` on a missing store is a named error.
"""

from __future__ import annotations

import io
import math
import struct
import tarfile
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mcad_cache import job as cache_job
from mcad_cache.config import CacheConfig
from mcad_cache.job import run_cache
from mcad_cache.store import CacheStore
from mcad_core.dist import explicit_place
from mcad_core.shards import DEFAULT_MAX_IMAGE_PIXELS, ReadStats, ShardReadError, iter_samples
from pipeline.cli import main

SINGLE = explicit_place(0, 1)


def _jpeg(side: int = 32) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(out, format="JPEG")
    return out.getvalue()


def _huge_png_header(side: int = 12000) -> bytes:
    """A PNG whose header says ``side`` x ``side`` and whose data is an 8x8 image's: decoding it would fail."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="PNG")
    data = bytearray(out.getvalue())
    ihdr = struct.pack(">II", side, side) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _good(key: str) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", _jpeg()), (f"{key}.txt", f"a red square {key}".encode())]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of exactly these members, in this order (names webdataset's writer would refuse included)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _never(*args, **kwargs):
    raise AssertionError("teachers were loaded before the inputs were checked")


@pytest.fixture
def teachers(tokenizer_dir, tiny_clip, tiny_blip) -> list[str]:
    return ["--dual", tiny_clip[1].name, "--single", tiny_blip[1].name, "--tokenizer", str(tokenizer_dir)]


def _cache(shards: Path, store: Path, teachers: list[str], *extra: str):
    return CliRunner().invoke(main, ["cache", *teachers, "--shards", str(shards), "--store", str(store),
                                     "-k", "3", "--block-shards", "1", "--passes", "embed", *extra])


@pytest.fixture
def cfg(tmp_path, tokenizer_dir, tiny_clip, tiny_blip) -> CacheConfig:
    return CacheConfig(shards=str(tmp_path / "shards"), store=tmp_path / "cache.zarr", teachers_dir=None,
                       dual=(tiny_clip[1].name,), single=tiny_blip[1].name, tokenizer=str(tokenizer_dir),
                       source_size=32, k=3, block_shards=1, batch_size=16)


# ------------------------------------------------------- options


@pytest.mark.parametrize("option, message", [
    (["--fusion", "reconstruction", "--fusion-a", "5"], "reconstruction needs 0 <= a <= 1, got a=5.0"),
    (["--fusion-a", "nan"], "fusion_a must be a finite number"),
    (["--max-image-pixels", "0"], "max_image_pixels must be >= 1"),
    (["--device", "gpu0"], "device 'gpu0' is not a torch device"),
    (["--dual-weights", "1,-1"], "dual_weights must be >= 0 with a positive sum"),
    (["--dual-weights", "0.3,x"], "expected comma-separated numbers such as 0.3,0.7, got '0.3,x'"),
])
def test_options_the_run_would_refuse_later_fail_before_anything_is_written(tmp_path, tiny_world, monkeypatch,
                                                                            option, message):
    monkeypatch.setattr(cache_job, "load_teacher_set", _never)
    store = tmp_path / "cache.zarr"
    result = CliRunner().invoke(main, ["cache", "--shards", str(tiny_world / "train"), "--store", str(store),
                                       *option])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_cuda_fails_first(tmp_path, tiny_world, monkeypatch):
    monkeypatch.setattr(cache_job, "load_teacher_set", _never)
    result = CliRunner().invoke(main, ["cache", "--shards", str(tiny_world / "train"), "--store",
                                       str(tmp_path / "c.zarr"), "--device", "cuda:0"])
    assert result.exit_code == 2 and "CUDA is not available" in result.output
    assert list(tmp_path.iterdir()) == []


def test_auto_gives_each_task_on_a_machine_its_own_gpu(monkeypatch):
    """``auto`` is ``cuda:<local rank>`` as stage 2 reads it: torchrun's LOCAL_RANK, else Slurm's SLURM_LOCALID."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cache_job.resolve_device("auto") == "cuda:0" and cache_job.resolve_device("cpu") == "cpu"
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert cache_job.resolve_device("auto") == "cuda:2"
    monkeypatch.setenv("LOCAL_RANK", "")  # blank: unset, not "cuda:"
    assert cache_job.resolve_device("auto") == "cuda:2"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cache_job.resolve_device("auto") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cache_job.resolve_device("auto") == "cpu"


def test_the_pixel_limit_default_is_the_readers():
    assert CacheConfig().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    assert not math.isnan(CacheConfig().fusion_a)


# ------------------------------------------------------- --on-error raise


def test_raise_names_shard_and_key_and_removes_the_empty_store_it_made(tmp_path, teachers):
    shards = tmp_path / "shards"
    _tar(shards / "00000.tar", _good("k0") + [("bad.jpg", b"not a jpeg"), ("bad.txt", b"x")] + _good("k1")
         + _good("k2"))
    store = tmp_path / "cache.zarr"
    result = _cache(shards, store, teachers, "--on-error", "raise")
    assert result.exit_code == 3, result.output
    assert isinstance(result.exception, SystemExit)  # the message, not a traceback
    assert f"error: corrupt_image in shard {shards / '00000.tar'} (key bad)" in result.output
    assert not store.exists()  # created by this run, nothing embedded: removed

    # A store with an embedded shard stays: a re-run resumes it.
    _tar(shards / "00000.tar", _good("k0") + _good("k1") + _good("k2"))
    _tar(shards / "00001.tar", _good("m0") + [("bad.jpg", b"not a jpeg"), ("bad.txt", b"x")] + _good("m1")
         + _good("m2"))
    result = _cache(shards, store, teachers, "--on-error", "raise")
    assert result.exit_code == 3 and "(key bad)" in result.output and "00001.tar" in result.output
    kept = CacheStore.open(store)
    assert kept.shard_done("00000") and not kept.shard_done("00001")


def test_a_truncated_tar_under_raise_is_one_clean_message_counted_once(tmp_path, tiny_world, teachers):
    src = tiny_world / "train" / "00000.tar"
    with tarfile.open(src) as tar:
        member = tar.getmembers()[3 * 5 + 1]
    cut = tmp_path / "shards" / "00000.tar"
    cut.parent.mkdir()
    cut.write_bytes(src.read_bytes()[: member.offset_data + member.size // 2])

    stats = ReadStats()
    with pytest.raises(ShardReadError) as err:
        list(iter_samples([str(cut)], policy="raise", stats=stats))
    assert str(err.value) == f"truncated_tar in shard {cut} (key 000000005): ReadError: unexpected end of data"
    assert dict(stats.by_reason) == {"truncated_tar": 1} and len(stats.records) == len(stats.truncated) == 1

    result = _cache(cut.parent, tmp_path / "cache.zarr", teachers, "--on-error", "raise")
    assert result.exit_code == 3, result.output
    assert f"error: truncated_tar in shard {cut} (key 000000005)" in result.output
    assert "_io.BufferedReader" not in result.output and "('" not in result.output


# ------------------------------------------------------- shards that are no tar


@pytest.mark.parametrize("content, problem", [(b"", "empty file"),
                                              (bytes(range(256)) * 7, "no tar header at its start")])
@pytest.mark.parametrize("policy", ["warn", "raise"])
def test_a_shard_that_is_no_tar_is_named_not_blamed_on_k(tmp_path, teachers, monkeypatch, content, problem, policy):
    monkeypatch.setattr(cache_job, "load_teacher_set", _never)
    shard = tmp_path / "shards" / "00000.tar"
    shard.parent.mkdir()
    shard.write_bytes(content)
    store = tmp_path / "cache.zarr"
    result = _cache(shard.parent, store, teachers, "--on-error", policy)
    assert result.exit_code == 3, result.output
    assert f"shard {shard} is not a tar archive ({problem})" in result.output
    assert "k=3 exceeds" not in result.output
    assert not store.exists()


# ------------------------------------------------------- a member twice in one sample


def test_a_repeated_member_skips_its_sample_not_the_shard(cfg):
    shards = Path(cfg.shards)
    _tar(shards / "00000.tar", _good("a") + [("x.jpg", _jpeg()), ("x.txt", b"one"), ("x.txt", b"two")]
         + _good("b") + _good("c"))
    summary = run_cache(cfg, ["embed"], SINGLE, progress=False)
    status = CacheStore.open(cfg.store).shard_status("00000")
    assert "failed" not in status and summary.shards_failed == []
    assert status["samples"] == 3 and status["skipped_by_reason"] == {"duplicate_member": 1}
    assert status["skip_records"] == [[str(shards / "00000.tar"), "x", "duplicate_member"]]
    assert list(CacheStore.open(cfg.store).shard_group("00000")["keys"][...]) == ["a", "b", "c"]

    with pytest.raises(ShardReadError, match=r"duplicate_member in shard .*00000\.tar \(key x\): x\.txt appears"):
        run_cache(replace(cfg, on_error="raise", store=cfg.store.with_name("strict.zarr")), ["embed"], SINGLE,
                  progress=False)


# ------------------------------------------------------- keys that would be paths


def test_keys_that_would_be_paths_are_refused(cfg, teachers):
    shards = Path(cfg.shards)
    _tar(shards / "00000.tar", _good("a") + _good("../up") + _good("/etc/passwd") + _good("dir/k") + _good("b")
         + _good("c"))
    run_cache(cfg, ["embed"], SINGLE, progress=False)
    store = CacheStore.open(cfg.store)
    status = store.shard_status("00000")
    assert list(store.shard_group("00000")["keys"][...]) == ["a", "b", "c"]
    assert status["skipped_by_reason"] == {"unsafe_key": 3} and "failed" not in status

    result = _cache(shards, cfg.store.with_name("strict.zarr"), teachers, "--on-error", "raise")
    assert result.exit_code == 3, result.output
    assert "unsafe_key in shard" in result.output and "(key ../up)" in result.output
    assert not cfg.store.with_name("strict.zarr").exists()


# ------------------------------------------------------- the pixel limit


def test_images_over_the_pixel_limit_are_refused_from_their_header(cfg, teachers):
    shards = Path(cfg.shards)
    # The big image's data is an 8x8 image's: decoding it would fail as corrupt, so image_too_large
    # shows that only its header was read.
    _tar(shards / "00000.tar", _good("a") + [("big.png", _huge_png_header()), ("big.txt", b"huge")] + _good("b")
         + _good("c"))
    stats = ReadStats()
    assert [s.key for s in iter_samples([str(shards / "00000.tar")], policy="warn", stats=stats)] == ["a", "b", "c"]
    assert stats.records == [(str(shards / "00000.tar"), "big", "image_too_large")]

    run_cache(cfg, ["embed"], SINGLE, progress=False)
    store = CacheStore.open(cfg.store)
    assert store.shard_status("00000")["skipped_by_reason"] == {"image_too_large": 1}
    assert "max_image_pixels" not in store.manifest["preprocessing"]  # the default: stores from before still match

    small = cfg.store.with_name("small.zarr")
    result = _cache(shards, small, teachers, "--on-error", "raise", "--max-image-pixels", "1000")
    assert result.exit_code == 3, result.output
    assert "image_too_large in shard" in result.output and "(key a)" in result.output
    assert "32x32 is 1,024 pixels, over the limit of 1,000" in result.output and not small.exists()

    result = _cache(shards, small, teachers, "--max-image-pixels", "2000")
    assert result.exit_code == 0, result.output
    assert CacheStore.open(small).manifest["preprocessing"]["max_image_pixels"] == 2000


# ------------------------------------------------------- cache-info


def test_cache_info_names_a_missing_or_foreign_store(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["cache-info", str(tmp_path / "none.zarr")])
    assert missing.exit_code == 3, missing.output
    assert f"no cache store at {tmp_path / 'none.zarr'}" in missing.output
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for path, words in ((tmp_path / "empty", "is a directory but not a cache store"), (tmp_path / "file", "is a file")):
        result = runner.invoke(main, ["cache-info", str(path)])
        assert result.exit_code == 3 and words in result.output, result.output
