"""Which fusion rule and weight ``a`` rank the true pairs best inside a store's cached lists (no training).

A fused target teaches the student more than the dual-stream one only where it ranks an anchor's candidates
better. The store holds both teachers' scores for every cached candidate, so each rule and weight can be
scored against the true pairs directly: the share of anchors whose top-fused candidate is a true pair, per
direction, pooled over the blocks (mcad_cache.list_quality). A cheap first filter before student runs:

    python -m bench.fusion_lists --store artifacts/cache/default.zarr --out bench/results/fusion_lists.json

``itm_topk`` (``dual + a * itm``) at a = 0 is the dual-stream ranking and at large ``a`` the ITM's;
``reconstruction`` (``a * dual + (1 - a) * itm``) runs from the ITM's (a = 0) to the dual's (a = 1).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from mcad_cache import list_quality
from mcad_cache.fusion import fuse
from mcad_cache.info import block_lists, open_store
from mcad_cache.store import block_name
from mcad_core.atomic import atomic_write_bytes, atomic_write_json

GRID = {"itm_topk": (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0), "reconstruction": (0.0, 0.25, 0.5, 0.75, 1.0)}


def fused_counts(lists: dict, text_image: np.ndarray, rule: str, a: float) -> dict[str, dict[str, int]]:
    """A block's top-1 counts when its lists are fused with ``rule`` at ``a`` (as score ``fused``)."""
    fused = dict(lists)
    for direction in list_quality.DIRECTIONS:
        dual, itm = (torch.from_numpy(np.asarray(lists[f"{direction}/{s}"])) for s in ("dual", "itm"))
        fused[f"{direction}/fused"] = fuse(rule, dual, itm, a).numpy()
    counts = list_quality.count_block(fused, text_image)
    return {d: {"anchors": c["anchors"], "in_list": c["in_list"], "top1": c["top1_fused"]} for d, c in counts.items()}


def sweep(store_path: Path, grid: dict[str, tuple[float, ...]] = GRID) -> dict:
    """Every rule and ``a`` of ``grid`` scored over the store's blocks; a block not yet rescored is refused."""
    store = open_store(store_path)
    loaded = []
    for index, shards in enumerate(store.manifest["search"]["blocks"]):
        if not store.pass_done(block_name(index), "rescore"):
            raise SystemExit(f"{store_path}: block {block_name(index)} has no ITM scores yet (its rescore pass is "
                             "not done); finish it with `mcad cache` first")
        loaded.append(block_lists(store, store.block_group(block_name(index)), shards))
    rows = []
    for rule, values in grid.items():
        for a in values:
            pooled = list_quality.summarize([fused_counts(lists, ti, rule, a) for lists, ti in loaded])
            rows.append({"rule": rule, "a": a, **{f"{d}_top1": pooled[d]["top1"] for d in list_quality.DIRECTIONS}})
    # anchors and in_list do not depend on the fusion: the last row's pooled counts hold them
    return {"store": str(store_path), "blocks": len(loaded), "stored_fusion": store.manifest["fusion"],
            "in_list": {d: pooled[d]["in_list"] for d in list_quality.DIRECTIONS},
            "anchors": {d: pooled[d]["anchors"] for d in list_quality.DIRECTIONS}, "rows": rows}


def markdown(report: dict) -> str:
    f = report["stored_fusion"]
    lines = [f"# Fusion rules scored on the cached lists of `{report['store']}`", "",
             f"`python -m bench.fusion_lists`: share of anchors whose top-fused candidate is a true pair "
             f"({report['blocks']} blocks; i2t {report['anchors']['i2t']} anchors, t2i {report['anchors']['t2i']}). "
             f"A true pair is in the list for {report['in_list']['i2t']:.1%} (i2t) and {report['in_list']['t2i']:.1%} "
             f"(t2i) of the anchors. The store was fused with {f['rule']} a={f['a']}.", "",
             "| rule | a | i2t top-1 | t2i top-1 |", "|---|---:|---:|---:|"]
    lines += [f"| {r['rule']} | {r['a']:g} | {r['i2t_top1']:.2%} | {r['t2i_top1']:.2%} |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("artifacts/cache/default.zarr"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/fusion_lists.json"))
    args = parser.parse_args(argv)
    report = sweep(args.store)
    atomic_write_json(args.out, report)
    atomic_write_bytes(args.out.with_suffix(".md"), markdown(report).encode())
    print(markdown(report))


if __name__ == "__main__":
    main()
