"""`mcad cache-info --lists`: how often each cached score ranks a true pair first, against hand counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from mcad_cache.list_quality import count_block, summarize, truth_table
from pipeline.cli import main

# A block of 3 images and 5 captions: captions 0, 1 -> image 0; 2 -> image 1; 3, 4 -> image 2.
TEXT_IMAGE = np.array([0, 0, 1, 2, 2])
LISTS = {
    # image anchors, 2 caption candidates each
    "i2t/ids": np.array([[2, 1], [2, 0], [0, 1]]),
    "i2t/dual": np.array([[0.9, 0.1], [0.8, 0.2], [0.5, 0.4]]),  # tops: caption 2 (no), 2 (yes), 0 (no)
    "i2t/itm": np.array([[0.1, 0.9], [0.3, 0.7], [0.5, 0.5]]),  # tops: 1 (yes), 0 (no), tie -> first: 0 (no)
    # caption anchors, 2 image candidates each
    "t2i/ids": np.array([[0, 1], [1, 2], [1, 0], [2, 1], [0, 1]]),
    "t2i/dual": np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]),  # tops: 0 1 1 2 0
}


def test_truth_table_by_hand():
    assert truth_table("i2t", LISTS["i2t/ids"], TEXT_IMAGE).tolist() == [[False, True], [True, False],
                                                                          [False, False]]
    assert truth_table("t2i", LISTS["t2i/ids"], TEXT_IMAGE).tolist() == [[True, False], [False, False],
                                                                          [True, False], [True, False],
                                                                          [False, False]]
    with pytest.raises(ValueError, match="direction"):
        truth_table("x2y", LISTS["i2t/ids"], TEXT_IMAGE)


def test_counts_and_pooled_shares_by_hand():
    counts = count_block(LISTS, TEXT_IMAGE)
    # i2t: true pair in list for images 0, 1 (image 2's candidates are image 0's captions); dual right on
    # image 1 only; itm right on image 0 only; no fused array -> no fused count.
    assert counts["i2t"] == {"anchors": 3, "in_list": 2, "top1_dual": 1, "top1_itm": 1}
    # t2i: captions 0 (image 0), 2 (image 1), 3 (image 2) have their image in the list, all at the top.
    assert counts["t2i"] == {"anchors": 5, "in_list": 3, "top1_dual": 3}
    pooled = summarize([counts, counts, {"i2t": {"anchors": 2, "in_list": 0, "top1_dual": 0, "top1_itm": 0},
                                         "t2i": {"anchors": 0, "in_list": 0, "top1_dual": 0}}])
    assert pooled["i2t"] == {"anchors": 8, "in_list": 0.5, "top1_dual": 0.25, "top1_itm": 0.25}
    assert pooled["t2i"] == {"anchors": 10, "in_list": 0.6, "top1_dual": 0.6}


def test_cache_info_lists_equals_a_recount_of_the_store(tiny_cache):
    result = CliRunner().invoke(main, ["cache-info", "--lists", str(tiny_cache)])
    assert result.exit_code == 0, result.output
    assert "true pair in list" in result.output
    report = json.loads(CliRunner().invoke(main, ["cache-info", "--lists", "--json", str(tiny_cache)]).output)
    quality = report["list_quality"]
    # the recount: every block's lists against its shards' captions, straight from the store's arrays
    root = zarr.open_group(str(tiny_cache), mode="r")
    hits = {"i2t": 0, "t2i": 0}
    anchors = {"i2t": 0, "t2i": 0}
    for index, shards in enumerate(report["manifest"]["search"]["blocks"]):
        block = root[f"blocks/b{index:05d}"]
        sizes = [root[f"shards/{s}/keys"].shape[0] for s in shards]
        text_image = np.concatenate([root[f"shards/{s}/text_image"][...] + off
                                     for s, off in zip(shards, np.cumsum([0] + sizes[:-1]))])
        i2t_ids, t2i_ids = block["i2t/ids"][...], block["t2i/ids"][...]
        for image in range(len(i2t_ids)):
            best = i2t_ids[image][int(np.argmax(block["i2t/fused"][image]))]
            hits["i2t"] += int(text_image[best] == image)
        for text in range(len(t2i_ids)):
            best = t2i_ids[text][int(np.argmax(block["t2i/fused"][text]))]
            hits["t2i"] += int(best == text_image[text])
        anchors["i2t"] += len(i2t_ids)
        anchors["t2i"] += len(t2i_ids)
    assert quality["blocks"] == len(report["manifest"]["search"]["blocks"])
    for direction in ("i2t", "t2i"):
        assert quality[direction]["anchors"] == anchors[direction]
        assert quality[direction]["top1_fused"] == round(hits[direction] / anchors[direction], 4)
        assert set(quality[direction]) == {"anchors", "in_list", "top1_dual", "top1_itm", "top1_fused"}
    assert "list_quality" not in json.loads(CliRunner().invoke(main, ["cache-info", "--json",
                                                                      str(tiny_cache)]).output)


def test_fusion_sweep_agrees_with_the_stored_scores(tiny_cache, tmp_path):
    from bench.fusion_lists import main as sweep_main

    quality = json.loads(CliRunner().invoke(main, ["cache-info", "--lists", "--json", str(tiny_cache)]).output)
    stored = quality["manifest"]["fusion"]
    out = tmp_path / "fusion.json"
    sweep_main(["--store", str(tiny_cache), "--out", str(out)])
    rows = {(r["rule"], r["a"]): r for r in json.loads(out.read_text())["rows"]}
    q = quality["list_quality"]
    for direction in ("i2t", "t2i"):
        # dual + 0 * itm ranks as the dual scores; 0 * dual + 1 * itm as the ITM scores; the store's own rule
        # and a as the fused scores it wrote
        assert rows[("itm_topk", 0.0)][f"{direction}_top1"] == q[direction]["top1_dual"]
        assert rows[("reconstruction", 0.0)][f"{direction}_top1"] == q[direction]["top1_itm"]
        assert rows[(stored["rule"], stored["a"])][f"{direction}_top1"] == q[direction]["top1_fused"]
    assert out.with_suffix(".md").read_text().startswith("# Fusion rules scored on the cached lists")


def test_fusion_sweep_refuses_a_block_without_itm_scores(tiny_cache, tmp_path):
    import shutil

    from bench.fusion_lists import sweep

    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_cache, store)
    block = zarr.open_group(str(store / "blocks" / "b00000"), mode="r+")
    passes = dict(block.attrs["passes"])
    del passes["rescore"]
    block.attrs["passes"] = passes
    with pytest.raises(SystemExit, match="b00000 has no ITM scores yet"):
        sweep(store)
