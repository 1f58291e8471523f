"""Run records: what a finished `mcad distill` run measured, kept in the repository as one small JSON per run.

Run directories live under ``runs/`` (ignored by git) and are lost with the machine that made them; the figures
in the README and docs/results.md must stay checkable after that. So every run the published tables use is
recorded here, and ``python -m bench.regime --runs DIR`` reads a directory of records as it reads one of run
directories:

    python -m bench.records runs/regime/dual_kd_s0 runs/regime/fused_kd_s0 --into bench/results/runs/default

A record is ``{"name", "source", "summary", "config"}``: the run's ``summary.json`` and ``config.json`` as the
run wrote them, and where they came from (``run directory <path>``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mcad_core.atomic import atomic_write_json


class RecordError(ValueError):
    """A run directory that cannot be recorded (unfinished, or its files missing)."""


def record_of(run_dir: Path) -> dict:
    """The record of a finished run directory (one with ``summary.json`` and ``config.json``)."""
    summary, config = run_dir / "summary.json", run_dir / "config.json"
    for path in (summary, config):
        if not path.is_file():
            raise RecordError(f"{run_dir} has no {path.name}: not a finished `mcad distill` run")
    return {"name": run_dir.name, "source": f"run directory {run_dir}",
            "summary": json.loads(summary.read_text()), "config": json.loads(config.read_text())}


def read_record(path: Path) -> tuple[dict, dict]:
    """(summary, config) of a record file."""
    data = json.loads(path.read_text())
    try:
        return data["summary"], data["config"]
    except (KeyError, TypeError) as err:
        raise RecordError(f"{path} is not a run record (no summary and config)") from err


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished run directories")
    parser.add_argument("--into", type=Path, required=True, help="the records directory (one NAME.json per run)")
    args = parser.parse_args(argv)
    records = [record_of(run) for run in args.runs]  # every run checked before any file is written
    args.into.mkdir(parents=True, exist_ok=True)
    for record in records:
        atomic_write_json(args.into / f"{record['name']}.json", record)
        print(f"{args.into / (record['name'] + '.json')}: {record['summary']['mode']} seed "
              f"{record['summary']['seed']}, mean recall {record['summary']['recalls']['mean_recall']:.2f}")


if __name__ == "__main__":
    main()
