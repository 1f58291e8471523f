"""The whole `mcad` chain on the quadrant world (mcad_world/quadrants.py), not the default generator's.

96px PNG images, 5 captions per image in another grammar and vocabulary, letter-prefixed keys,
``part-NNNN.tar`` shards and no ``world.json``: every command runs with its default options except
those that only make the run small and fast.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main

from mcad_world.quadrants import CAPTIONS_PER_IMAGE, IMAGE_SIZE, write_other_world


@pytest.fixture(scope="module")
def other_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("other_world")
    write_other_world(out, seed=3, n_train=64, n_val=16, n_test=16, per_shard=16)
    return out


def test_the_other_world_is_not_the_default_one(other_world):
    """Guards the point of the end-to-end test: what the default world's readers could lean on differs here."""
    from PIL import Image

    assert not (other_world / "world.json").exists()
    assert sorted(p.name for p in (other_world / "train").iterdir()) == [f"part-{i:04d}.tar" for i in range(4)]
    with tarfile.open(other_world / "test" / "part-0000.tar") as tar:
        names = tar.getnames()
        assert names[:3] == ["te00000000.json", "te00000000.png", "te00000000.txt"]
        meta = json.loads(tar.extractfile("te00000000.json").read())
        image = Image.open(tar.extractfile("te00000000.png"))
        assert (image.format, image.size) == ("PNG", (IMAGE_SIZE, IMAGE_SIZE))
        assert len(meta["captions"]) == CAPTIONS_PER_IMAGE
        assert tar.extractfile("te00000000.txt").read().decode() == meta["captions"][0]
    again = other_world.parent / "again"
    write_other_world(again, seed=3, n_train=64, n_val=16, n_test=16, per_shard=16)
    for split in ("train", "val", "test"):  # deterministic from the seed
        for shard in (other_world / split).iterdir():
            assert shard.read_bytes() == (again / split / shard.name).read_bytes()


def _ok(result, step: str) -> str:
    assert result.exit_code == 0, f"`mcad {step}` exited {result.exit_code}:\n{result.output}\n{result.exception!r}"
    return result.output


@pytest.mark.slow
def test_whole_chain_on_a_world_the_project_did_not_generate(other_world, tmp_path):
    world = other_world
    teachers, eval_json, store = tmp_path / "teachers", tmp_path / "eval.json", tmp_path / "cache.zarr"
    run, export, index = tmp_path / "run", tmp_path / "export", tmp_path / "index"
    runner = CliRunner()

    _ok(runner.invoke(main, ["teachers", "--data", str(world), "--out", str(teachers),
                             "--clip-steps", "2", "--blip-steps", "2"]), "teachers")
    report = json.loads((teachers / "teachers.json").read_text())
    assert {"tokenizer", "clip_a", "clip_b", "blip"} <= set(report)
    assert (report["n_train"], report["image_size"], report["skipped"]) == (64, IMAGE_SIZE, {})
    # no world.json names caption-edit words, so BLIP trains without edited negatives and says why
    assert report["blip_edit_negatives"].startswith("off:"), report["blip_edit_negatives"]

    _ok(runner.invoke(main, ["eval", "--teachers", str(teachers), "--shards", str(world / "test"),
                             "--out", str(eval_json)]), "eval")
    table = json.loads(eval_json.read_text())
    assert (table["n_images"], table["n_texts"]) == (16, 16 * CAPTIONS_PER_IMAGE)
    assert {"clip_a", "clip_b"} <= set(table["results"])
    assert any(row.startswith("blip") for row in table["results"])
    for metrics in table["results"].values():
        assert 0.0 <= metrics["i2t_R@1"] <= metrics["i2t_R@5"] <= metrics["i2t_R@10"] <= 100.0

    # 4 shards of 16: the default block of 4 shards and the default k=11 fit the tiny world
    _ok(runner.invoke(main, ["cache", "--teachers", str(teachers), "--shards", str(world / "train"),
                             "--store", str(store), "--summary-json", str(tmp_path / "cache_run.json")]), "cache")
    cache_run = json.loads((tmp_path / "cache_run.json").read_text())
    assert cache_run["non_default_settings"] == [] and cache_run["summary"]["overhead_ratio"] > 1.0
    info = json.loads(_ok(runner.invoke(main, ["cache-info", str(store), "--json"]), "cache-info"))
    # cache skips bad samples by default (on_error=warn): every PNG and all 5 captions of each must be in
    assert (info["samples"], info["texts"], info["skipped_samples"]) == (64, 64 * CAPTIONS_PER_IMAGE, 0)
    assert info["shards"] == {"done": 4, "failed": 0, "missing": 0}

    output = _ok(runner.invoke(main, ["distill", "--store", str(store), "--out", str(run),
                                      "--eval-shards", str(world / "test"), "--steps", "2", "--batch-size", "16",
                                      "--checkpoint-every", "1", "--teacher-table", str(eval_json)]), "distill")
    assert "| clip_a |" in output  # the teachers measured on the same shards are printed beside the student
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["skipped_samples"] == {}

    _ok(runner.invoke(main, ["export", "--student", str(run / "student"), "--out", str(export)]), "export")
    output = _ok(runner.invoke(main, ["index", "--export", str(export), "--shards", str(world / "test"),
                                      "--out", str(index)]), "index")
    assert "indexed 16 images" in output

    output = _ok(runner.invoke(main, ["search", "--index", str(index), "--query", "a teal star", "--json"]),
                 "search")
    hits = json.loads(output)["results"]
    assert len(hits) == 10  # the default k
    assert all(hit["key"].startswith("te") and len(hit["key"]) == 10 for hit in hits)
    assert len({hit["key"] for hit in hits}) == 10
    scores = [hit["score"] for hit in hits]
    assert scores == sorted(scores, reverse=True)
