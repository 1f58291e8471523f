"""Stage 1 end to end on tiny teachers and shards: store contents, validation, resume, partitioning."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mcad_cache.schema import BLOCK_PASSES, SHARD_ARRAYS
from mcad_cache.store import CacheIncompleteError, CacheMismatchError, CacheStore
from mcad_cache.job import PASSES, run_cache
from mcad_cache.config import CacheConfig
from mcad_core.dist import explicit_place
from mcad_core.shards import ShardReadError
from store_arrays import assert_same_store

SINGLE = explicit_place(0, 1)


@pytest.fixture()
def cache_cfg(tmp_path, tiny_world, tokenizer_dir, tiny_clip, tiny_blip) -> CacheConfig:
    return CacheConfig(
        shards=str(tiny_world / "train"), store=tmp_path / "cache.zarr", teachers_dir=None,
        dual=(tiny_clip[1].name,), single=tiny_blip[1].name, tokenizer=str(tokenizer_dir),
        source_size=32, views=2, k=5, block_shards=2, batch_size=16, itm_batch_size=40,
        integration_dim=8, integration_steps=5,
    )


def test_cache_writes_every_array_and_the_lists_are_right(cache_cfg, tiny_clip, tiny_blip):
    summary = run_cache(cache_cfg, PASSES, SINGLE, progress=False)
    store = CacheStore.open(cache_cfg.store)
    manifest = store.manifest
    assert summary.samples == 64 and summary.shards_embedded == 4
    recorded = summary.to_dict()  # what `mcad cache --summary-json` writes
    assert recorded["overhead_ratio"] == pytest.approx(summary.wall_seconds / summary.teacher_seconds, rel=1e-3)
    assert summary.wall_seconds >= sum(summary.seconds.values()) and recorded["place"]["world_size"] == 1
    assert manifest["search"]["blocks"] == [["00000", "00001"], ["00002", "00003"]]
    dual = manifest["dual_teachers"][0]
    group = store.shard_group("00000")
    for spec in SHARD_ARRAYS:
        assert spec.path in group
    assert group["emb/" + dual + "/image"].shape == (16, 2, 16)
    single = manifest["single_teacher"]
    assert group["emb/" + single + "/image"].shape[:2] == (16, 1)  # single_itc_views "first": view 0 only
    assert np.allclose(group["view_params"][:, 0], [0, 0, 1, 1])

    # The stored view-0 embedding is the teacher's own embedding of the original image.
    from mcad_cache.teachers.dual import DualStreamTeacher
    from mcad_core.shards import list_shards, load_split

    teacher = DualStreamTeacher.load(tiny_clip[1])
    data = load_split(list_shards(cache_cfg.shards)[:1])
    expected = teacher.encode_images(teacher.pixels_from_uint8(data.images))
    np.testing.assert_allclose(group["emb/" + dual + "/image"][:, 0].astype(np.float32), expected.numpy(),
                               atol=2e-3)

    # Candidate lists of block 0 equal brute force over the block's fused dual logits.
    block = store.block_group("b00000")
    images = np.concatenate([store.shard_group(s)["emb/" + dual + "/image"][:, 0] for s in ("00000", "00001")])
    texts = np.concatenate([store.shard_group(s)["emb/" + dual + "/text"][...] for s in ("00000", "00001")])
    scale = manifest["teachers"][dual]["logit_scale"]
    logits = scale * images.astype(np.float32) @ texts.astype(np.float32).T
    np.testing.assert_allclose(block["i2t/dual"][...], -np.sort(-logits, axis=1)[:, :5], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(logits, block["i2t/ids"][...].astype(int), 1),
                               block["i2t/dual"][...], rtol=1e-4, atol=1e-4)
    # Fusion is the default itm_topk rule on the stored logits: the dual logit plus a times the ITM logit.
    assert manifest["fusion"] == {"rule": "itm_topk", "a": 1.0}
    np.testing.assert_allclose(block["t2i/fused"][...], block["t2i/dual"][...] + block["t2i/itm"][...],
                               rtol=1e-5, atol=1e-5)
    for pass_name, specs in BLOCK_PASSES.items():
        assert store.pass_done("b00000", pass_name)
        for spec in specs:
            assert spec.path in block

    # ITM logits in the lists are the single-stream teacher's own scores of those pairs.
    from mcad_cache.teachers.single import load_single

    single = load_single(tiny_blip[1])
    data = load_split(list_shards(cache_cfg.shards)[:2])
    captions = [c for cs in data.captions for c in cs]
    rows = torch.tensor([0, 5, 17])
    ids = torch.from_numpy(block["i2t/ids"][...].astype(np.int64))[rows, 0]
    with torch.no_grad():
        tokens = single.vision_tokens(single.pixels_from_uint8(data.images[rows]))
        out = single.itm(tokens, single.tokenize([captions[i] for i in ids]))
    np.testing.assert_allclose(block["i2t/itm"][...][rows.numpy(), 0], out.logits.numpy(), atol=1e-4)


def test_rerun_skips_done_work_and_other_config_is_refused(cache_cfg):
    run_cache(cache_cfg, PASSES, SINGLE, progress=False)
    again = run_cache(cache_cfg, PASSES, SINGLE, progress=False)
    assert again.shards_embedded == 0 and again.shards_skipped_done == 4 and again.itm_pairs == 0
    with pytest.raises(CacheMismatchError, match="candidate search"):
        run_cache(replace(cache_cfg, k=7), PASSES, SINGLE, progress=False)
    with pytest.raises(CacheMismatchError, match="preprocessing"):
        run_cache(replace(cache_cfg, views=1), PASSES, SINGLE, progress=False)


def test_block_passes_wait_for_every_shard(cache_cfg):
    run_cache(cache_cfg, ["embed"], explicit_place(0, 2), progress=False)
    with pytest.raises(CacheIncompleteError, match="not embedded"):
        run_cache(cache_cfg, ["search"], SINGLE, progress=False)
    with pytest.raises(ValueError, match="single-task job"):
        run_cache(cache_cfg, ["embed", "search"], explicit_place(1, 2), progress=False)


def test_changed_shard_is_refused(cache_cfg, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(cache_cfg.shards, shards)
    cfg = replace(cache_cfg, shards=str(shards))
    run_cache(cfg, ["embed"], SINGLE, progress=False)
    with open(shards / "00001.tar", "r+b") as f:
        f.seek(700)
        f.write(b"changed!")
    with pytest.raises(CacheMismatchError, match="changed content"):
        run_cache(cfg, ["embed"], SINGLE, progress=False)


# Every job a store is compared with runs in a subprocess with one torch thread:
# the thread count changes how a matrix product's sums are split, hence the last
# bit of a float, so stores are promised identical at equal thread counts.
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


def _cli(cfg: CacheConfig, *extra: str) -> list[str]:
    cfg_file = Path(str(cfg.store) + ".json")
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    return [sys.executable, "-m", "pipeline.cli", "cache", "--config", str(cfg_file), *extra]


@pytest.mark.slow
def test_two_tasks_then_block_job_equal_one_job(cache_cfg, tmp_path):
    one = replace(cache_cfg, store=tmp_path / "one.zarr")
    two = replace(cache_cfg, store=tmp_path / "two.zarr")
    subprocess.run(_cli(one), check=True, timeout=300, env=ONE_THREAD)
    env = dict(ONE_THREAD, WORLD_SIZE="2")
    procs = [subprocess.Popen(_cli(two, "--passes", "embed"), env=dict(env, RANK=str(r))) for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    subprocess.run(_cli(two, "--passes", "search,rescore,fuse,integrate"), check=True, timeout=300, env=ONE_THREAD)
    assert_same_store(one.store, two.store)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", ["embed", "rescore"])
def test_kill_9_then_rerun_equals_uninterrupted(cache_cfg, tmp_path, kill_after):
    clean = replace(cache_cfg, store=tmp_path / "clean.zarr")
    killed = replace(cache_cfg, store=tmp_path / "killed.zarr")
    subprocess.run(_cli(clean), check=True, timeout=300, env=ONE_THREAD)
    # Stop the job with SIGKILL as soon as the first unit of the chosen pass is marked done.
    proc = subprocess.Popen(_cli(killed), env=ONE_THREAD,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = "shards/00000/zarr.json" if kill_after == "embed" else "blocks/b00000/zarr.json"
    needle = '"done": true' if kill_after == "embed" else '"rescore"'
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        path = killed.store / marker
        if path.exists() and needle in path.read_text():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    subprocess.run(_cli(killed), check=True, timeout=300, env=ONE_THREAD)
    assert_same_store(clean.store, killed.store)


def test_cache_info_reports_sizes_and_missing(cache_cfg):
    from click.testing import CliRunner

    from pipeline.cli import main

    run_cache(cache_cfg, ["embed"], explicit_place(0, 2), progress=False)
    result = CliRunner().invoke(main, ["cache-info", str(cache_cfg.store)])
    assert result.exit_code == 0, result.output
    assert "2 done, 0 failed, 2 missing" in result.output
    assert "missing ['search', 'rescore', 'fuse', 'integrate']" in result.output
    report = json.loads(CliRunner().invoke(main, ["cache-info", "--json", str(cache_cfg.store)]).output)
    assert report["samples"] == 32 and report["bytes_per_sample_per_view"] > 0


def test_bad_samples_and_unreadable_shards_are_reported_not_dropped(cache_cfg, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(cache_cfg.shards, shards)
    data = (shards / "00002.tar").read_bytes()
    (shards / "00002.tar").write_bytes(data[: len(data) // 2])  # truncated mid-member
    (shards / "00003.tar").write_bytes(b"this is not a tar file" * 100)
    cfg = replace(cache_cfg, shards=str(shards), on_error="warn")
    summary = run_cache(cfg, ["embed"], SINGLE, progress=False)
    store = CacheStore.open(cfg.store)
    truncated, garbage = store.shard_status("00002"), store.shard_status("00003")
    assert truncated["done"] and 0 < truncated["samples"] < 16 and truncated["skipped"] >= 1
    assert garbage["done"] and garbage["samples"] == 0 and "unreadable_shard" in garbage["failed"]
    assert summary.skipped_samples >= 1 and summary.shards_failed == ["00003"]
    assert "FAILED shards (recorded in the store): ['00003']" in "\n".join(summary.lines())
    with pytest.raises(ShardReadError, match="00002.tar"):
        run_cache(replace(cfg, store=tmp_path / "strict.zarr", on_error="raise"), ["embed"], SINGLE, progress=False)


def test_single_itc_views_all_stores_every_view_and_view_0_is_the_same(cache_cfg, tmp_path):
    first = replace(cache_cfg, store=tmp_path / "first.zarr")
    every = replace(cache_cfg, store=tmp_path / "all.zarr", single_itc_views="all")
    for cfg in (first, every):
        run_cache(cfg, ["embed"], SINGLE, progress=False)
    a, b = CacheStore.open(first.store), CacheStore.open(every.store)
    single = a.manifest["single_teacher"]
    assert a.manifest["preprocessing"]["single_itc_views"] == "first"
    assert b.manifest["preprocessing"]["single_itc_views"] == "all"
    one, both = a.shard_group("00000")[f"emb/{single}/image"][...], b.shard_group("00000")[f"emb/{single}/image"][...]
    assert one.shape[1] == 1 and both.shape[1] == cache_cfg.views == 2
    np.testing.assert_array_equal(one[:, 0], both[:, 0])
    with pytest.raises(CacheMismatchError, match="preprocessing"):  # a store is completed only as it was begun
        run_cache(replace(every, store=first.store), ["embed"], SINGLE, progress=False)
    with pytest.raises(ValueError, match="single_itc_views"):
        replace(cache_cfg, single_itc_views="some")


def test_block_passes_run_from_the_embed_pass_input_equal_reading_the_shards_again(cache_cfg, tmp_path):
    """One task running every pass scores each block from its shards as the embed pass read them; the store
    is the one that embedding first and scoring later (the shards read a second time) writes."""
    from mcad_cache.store import block_name

    run_cache(cache_cfg, PASSES, SINGLE, progress=False)
    later = replace(cache_cfg, store=tmp_path / "later.zarr")
    run_cache(later, ["embed"], SINGLE, progress=False)
    summary = run_cache(later, [p for p in PASSES if p != "embed"], SINGLE, progress=False)
    assert set(summary.seconds) == set(PASSES) - {"embed"}
    for cfg, source in ((cache_cfg, "embed pass"), (later, "shards")):
        groups = CacheStore.open(cfg.store).root["blocks"]
        assert [groups[block_name(i)].attrs["passes"]["rescore"]["input"] for i in range(2)] == [source] * 2
    assert_same_store(cache_cfg.store, later.store)


def test_a_block_with_a_shard_embedded_before_is_scored_after_the_embed_pass(cache_cfg):
    from mcad_cache.store import block_name

    run_cache(cache_cfg, ["embed"], SINGLE, progress=False)
    store = CacheStore.open(cache_cfg.store)
    store.shard_group("00003").attrs.put({})  # as if the run had been killed before this shard was marked
    run_cache(cache_cfg, PASSES, SINGLE, progress=False)
    groups = CacheStore.open(cache_cfg.store).root["blocks"]
    assert [groups[block_name(i)].attrs["passes"]["rescore"]["input"] for i in range(2)] == ["shards", "shards"]


def test_rescore_read_ahead_equals_reading_each_block_in_turn(cache_cfg, tmp_path):
    from mcad_cache.embed import load_teacher_set
    from mcad_cache.job import CacheSummary, blocks_pass
    from mcad_cache.store import block_name

    run_cache(cache_cfg, ["embed", "search"], SINGLE, progress=False)
    plain = replace(cache_cfg, store=tmp_path / "plain.zarr")
    shutil.copytree(cache_cfg.store, plain.store)
    teachers = load_teacher_set(cache_cfg, "cpu")
    for cfg, ahead in ((cache_cfg, True), (plain, False)):  # the next block read while one is scored, or not
        store = CacheStore.open(cfg.store)
        assert len(store.manifest["search"]["blocks"]) == 2
        blocks_pass(store, cfg, teachers, "rescore", CacheSummary(str(cfg.store), SINGLE), False, read_ahead=ahead)
        assert all(store.pass_done(block_name(i), "rescore") for i in range(2))
    assert_same_store(cache_cfg.store, plain.store)


def test_rescore_input_from_joins_token_batches_of_other_widths():
    """Batches a single-stream tokenizer padded to their own longest caption are joined at the widest, the
    added positions masked out."""
    from types import SimpleNamespace

    from mcad_cache.job import rescore_input_from
    from mcad_cache.teachers.single import TextBatch
    from mcad_core.shards import SplitData

    def shard(keys, widths):
        data = SplitData(keys=keys, images=torch.zeros(len(keys), 3, 4, 4, dtype=torch.uint8),
                         captions=[["c"] for _ in keys], shard_of=["s"] * len(keys))
        batches = [TextBatch(torch.full((1, w), 7), torch.ones(1, w, dtype=torch.long)) for w in widths]
        return SimpleNamespace(data=data, teacher_tokens={"blip": batches})

    joined = rescore_input_from([shard(["a", "b"], [3, 5]), shard(["c"], [2])], "blip")
    assert joined.data.keys == ["a", "b", "c"] and joined.data.images.shape[0] == 3
    assert joined.texts.input_ids.tolist() == [[7, 7, 7, 0, 0], [7] * 5, [7, 7, 0, 0, 0]]
    assert joined.texts.attention_mask.sum(1).tolist() == [3, 5, 2] and joined.source == "embed pass"
