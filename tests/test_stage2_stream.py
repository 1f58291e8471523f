"""Stage-2 input that streams: encoded images decoded per batch, the next block read ahead, the store opened once."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mcad_cache.store import CacheStore
from mcad_core.shards import list_shards, load_split
from mcad_core.views import render_views
from mcad_student import data as stage2_data
from mcad_student import train as stage2_train
from mcad_student.data import CacheBatches, EncodedImages, Position, encoded_samples, trim_padding
from mcad_student.model import StudentConfig
from mcad_student.train import DistillConfig, distill

TINY_STUDENT = StudentConfig(image_model="mobilevitv2_050", image_size=32, text_layers=1, text_width=32,
                             text_heads=2, text_intermediate=64, embed_dim=16)


def _tensors(obj, prefix: str = ""):
    """(path, tensor) of every tensor in a nested batch."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{prefix}/{key}")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}/{i}")


def _assert_same_batch(a: dict, b: dict) -> None:
    ta, tb = dict(_tensors(a)), dict(_tensors(b))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key
    assert a["block"] == b["block"] and a["captions"] == b["captions"]


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mcad-read-ahead")]


@pytest.mark.parametrize("batching", ["neighbor", "random"])
def test_prefetch_gives_the_same_batches_as_reading_in_turn(tiny_cache, batching):
    kwargs = {"batch_size": 12, "image_size": 32, "seed": 3, "fused": True, "batching": batching}
    ahead, in_turn = (CacheBatches(tiny_cache, **kwargs, prefetch=p) for p in (True, False))
    n = 2 * ahead.batches_per_epoch() + 1  # across an epoch boundary
    for start in (Position(), Position(0, 4)):  # from the start, and resumed inside a block
        a, b = ahead.iter_from(start), in_turn.iter_from(start)
        for _ in range(n):
            (pa, x), (pb, y) = next(a), next(b)
            assert pa == pb
            _assert_same_batch(x, y)
        a.close()
        b.close()
    assert ahead.skipped == in_turn.skipped


def test_batches_hold_the_pixels_and_tokens_of_the_whole_block_decode(tiny_cache):
    """The old path decoded a whole block with ``load_split`` and indexed it; a batch decodes its rows only."""
    stream = CacheBatches(tiny_cache, batch_size=16, image_size=24, seed=0, fused=True)
    size = stream.manifest["preprocessing"]["source_size"]
    reference = {}
    for index, shards in enumerate(stream.manifest["search"]["blocks"]):
        block = stream.block(index)
        split = load_split([stream.paths[s] for s in shards], image_size=size, policy="warn")
        row_of = {k: i for i, k in enumerate(split.keys)}
        whole = split.images[torch.tensor([row_of[str(k)] for k in block.keys])]
        assert torch.equal(block.images[torch.arange(len(block))], whole)
        assert block.captions == [c for k in block.keys for c in split.captions[row_of[str(k)]]]
        reference[block.name] = whole
    batches = stream.iter_from(Position())
    for _ in range(stream.batches_per_epoch()):
        _, batch = next(batches)
        whole = reference[batch["block"]]
        assert torch.equal(batch["source_images"], whole[batch["rows"]])
        assert torch.equal(batch["pixels"], render_views(whole[batch["rows"]], batch["boxes"], 24))
        tokens = stream._cache[1].text_tokens.numpy().astype(np.int64)  # as the old path held them
        assert torch.equal(batch["input_ids"], trim_padding(torch.from_numpy(tokens)[batch["texts"]]))
    batches.close()


def test_encoded_images_decode_as_load_split_resizes(tiny_world):
    """Rows decoded to another size than the shards' go through the same ``square`` as ``load_split``."""
    from mcad_core.shards import ReadStats

    shard = list_shards(tiny_world / "train")[:1]
    samples = list(encoded_samples(shard, "raise", ReadStats()))
    extensions, data = zip(*(s.image for s in samples), strict=True)
    for size in (24, 40):
        images = EncodedImages(list(data), list(extensions), size)
        rows = torch.tensor([3, 0, 3, len(samples) - 1])
        assert torch.equal(images[rows], load_split(shard, image_size=size).images[rows])
    assert images.nbytes == sum(len(d) for d in data) and len(images) == len(samples)


def test_the_read_ahead_is_one_block_and_its_thread_stops(tiny_cache, monkeypatch):
    stream = CacheBatches(tiny_cache, batch_size=16, image_size=32, seed=0, fused=True)
    reads, taken = [], []
    real_read, real_take = stream.read, stream._take
    monkeypatch.setattr(stream, "read", lambda index: reads.append(len(taken)) or real_read(index))
    monkeypatch.setattr(stream, "_take", lambda index, block: taken.append(index) or real_take(index, block))
    batches = stream.iter_from(Position())
    next(batches)  # the first block's first batch: the second block is read meanwhile
    deadline = time.monotonic() + 10
    while len(reads) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(reads) == 2 and len(taken) == 1
    time.sleep(0.2)
    assert len(reads) == 2  # nothing further ahead until the next block is taken
    for _ in range(2 * stream.batches_per_epoch()):
        next(batches)
    assert all(before >= i for i, before in enumerate(reads))  # read i + 1 starts once i + 1 blocks are taken
    assert _reader_threads()
    batches.close()
    assert not _reader_threads()


def test_a_read_error_is_raised_at_its_block_and_leaves_no_thread(tiny_cache, monkeypatch):
    stream = CacheBatches(tiny_cache, batch_size=16, image_size=32, seed=0, fused=True)
    real_read = stream.read
    calls = []

    def failing(index):
        calls.append(index)
        if len(calls) == 2:
            raise OSError("disk gone")
        return real_read(index)

    monkeypatch.setattr(stream, "read", failing)
    batches = stream.iter_from(Position())
    got = [next(batches)[1]["block"] for _ in range(2)]  # the first block's two batches
    assert len(set(got)) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(batches)
    assert not _reader_threads()


def _cfg(tiny_cache, tiny_world, tmp_path, **kw) -> DistillConfig:
    base = DistillConfig(store=tiny_cache, out_dir=tmp_path / "run", student=TINY_STUDENT, steps=2, batch_size=16,
                         warmup=1, checkpoint_every=2, eval_shards=str(tiny_world / "val"), threads=1)
    return replace(base, **kw)


def test_no_reader_thread_outlives_a_run_that_finishes_or_raises(tiny_cache, tiny_world, tmp_path, monkeypatch):
    distill(_cfg(tiny_cache, tiny_world, tmp_path / "a"), progress=False)
    assert not _reader_threads()

    def broken(*args, **kwargs):
        raise RuntimeError("step failed")

    monkeypatch.setattr(stage2_train, "optimizer_step", broken)
    with pytest.raises(RuntimeError, match="step failed"):
        distill(_cfg(tiny_cache, tiny_world, tmp_path / "b"), progress=False)
    assert not _reader_threads()


def _count_lookups(monkeypatch) -> dict[str, int]:
    """Counts of ``CacheStore.open`` and ``locate_shards`` calls from here on."""
    counts = {"open": 0, "locate_shards": 0}
    real_open = CacheStore.open.__func__

    def opening(cls, *args, **kwargs):
        counts["open"] += 1
        return real_open(cls, *args, **kwargs)

    def locating(real):
        def locate(*args, **kwargs):
            counts["locate_shards"] += 1
            return real(*args, **kwargs)
        return locate

    monkeypatch.setattr(CacheStore, "open", classmethod(opening))
    for module in (stage2_train, stage2_data):
        monkeypatch.setattr(module, "locate_shards", locating(module.locate_shards))
    return counts


def test_a_run_opens_the_store_and_finds_its_shards_once(tiny_cache, tiny_world, tmp_path, monkeypatch):
    counts = _count_lookups(monkeypatch)
    distill(_cfg(tiny_cache, tiny_world, tmp_path, steps=1, checkpoint_every=1), progress=False)
    assert counts == {"open": 1, "locate_shards": 1}


def test_mcad_distill_opens_the_store_and_finds_its_shards_once(tiny_cache, tiny_world, tmp_path, monkeypatch):
    from pipeline.cli import main

    counts = _count_lookups(monkeypatch)
    config = tmp_path / "distill.json"
    config.write_text('{"student": {"image_size": 32, "text_layers": 1, "text_width": 32, "text_heads": 2, '
                      '"text_intermediate": 64, "embed_dim": 16}, "batch_size": 16, "warmup": 1, "threads": 1}')
    result = CliRunner().invoke(main, ["distill", "--config", str(config), "--store", str(tiny_cache), "--out",
                                       str(tmp_path / "cli"), "--steps", "1", "--eval-shards",
                                       str(tiny_world / "val"), "--teacher-table", str(tmp_path / "none.json")])
    assert result.exit_code == 0, result.output
    assert counts == {"open": 1, "locate_shards": 1}
