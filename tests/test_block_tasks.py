"""The block passes over several tasks: the arrays of one task, resumed kills, and the streaming integrate pass."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mcad_cache import blocks as block_ops
from mcad_cache.config import CacheConfig
from mcad_cache.job import PASSES, run_cache
from mcad_cache.store import CacheIncompleteError, CacheStore, block_name
from mcad_core.dist import explicit_place
from store_arrays import assert_same_store

SINGLE = explicit_place(0, 1)
BLOCK_PASSES = ["search", "rescore", "fuse", "integrate"]


@pytest.fixture()
def cache_cfg(tmp_path, tiny_world, tokenizer_dir, tiny_clip, tiny_blip) -> CacheConfig:
    """Four blocks of one shard each: two per task of two."""
    return CacheConfig(
        shards=str(tiny_world / "train"), store=tmp_path / "cache.zarr", teachers_dir=None,
        dual=(tiny_clip[1].name,), single=tiny_blip[1].name, tokenizer=str(tokenizer_dir),
        source_size=32, views=2, k=5, block_shards=1, batch_size=16, itm_batch_size=40,
        integration_dim=8, integration_steps=5,
    )


def _embedded(cfg: CacheConfig, *stores: Path) -> list[CacheConfig]:
    """``cfg``'s store embedded by one task, then copied to each of ``stores``."""
    run_cache(cfg, ["embed"], SINGLE, progress=False)
    out = []
    for store in stores:
        shutil.copytree(cfg.store, store)
        out.append(replace(cfg, store=store))
    return out


def test_two_tasks_one_after_the_other_write_the_arrays_of_one_task(cache_cfg, tmp_path):
    one, two = _embedded(cache_cfg, tmp_path / "one.zarr", tmp_path / "two.zarr")
    run_cache(one, BLOCK_PASSES, SINGLE, progress=False)
    # Task 1 first: it finds task 0's blocks not fused and leaves integrate to task 0, which fuses the last block.
    first = run_cache(two, BLOCK_PASSES, explicit_place(1, 2), progress=False)
    store = CacheStore.open(two.store)
    assert [store.pass_done(block_name(i), "fuse") for i in range(4)] == [False, True, False, True]
    assert "integrate" not in first.seconds and "integration" not in store.root.attrs
    last = run_cache(two, BLOCK_PASSES, explicit_place(0, 2), progress=False)
    assert "integrate" in last.seconds
    assert_same_store(one.store, two.store)
    assert not any(p.name.startswith(".two.zarr.") for p in tmp_path.iterdir())  # no lock or scratch left
    again = run_cache(two, BLOCK_PASSES, explicit_place(1, 2), progress=False)  # all done: nothing redone
    assert again.itm_pairs == 0


def test_integrate_alone_refuses_unfused_blocks(cache_cfg):
    run_cache(cache_cfg, ["embed", "search"], SINGLE, progress=False)
    with pytest.raises(CacheIncompleteError, match="not fused"):
        run_cache(cache_cfg, ["integrate"], SINGLE, progress=False)
    assert run_cache(cache_cfg, ["integrate"], explicit_place(0, 2), progress=False).seconds == {}


def test_a_task_killed_midway_resumes_without_redoing_finished_blocks(cache_cfg, tmp_path, monkeypatch):
    clean, killed = _embedded(cache_cfg, tmp_path / "clean.zarr", tmp_path / "killed.zarr")
    run_cache(clean, BLOCK_PASSES, SINGLE, progress=False)
    calls = {"search": [], "rescore": []}
    search, rescore = block_ops.search, block_ops.rescore

    def counted_search(*args, **kwargs):
        calls["search"].append(1)
        return search(*args, **kwargs)

    def dying_rescore(plan, *args, **kwargs):
        calls["rescore"].append(len(plan))
        if die and len(calls["rescore"]) == 2:
            raise KeyboardInterrupt  # as a kill between two blocks' writes: the second block is never marked
        return rescore(plan, *args, **kwargs)

    monkeypatch.setattr(block_ops, "search", counted_search)
    monkeypatch.setattr(block_ops, "rescore", dying_rescore)
    die = True
    with pytest.raises(KeyboardInterrupt):
        run_cache(killed, BLOCK_PASSES, explicit_place(0, 2), progress=False)
    store = CacheStore.open(killed.store)
    assert [store.pass_done(block_name(i), "rescore") for i in range(4)] == [True, False, False, False]
    assert len(calls["search"]) == 2
    die = False
    calls = {"search": [], "rescore": []}
    run_cache(killed, BLOCK_PASSES, explicit_place(1, 2), progress=False)  # its blocks 1 and 3; no integrate yet
    assert len(calls["search"]) == 2 and len(calls["rescore"]) == 2
    calls = {"search": [], "rescore": []}
    resumed = run_cache(killed, BLOCK_PASSES, explicit_place(0, 2), progress=False)
    assert calls["search"] == [] and len(calls["rescore"]) == 1  # block 2 only
    assert "integrate" in resumed.seconds
    assert_same_store(clean.store, killed.store)


# Stores compared across processes are made with one torch thread each (see tests/test_cache.py).
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


def _cli(cfg: CacheConfig, *extra: str) -> list[str]:
    cfg_file = Path(str(cfg.store) + ".json")
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    return [sys.executable, "-m", "pipeline.cli", "cache", "--config", str(cfg_file), *extra]


@pytest.mark.slow
def test_two_task_processes_side_by_side_write_the_arrays_of_one_task(cache_cfg, tmp_path):
    one, two = _embedded(cache_cfg, tmp_path / "one.zarr", tmp_path / "two.zarr")
    passes = ("--passes", ",".join(BLOCK_PASSES))
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen(_cli(one, *passes), env=ONE_THREAD, **quiet)]
    procs += [subprocess.Popen(_cli(two, *passes), env=dict(ONE_THREAD, WORLD_SIZE="2", RANK=str(r)), **quiet)
              for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    assert_same_store(one.store, two.store)
    info = [dict(CacheStore.open(two.store).root["blocks"][block_name(i)].attrs) for i in range(4)]
    assert all(set(i["passes"]) == set(BLOCK_PASSES) for i in info)


def test_streaming_integrate_equals_integrating_every_feature_in_memory(cache_cfg):
    """The integrate pass (features on disk, read per batch; outputs block by block) writes what training on the
    concatenated features in memory (the pass before streaming: bench.scale_blocks.integrate_in_memory) gives."""
    from bench.scale_blocks import integrate_in_memory

    run_cache(cache_cfg, PASSES, SINGLE, progress=False)
    store = CacheStore.open(cache_cfg.store)
    model, images, texts = integrate_in_memory(store, cache_cfg)
    weights = store.root["integration"]
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(weights[key][...], value.numpy(), err_msg=key)
    rows = [store.block_group(block_name(i)) for i in range(4)]
    stored_images = np.concatenate([g["integrated/image"][...] for g in rows])
    stored_texts = np.concatenate([g["integrated/text"][...] for g in rows])
    np.testing.assert_array_equal(stored_images, images.numpy().astype(np.float16))
    np.testing.assert_array_equal(stored_texts, texts.numpy().astype(np.float16))


def test_row_files_and_spans_give_the_tensors_rows(tmp_path):
    from mcad_cache.integrate import IntegrationModule, RowFile, integrated_features, integrated_spans

    torch.manual_seed(0)
    dual, single = torch.randn(23, 6), torch.randn(23, 4)
    files = {"dual": RowFile(tmp_path / "dual.f32", 6), "single": RowFile(tmp_path / "single.f32", 4)}
    assert files["dual"][torch.tensor([], dtype=torch.long)].shape == (0, 6)
    for lo, hi in ((0, 10), (10, 11), (11, 23)):
        files["dual"].append(dual[lo:hi])
        files["single"].append(single[lo:hi])
    index = torch.tensor([22, 0, 5, 5])
    assert torch.equal(files["dual"][index], dual[index]) and torch.equal(files["single"][3:9], single[3:9])
    model = IntegrationModule(6, 4, 3).eval()
    whole, _ = integrated_features(model, dual, single, dual[:0], single[:0], batch=4)
    spans = [(0, 7), (7, 7), (7, 20), (20, 23)]
    parts = list(integrated_spans(model, "image", files["dual"], files["single"], spans, batch=4))
    assert [len(p) for p in parts] == [7, 0, 13, 3]
    assert torch.equal(torch.cat(parts), whole)
    with pytest.raises(ValueError, match="does not follow"):
        list(integrated_spans(model, "image", dual, single, [(0, 5), (6, 9)]))
