"""The ablation table (`mcad ablation`'s ablation.{json,md,png}) from run records instead of run directories.

`mcad ablation` trains its rows into one directory at one learning rate. The runs the regime tables use were
trained one by one (`mcad distill --mode ...`, two at a time) and live on as run records (bench.records), so
the table is built from those: each ``--row LABEL=DIR/VARIANT`` is every ``DIR/VARIANT_s<seed>.json``, and the
rows are paired by seed as `mcad ablation` pairs them:

    python -m bench.ablation_records --row a=bench/results/runs/default_lr5e-4/contrastive \\
        --row b=bench/results/runs/default/dual_kd --row c=bench/results/runs/default/fused_kd \\
        --row d=bench/results/runs/default/mcad --out bench/results --note "..."
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from bench.records import RecordError, read_record
from pipeline.ablation import PAIRS, write_report


def row_runs(prefix: Path) -> list[dict]:
    """The summaries of every record ``<prefix>_s<seed>.json``, by seed; a variant with none is an error."""
    pattern = re.compile(re.escape(prefix.name) + r"_s(\d+)\.json")
    found = sorted((int(m.group(1)), path) for path in prefix.parent.glob(f"{prefix.name}_s*.json")
                   if (m := pattern.fullmatch(path.name)))
    if not found:
        raise RecordError(f"no run records {prefix}_s<seed>.json")
    return [read_record(path)[0] for _, path in found]


def results_from(rows: list[tuple[str, Path]]) -> dict:
    """``{label: {"mode", "online", "runs"}}`` as `mcad ablation` collects it, from the records of each row.

    Every run of a row must have the same mode and the rows the same steps: a table of unlike runs says nothing.
    """
    results, steps = {}, set()
    for label, prefix in rows:
        runs = row_runs(prefix)
        modes = {run["mode"] for run in runs}
        if len(modes) != 1:
            raise RecordError(f"row {label} ({prefix}) mixes modes {sorted(modes)}")
        steps |= {run.get("steps") for run in runs}
        results[label] = {"mode": modes.pop(), "online": False, "runs": runs}
    if len(steps - {None}) > 1:
        raise RecordError(f"the rows were trained for different steps {sorted(steps - {None})}")
    return results


def _assignment(text: str, form: str) -> tuple[str, str]:
    """``NAME=VALUE`` as its two non-empty halves; anything else is a usage error showing ``form``."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}")
    return name, value


def _row(text: str) -> tuple[str, Path]:
    label, prefix = _assignment(text, "LABEL=DIR/VARIANT")
    return label, Path(prefix)


def _pair(text: str) -> tuple[str, str]:
    return _assignment(text, "ROW=AGAINST")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", type=_row, action="append", required=True,
                        help="LABEL=DIR/VARIANT: the row's records are DIR/VARIANT_s<seed>.json (repeat, in order)")
    parser.add_argument("--pair", type=_pair, action="append", default=[],
                        help="ROW=AGAINST: also pair these two rows by seed (repeat); the rows (a)-(e) always are")
    parser.add_argument("--out", type=Path, required=True, help="directory for ablation.{json,md,png}")
    parser.add_argument("--note", required=True, help="the line above the table: what the runs were")
    args = parser.parse_args(argv)
    labels = {label for label, _ in args.row}
    unknown = sorted({label for pair in args.pair for label in pair} - labels)
    if unknown:  # refused before any record is read
        parser.error(f"--pair names rows with no --row: {unknown}")
    results = results_from(args.row)
    args.out.mkdir(parents=True, exist_ok=True)
    for entry in write_report(results, args.out, args.note, PAIRS + tuple(args.pair)):
        print(f"({entry['row']}) {entry['mode']}: {entry['seeds']} seeds, mean recall {entry['mean_recall']:.1f} "
              f"± {entry['mean_recall_sd']:.1f}, candidates_in_batch {entry['candidates_in_batch']}")


if __name__ == "__main__":
    main()
