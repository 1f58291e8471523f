"""The benchmark harness: its pure helpers, and `bench.run_all --quick` end to end on the tiny cache."""

from __future__ import annotations

import json

from dataclasses import replace

import pytest

from bench.cache_size import Widths, bytes_per_sample
from bench.common import Inputs, MissingInputError, check_inputs, linear_fit, markdown_table
from bench.step_time import Variant, run_interleaved


def test_linear_fit_recovers_a_line_and_scores_noise():
    fit = linear_fit([1, 2, 3, 4], [3.0, 5.0, 7.0, 9.0])
    assert fit["slope"] == pytest.approx(2.0) and fit["intercept"] == pytest.approx(1.0)
    assert fit["r2"] == pytest.approx(1.0)
    noisy = linear_fit([1, 2, 3, 4], [1.0, 3.0, 2.0, 4.0])
    assert noisy["slope"] == pytest.approx(0.8) and noisy["r2"] == pytest.approx(0.64)
    with pytest.raises(ValueError):
        linear_fit([1], [2.0])


def test_bytes_per_sample_follow_the_schema():
    # Hand count, per sample: 1 caption, 2 views, 3 tokens, 4 view params, k=5, fused 6, integrated 7, keys 10 B.
    # shards: keys 10 + text_image 4 + tokens 3*4 + view_params 2*4*4 + emb a (2*2*2 + 2*2) + emb s (2*1*2 + 1*2) = 76
    # blocks: search 4 arrays of 5 * 4 B = 80; rescore i2t/t2i itm 40 + pos/itm 4 + pos/feature 6*2 = 56;
    #         fuse 2 arrays of 5 * 4 = 40; integrate (7 + 7) * 2 = 28                                              = 204
    # The single teacher's ITC image embeddings at every view (single_itc_views "all"): emb s image 2*1*2.
    w = Widths(duals={"a": 2}, single=("s", 1), captions=1, views=2, context=3, params=4, k=5, fused=6, integrated=7,
               single_views=2)
    sizes = bytes_per_sample(w, str_bytes=10)
    assert sum(sizes.values()) == 280
    assert sizes["shards/emb/a/image"] == 8 and sizes["blocks/pos/feature"] == 12
    # The default ("first"): view 0 only, 1*1*2 = 2 B instead of 4.
    assert sum(bytes_per_sample(replace(w, single_views=1), str_bytes=10).values()) == 278
    # The default store's widths (two CLIPs 128/96, BLIP 128, 3 captions, k=11): 5,656 raw bytes, as cache-info says.
    toy = Widths(duals={"clip_a": 128, "clip_b": 96}, single=("blip", 128), captions=3, views=1, context=24, params=4,
                 k=11, fused=128, integrated=128)
    assert sum(bytes_per_sample(toy).values()) == 5656


def test_interleaved_rounds_warm_up_then_time_each_variant():
    calls: list[str] = []
    variants = [Variant("a", lambda: calls.append("a"), lambda: calls.append("wa"), 3),
                Variant("b", lambda: calls.append("b"), lambda: calls.append("wb"), 1)]
    times = run_interleaved(variants, warmup=2)
    assert calls == ["wa", "wb", "wa", "wb", "a", "b", "a", "a"]
    assert [len(times["a"]), len(times["b"])] == [3, 1]


def test_missing_store_says_what_to_run(tmp_path):
    with pytest.raises(MissingInputError, match="make data teachers cache"):
        check_inputs(Inputs(store=tmp_path / "none.zarr"))


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1.23456, None], [123456.0, "x"]]).splitlines() == [
        "| a | b |", "|---|---|", "| 1.235 | - |", "| 123,456 | x |"]


@pytest.mark.slow
def test_run_all_quick_on_the_tiny_cache(tiny_cache, tiny_world, tmp_path):
    from bench.run_all import PARTS, run_parts

    out = tmp_path / "results"
    summary = run_parts(Inputs(store=tiny_cache, shards=tiny_world / "train", out=out, quick=True, threads=1),
                        list(PARTS))
    assert all("error" not in part for part in summary["parts"].values()), summary["parts"]
    for name in PARTS:
        assert (out / f"{name}.json").exists() and (out / f"{name}.md").exists()
    for name in ("step_time", "search_scaling", "stage1_k"):
        assert (out / f"{name}.png").stat().st_size > 0
    assert "| part | figure |" in (out / "summary.md").read_text()
    size = json.loads((out / "cache_size.json").read_text())
    assert size["rows"][0]["raw_bytes_per_sample_per_view"] == size["measured"]["raw_bytes_per_sample_per_view"]
    steps = json.loads((out / "step_time.json").read_text())["settings"]
    assert set(steps) == {"toy", "realistic"}
    assert all(v["median_s"] > 0 for s in steps.values() for v in s["variants"].values())
    stage1 = json.loads((out / "stage1_k.json").read_text())["runs"]
    assert [r["k"] for r in stage1] == [1, 3] and stage1[0]["pairs_per_sample"] < stage1[1]["pairs_per_sample"]
    loading = json.loads((out / "data_loading.json").read_text())
    assert loading["student"] is not None and loading["loader"]["blocks"] == 2


def test_fused_pass_bench_checks_the_ways_agree_then_times_each(tiny_blip, tiny_world, tmp_path):
    from bench.fused_pass import VARIANTS, main

    results = main(["--blip", tiny_blip[1].name, "--shards", str(tiny_world / "train"), "--out", str(tmp_path),
                    "--rounds", "1", "--batch-size", "8", "--images", "6", "--no-edits"])
    assert results["agreement"]["itm_logits_max_abs_diff"] < 1e-4
    assert results["agreement"]["loss_terms_max_abs_diff"] < 1e-4
    assert {job: {v: len(t) for v, t in by.items()} for job, by in results["seconds"].items()} == {
        job: {v: 1 for v in VARIANTS} for job in ("train_step", "rescore")}
    assert results["settings"]["rescore_k"] == 16
    assert json.loads((tmp_path / "fused_pass.json").read_text())["speedup"] == results["speedup"]


def test_clip_block_bench_checks_the_blocks_agree_then_times_each(tmp_path):
    from bench.clip_block import SHAPES, WAYS, main

    results = main(["--out", str(tmp_path), "--rounds", "2", "--batch-size", "4"])
    assert all(diff < 1e-4 for diff in results["embedding_max_abs_diff"].values())
    assert {name: {b: len(t) for b, t in by.items()} for name, by in results["seconds"].items()} == {
        name: {w: 2 for w in WAYS} for name in SHAPES}
    assert json.loads((tmp_path / "clip_block.json").read_text())["speedup"] == results["speedup"]
    assert set(results["text_cut_speedup"]) == set(SHAPES)


def test_the_summary_lists_the_standalone_scripts_figures(tmp_path):
    from bench.run_all import standalone_figures

    figure = {"part": "search_latency", "name": "search median ms, 100k gallery", "value": 4.2, "unit": "ms",
              "target": "<= 5", "met": True}
    (tmp_path / "search_latency.json").write_text(json.dumps({"figures": [figure]}))
    assert standalone_figures(tmp_path) == [{**figure, "from": "search_latency.json"}]
    assert standalone_figures(tmp_path / "none") == []


def test_the_stage_1_figure_is_named_only_for_a_full_default_run(tmp_path):
    from bench.run_all import make_cache_figures

    run = {"summary": {"overhead_ratio": 1.04}, "passes": ["embed", "search", "rescore", "fuse", "integrate"],
           "non_default_settings": []}
    (tmp_path / "cache_run.json").write_text(json.dumps(run))
    (figure,) = make_cache_figures(tmp_path)
    assert figure["name"] == "stage-1 overhead ratio, make cache defaults" and figure["met"] is True
    (tmp_path / "cache_run.json").write_text(json.dumps({**run, "non_default_settings": ["k"],
                                                         "summary": {"overhead_ratio": 1.2}}))
    (figure,) = make_cache_figures(tmp_path)
    assert figure["name"].startswith("stage-1 overhead ratio (passes") and "k" in figure["name"]
    assert figure["met"] is None


def test_report_only_rebuilds_the_summary_from_the_parts_last_results(tmp_path):
    from bench.run_all import report_parts

    cache_size = {"part": "cache_size", "name": "cache bytes", "value": 3630, "unit": "B", "target": "<= 3700",
                  "met": True}
    (tmp_path / "cache_size.json").write_text(json.dumps({"figures": [cache_size]}))
    run = {"summary": {"overhead_ratio": 1.04}, "passes": ["embed", "search", "rescore", "fuse", "integrate"],
           "non_default_settings": []}
    (tmp_path / "cache_run.json").write_text(json.dumps(run))
    summary = report_parts(Inputs(store=tmp_path, shards=tmp_path, out=tmp_path, quick=False, threads=0),
                           ["cache_size", "step_time"])
    names = [f["name"] for f in summary["figures"]]
    assert names == ["cache bytes", "stage-1 overhead ratio, make cache defaults"]
    assert summary["parts"]["cache_size"] == {"seconds": None, "from": "cache_size.json"}
    assert "no step_time.json" in summary["parts"]["step_time"]["error"]
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["report_only"] and written["figures"] == summary["figures"]
    assert "--report-only" in (tmp_path / "summary.md").read_text()


def test_scale_figures_judge_each_goal_by_its_direction():
    from bench.scale import GOALS, figures

    results = {name: None for name in GOALS}
    results.update({"block_pass_2_tasks_identical": False, "block_pass_2_tasks_wall_ratio": 0.55,
                    "stage1_noop_teacher_speedup_2_workers": 1.2, "stage2_rss_block_8_over_block_2": 1.3})
    met = {f.name: f.met for f in figures(results)}
    assert met["block_pass_2_tasks_identical"] is False  # a bool goal is met only by that value
    assert met["block_pass_2_tasks_wall_ratio"] is True  # at most 0.6
    assert met["stage1_noop_teacher_speedup_2_workers"] is False  # at least 1.8
    assert met["stage2_rss_block_8_over_block_2"] is False
    assert met["bf16_embedding_cosine_min"] is None  # not measured: neither met nor missed
