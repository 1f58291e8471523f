"""`make ablation`: every MCAD variant at equal steps from one cache, one table and one plot.

Rows (see mcad_student/train.py for the modes):
    (a) contrastive   (b) dual_kd   (c) fused_kd   (d) mcad   (e) ammkd   (f) mcad, online teachers

Each row is an ordinary `mcad distill` run directory under ``out``; a re-run
skips rows whose summary.json exists (and resumes a row that was killed), so
the table can be rebuilt without retraining. A finished row is reused only if
its config.json is the config the row would train with now: one trained with
other settings (e.g. an older default) is a StaleRowError, never silently
mixed into the table.
"""

from __future__ import annotations

import io
import json
import logging
import statistics
from dataclasses import replace
from pathlib import Path

from mcad_core.atomic import atomic_write_bytes, atomic_write_json
from mcad_core.errors import InputError

log = logging.getLogger(__name__)

ROWS = (
    ("a", "contrastive", False),
    ("b", "dual_kd", False),
    ("c", "fused_kd", False),
    ("d", "mcad", False),
    ("e", "ammkd", False),
    ("f", "mcad", True),
)


class StaleRowError(ValueError):
    """A finished row's run directory was trained with another config than the row would use now."""


class NoAblationRunsError(InputError):
    """``--report-only`` found no finished run to report under the ablation directory (exit 3)."""


# What the report's note states of every row (pipeline/cli.py): runs that differ in these cannot share a table.
REPORTED_SETTINGS = ("steps", "batch_size", "lr", "eval_shards")

METRICS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_recall")


def run_ablation(base, out: Path, seeds: tuple[int, ...], rows: tuple[str, ...] | None = None,
                 progress: bool = True, online_seeds: tuple[int, ...] | None = None,
                 report_only: bool = False) -> dict:
    """Train every selected row for every seed; returns {row: {mode, online, runs: [summary...]}}.

    ``online_seeds`` (default: ``seeds``) lets the slow online row (f) run fewer seeds. With
    ``report_only`` nothing is trained: the finished runs are collected and the others left out (a
    table of what is done while runs are still going, e.g. in other processes). Every finished run is
    checked against its row's config before anything trains (StaleRowError).
    """
    from mcad_student.train import distill

    plan = []  # (label, mode, online, cfg, finished)
    for label, mode, online, seed in _selected(seeds, rows, online_seeds):
        run_dir = out / run_name(label, mode, online, seed)
        cfg = replace(base, mode=mode, seed=seed, out_dir=run_dir, online=online)
        finished = (run_dir / "summary.json").exists()
        if finished:
            _check_finished(run_dir, cfg)
        plan.append((label, mode, online, cfg, finished))
    results = {}
    for label, mode, online, cfg, finished in plan:
        if finished:
            log.info("row (%s): reusing the finished run %s", label, cfg.out_dir)
            summary = json.loads((cfg.out_dir / "summary.json").read_text())
        elif report_only:
            continue
        else:
            log.info("row (%s): training %s", label, cfg.out_dir)
            summary = distill(cfg, progress=progress)
        results.setdefault(label, {"mode": mode, "online": online, "runs": []})["runs"].append(summary)
    return results


def run_name(label: str, mode: str, online: bool, seed: int) -> str:
    """A row's run directory name under the ablation directory, e.g. ``c_fused_kd_s0``."""
    return f"{label}_{mode}{'_online' if online else ''}_s{seed}"


def _selected(seeds: tuple[int, ...], rows: tuple[str, ...] | None, online_seeds: tuple[int, ...] | None):
    """(label, mode, online, seed) of every selected row and seed, in table order."""
    for label, mode, online in ROWS:
        if rows and label not in rows:
            continue
        for seed in (online_seeds or seeds) if online else seeds:
            yield label, mode, online, seed


def finished_runs(out: Path, seeds: tuple[int, ...], rows: tuple[str, ...] | None = None,
                  online_seeds: tuple[int, ...] | None = None) -> tuple[dict, dict]:
    """`mcad ablation --report-only`: (results as ``run_ablation`` returns them, the settings they share).

    Reads only the runs' own summary.json and config.json: no torch, and no training option has to be
    repeated, since each run says how it was trained. Runs still training (no summary.json) are left out.
    Raises NoAblationRunsError when none is finished, and StaleRowError when a finished run has no
    config.json or the runs differ in a setting the report states for all of them (REPORTED_SETTINGS).
    """
    results: dict = {}
    shared: dict | None = None
    first: Path | None = None
    for label, mode, online, seed in _selected(seeds, rows, online_seeds):
        run_dir = out / run_name(label, mode, online, seed)
        if not (run_dir / "summary.json").exists():
            continue
        saved = _saved_config(run_dir)
        settings = {key: saved.get(key) for key in REPORTED_SETTINGS}
        if shared is None:
            shared, first = settings, run_dir
        else:
            differ = [key for key in REPORTED_SETTINGS if not _same_setting(key, settings[key], shared[key])]
            if differ:
                shown = ", ".join(f"{key} {settings[key]!r} against {shared[key]!r}" for key in differ)
                raise StaleRowError(f"{run_dir} and {first} were trained with other settings ({shown}); one "
                                    "table cannot hold both: move the odd runs away")
        summary = json.loads((run_dir / "summary.json").read_text())
        results.setdefault(label, {"mode": mode, "online": online, "runs": []})["runs"].append(summary)
    if shared is None:
        selected = list(rows or (label for label, _, _ in ROWS))
        raise NoAblationRunsError(f"no ablation runs under {out}: no finished run of rows {selected} and seeds "
                                  f"{list(seeds)} (a finished run is a <row>_<mode>_s<seed>/summary.json); "
                                  "train them with `mcad ablation` first")
    return results, shared


def _same_setting(key: str, a, b) -> bool:
    if key == "eval_shards" and isinstance(a, str) and isinstance(b, str):
        return Path(a).resolve() == Path(b).resolve()  # the same directory, written relative or absolute
    return a == b


def _saved_config(run_dir: Path) -> dict:
    """A finished run's config.json; StaleRowError when it has none."""
    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise StaleRowError(f"{run_dir} has a summary.json but no config.json: cannot tell what it trained; "
                            "move it away to retrain it")
    return json.loads(config_path.read_text())


def _check_finished(run_dir: Path, cfg) -> None:
    """StaleRowError unless ``run_dir`` was trained with ``cfg``: the changes a resume allows, but its steps."""
    from mcad_student.train import RESUMABLE_CHANGES, config_differences

    config_path = run_dir / "config.json"
    saved = _saved_config(run_dir)
    if Path(saved.get("eval_shards", "")).resolve() == Path(cfg.eval_shards).resolve():
        saved["eval_shards"] = cfg.eval_shards  # the same directory, written relative or absolute
    differences = config_differences(saved, cfg, str(config_path), ignore=RESUMABLE_CHANGES - {"steps"},
                                     effective=True)
    if differences:
        raise StaleRowError(f"{run_dir} was trained with other settings ({differences}) than this row's now; "
                            "move it away to retrain it, or use another --out")


def aggregate(results: dict) -> list[dict]:
    table = []
    for label, row in results.items():
        runs = row["runs"]
        entry = {"row": label, "mode": row["mode"] + (" (online)" if row["online"] else ""), "seeds": len(runs)}
        for metric in METRICS:
            values = [r["recalls"][metric] for r in runs]
            entry[metric] = statistics.fmean(values)
            entry[f"{metric}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        # a run record rebuilt from a published table (bench.records) has no timings: the row then has none
        timed = all("seconds" in r and "steps_per_second" in r for r in runs)
        entry["seconds"] = statistics.fmean(r["seconds"] for r in runs) if timed else None
        entry["steps_per_second"] = statistics.fmean(r["steps_per_second"] for r in runs) if timed else None
        entry["parameters"] = runs[0]["parameters"]
        entry["candidates_in_batch"] = runs[0].get("candidates_in_batch")
        table.append(entry)
    return table


# The comparisons the README's goals name: each row against contrastive (a) and against CLIP-only KD (b); and
# what fd + ia add to fused-target kd, (d) against (c).
PAIRS = (("b", "a"), ("c", "a"), ("d", "a"), ("e", "a"), ("c", "b"), ("d", "b"), ("e", "b"), ("d", "c"))


def paired(results: dict, metric: str = "mean_recall",
           pairs: tuple[tuple[str, str], ...] = PAIRS) -> list[dict]:
    """Per-seed differences ``row - against`` on ``metric``, for the ``(row, against)`` pairs both of whose rows ran.

    Seeds pair runs that share the initialization and the batch order, so a difference per seed
    removes most of the seed-to-seed spread that a difference of means keeps.
    """
    out = []
    for label, against in pairs:
        if label not in results or against not in results:
            continue
        mine = {r["seed"]: r["recalls"][metric] for r in results[label]["runs"] if "seed" in r}
        theirs = {r["seed"]: r["recalls"][metric] for r in results[against]["runs"] if "seed" in r}
        seeds = sorted(set(mine) & set(theirs))
        if not seeds:
            continue
        diffs = [mine[seed] - theirs[seed] for seed in seeds]
        out.append({"row": label, "against": against, "metric": metric, "seeds": seeds, "diffs": diffs,
                    "mean": statistics.fmean(diffs), "sd": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                    "wins": sum(d > 0 for d in diffs)})
    return out


def markdown(table: list[dict], note: str, pairs: list[dict] = ()) -> str:
    lines = [note, "", "| row | mode | " + " | ".join(METRICS) + " | wall s | steps/s | params |",
             "|---|---|" + "---:|" * (len(METRICS) + 3)]
    for e in table:
        cells = [f"{e[m]:.1f} ± {e[m + '_sd']:.1f}" if e["seeds"] > 1 else f"{e[m]:.1f}" for m in METRICS]
        lines.append(f"| ({e['row']}) | {e['mode']} | " + " | ".join(cells)
                     + (f" | {e['seconds']:.0f} | {e['steps_per_second']:.2f}" if e["seconds"] is not None else " | - | -")
                     + f" | {e['parameters'] / 1e6:.2f}M |")
    if pairs:
        lines += ["", "Paired by seed (mean recall, row minus the row it is compared with):", "",
                  "| row | against | per seed | mean ± sd | wins |", "|---|---|---|---:|---:|"]
        for p in pairs:
            per_seed = ", ".join(f"{d:+.1f}" for d in p["diffs"])
            lines.append(f"| ({p['row']}) | ({p['against']}) | {per_seed} | {p['mean']:+.1f} ± {p['sd']:.1f} | "
                         f"{p['wins']}/{len(p['diffs'])} |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"({e['row']}) {e['mode']}" for e in table]
    x = range(len(table))
    for offset, metric in ((-0.2, "i2t_R@1"), (0.2, "t2i_R@1")):
        ax.bar([i + offset for i in x], [e[metric] for e in table], width=0.4, label=metric,
               yerr=[e[metric + "_sd"] for e in table], capsize=3)
    ax.set_xticks(list(x), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("recall@1 (%)")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()  # no fixed scratch name: two ablation workers sharing --out may plot at once
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def write_report(results: dict, out: Path, note: str,
                 pairs: tuple[tuple[str, str], ...] = PAIRS) -> list[dict]:
    table = aggregate(results)
    comparisons = paired(results, pairs=pairs)
    atomic_write_json(out / "ablation.json", {"rows": table, "paired": comparisons, "runs": results})
    atomic_write_bytes(out / "ablation.md", markdown(table, note, comparisons).encode())
    plot(table, out / "ablation.png")
    return table
