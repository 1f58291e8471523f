"""`mcad cache` refuses bad options before any teacher runs, and a refused run leaves nothing on disk."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mcad_cache import job as cache_job
from mcad_cache.job import _count_images, check_k_fits_blocks
from pipeline.cli import main
from mcad_core.shards import list_shards


def _never_load(*args, **kwargs):
    raise AssertionError("teachers were loaded before the options were checked")


@pytest.mark.parametrize("option, message", [
    (["-k", "0"], "k must be >= 1"),
    (["-k", "-3"], "k must be >= 1"),
    (["--views", "0"], "views must be >= 1"),
    (["--block-shards", "0"], "block_shards must be >= 1"),
    (["-k", "100"], "k=100 exceeds the 32 images of the candidate block [00000.tar, 00001.tar]"),
    (["--fusion", "recontruction"], "unknown fusion rule 'recontruction'"),
])
def test_bad_options_fail_before_work_and_create_nothing(tmp_path, tiny_world, monkeypatch, option, message):
    monkeypatch.setattr(cache_job, "load_teacher_set", _never_load)
    store = tmp_path / "cache.zarr"
    result = CliRunner().invoke(main, ["cache", "--shards", str(tiny_world / "train"), "--store", str(store),
                                       "--block-shards", "2", *option])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not store.exists() and list(tmp_path.iterdir()) == []


def test_config_file_values_are_checked_too(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_job, "load_teacher_set", _never_load)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"views": -1, "view_scale": [0.9, 0.5]}))
    result = CliRunner().invoke(main, ["cache", "--config", str(config)])
    assert result.exit_code == 2
    assert "views must be >= 1" in result.output and "view_scale" in result.output


def test_k_is_counted_from_tar_headers_per_block(tiny_world):
    shards = list_shards(tiny_world / "train")  # 4 shards of 16 images
    check_k_fits_blocks(shards, 16, 1)
    with pytest.raises(ValueError, match="k=17 exceeds the 16 images"):
        check_k_fits_blocks(shards, 17, 1)
    check_k_fits_blocks(shards, 64, 4)
    with pytest.raises(ValueError, match="k=65 exceeds the 64 images"):
        check_k_fits_blocks(shards, 65, 4)
    assert [_count_images(shards[0], stop_at=n) for n in (None, 3, 0, 99)] == [16, 3, 0, 16]


def test_source_size_defaults_to_the_largest_teacher_input(tmp_path, tiny_world, tokenizer_dir, tiny_clip, tiny_blip):
    """Images are kept at the teachers' own input size unless the config says otherwise."""
    from mcad_cache.job import run_cache
    from mcad_cache.config import CacheConfig
    from mcad_core.dist import explicit_place

    from mcad_cache.store import CacheStore

    cfg = CacheConfig(shards=str(tiny_world / "train"), store=tmp_path / "c.zarr", teachers_dir=None,
                      dual=(tiny_clip[1].name,), single=tiny_blip[1].name, tokenizer=str(tokenizer_dir),
                      k=5, block_shards=2, batch_size=16)
    assert cfg.source_size is None
    run_cache(cfg, ["embed"], explicit_place(0, 1), progress=False)
    assert CacheStore.open(cfg.store).manifest["preprocessing"]["source_size"] == 32
