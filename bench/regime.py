"""The distillation regime of one world: the teachers, the contrastive-only student and the default student.

Reads ``RUNS/<mode>_s<seed>/summary.json`` (``mcad distill --mode MODE --seed SEED --out RUNS/<mode>_s<seed>``),
or the run records ``RUNS/<mode>_s<seed>.json`` that ``python -m bench.records`` keeps in the repository,
and the teachers' `mcad eval` JSON measured on the same split, and writes ``bench/results/distill.json`` (or
``--out``) with the shape `make distill --results-json` writes, plus the contrastive baseline and the share of
the teacher-student gap the default student closes, paired per seed:

    python -m bench.regime --runs runs/regime --teachers artifacts/eval/teachers.json --out bench/results/distill.json

Runs of the comparison modes (``COMPARED``: dual_kd, fused_kd) found under ``RUNS`` are reported too, at the
seeds they share with the default student, with the paired goals that name them.

Goals (the regime issue): best teacher - contrastive >= +10 mean recall on every seed; gap closed >= 0.60;
mcad >= dual_kd + 1.5 (mean of the paired differences); fused_kd >= dual_kd + 1.0 on every seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.records import read_record
from mcad_core.atomic import atomic_write_bytes, atomic_write_json

GAP_GOAL = 10.0
CLOSED_GOAL = 0.60
COMPARED = ("dual_kd", "fused_kd")  # modes reported beside the default student when their runs exist
MCAD_OVER_DUAL_GOAL = 1.5  # mean of the paired (per seed) differences
FUSED_OVER_DUAL_GOAL = 1.0  # on every seed


def seed_runs(runs: Path, mode: str) -> dict[int, dict]:
    """``{seed: summary}`` of the finished runs ``RUNS/<mode>_s<seed>`` (run directories, or the run records of
    bench/records.py: ``RUNS/<mode>_s<seed>.json``), each with its run's peak ``lr``."""
    found: dict[int, dict] = {}
    sources: dict[int, Path] = {}
    for path in sorted([*runs.glob(f"{mode}_s*/summary.json"), *runs.glob(f"{mode}_s*.json")]):
        if path.name == "summary.json":
            data = json.loads(path.read_text())
            config_file = path.with_name("config.json")
            config = json.loads(config_file.read_text()) if config_file.exists() else {}
        else:
            data, config = read_record(path)
        if data.get("mode") != mode:
            raise ValueError(f"{path} is a {data.get('mode')} run, not {mode}")
        seed = int(data["seed"])
        if seed in found:
            raise ValueError(f"{mode} seed {seed} has two runs under {runs}: {sources[seed]} and {path}")
        found[seed], sources[seed] = {**data, "lr": config.get("lr")}, path
    return found


def _stats(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 2),
            "sd": round(statistics.stdev(values), 2) if len(values) > 1 else None}


def _row(summaries: dict[int, dict], seeds: list[int]) -> dict:
    """One mode's row over ``seeds``: mean recall, its sd, the per-seed values and candidates_in_batch."""
    values = [summaries[s]["recalls"]["mean_recall"] for s in seeds]
    return {"mean_recall": _stats(values)["mean"], "mean_recall_sd": _stats(values)["sd"],
            "seeds": {str(s): round(v, 2) for s, v in zip(seeds, values, strict=True)},
            "lr": _one_lr(summaries, seeds),
            "candidates_in_batch": _stats([summaries[s]["candidates_in_batch"] or 0.0 for s in seeds])["mean"]}


def _one_lr(summaries: dict[int, dict], seeds: list[int]) -> float | None:
    """The peak lr the row's runs share (a row mixing learning rates is refused)."""
    lrs = {summaries[s]["lr"] for s in seeds}
    if len(lrs) > 1:
        raise ValueError(f"seeds {seeds} of one row ran at different learning rates: {sorted(lrs, key=str)}")
    return lrs.pop()


def regime(runs: Path, teachers_json: Path, mode: str, baseline_runs: Path | None = None,
           student_runs: Path | None = None) -> dict:
    """The report; the contrastive baseline's runs are read from ``baseline_runs`` when given (another
    learning rate's records, say), the default student's from ``student_runs`` when given (a new default's
    runs beside the compared modes' records), else both from ``runs``."""
    baseline_runs, student_runs = baseline_runs or runs, student_runs or runs
    students, baselines = seed_runs(student_runs, mode), seed_runs(baseline_runs, "contrastive")
    seeds = sorted(set(students) & set(baselines))
    if not seeds:
        raise SystemExit(f"no seed has both a {mode} run under {student_runs} and a contrastive run under "
                         f"{baseline_runs}")
    saved = json.loads(teachers_json.read_text())
    teachers = {name: {"mean_recall": round(row["mean_recall"], 2), "params": row.get("parameters")}
                for name, row in saved["results"].items()}
    best_name = max(teachers, key=lambda n: teachers[n]["mean_recall"])
    best = teachers[best_name]["mean_recall"]
    student = [students[s]["recalls"]["mean_recall"] for s in seeds]
    contrastive = [baselines[s]["recalls"]["mean_recall"] for s in seeds]
    gaps = [best - c for c in contrastive]
    closed = [(st - c) / g if g > 0 else None for st, c, g in zip(student, contrastive, gaps, strict=True)]
    first = students[seeds[0]]
    largest_teacher = max((t["params"] or 0) for t in teachers.values())
    student_row = _row(students, seeds)
    report = {
        "student": {**student_row, "mode": mode, "params": first["parameters"], "steps": first["steps"],
                    "eval_shards": first["eval_shards"]},
        "teachers": teachers,
        "best_teacher": best_name,
        "of_best_teacher": round(student_row["mean_recall"] / best, 4),
        "contrastive": {"mean_recall": _stats(contrastive)["mean"], "mean_recall_sd": _stats(contrastive)["sd"],
                        "seeds": {str(s): round(v, 2) for s, v in zip(seeds, contrastive, strict=True)},
                        "lr": _one_lr(baselines, seeds)},
        "gap": _stats(gaps),
        "gap_closed": round(statistics.fmean(c for c in closed if c is not None), 3) if any(closed) else None,
        "gap_closed_per_seed": {str(s): (round(c, 3) if c is not None else None) for s, c in zip(seeds, closed,
                                                                                                strict=True)},
        "student_over_largest_teacher_params": round(first["parameters"] / largest_teacher, 3) if largest_teacher else None,
    }
    report["modes"] = {}
    for other in (m for m in COMPARED if m != mode):
        runs_of = seed_runs(runs, other)
        if shared := [s for s in seeds if s in runs_of]:
            report["modes"][other] = _row(runs_of, shared)
    report["goals"] = {
        "gap >= 10": {"measured": report["gap"]["mean"], "met": min(gaps) >= GAP_GOAL},
        "gap_closed >= 0.60": {"measured": report["gap_closed"],
                               "met": report["gap_closed"] is not None and report["gap_closed"] >= CLOSED_GOAL},
        "student params <= largest teacher / 3": {"measured": report["student_over_largest_teacher_params"],
                                                 "met": (report["student_over_largest_teacher_params"] or 9) <= 1 / 3},
    }
    report["goals"].update(_mode_goals(report, mode))
    return report


def _paired(a: dict, b: dict) -> list[float]:
    """Per-seed differences a - b over the seeds both rows have."""
    return [a["seeds"][s] - b["seeds"][s] for s in a["seeds"] if s in b["seeds"]]


def _mode_goals(report: dict, mode: str) -> dict:
    """The goals that compare modes, where the runs they name exist."""
    rows = {**report["modes"], mode: report["student"]}
    goals = {}
    if "dual_kd" in rows and "mcad" in rows and (diffs := _paired(rows["mcad"], rows["dual_kd"])):
        mean = round(statistics.fmean(diffs), 2)
        goals[f"mcad - dual_kd >= {MCAD_OVER_DUAL_GOAL}"] = {
            "measured": mean, "per_seed": [round(d, 2) for d in diffs], "met": mean >= MCAD_OVER_DUAL_GOAL}
    if "dual_kd" in rows and "fused_kd" in rows and (diffs := _paired(rows["fused_kd"], rows["dual_kd"])):
        goals[f"fused_kd - dual_kd >= {FUSED_OVER_DUAL_GOAL} on every seed"] = {
            "measured": round(min(diffs), 2), "per_seed": [round(d, 2) for d in diffs],
            "met": min(diffs) >= FUSED_OVER_DUAL_GOAL}
    return goals


def markdown(report: dict) -> str:
    s, c = report["student"], report["contrastive"]
    lines = ["| model | lr | seeds | mean recall | parameters |", "|---|---:|---|---:|---:|"]
    for name, row in sorted(report["teachers"].items(), key=lambda kv: -kv[1]["mean_recall"]):
        lines.append(f"| teacher: {name} | - | - | {row['mean_recall']:.1f} | {row['params'] or '-'} |")
    sd = lambda v: f" ± {v:.1f}" if v is not None else ""
    students = [(s["mode"], s), ("contrastive only", c), *report["modes"].items()]
    lines += [f"| student ({name}) | {row.get('lr') or '-'} | {', '.join(f'{v:.1f}' for v in row['seeds'].values())} | "
              f"{row['mean_recall']:.1f}{sd(row['mean_recall_sd'])} | {s['params']} |" for name, row in students]
    lines += ["", "| goal | measured | met |", "|---|---:|---|"]
    lines += [f"| {goal} | {v['measured']} | {'yes' if v['met'] else '**no**'} |" for goal, v in report["goals"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/regime"))
    parser.add_argument("--teachers", type=Path, default=Path("artifacts/eval/teachers.json"))
    parser.add_argument("--baseline", type=Path, default=None,
                        help="where the contrastive baseline's runs are (default: --runs)")
    parser.add_argument("--student-runs", type=Path, default=None,
                        help="where the default student's runs are (default: --runs)")
    parser.add_argument("--mode", default="mcad", help="the default student's mode")
    parser.add_argument("--out", type=Path, default=Path("bench/results/distill.json"))
    args = parser.parse_args(argv)
    report = regime(args.runs, args.teachers, args.mode, args.baseline, args.student_runs)
    atomic_write_json(args.out, report)
    atomic_write_bytes(args.out.with_suffix(".md"), markdown(report).encode())
    print(markdown(report))


if __name__ == "__main__":
    main()
