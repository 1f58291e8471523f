"""The ablation report: per-row mean ± sd and the per-seed paired comparisons the README's goals name."""

from __future__ import annotations

import pytest

from pipeline.ablation import aggregate, markdown, paired


def _row(mode: str, by_seed: dict[int, float]) -> dict:
    runs = [{"seed": seed, "recalls": {m: value for m in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5",
                                                             "t2i_R@10", "mean_recall")},
             "seconds": 10.0, "steps_per_second": 2.0, "parameters": 1000} for seed, value in by_seed.items()]
    return {"mode": mode, "online": False, "runs": runs}


def test_paired_differences_by_seed_against_hand_computed_values():
    results = {"a": _row("contrastive", {0: 50.0, 1: 52.0, 2: 48.0}),
               "b": _row("dual_kd", {0: 51.0, 1: 55.0, 2: 48.5}),
               "d": _row("mcad", {0: 56.0, 1: 57.0, 2: 55.0})}
    pairs = {(p["row"], p["against"]): p for p in paired(results)}
    assert set(pairs) == {("b", "a"), ("d", "a"), ("d", "b")}
    d_a = pairs[("d", "a")]
    assert d_a["diffs"] == [6.0, 5.0, 7.0] and d_a["mean"] == pytest.approx(6.0) and d_a["sd"] == pytest.approx(1.0)
    assert pairs[("b", "a")]["wins"] == 3 and pairs[("d", "b")]["diffs"] == [5.0, 2.0, 6.5]
    table = aggregate(results)
    assert table[0]["mean_recall"] == pytest.approx(50.0) and table[0]["mean_recall_sd"] == pytest.approx(2.0)
    text = markdown(table, "note", paired(results))
    assert "| (d) | (a) | +6.0, +5.0, +7.0 | +6.0 ± 1.0 | 3/3 |" in text


def test_only_seeds_both_rows_ran_are_paired():
    results = {"a": _row("contrastive", {0: 50.0, 1: 52.0}), "c": _row("fused_kd", {1: 53.0, 2: 60.0})}
    (pair,) = paired(results)
    assert pair["seeds"] == [1] and pair["diffs"] == [1.0] and pair["sd"] == 0.0


def _finished(run_dir, cfg, summary: dict) -> None:
    import json

    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))


def test_report_only_collects_finished_runs_and_trains_nothing(tmp_path, monkeypatch):
    from dataclasses import replace

    from mcad_student import train
    from pipeline.ablation import run_ablation

    def no_training(*args, **kwargs):
        raise AssertionError("report_only must not train")

    monkeypatch.setattr(train, "distill", no_training)
    base = train.DistillConfig()
    summary = {"seed": 0, "recalls": {"mean_recall": 50.0}}
    run = tmp_path / "a_contrastive_s0"
    _finished(run, replace(base, mode="contrastive", seed=0, out_dir=run, threads=2), summary)  # threads: ignored
    (tmp_path / "b_dual_kd_s0").mkdir()  # started, not finished: left out
    results = run_ablation(base, tmp_path, (0, 1), ("a", "b"), report_only=True)
    assert list(results) == ["a"] and results["a"]["runs"] == [summary]


def test_a_finished_row_with_other_settings_is_refused_before_any_training(tmp_path, monkeypatch):
    from dataclasses import replace

    from mcad_student import train
    from mcad_student.losses import LossWeights
    from pipeline.ablation import StaleRowError, run_ablation

    def no_training(*args, **kwargs):
        raise AssertionError("nothing may train before every finished row is checked")

    monkeypatch.setattr(train, "distill", no_training)
    base = train.DistillConfig()
    run = tmp_path / "c_fused_kd_s0"  # trained with kd on image-to-text rows, the default before
    _finished(run, replace(base, mode="fused_kd", seed=0, out_dir=run, loss=LossWeights(kd_direction="i2t")),
              {"seed": 0, "recalls": {"mean_recall": 50.0}})
    with pytest.raises(StaleRowError, match="loss"):
        run_ablation(base, tmp_path, (0,), ("b", "c"))
    contrastive = tmp_path / "a_contrastive_s0"  # kd settings it never read do not make it stale
    _finished(contrastive, replace(base, mode="contrastive", seed=0, out_dir=contrastive,
                                   loss=LossWeights(alpha=1.0, kd_direction="both")), {"seed": 0})
    assert run_ablation(base, tmp_path, (0,), ("a",), report_only=True)["a"]["runs"] == [{"seed": 0}]
    (run / "config.json").unlink()
    with pytest.raises(StaleRowError, match="no config.json"):
        run_ablation(base, tmp_path, (0,), ("b", "c"))
