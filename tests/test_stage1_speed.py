"""Stage 1 at scale: teacher precision, one render per view and size, BLIP's ITC text cut, worker processes.

Each speed-up must leave the store as it was: the default options write the same arrays, and workers
write the same store as the reader thread. Tiny random-init teachers and the tiny world (tests/conftest.py).
"""

from __future__ import annotations

import pickle
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from mcad_cache import embed
from mcad_cache.config import CacheConfig
from mcad_cache.embed import ImageTower, ReadFailure, check_precision, _image_embeddings
from mcad_cache.job import PASSES, run_cache
from mcad_cache.store import CacheMismatchError, CacheStore
from mcad_core.dist import explicit_place
from mcad_core.shards import DuplicateKeyError, NoShardsError, NotATarError, ShardReadError
from mcad_core.views import render_views, view_boxes
from store_arrays import assert_same_store
from pipeline.cli import main

SINGLE = explicit_place(0, 1)
TIMINGS = {"seconds", "read_seconds", "prepare_seconds", "teacher_seconds"}


@pytest.fixture()
def cfg(tmp_path, tiny_world, tokenizer_dir, tiny_clip, tiny_clip_b, tiny_blip) -> CacheConfig:
    """Two dual-stream teachers and the single-stream one, all 32 px, 3 views."""
    return CacheConfig(
        shards=str(tiny_world / "train"), store=tmp_path / "cache.zarr", teachers_dir=None,
        dual=(tiny_clip[1].name, tiny_clip_b[1].name), single=tiny_blip[1].name, tokenizer=str(tokenizer_dir),
        source_size=32, views=3, k=5, block_shards=2, batch_size=16, itm_batch_size=40,
        integration_dim=8, integration_steps=5,
    )


# ---------------------------------------------------------------------- 1. precision


def test_bf16_teacher_embeddings_match_fp32(cfg, tmp_path, monkeypatch, capsys):
    from mcad_cache.teachers.dual import DualStreamTeacher

    fp32 = replace(cfg, store=tmp_path / "fp32.zarr")
    bf16 = replace(cfg, store=tmp_path / "bf16.zarr", precision="amp-bf16")
    run_cache(fp32, ["embed"], SINGLE, progress=False)
    seen_dtypes = []
    encode = DualStreamTeacher.encode_images

    def spy(self, pixels):
        seen_dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return encode(self, pixels)

    monkeypatch.setattr(DualStreamTeacher, "encode_images", spy)
    run_cache(bf16, PASSES, SINGLE, progress=False)  # rescore's ITM forwards under autocast too
    assert seen_dtypes and set(seen_dtypes) == {torch.bfloat16}  # the forwards ran under bf16 autocast
    block = CacheStore.open(bf16.store).block_group("b00000")
    assert np.isfinite(block["i2t/itm"][...]).all() and np.isfinite(block["pos/feature"][...]).all()

    a, b = CacheStore.open(fp32.store), CacheStore.open(bf16.store)
    assert "precision" not in a.manifest and b.manifest["precision"] == "amp-bf16"  # fp32 stores are unchanged
    lowest = {}
    for shard in ("00000", "00001", "00002", "00003"):
        ga, gb = a.shard_group(shard), b.shard_group(shard)
        for name, array in ga["emb"].members(max_depth=None):
            if not isinstance(array, zarr.Array):
                continue
            x = array[...].astype(np.float32).reshape(-1, array.shape[-1])
            y = gb["emb"][name][...].astype(np.float32).reshape(-1, array.shape[-1])
            assert gb["emb"][name].dtype == np.float16  # stored as before
            cosine = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
            lowest[name] = min(lowest.get(name, 1.0), float(cosine.min()))
        np.testing.assert_array_equal(ga["text_tokens"][...], gb["text_tokens"][...])
    with capsys.disabled():
        print(f"\nbf16 vs fp32 embedding cosine, lowest row per array: {lowest}")
    assert min(lowest.values()) >= 0.999, lowest
    # A store keeps the precision it was begun with.
    with pytest.raises(CacheMismatchError, match="teacher precision"):
        run_cache(replace(bf16, precision="fp32"), ["embed"], SINGLE, progress=False)


def test_precision_is_checked_before_anything_loads(cfg, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a teacher was looked up before the precision was checked")

    monkeypatch.setattr(embed, "check_teachers", never)
    store = tmp_path / "out" / "fp16.zarr"
    args = ["cache", "--shards", cfg.shards, "--store", str(store), "--dual", cfg.dual[0], "--single", cfg.single,
            "--tokenizer", cfg.tokenizer, "--block-shards", "2", "-k", "5", "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "--precision", "amp-fp16"])
    assert result.exit_code == 2, result.output
    assert "precision amp-fp16 needs a CUDA device" in result.output
    assert not store.parent.exists() or list(store.parent.iterdir()) == []
    result = CliRunner().invoke(main, [*args, "--precision", "bf16"])
    assert result.exit_code == 2 and "'bf16' is not one of" in result.output
    with pytest.raises(ValueError, match="precision must be one of fp32, amp-bf16, amp-fp16"):
        replace(cfg, precision="fp16")
    with pytest.raises(embed.PrecisionUnavailableError, match="amp-fp16 needs a CUDA device"):
        check_precision("amp-fp16", "cpu")
    assert check_precision("fp32", "cpu") is None and check_precision("amp-bf16", "cpu") is torch.bfloat16


# ---------------------------------------------------------------------- 2. one render per view and size


def test_each_view_is_rendered_once_for_teachers_of_one_size(cfg, tmp_path, monkeypatch):
    rendered = []

    def counting(images, boxes, size):
        rendered.append((len(images), size))
        return render_views(images, boxes, size)

    monkeypatch.setattr(embed, "render_views", counting)
    for itc_views in ("first", "all"):
        rendered.clear()
        summary = run_cache(replace(cfg, store=tmp_path / f"{itc_views}.zarr", single_itc_views=itc_views),
                            ["embed"], SINGLE, progress=False)
        # 2 dual teachers + the single-stream one, all 32 px, 3 views: 3 renders per image, not 7 (or 9)
        assert sum(rows for rows, _ in rendered) == cfg.views * summary.samples == 3 * 64


def test_shared_renders_give_the_embeddings_of_one_render_per_tower():
    """Towers of two sizes, one embedding fewer views: the arrays a tower-by-tower loop gives, bit for bit,
    with one render per (view, batch, size)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 40, 40), dtype=torch.uint8, generator=generator)
    boxes = view_boxes([f"k{i}" for i in range(10)], 3, seed=0)
    weights = {size: torch.randn(3, 5, generator=generator) for size in (32, 24)}

    def tower(key, size, views, offset):
        return ImageTower(key, size, lambda u8: u8.float() / 255 - offset,
                          lambda px, size=size: px.mean((2, 3)) @ weights[size], 5, views)

    towers = [tower("a", 32, 3, 0.5), tower("b", 32, 3, 0.25), tower("c", 24, 1, 0.5), tower("d", 24, 3, 0.1)]
    calls = []

    def counting(images, boxes, size):
        calls.append(size)
        return render_views(images, boxes, size)

    original = embed.render_views
    embed.render_views = counting
    try:
        shared = _image_embeddings(images, boxes, towers, 4, {"seconds": 0.0})
    finally:
        embed.render_views = original
    assert len(calls) == 3 * 3 * 2  # views x batches (4 + 4 + 2 rows) x sizes
    for t in towers:
        alone = np.zeros((10, t.views, 5), dtype=np.float16)
        for view in range(t.views):
            for start in range(0, 10, 4):
                pixels = t.prepare(render_views(images[start:start + 4], torch.from_numpy(boxes[start:start + 4, view]),
                                                t.size))
                alone[start:start + 4, view] = t.encode(pixels).numpy()
        np.testing.assert_array_equal(shared[t.key], alone, err_msg=t.key)


# ---------------------------------------------------------------------- 3. BLIP's ITC text cut


def test_blip_itc_text_is_cut_to_the_longest_caption(tiny_blip, tiny_world):
    import torch.nn.functional as F

    from mcad_cache.teachers.blip import cut_padding
    from mcad_cache.teachers.single import TextBatch, load_single
    from mcad_core.shards import list_shards, load_split

    teacher = load_single(tiny_blip[1])
    captions = [c for cs in load_split(list_shards(tiny_world / "train")[:1]).captions for c in cs]
    text = teacher.tokenize(captions)
    longest = int(text.attention_mask.sum(1).max())
    assert text.input_ids.shape[1] == teacher.context_length > longest  # padded to the model's positions
    cut = cut_padding(text)
    assert cut.input_ids.shape[1] == longest and torch.equal(cut.input_ids, text.input_ids[:, :longest])
    flipped = TextBatch(text.input_ids.flip(1), text.attention_mask.flip(1))  # padding on the left: nothing cut
    assert cut_padding(flipped) is flipped
    with torch.no_grad():
        uncut = F.normalize(teacher.model.text_proj(teacher.text_states(text)[:, 0, :]), dim=-1)
        result = teacher.itc_texts(text)
    torch.testing.assert_close(result, uncut, atol=1e-6, rtol=1e-5)
    print(f"\nITC text cut {teacher.context_length} -> {longest} tokens: max abs difference "
          f"{(result - uncut).abs().max().item():.3g}, bit-identical: {torch.equal(result, uncut)}")


# ---------------------------------------------------------------------- 4. worker processes


def test_two_workers_write_the_store_one_reader_thread_writes(cfg, tmp_path):
    thread = replace(cfg, store=tmp_path / "thread.zarr", views=2)
    workers = replace(thread, store=tmp_path / "workers.zarr", workers=2)
    for c in (thread, workers):
        run_cache(c, PASSES, SINGLE, progress=False)
    assert_same_store(thread.store, workers.store)
    assert CacheStore.open(thread.store).manifest == CacheStore.open(workers.store).manifest


def test_workers_skip_and_record_bad_shards_and_repeated_keys_as_the_thread_does(cfg, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(cfg.shards, shards)
    shutil.copy(shards / "00000.tar", shards / "00002.tar")  # every key read before, in 00000
    (shards / "00003.tar").write_bytes(b"this is not a tar file" * 100)
    base = replace(cfg, shards=str(shards), views=1, k=3, on_error="warn")
    stores = {}
    for n in (0, 2):
        stores[n] = replace(base, store=tmp_path / f"w{n}.zarr", workers=n)
        run_cache(stores[n], ["embed"], SINGLE, progress=False)
    assert_same_store(stores[0].store, stores[2].store)
    statuses = [{name: {k: v for k, v in CacheStore.open(c.store).shard_status(name).items() if k not in TIMINGS}
                 for name in ("00000", "00001", "00002", "00003")} for c in stores.values()]
    assert statuses[0] == statuses[1]
    assert statuses[1]["00002"]["skipped_by_reason"] == {"duplicate_key": 16}
    assert "unreadable_shard" in statuses[1]["00003"]["failed"]
    # Under raise a worker's read error and a repeated key stop the run as the same named errors.
    strict = replace(base, store=tmp_path / "strict.zarr", workers=2, on_error="raise")
    with pytest.raises(DuplicateKeyError, match=r"00002\.tar \(key 000000000\): first read from shard .*00000\.tar"):
        run_cache(strict, ["embed"], SINGLE, progress=False)
    (shards / "00002.tar").unlink()
    with pytest.raises(NotATarError, match="00003.tar is not a tar archive"):
        run_cache(replace(strict, store=tmp_path / "strict2.zarr"), ["embed"], SINGLE, progress=False)


def test_read_errors_cross_process_boundaries_whole():
    errors = [ShardReadError("a.tar", "k1", "corrupt_image", "bad bytes"), NotATarError("b.tar", "empty file"),
              DuplicateKeyError("k2", "a.tar", "b.tar"), NoShardsError(2, "no shards", "data/x"),
              ShardReadError("c.tar", None, "unreadable_shard", "x")]
    errors[-1].args += (open(__file__, "rb"), "c.tar")  # webdataset appends its stream: not picklable as such
    try:
        for error in errors:
            back = pickle.loads(pickle.dumps(ReadFailure(error))).error
            assert type(back) is type(error) and str(back) == str(error)
            assert {k: v for k, v in vars(back).items()} == {k: v for k, v in vars(error).items()}
        assert errors[3].filename == pickle.loads(pickle.dumps(ReadFailure(errors[3]))).error.filename == "data/x"
    finally:
        errors[-1].args[-2].close()


def test_bad_worker_count_is_refused(cfg):
    with pytest.raises(ValueError, match="workers must be >= 0"):
        replace(cfg, workers=-1)
    result = CliRunner().invoke(main, ["cache", "--workers", "-2"])
    assert result.exit_code == 2 and "workers must be >= 0" in result.output


# ---------------------------------------------------------------------- 5. views rendered in the workers


def test_views_rendered_ahead_give_the_same_arrays_with_one_render_per_view_and_size(cfg, monkeypatch):
    """A worker's renders and prepared pixels (``views_ahead``), whole, cut short by the byte budget, or renders
    only: ``embed_input`` gives the arrays it gives without them, bit for bit, and each (view, batch) is still
    rendered once at the one input size, there or here."""
    from mcad_core.shards import list_shards

    run = replace(cfg, views=3, batch_size=8)  # 16 samples a shard: 2 batches x 3 views
    teachers = embed.load_teacher_set(run)
    shard = list_shards(cfg.shards)[0]
    rendered = []

    def counting(images, boxes, size):
        rendered.append(len(images))
        return render_views(images, boxes, size)

    monkeypatch.setattr(embed, "render_views", counting)
    reference, _ = embed.embed_input(embed.read_shard(shard, run, teachers), run, teachers)
    samples = len(reference["keys"])
    assert sum(rendered) == run.views * samples
    render_step = 8 * 3 * 32 * 32  # the uint8 render of one (view, batch); a tower's float32 pixels are 4x that
    for budget in (1 << 30, 12 * render_step, 3 * render_step, 0):
        for prepare in (True, False):
            rendered.clear()
            shard_input = embed.read_shard(shard, run, teachers)
            ahead = shard_input.ahead = embed.views_ahead(shard_input, run, teachers, budget, prepare)
            if budget == 0:
                assert ahead is None
            else:
                keys = list(ahead.index)
                assert keys and ahead.buffer.numel() <= budget + 64
                pixels = [isinstance(k[2], str) for k in keys]  # (view, start, tower) or (view, start, size)
                assert pixels == sorted(pixels, reverse=True)  # prepared pixels, then renders only
                if budget == 1 << 30:  # all of it: batches x (towers of each view, or views)
                    assert len(keys) == (2 * (3 + 2 + 2) if prepare else 2 * 3) and all(pixels) == prepare
                    if prepare:  # the two CLIPs share mean and std: one copy of their pixels
                        assert len({ahead.index[k][0] for k in keys}) < len(keys)
                if budget == 3 * render_step:  # 3 of the 6 renders, and no pixels
                    assert len(keys) == 3 and not any(pixels)
            arrays, _ = embed.embed_input(shard_input, run, teachers)
            assert shard_input.ahead is None and (ahead is None or not ahead.index)
            assert sum(rendered) == run.views * samples, (budget, prepare)
            assert sorted(arrays) == sorted(reference)
            for name in reference:
                np.testing.assert_array_equal(arrays[name], reference[name], err_msg=f"{name} {budget} {prepare}")


def test_workers_write_the_reader_threads_store_with_their_views_whole_or_cut_by_the_budget(cfg, tmp_path,
                                                                                             monkeypatch):
    """0, 1 and 2 workers, and 2 workers whose budget holds part of a shard's views: the same store. One
    worker over 4 shards fills its first buffer again (shard 3), once the main process has released it."""
    base = replace(cfg, views=3)
    stores = {}
    for workers in (0, 1, 2):
        stores[workers] = replace(base, store=tmp_path / f"w{workers}.zarr", workers=workers)
        run_cache(stores[workers], ["embed"], SINGLE, progress=False)
    # 16 samples x 32 px: a view's pixels are 196,608 bytes a tower and its render 49,152; 250,000 bytes a
    # shard (2 workers x 2 buffers) holds view 0's pixels (the three teachers' one copy) and view 1's render,
    # and the main process renders view 2.
    monkeypatch.setattr(embed, "WORKER_VIEW_BYTES", 4 * 250_000)
    stores["cut"] = replace(base, store=tmp_path / "cut.zarr", workers=2)
    run_cache(stores["cut"], ["embed"], SINGLE, progress=False)
    for other in (1, 2, "cut"):
        assert_same_store(stores[0].store, stores[other].store)
        assert CacheStore.open(stores[0].store).manifest == CacheStore.open(stores[other].store).manifest


def test_a_workers_view_buffers_are_filled_again_once_released(monkeypatch):
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as in a DataLoader worker
    monkeypatch.setattr(embed, "_worker_buffers", [])
    first = embed._worker_buffer(100, 1000)
    assert first.numel() == 1000 and first.is_shared() and int(first[0]) == 1
    second = embed._worker_buffer(100, 1000)  # the first is still the main process's
    assert second.data_ptr() != first.data_ptr()
    embed.ViewsAhead(first, {}).release()
    assert embed._worker_buffer(100, 1000).data_ptr() == first.data_ptr()  # filled again
    assert embed._worker_buffer(2000, 1000).numel() == 2000  # none free: a new one, and of the size needed
    assert len(embed._worker_buffers) == 2  # the oldest busy one (never released) is let go
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: None)
    assert not embed._worker_buffer(100, 1000).is_shared()  # outside a worker: a plain tensor of the size needed
