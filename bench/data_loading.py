"""Stage-2 input rate: samples per second from shards + cache alone (no model), as `mcad distill` reads them.

``CacheBatches`` is built exactly as ``mcad_student.train.distill`` builds it for the default config (batch
size, student image size, seed, fused targets for mode ``mcad``, error policy, neighbour batching) and
every batch of the first whole blocks of an epoch (default 2) is taken: block reads (every array of the
block's shard and block groups, the block's source shards streamed and decoded, images joined by key, the
batch plan), view rendering, caption choice, the target rebuild and integrated features. Each batch's
``next()`` is timed.
Reported: samples/s over all batches (block reads included) and over batches that read no block, beside
the measured student step throughput of the cached variant (bench/results/step_time.json, toy setting,
same batch size) when it exists. `mcad distill` reads batches in the training process itself (no worker
processes), so the input share of an iteration = input seconds / (input + step seconds) is reported too.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from bench.common import (add_common_args, apply_threads, check_inputs, Figure, Inputs, inputs_from, machine,
                          markdown_table, median, publish, quiet_progress, rounded)

NAME = "data_loading"


def distill_config(quick: bool):
    """`mcad distill`'s default config (tiny batch and student with ``quick``, as bench.step_time uses)."""
    from mcad_student.train import DistillConfig

    cfg = DistillConfig()
    if quick:
        cfg = replace(cfg, batch_size=8, student=replace(cfg.student, image_size=32))
    return cfg


def take_batches(store: Path, n_blocks: int, quick: bool) -> dict:
    """Time ``next()`` on every batch of the first ``n_blocks`` whole blocks of epoch 0."""
    from mcad_student.data import CacheBatches, Position

    cfg = distill_config(quick)
    stream = CacheBatches(store, cfg.batch_size, cfg.student.image_size, cfg.seed,
                          fused=cfg.mode in ("fused_kd", "mcad"), policy=cfg.on_error, batching=cfg.batching)
    sizes = stream.block_sizes()
    batches = stream.iter_from(Position())
    seconds, samples, blocks = [], [], []
    left = 0  # batches still to come from the current block
    while left or len(set(blocks)) < min(n_blocks, stream.n_blocks):
        start = time.perf_counter()
        _, batch = next(batches)
        seconds.append(time.perf_counter() - start)
        samples.append(len(batch["rows"]))
        if not blocks or batch["block"] != blocks[-1]:
            left = -(-sizes[int(batch["block"].lstrip("b"))] // cfg.batch_size)
        left -= 1
        blocks.append(batch["block"])
    n_batches = len(seconds)
    reads = [i == 0 or blocks[i] != blocks[i - 1] for i in range(n_batches)]
    steady = [s for s, r in zip(seconds, reads, strict=True) if not r]
    steady_samples = sum(n for n, r in zip(samples, reads, strict=True) if not r)
    return {
        "batch_size": cfg.batch_size, "image_size": cfg.student.image_size, "batching": cfg.batching,
        "blocks": len(set(blocks)), "batches": n_batches, "samples": sum(samples), "seconds": rounded(sum(seconds)),
        "block_reads": sum(reads), "block_read_batch_s": [rounded(s) for s, r in zip(seconds, reads, strict=True) if r],
        "samples_per_s": rounded(sum(samples) / sum(seconds)),
        "steady_samples_per_s": rounded(steady_samples / sum(steady)) if steady else None,
        "median_batch_s": rounded(median(seconds)), "mean_batch_s": rounded(sum(seconds) / n_batches),
    }


def student_rate(out: Path, batch_size: int) -> dict | None:
    """The cached variant's step throughput at this batch size from step_time.json, if measured."""
    path = Path(out) / "step_time.json"
    if not path.exists():
        return None
    for name, setting in json.loads(path.read_text())["settings"].items():
        if setting["batch_size"] == batch_size:
            cached = setting["variants"]["cached"]
            return {"setting": name, "samples_per_s": cached["samples_per_s"], "step_s": cached["median_s"]}
    return None


def figures(results: dict) -> list[Figure]:
    loader, student = results["loader"], results["student"]
    out = [Figure(NAME, f"stage-2 input samples/s (batch {loader['batch_size']}, block reads included)",
                  loader["samples_per_s"], "samples/s", "", None)]
    if student is None:
        return out
    ratio = results["loader_over_student"]
    out.append(Figure(NAME, "input rate / cached student step rate", ratio, "x", ">= 1", ratio >= 1))
    out.append(Figure(NAME, "input share of a training iteration", results["input_share"], "", "", None))
    return out


def markdown(results: dict) -> str:
    loader, student = results["loader"], results["student"]
    rows = [["input pipeline (CacheBatches, no model), all batches", loader["samples_per_s"], loader["mean_batch_s"]],
            ["input pipeline, batches without a block read", loader["steady_samples_per_s"], None]]
    if student:
        rows.append([f"student step, cached MCAD ({student['setting']}, step_time.json)", student["samples_per_s"],
                     student["step_s"]])
    lines = [f"# Stage-2 input rate ({loader['blocks']} whole blocks: {loader['batches']} batches of "
             f"{loader['batch_size']})", "",
             markdown_table(["what", "samples/s", "s per batch"], rows), ""]
    if student:
        lines.append(f"Input rate / step rate = {results['loader_over_student']}; the input pipeline runs in the "
                     f"training process, so it takes {100 * results['input_share']:.1f}% of an iteration.")
    else:
        lines.append("No step_time.json at this batch size: run bench.step_time first for the comparison.")
    lines.append(f"Batches that read a block took {loader['block_read_batch_s']} s.")
    return "\n".join(lines)


def run(inputs: Inputs, n_blocks: int = 2) -> dict:
    check_inputs(inputs)
    apply_threads(inputs.threads)
    loader = take_batches(inputs.store, n_blocks, inputs.quick)
    student = student_rate(inputs.out, loader["batch_size"])
    results = {"part": NAME, "quick": inputs.quick, "machine": machine(), "loader": loader, "student": student}
    if student:
        results["loader_over_student"] = rounded(loader["samples_per_s"] / student["samples_per_s"])
        results["input_share"] = rounded(loader["mean_batch_s"] / (loader["mean_batch_s"] + student["step_s"]))
    return publish(inputs.out, NAME, results, figures, markdown)


def main(argv: list[str] | None = None) -> None:
    quiet_progress()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--blocks", type=int, default=2, help="whole blocks to read (default 2)")
    args = parser.parse_args(argv)
    print(markdown(run(inputs_from(args), args.blocks)))


if __name__ == "__main__":
    main()
