"""Dual weights ranked by how often they put a true pair first (mcad_cache.weighing), against counts by hand."""

import pytest
import torch

from mcad_cache import weighing

# Three images, four captions: captions 0 and 1 are image 0's, caption 2 image 1's, caption 3 image 2's.
TEXT_IMAGE = torch.tensor([0, 0, 1, 2])
# Each teacher's (image, caption) logits; with identity image embeddings the caption embeddings are the columns.
A = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0]])
B = torch.tensor([[0.0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 2]])
# By hand (ties to the lowest index):
#   A alone: i2t img0->cap0 yes, img1->cap2 yes, img2->cap1 no: 2;  t2i cap0->img0 yes, cap1->img2 no,
#            cap2->img1 yes, cap3 (all 0)->img0 no: 2
#   B alone: i2t img0->cap1 yes, img1 (all 0)->cap0 no, img2->cap3 yes: 2;  t2i cap0 (all 0)->img0 yes,
#            cap1->img0 yes, cap2 (all 0)->img0 no, cap3->img2 yes: 3
#   0.5 / 0.5: [[.5, 1, 0, 0], [0, 0, .5, 0], [0, .5, 0, 1]]: i2t 3 of 3, t2i 4 of 4
GRID = [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]
EXPECTED = [[2, 3], [3, 4], [2, 2]]


def test_simplex_grid_by_hand():
    assert weighing.simplex_grid(2, 4) == [(0, 1), (0.25, 0.75), (0.5, 0.5), (0.75, 0.25), (1, 0)]
    three = weighing.simplex_grid(3, 2)
    assert sorted(three) == sorted([(0, 0, 1), (0, 0.5, 0.5), (0, 1, 0), (0.5, 0, 0.5), (0.5, 0.5, 0), (1, 0, 0)])
    assert all(abs(sum(p) - 1) < 1e-9 for p in weighing.simplex_grid(4, 5)) and len(weighing.simplex_grid(4, 5)) == 56
    with pytest.raises(ValueError, match="at least one"):
        weighing.simplex_grid(2, 0)


@pytest.mark.parametrize("chunk", [1, 2, 1024])  # slabs that split the ties across them must count as one argmax
def test_block_top1_by_hand(monkeypatch, chunk):
    monkeypatch.setattr(weighing, "CHUNK", chunk)
    eye = torch.eye(3)
    counts = weighing.block_top1([eye, eye], [A.t(), B.t() / 2], [1.0, 2.0], TEXT_IMAGE, GRID)
    assert counts.tolist() == EXPECTED


def test_summarize_names_the_best_and_prefers_equal_weights_on_a_tie():
    report = weighing.summarize(["a", "b"], GRID, [torch.tensor(EXPECTED)], images=3, captions=4)
    assert report["best"] == [0.5, 0.5]
    assert report["rows"][0] == {"weights": [0.0, 1.0], "i2t_top1": round(2 / 3, 4), "t2i_top1": 0.75,
                                 "mean_top1": round((2 / 3 + 0.75) / 2, 4)}
    # two blocks add up; a tie between the ends and the middle keeps the middle
    tied = torch.tensor([[3, 4], [3, 4], [1, 1]])
    assert weighing.summarize(["a", "b"], GRID, [tied, tied], images=6, captions=8)["best"] == [0.5, 0.5]
    # a tie between two uneven weightings goes to the one nearer equal
    grid = [(0.0, 1.0), (0.25, 0.75), (0.5, 0.5)]
    assert weighing.summarize(["a", "b"], grid, [torch.tensor([[4, 4], [4, 4], [1, 1]])], 6, 8)["best"] == [0.25, 0.75]


def test_ranked_leaves_equal_weights_unless_the_best_passes_them_by_two_standard_errors():
    # equal (0.5, 0.5) ranks 50 of 100 images and 40 of 100 captions: margin = 2 sqrt(.5*.5/100 + .4*.6/100) / 2
    margin = (0.25 / 100 + 0.24 / 100) ** 0.5
    clear = weighing.summarize(["a", "b"], GRID, [torch.tensor([[90, 80], [50, 40], [10, 10]])], 100, 100)
    assert clear["margin"] == pytest.approx(round(margin, 4)) and clear["gain"] == pytest.approx(0.4)
    assert clear["best"] == clear["chosen"] == [0.0, 1.0]
    noise = weighing.summarize(["a", "b"], GRID, [torch.tensor([[52, 41], [50, 40], [10, 10]])], 100, 100)
    assert noise["gain"] == pytest.approx(0.015) and noise["best"] == [0.0, 1.0] and noise["chosen"] == [0.5, 0.5]
    with pytest.raises(ValueError, match="lacks equal weights"):
        weighing.summarize(["a", "b"], [(0.0, 1.0), (1.0, 0.0)], [torch.tensor([[1, 1], [1, 1]])], 2, 2)


def test_weighting_grid_adds_equal_weights_where_the_steps_miss_them():
    three = weighing.weighting_grid(3, 10)
    assert len(three) == 67 and sum(weighing._same(p, (1 / 3, 1 / 3, 1 / 3)) for p in three) == 1
    assert weighing.weighting_grid(2, 10) == weighing.simplex_grid(2, 10)


def test_cache_info_weights_agrees_with_the_stored_search(tiny_cache):
    """The store's own weighting ranks each block as its search pass did: its top-1 shares equal the share of
    list anchors whose first (highest dual logit) candidate is a true pair (`--lists`' dual column)."""
    import json

    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, ["cache-info", "--weights", "4", "--lists", "--json", str(tiny_cache)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    weighting, lists = report["dual_weighting"], report["list_quality"]
    assert [row["weights"] for row in weighting["rows"]] == [[0, 1], [0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [1, 0]]
    assert weighting["images"] == report["samples"] and weighting["captions"] == report["texts"]
    own = next(row for row in weighting["rows"] if row["weights"] == report["manifest"]["search"]["dual_weights"])
    assert own["i2t_top1"] == lists["i2t"]["top1_dual"] and own["t2i_top1"] == lists["t2i"]["top1_dual"]
    assert weighting["best"] in [row["weights"] for row in weighting["rows"]]
    assert weighting["chosen"] in (weighting["best"], [0.5, 0.5])
    text = CliRunner().invoke(main, ["cache-info", "--weights", "4", str(tiny_cache)]).output
    assert "<- best" in text and "(this store's)" in text and "mcad cache --dual-weighting ranked" in text


def test_cache_dual_weights_reach_the_manifest_normalized(tmp_path, tiny_world, tokenizer_dir, tiny_clip,
                                                          tiny_clip_b, tiny_blip):
    from click.testing import CliRunner

    from mcad_cache.store import CacheStore
    from pipeline.cli import main

    teachers = ["--dual", tiny_clip[1].name, "--dual", tiny_clip_b[1].name, "--single", tiny_blip[1].name,
                "--tokenizer", str(tokenizer_dir)]
    base = ["cache", *teachers, "--shards", str(tiny_world / "train"), "-k", "3", "--block-shards", "1",
            "--passes", "embed"]
    result = CliRunner().invoke(main, [*base, "--store", str(tmp_path / "a.zarr"), "--dual-weights", "1,3"])
    assert result.exit_code == 0, result.output
    assert CacheStore.open(tmp_path / "a.zarr").manifest["search"]["dual_weights"] == [0.25, 0.75]
    result = CliRunner().invoke(main, [*base, "--store", str(tmp_path / "b.zarr"), "--dual-weights", "1,2,3"])
    assert result.exit_code == 2 and "dual_weights has 3 entries for 2 dual teachers" in result.output
    assert not (tmp_path / "b.zarr").exists()


def test_a_ranked_store_searches_with_the_weights_it_chose_and_keeps_them(tmp_path, tiny_world, tokenizer_dir,
                                                                          tiny_clip, tiny_clip_b, tiny_blip):
    """`--dual-weighting ranked` chooses on the first block what `cache-info --weights` counts there, searches
    exactly as a store given those weights by hand, and a re-run opens the store with the same choice."""
    import json

    import numpy as np
    import zarr
    from click.testing import CliRunner

    from mcad_cache.store import CacheStore, block_name
    from pipeline.cli import main

    teachers = ["--dual", tiny_clip[1].name, "--dual", tiny_clip_b[1].name, "--single", tiny_blip[1].name,
                "--tokenizer", str(tokenizer_dir)]
    base = ["cache", *teachers, "--shards", str(tiny_world / "train"), "-k", "3", "--block-shards", "10",
            "--passes", "embed,search"]
    ranked = tmp_path / "ranked.zarr"
    result = CliRunner().invoke(main, [*base, "--store", str(ranked), "--dual-weighting", "ranked"])
    assert result.exit_code == 0, result.output
    store = CacheStore.open(ranked)
    assert store.stored_manifest["search"]["dual_weights"] == "ranked"
    chosen = store.manifest["search"]["dual_weights"]
    assert store.manifest["search"]["dual_weighting"] == "ranked" and abs(sum(chosen) - 1) < 1e-6
    # one block (block_shards 10 holds every shard): cache-info's count over the store is the first block's
    report = json.loads(CliRunner().invoke(main, ["cache-info", "--weights", "--json", str(ranked)]).output)
    assert report["dual_weighting"]["blocks"] == 1 and report["dual_weighting"]["chosen"] == chosen
    assert store.chosen_dual_weights()["rows"] == report["dual_weighting"]["rows"]
    by_hand = tmp_path / "by_hand.zarr"
    weights = ",".join(str(w) for w in chosen)
    result = CliRunner().invoke(main, [*base, "--store", str(by_hand), "--dual-weights", weights])
    assert result.exit_code == 0, result.output
    for path in ("i2t/ids", "t2i/ids", "i2t/dual", "t2i/dual"):
        a = zarr.open_group(str(ranked), mode="r")[f"blocks/{block_name(0)}/{path}"][...]
        b = zarr.open_group(str(by_hand), mode="r")[f"blocks/{block_name(0)}/{path}"][...]
        assert np.array_equal(a, b), path
    # a re-run of the same command opens the store; one that asks for equal weights is refused
    assert CliRunner().invoke(main, [*base, "--store", str(ranked), "--dual-weighting", "ranked"]).exit_code == 0
    result = CliRunner().invoke(main, [*base, "--store", str(ranked)])
    assert result.exit_code == 3 and "candidate search" in result.output
    # the first published choice stands: a later one is not written
    again = store.publish_dual_weights({"dual_weights": [1.0, 0.0], "rule": "ranked"})
    assert again["dual_weights"] == chosen and CacheStore.open(ranked).manifest["search"]["dual_weights"] == chosen
    assert not [p for p in ranked.iterdir() if p.name.startswith(".weighing")]


def test_an_unknown_dual_weighting_is_refused_by_the_config():
    from mcad_cache.config import CacheConfig

    with pytest.raises(ValueError, match="dual_weighting must be one of equal, ranked, got 'best'"):
        CacheConfig(dual_weighting="best")
