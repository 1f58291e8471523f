"""bench/regime.py: the regime figures from run summaries, checked by hand."""

from __future__ import annotations

import json

import pytest

from bench.regime import regime


def _run(root, mode, seed, mean_recall, params=1000, lr=None):
    out = root / f"{mode}_s{seed}"
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({
        "mode": mode, "seed": seed, "steps": 10, "parameters": params, "eval_shards": "data/default/test",
        "candidates_in_batch": 0.25, "recalls": {"mean_recall": mean_recall}}))
    if lr is not None:
        (out / "config.json").write_text(json.dumps({"lr": lr, "mode": mode}))


def test_each_row_names_its_runs_lr_and_a_row_mixing_rates_is_refused(tmp_path):
    runs = tmp_path / "runs"
    teachers = tmp_path / "teachers.json"
    teachers.write_text(json.dumps({"results": {"clip_a": {"mean_recall": 70.0, "parameters": 4000}}}))
    for seed in (0, 1):
        _run(runs, "mcad", seed, 60.0, lr=1e-3)
        _run(runs, "contrastive", seed, 40.0, lr=5e-4)
    report = regime(runs, teachers, "mcad")
    assert (report["student"]["lr"], report["contrastive"]["lr"]) == (1e-3, 5e-4)
    _run(runs, "mcad", 2, 60.0, lr=2e-3)
    _run(runs, "contrastive", 2, 40.0, lr=5e-4)
    with pytest.raises(ValueError, match="different learning rates"):
        regime(runs, teachers, "mcad")


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


def test_compared_modes_and_their_paired_goals_by_hand(tmp_path):
    runs = tmp_path / "runs"
    # seed: (mcad, contrastive, dual_kd, fused_kd); dual_kd has no seed 2, so the pairs are seeds 0 and 1.
    for seed, (student, base, dual, fused) in enumerate([(60.0, 40.0, 57.0, 58.5), (62.0, 42.0, 61.0, 61.5),
                                                         (58.0, 41.0, None, 59.0)]):
        _run(runs, "mcad", seed, student)
        _run(runs, "contrastive", seed, base)
        _run(runs, "fused_kd", seed, fused)
        if dual is not None:
            _run(runs, "dual_kd", seed, dual)
    teachers = tmp_path / "teachers.json"
    teachers.write_text(json.dumps({"results": {"clip_a": {"mean_recall": 70.0, "parameters": 4000}}}))
    report = regime(runs, teachers, "mcad")
    assert report["modes"]["dual_kd"]["seeds"] == {"0": 57.0, "1": 61.0}
    assert report["modes"]["fused_kd"]["mean_recall"] == pytest.approx((58.5 + 61.5 + 59.0) / 3, abs=0.01)
    mcad_goal = report["goals"]["mcad - dual_kd >= 1.5"]
    assert mcad_goal["per_seed"] == [3.0, 1.0] and mcad_goal["measured"] == 2.0 and mcad_goal["met"]
    fused_goal = report["goals"]["fused_kd - dual_kd >= 1.0 on every seed"]
    assert fused_goal["per_seed"] == [1.5, 0.5] and fused_goal["measured"] == 0.5 and not fused_goal["met"]


def test_without_dual_kd_runs_no_mode_goal_is_claimed(tmp_path):
    runs = tmp_path / "runs"
    _run(runs, "mcad", 0, 60.0)
    _run(runs, "contrastive", 0, 40.0)
    teachers = tmp_path / "teachers.json"
    teachers.write_text(json.dumps({"results": {"clip_a": {"mean_recall": 70.0, "parameters": 4000}}}))
    report = regime(runs, teachers, "mcad")
    assert report["modes"] == {}
    assert not any("dual_kd" in goal for goal in report["goals"])


def test_run_records_read_as_run_directories_and_a_seed_twice_is_refused(tmp_path):
    from bench.records import RecordError, main as record_main

    runs, records = tmp_path / "runs", tmp_path / "records"
    for seed, (student, base) in enumerate([(60.0, 40.0), (62.0, 42.0)]):
        _run(runs, "mcad", seed, student, lr=1e-3)
        _run(runs, "contrastive", seed, base, lr=1e-3)
    teachers = tmp_path / "teachers.json"
    teachers.write_text(json.dumps({"results": {"clip_a": {"mean_recall": 70.0, "parameters": 4000}}}))
    record_main([str(p) for p in sorted(runs.iterdir())] + ["--into", str(records)])
    assert sorted(p.name for p in records.iterdir()) == ["contrastive_s0.json", "contrastive_s1.json",
                                                        "mcad_s0.json", "mcad_s1.json"]
    assert regime(records, teachers, "mcad") == regime(runs, teachers, "mcad")
    # an unfinished run (no summary) is refused before any record is written
    (runs / "mcad_s9").mkdir()
    with pytest.raises(RecordError, match="mcad_s9 has no summary.json"):
        record_main([str(runs / "mcad_s0"), str(runs / "mcad_s9"), "--into", str(tmp_path / "fresh")])
    assert not (tmp_path / "fresh").exists()
    # the same seed as a record and as a run directory in one place is ambiguous
    (records / "mcad_s0").mkdir()
    (records / "mcad_s0" / "summary.json").write_text((runs / "mcad_s0" / "summary.json").read_text())
    with pytest.raises(ValueError, match="mcad seed 0 has two runs"):
        regime(records, teachers, "mcad")


def test_the_baseline_can_come_from_another_directory(tmp_path):
    runs, other = tmp_path / "runs", tmp_path / "other"
    _run(runs, "mcad", 0, 60.0, lr=1e-3)
    _run(runs, "contrastive", 0, 30.0, lr=1e-3)
    _run(other, "contrastive", 0, 40.0, lr=5e-4)
    teachers = tmp_path / "teachers.json"
    teachers.write_text(json.dumps({"results": {"clip_a": {"mean_recall": 70.0, "parameters": 4000}}}))
    assert regime(runs, teachers, "mcad")["contrastive"]["mean_recall"] == 30.0
    report = regime(runs, teachers, "mcad", baseline_runs=other)
    assert (report["contrastive"]["mean_recall"], report["contrastive"]["lr"]) == (40.0, 5e-4)
    assert report["gap_closed"] == pytest.approx(20 / 30, abs=1e-3)


def _record(root, name, mode, seed, mean_recall, cand=0.1, timed=True, steps=10):
    summary = {"mode": mode, "seed": seed, "steps": steps, "parameters": 1000, "candidates_in_batch": cand,
               "recalls": {m: mean_recall for m in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5",
                                                    "t2i_R@10", "mean_recall")},
               **({"seconds": 100.0, "steps_per_second": 0.1} if timed else {})}
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}_s{seed}.json").write_text(json.dumps({"name": name, "source": "test", "summary": summary,
                                                           "config": {"mode": mode}}))


def test_ablation_table_from_records_by_hand(tmp_path):
    from bench.ablation_records import main
    from bench.records import RecordError

    base, runs = tmp_path / "base", tmp_path / "runs"
    for seed, (a, d, n) in enumerate([(40.0, 60.0, 61.0), (42.0, 63.0, 62.0), (41.0, 66.0, 66.0)]):
        _record(base, "contrastive", "contrastive", seed, a, cand=None, timed=False)  # a rebuilt record: no timings
        _record(runs, "mcad", "mcad", seed, d)
        _record(runs, "mcad-nb2", "mcad", seed, n, cand=0.18)
    _record(runs, "mcad-nb2x", "mcad", 0, 99.0)  # another variant whose name starts alike: not row n's
    out = tmp_path / "out"
    main(["--row", f"a={base / 'contrastive'}", "--row", f"d={runs / 'mcad'}", "--row", f"n={runs / 'mcad-nb2'}",
          "--out", str(out), "--note", "by hand"])
    report = json.loads((out / "ablation.json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert [r["row"] for r in report["rows"]] == ["a", "d", "n"]
    assert rows["d"]["mean_recall"] == pytest.approx(63.0) and rows["d"]["mean_recall_sd"] == pytest.approx(3.0)
    assert rows["n"]["mean_recall"] == pytest.approx(63.0) and rows["n"]["seeds"] == 3
    assert (rows["a"]["candidates_in_batch"], rows["n"]["candidates_in_batch"]) == (None, 0.18)
    assert rows["a"]["seconds"] is None and rows["d"]["seconds"] == 100.0
    (pair,) = [p for p in report["paired"] if (p["row"], p["against"]) == ("d", "a")]
    assert pair["diffs"] == [20.0, 21.0, 25.0] and pair["wins"] == 3
    text = (out / "ablation.md").read_text()
    assert text.startswith("by hand") and "| (a) | contrastive |" in text and " | - | - | " in text
    with pytest.raises(RecordError, match="no run records"):
        main(["--row", f"a={runs / 'none'}", "--out", str(out), "--note", "x"])
    _record(runs, "odd", "mcad", 0, 50.0)
    _record(runs, "odd", "dual_kd", 1, 50.0)
    with pytest.raises(RecordError, match="mixes modes"):
        main(["--row", f"a={runs / 'odd'}", "--out", str(out), "--note", "x"])
    _record(runs, "long", "mcad", 0, 50.0, steps=20)
    with pytest.raises(RecordError, match="different steps"):
        main(["--row", f"a={runs / 'mcad'}", "--row", f"b={runs / 'long'}", "--out", str(out), "--note", "x"])


def test_ablation_records_pairs_extra_rows_by_seed(tmp_path):
    from bench.ablation_records import main

    runs = tmp_path / "runs"
    for seed, (d, g) in enumerate([(80.0, 78.5), (81.0, 81.5), (82.0, 79.0)]):
        _record(runs, "mcad", "mcad", seed, d)
        _record(runs, "mcad-gamma0", "mcad", seed, g)
    out = tmp_path / "out"
    main(["--row", f"d={runs / 'mcad'}", "--row", f"g={runs / 'mcad-gamma0'}", "--pair", "g=d",
          "--out", str(out), "--note", "extra pair"])
    (pair,) = json.loads((out / "ablation.json").read_text())["paired"]
    assert (pair["row"], pair["against"]) == ("g", "d")
    assert pair["diffs"] == [-1.5, 0.5, -3.0] and pair["mean"] == pytest.approx(-4.0 / 3) and pair["wins"] == 1
    assert "| (g) | (d) | -1.5, +0.5, -3.0 | -1.3 ± 1.8 | 1/3 |" in (out / "ablation.md").read_text()
    with pytest.raises(SystemExit):  # a pair naming a row that is not in the table is refused
        main(["--row", f"d={runs / 'mcad'}", "--pair", "g=d", "--out", str(out), "--note", "x"])


def test_the_default_students_runs_can_live_apart_from_the_compared_modes(tmp_path):
    runs, new_default = tmp_path / "runs", tmp_path / "fd4"
    teachers = tmp_path / "teachers.json"
    teachers.write_text(json.dumps({"results": {"clip_a": {"mean_recall": 70.0, "parameters": 4000}}}))
    for seed, (old, new, dual, base) in enumerate([(60.0, 64.0, 55.0, 40.0), (61.0, 62.0, 56.0, 42.0)]):
        _run(runs, "mcad", seed, old)
        _run(new_default, "mcad", seed, new)
        _run(runs, "dual_kd", seed, dual)
        _run(runs, "contrastive", seed, base)
    report = regime(runs, teachers, "mcad", student_runs=new_default)
    assert report["student"]["seeds"] == {"0": 64.0, "1": 62.0}
    assert report["modes"]["dual_kd"]["seeds"] == {"0": 55.0, "1": 56.0}
    assert report["goals"]["mcad - dual_kd >= 1.5"]["per_seed"] == [9.0, 6.0]
    assert report["gap_closed"] == pytest.approx(round((24 / 30 + 20 / 28) / 2, 3))
