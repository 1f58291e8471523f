"""`make bench`: every benchmark part in one process, then bench/results/summary.{md,json}.

Parts, in order (data_loading reads step_time's results, so it runs after it):

    cache_size      bytes per sample per view, measured and computed for ViT-L/14 + BLIP-large
    step_time       stage-2 step: student-only vs cached MCAD vs online MCAD (toy and realistic teachers)
    data_loading    stage-2 input samples/s from shards + cache alone
    search_scaling  candidate search time and peak RSS vs N at a fixed block size
    stage1_k        stage-1 overhead ratio and ITM pairs per sample for k = 1, 5, 11, 21

    .venv/bin/python -m bench.run_all [--quick] [--parts step_time,stage1_k] [--threads N]
    .venv/bin/python -m bench.run_all --report-only   # the summary again from every part's last results

``--report-only`` runs no part: it rebuilds the summary from the parts' saved results, e.g. after a new
`make cache` (whose cache_run.json holds the stage-1 figure) when nothing a part measures has changed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

from bench.common import (Figure, Inputs, add_common_args, apply_threads, check_inputs, inputs_from, machine,
                          markdown_table, quiet_progress, rounded, write_results)

PARTS = ("cache_size", "step_time", "data_loading", "search_scaling", "stage1_k")
BUDGET_S = 20 * 60  # `make bench` on 2 CPU cores
# Scripts `make bench` runs in their own processes before this one (a fresh process measures search's RSS;
# the others load teachers): their figures are read from their results and listed in the summary too.
STANDALONE = ("search_latency", "search_rss_parts", "fused_pass", "clip_block")


def run_parts(inputs: Inputs, parts: list[str]) -> dict:
    """Run ``parts`` in order; a part that fails is recorded (with its error) and the others still run."""
    check_inputs(inputs)
    apply_threads(inputs.threads)
    summary: dict = {"quick": inputs.quick, "threads": inputs.threads, "machine": machine(), "parts": {},
                     "figures": []}
    start = time.perf_counter()
    for name in parts:
        print(f"== bench {name} ...", flush=True)
        tick = time.perf_counter()
        try:
            results = importlib.import_module(f"bench.{name}").run(inputs)
        except Exception as err:  # noqa: BLE001 - one broken part must not hide the others' figures
            traceback.print_exc()
            summary["parts"][name] = {"seconds": rounded(time.perf_counter() - tick), "error": repr(err)}
            continue
        summary["parts"][name] = {"seconds": rounded(time.perf_counter() - tick)}
        summary["figures"] += results.get("figures", [])
        print(f"== bench {name}: {time.perf_counter() - tick:.1f}s", flush=True)
    summary["seconds"] = rounded(time.perf_counter() - start)
    summary["figures"] += standalone_figures(inputs.out) + make_cache_figures(inputs.out)
    if not inputs.quick and list(parts) == list(PARTS):
        summary["figures"].append(Figure("run_all", "benchmark wall time, all parts", summary["seconds"], "s",
                                         f"<= {BUDGET_S}", summary["seconds"] <= BUDGET_S).to_dict())
    write_results(inputs.out, "summary", summary, summary_markdown(summary))
    return summary


def report_parts(inputs: Inputs, parts: list[str]) -> dict:
    """The summary of every part's last results under ``inputs.out``; no part runs. A part without results
    is listed with its file missing."""
    from pathlib import Path

    summary: dict = {"quick": inputs.quick, "report_only": True, "threads": inputs.threads, "machine": machine(),
                     "parts": {}, "figures": []}
    for name in parts:
        found = (Path(inputs.out) / f"{name}.json").exists()
        summary["parts"][name] = ({"seconds": None, "from": f"{name}.json"} if found
                                  else {"seconds": None, "error": f"no {name}.json: run the part"})
    summary["seconds"] = None
    summary["figures"] += (standalone_figures(inputs.out, parts) + standalone_figures(inputs.out)
                           + make_cache_figures(inputs.out))
    write_results(inputs.out, "summary", summary, summary_markdown(summary))
    return summary


def standalone_figures(out, names=STANDALONE) -> list[dict]:
    """The figures of the results of ``names`` (default: the ``STANDALONE`` scripts) under ``out``, each marked
    with its file; a name without results adds none."""
    import json
    from pathlib import Path

    figures = []
    for name in names:
        path = Path(out) / f"{name}.json"
        if path.exists():
            figures += [{**figure, "from": path.name} for figure in json.loads(path.read_text()).get("figures", [])]
    return figures


STAGE1_TARGET = 1.05


def make_cache_figures(out) -> list[dict]:
    """The overhead ratio of the last full `make cache` (its ``--summary-json``, bench/results/cache_run.json).

    Only a run of all five passes with the default settings is the figure the target names; another run is
    reported under a name that says what it was.
    """
    import json
    from pathlib import Path

    path = Path(out) / "cache_run.json"
    if not path.exists():
        return []
    run = json.loads(path.read_text())
    ratio = run["summary"]["overhead_ratio"]
    if ratio is None:
        return []
    full = sorted(run["passes"]) == sorted(("embed", "search", "rescore", "fuse", "integrate"))
    if full and not run["non_default_settings"]:
        return [Figure("make_cache", "stage-1 overhead ratio, make cache defaults", ratio, "",
                       f"<= {STAGE1_TARGET}", ratio <= STAGE1_TARGET).to_dict() | {"from": path.name}]
    what = f"passes {','.join(run['passes'])}; settings {', '.join(run['non_default_settings']) or 'default'}"
    return [Figure("make_cache", f"stage-1 overhead ratio ({what})", ratio, "", "", None).to_dict()
            | {"from": path.name}]


def verdict(met: bool | None) -> str:
    return "-" if met is None else ("met" if met else "MISSED")


def summary_markdown(summary: dict) -> str:
    rows = [[f["part"], f["name"], f["value"], f["unit"], f["target"] or "-", verdict(f["met"])]
            for f in summary["figures"]]
    times = [[name, "-" if part["seconds"] is None else part["seconds"],
              part.get("error", f"from {part['from']}" if "from" in part else "ok")]
             for name, part in summary["parts"].items()]
    m = summary["machine"]
    title = "# MCAD benchmark summary" + (" (--quick: tiny sizes, not the real figures)" if summary["quick"] else "")
    if summary.get("report_only"):
        title += " (--report-only: every part's figures from its last run)"
    return "\n".join([
        title,
        "", f"{m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} threads, CUDA {m['cuda']}; "
        + (f"total {summary['seconds']} s." if summary["seconds"] is not None else "no part run."), "",
        markdown_table(["part", "figure", "value", "unit", "target", "verdict"], rows), "",
        markdown_table(["part", "seconds", "status"], times), "",
        "Details: bench/results/<part>.md / .json / .png.",
    ])


def main(argv: list[str] | None = None) -> None:
    quiet_progress()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--report-only", action="store_true",
                        help="run no part: the summary again from the parts' last results")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; known: {list(PARTS)}")
    summary = (report_parts if args.report_only else run_parts)(inputs_from(args), parts)
    print(summary_markdown(summary))
    if any("error" in part for part in summary["parts"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
