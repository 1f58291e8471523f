"""bench/regime.py: the regime figures from run summaries, checked by hand."""

from __future__ import annotations

import json

import pytest

from bench.regime import regime


def _run(root, mode, seed, mean_recall, params=1000):
    out = root / f"{mode}_s{seed}"
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({
        "mode": mode, "seed": seed, "steps": 10, "parameters": params, "eval_shards": "data/default/test",
        "candidates_in_batch": 0.25, "recalls": {"mean_recall": mean_recall}}))


def test_gap_and_share_closed_by_hand(tmp_path):
    runs = tmp_path / "runs"
    for seed, (student, base) in enumerate([(60.0, 40.0), (62.0, 42.0), (58.0, 41.0)]):
        _run(runs, "fused_kd", seed, student)
        _run(runs, "contrastive", seed, base)
    teachers = tmp_path / "teachers.json"
    teachers.write_text(json.dumps({"results": {"clip_a": {"mean_recall": 70.0, "parameters": 4000},
                                                "blip": {"mean_recall": 65.0, "parameters": 1500}}}))
    report = regime(runs, teachers, "fused_kd")
    assert report["best_teacher"] == "clip_a"
    assert report["contrastive"]["mean_recall"] == pytest.approx(41.0)
    assert report["gap"]["mean"] == pytest.approx(29.0)  # 30, 28, 29
    # Per seed: 20/30, 20/28, 17/29; their mean.
    assert report["gap_closed"] == pytest.approx(round((20 / 30 + 20 / 28 + 17 / 29) / 3, 3))
    assert report["goals"]["gap >= 10"]["met"] and report["goals"]["gap_closed >= 0.60"]["met"]
    assert report["student_over_largest_teacher_params"] == 0.25
    assert report["goals"]["student params <= largest teacher / 3"]["met"]


def test_a_mode_mismatch_is_refused(tmp_path):
    runs = tmp_path / "runs"
    _run(runs, "fused_kd", 0, 50.0)
    (runs / "contrastive_s0").mkdir()
    (runs / "contrastive_s0" / "summary.json").write_text(json.dumps({"mode": "dual_kd", "seed": 0}))
    with pytest.raises(ValueError, match="is a dual_kd run, not contrastive"):
        regime(runs, tmp_path / "t.json", "fused_kd")
