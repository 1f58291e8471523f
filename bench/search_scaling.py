"""Candidate search time and peak memory as N grows, at a fixed block size, through stage 1's own search code.

Stage 1 searches each block (a few shards) on its own, so N samples are N / block_size blocks of a fixed
size and the search pass should cost time linear in N and memory independent of N. For each N (one fresh
subprocess each, so its peak RSS is its own), every block gets synthetic unit embeddings for the store's dual
teachers (their widths, weights and logit scales), and the time inside ``blocks.dual_logit_embeddings`` +
``blocks.search`` (blocked top-k both directions, ``topk.blocked_topk``) is summed; generating the
embeddings is not timed. Reported: seconds per N, a least-squares line (slope = seconds per row, R^2),
microseconds per row, and the subprocess's peak RSS (VmHWM) next to its RSS before the first search.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (add_common_args, Figure, Inputs, inputs_from, linear_fit, machine, markdown_table, publish,
                          pyplot, quiet_progress, rounded, save_figure)

NAME = "search_scaling"
R2_TARGET = 0.99
DEFAULT_TEACHERS = {"widths": [128, 96], "weights": [0.5, 0.5], "scales": [16.0, 16.0], "k": 11}


def sizes(quick: bool) -> tuple[list[int], int]:
    """(N values, block size): every N is a whole number of blocks."""
    if quick:
        return [1000, 2000, 4000], 500
    return [10_000, 30_000, 100_000, 300_000, 1_000_000], 5000


def teachers_of(store: Path) -> dict:
    """Dual-teacher widths, weights, logit scales and k of the store (defaults without a store)."""
    if not (Path(store) / "zarr.json").exists():
        return dict(DEFAULT_TEACHERS)
    from mcad_cache.store import CacheStore

    manifest = CacheStore.open(store).manifest
    duals = manifest["dual_teachers"]
    return {"widths": [int(manifest["teachers"][t]["embed_dim"]) for t in duals],
            "weights": list(manifest["search"]["dual_weights"]),
            "scales": [float(manifest["teachers"][t]["logit_scale"]) for t in duals], "k": int(manifest["search"]["k"])}


def peak_rss_kib() -> int:
    """This process's RSS high-water mark (VmHWM), KiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def current_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def search_blocks(n: int, block: int, texts_per_image: int, teachers: dict, seed: int = 0) -> dict:
    """Search ``n / block`` blocks of synthetic embeddings; seconds inside the search code only."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from mcad_cache import blocks as block_ops

    if n % block:
        raise ValueError(f"N={n} is not a whole number of blocks of {block}")
    names = [f"t{i}" for i in range(len(teachers["widths"]))]
    text_image = torch.arange(block).repeat_interleave(texts_per_image)
    keys = np.arange(block).astype(str)
    seconds, before = 0.0, 0
    for index in range(n // block):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        emb = block_ops.BlockEmbeddings(
            keys=keys, text_image=text_image,
            images={t: F.normalize(torch.randn(block, d, generator=gen), dim=-1) for t, d in
                    zip(names, teachers["widths"], strict=True)},
            texts={t: F.normalize(torch.randn(len(text_image), d, generator=gen), dim=-1) for t, d in
                   zip(names, teachers["widths"], strict=True)})
        if index == 0:
            before = current_rss_kib()
        start = time.perf_counter()
        image_vecs, text_vecs = block_ops.dual_logit_embeddings(emb, names, teachers["weights"], teachers["scales"])
        block_ops.search(image_vecs, text_vecs, teachers["k"])
        seconds += time.perf_counter() - start
    return {"n": n, "blocks": n // block, "texts": n * texts_per_image, "search_s": seconds,
            "rss_before_kib": before, "peak_rss_kib": peak_rss_kib()}


def measure_in_subprocess(n: int, block: int, texts_per_image: int, teachers: dict, threads: int) -> dict:
    command = [sys.executable, "-m", "bench.search_scaling", "--child", str(n), "--block", str(block),
               "--texts-per-image", str(texts_per_image), "--teachers", json.dumps(teachers),
               "--threads", str(threads)]
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise RuntimeError(f"search child for N={n} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["child_wall_s"] = time.perf_counter() - start
    return out


def summarize(points: list[dict]) -> dict:
    fit = linear_fit([p["n"] for p in points], [p["search_s"] for p in points])
    return {"slope_s_per_row": fit["slope"], "intercept_s": fit["intercept"], "r2": fit["r2"],
            "us_per_row": [1e6 * p["search_s"] / p["n"] for p in points]}


def figures(results: dict) -> list[Figure]:
    fit, points = results["fit"], results["points"]
    per_row = fit["us_per_row"]
    peak = [p["peak_rss_kib"] / 1024 for p in points]
    return [
        Figure(NAME, f"search time linear in N (R^2 of the line, N {points[0]['n']}..{points[-1]['n']})",
               rounded(fit["r2"]), "", f">= {R2_TARGET}", fit["r2"] >= R2_TARGET),
        Figure(NAME, f"search time per row (block {results['block']}, slope of the line)",
               rounded(1e6 * fit["slope_s_per_row"]), "us/row", "", None),
        Figure(NAME, "search time per row, largest / smallest N", rounded(per_row[-1] / per_row[0]), "x", "", None),
        Figure(NAME, "peak RSS, largest / smallest N", rounded(peak[-1] / peak[0]), "x", "", None),
    ]


def markdown(results: dict) -> str:
    rows = [[p["n"], p["blocks"], p["texts"], rounded(p["search_s"]), rounded(us),
             rounded(p["rss_before_kib"] / 1024), rounded(p["peak_rss_kib"] / 1024)]
            for p, us in zip(results["points"], results["fit"]["us_per_row"], strict=True)]
    fit = results["fit"]
    return "\n".join([
        f"# Candidate search scaling (block {results['block']} images x {results['block'] * results['texts_per_image']}"
        f" texts, dual widths {results['teachers']['widths']}, k={results['teachers']['k']})", "",
        markdown_table(["N images", "blocks", "texts", "search s", "us/row", "RSS before MiB", "peak RSS MiB"], rows),
        "",
        f"Line: seconds = {fit['intercept_s']:.3g} + {fit['slope_s_per_row']:.3g} * N (R^2 = {fit['r2']:.5f}); "
        f"i.e. {1e6 * fit['slope_s_per_row']:.3g} us per row at this block size.",
    ])


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    points, fit = results["points"], results["fit"]
    n = [p["n"] for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].loglog(n, [p["search_s"] for p in points], "o", label="measured")
    axes[0].loglog(n, [fit["intercept_s"] + fit["slope_s_per_row"] * x for x in n], "-",
                   label=f"line, R^2={fit['r2']:.4f}")
    axes[0].set_xlabel("N images")
    axes[0].set_ylabel("search seconds")
    axes[0].legend()
    axes[1].semilogx(n, fit["us_per_row"], "o-")
    axes[1].set_ylim(0, max(fit["us_per_row"]) * 1.3)
    axes[1].set_xlabel("N images")
    axes[1].set_ylabel("microseconds per row")
    axes[2].semilogx(n, [p["peak_rss_kib"] / 1024 for p in points], "o-", label="peak RSS")
    axes[2].semilogx(n, [p["rss_before_kib"] / 1024 for p in points], "s--", label="RSS before search")
    axes[2].set_ylim(0, None)
    axes[2].set_xlabel("N images")
    axes[2].set_ylabel("MiB")
    axes[2].legend()
    fig.suptitle(f"Candidate search at a fixed block size ({results['block']})")
    save_figure(fig, path)


def run(inputs: Inputs, block: int | None = None, texts_per_image: int = 1) -> dict:
    ns, default_block = sizes(inputs.quick)
    block = block or default_block
    teachers = teachers_of(inputs.store)
    points = [measure_in_subprocess(n, block, texts_per_image, teachers, inputs.threads) for n in ns]
    results = {"part": NAME, "quick": inputs.quick, "machine": machine(), "block": block,
               "texts_per_image": texts_per_image, "teachers": teachers, "points": points, "fit": summarize(points)}
    return publish(inputs.out, NAME, results, figures, markdown, plot)


def main(argv: list[str] | None = None) -> None:
    quiet_progress()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--block", type=int, default=None, help="images per block (default 5000)")
    parser.add_argument("--texts-per-image", type=int, default=1)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--teachers", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(search_blocks(args.child, args.block, args.texts_per_image, json.loads(args.teachers))))
        return
    print(markdown(run(inputs_from(args), args.block, args.texts_per_image)))


if __name__ == "__main__":
    main()
