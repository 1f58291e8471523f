"""clip_benchmark's webdataset retrieval layout, and the clip_benchmark-vs-`mcad eval` check on a tiny student."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from bench.clip_benchmark_check import clip_benchmark_recalls, hit_bounds, main
from mcad_student.model import StudentConfig, build_student, save_student
from mcad_core.evaluation import flat_captions
from mcad_core.retrieval import dual_stream_ranks, recall_table
from mcad_core.shards import SplitData, iter_samples, list_shards
from pipeline.wds_retrieval import DATASET_TYPE, NSHARDS, SOURCE_JSON, caption_text, write_retrieval_layout

build_wds_dataset = pytest.importorskip("clip_benchmark.datasets.builder").build_wds_dataset

SIZE = 32  # the tiny world's image size (tests/conftest.py)
TINY = StudentConfig(image_model="test_convnext", image_size=SIZE, text_layers=1, text_width=32, text_heads=2,
                     text_intermediate=64, embed_dim=16, context_length=16)


def _read_back(root: Path, split: str = "test") -> list[tuple]:
    """The layout as clip_benchmark itself reads it: (PIL image, [captions]) per sample."""
    return list(build_wds_dataset("mcad", transform=None, split=split, data_dir=str(root)))


def test_layout_round_trips_images_and_captions(tiny_world, tmp_path):
    shards = list_shards(tiny_world / "test")
    summary = write_retrieval_layout(shards, tmp_path / "wds", max_count=5)
    source = list(iter_samples(shards))
    assert (summary["n_images"], summary["n_shards"]) == (len(source), -(-len(source) // 5))
    assert summary["n_texts"] == sum(len(s.captions) for s in source)
    assert (tmp_path / "wds" / DATASET_TYPE).read_text().strip() == "retrieval"
    assert int((tmp_path / "wds" / "test" / NSHARDS).read_text()) == summary["n_shards"]
    assert json.loads((tmp_path / "wds" / SOURCE_JSON).read_text())["n_images"] == len(source)

    read = _read_back(tmp_path / "wds")
    assert len(read) == len(source)
    assert any(len(s.captions) > 1 for s in source)  # several captions per image survive as several captions
    for sample, (image, captions) in zip(source, read, strict=True):
        assert captions == sample.captions
        assert image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(sample.image.convert("RGB")))
    sidecars = [s["json"] for s in wds.WebDataset(str(tmp_path / "wds" / "test" / "{0..3}.tar"), shardshuffle=False)
                .decode()]
    assert [m["key"] for m in sidecars] == [s.key for s in source]


def test_captions_clip_benchmark_would_split_are_refused():
    assert caption_text(["a red circle", "a blue square"]) == "a red circle\na blue square"
    for bad in ("two\nlines", "carriage\rreturn", "line\u2028separator", "next\x85line", ""):
        with pytest.raises(ValueError, match="line boundary"):
            caption_text(["fine", bad], key="k1")
    with pytest.raises(ValueError, match="no caption"):
        caption_text([], key="k1")


def test_a_failed_write_keeps_the_previous_layout(tiny_world, tmp_path):
    out = tmp_path / "wds"
    write_retrieval_layout(list_shards(tiny_world / "test"), out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    bad = tmp_path / "bad" / "00000.tar"
    bad.parent.mkdir()
    with wds.TarWriter(str(bad)) as sink:
        sink.write({"__key__": "000000001", "png": np.zeros((8, 8, 3), np.uint8),
                    "json": {"captions": ["split\nin two"]}})
    with pytest.raises(ValueError, match="000000001"):
        write_retrieval_layout([str(bad)], out)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert len(_read_back(out)) == 16


def test_hit_bounds_span_the_tie_rules():
    # Image 0 and image 1 share an identical caption (texts 0 and 2); text 1 belongs to image 0, text 3 to image 2.
    image_emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]), dim=-1)
    text_emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [-1.0, 0.0], [1.0, 0.05], [0.0, 1.0]]),
                                             dim=-1)
    image_of = torch.tensor([0, 0, 1, 2])
    exact = hit_bounds(image_emb, text_emb, image_of, ks=(1, 2), eps=0.0)
    # Image queries 0 and 1 each tie their shared caption with the other's copy: at k=1 a tie rule decides.
    assert exact["i2t_R@1"] == {"n": 3, "fewest": 1, "most": 3, "mcad_rule": 1, "undecided": 2,
                                "undecided_queries": [0, 1]}
    assert exact["i2t_R@2"]["fewest"] == exact["i2t_R@2"]["most"] == 3
    # mcad's rule on these embeddings is exactly mcad eval's recall.
    split = SplitData(keys=["a", "b", "c"], images=torch.zeros(3, 3, 1, 1, dtype=torch.uint8),
                      captions=[["x", "y"], ["x"], ["z"]], shard_of=["s"] * 3)
    assert torch.equal(flat_captions(split)[1], image_of)
    table = recall_table(*dual_stream_ranks(image_emb, text_emb, image_of), ks=(1, 2))
    for name in ("i2t_R@1", "i2t_R@2", "t2i_R@1", "t2i_R@2"):
        assert table[name] == pytest.approx(100.0 * exact[name]["mcad_rule"] / exact[name]["n"])
    # clip_benchmark's own recall code lands inside the range (torch.topk breaks the ties one way or the other).
    theirs = clip_benchmark_recalls(image_emb, text_emb, image_of, ks=(1, 2))
    for ours, name in (("i2t_R@1", "text_retrieval_recall@1"), ("t2i_R@1", "image_retrieval_recall@1")):
        assert exact[ours]["fewest"] <= round(theirs[name] * exact[ours]["n"]) <= exact[ours]["most"]
    # A score margin widens the range to near-ties.
    loose = hit_bounds(image_emb, text_emb, image_of, ks=(1,), eps=1.0)
    assert loose["t2i_R@1"]["fewest"] <= exact["t2i_R@1"]["fewest"] <= exact["t2i_R@1"]["most"] \
        <= loose["t2i_R@1"]["most"]


@pytest.mark.slow
def test_clip_benchmark_matches_mcad_eval_on_a_tiny_student(tiny_world, tokenizer_dir, tmp_path):
    torch.manual_seed(0)
    student = build_student(TINY, tokenizer_dir, tmp_path / "work").eval()
    save_student(student, tokenizer_dir, tmp_path / "student")
    code = main(["--student", str(tmp_path / "student"), "--shards", str(tiny_world / "test"),
                 "--work", str(tmp_path / "work_cb"), "--out", str(tmp_path / "results"), "--threads", "1"])
    result = json.loads((tmp_path / "results" / "clip_benchmark.json").read_text())
    assert code == 0, result["problems"]
    assert result["verdict"] == "match"
    inputs = result["inputs"]
    assert inputs["captions_identical"] and inputs["token_ids_identical"]
    assert inputs["pixels_max_abs_diff"] == 0.0
    assert inputs["n_images"] == {"clip_benchmark": 16, "mcad": 16}
    assert inputs["score_max_abs_diff"] <= 1e-6
    assert result["clip_benchmark_code_on_replicated_embeddings"] == result["clip_benchmark_raw"]
    assert {r["metric"] for r in result["rows"]} == {"mean_recall", *(f"{d}_R@{k}" for d in ("i2t", "t2i")
                                                                       for k in (1, 5, 10))}
    assert "--no_amp" in result["commands"]["clip_benchmark"]
    assert (tmp_path / "results" / "clip_benchmark.md").read_text().startswith("# clip_benchmark vs `mcad eval`")


def test_compare_flags_a_recall_outside_the_tie_range():
    from bench.clip_benchmark_check import PAIRS, compare

    bounds = {name: {"n": 10, "fewest": 4, "most": 5, "undecided": 1, "mcad_rule": 4} for name in PAIRS}
    mcad = {name: 40.0 for name in PAIRS} | {"mean_recall": 40.0}
    within = {theirs: 0.5 for theirs in PAIRS.values()}  # 5 of 10: a tie broken the other way
    rows = compare(mcad, within, bounds, bounds)
    assert all(r["ok"] for r in rows) and rows[0]["abs_diff"] == pytest.approx(10.0)
    outside = dict(within, **{"text_retrieval_recall@5": 0.6})
    rows = compare(mcad, outside, bounds, bounds)
    assert [r["metric"] for r in rows if not r["ok"]] == ["i2t_R@5", "mean_recall"]
