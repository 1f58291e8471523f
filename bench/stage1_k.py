"""Stage-1 cost as k grows: overhead ratio and ITM pairs scored per sample, from real `mcad cache` runs.

For each k the real stage 1 (``mcad_cache.job.run_cache``, every pass: embed, search, rescore, fuse,
integrate) runs on the first few training shards of the store (one block) into a fresh temporary store, with
the store's own teachers, tokenizer, views and fusion rule (read from its manifest). Reported per k, as
`make cache` reports them (``CacheSummary``):

- overhead ratio = wall seconds of all passes / seconds inside teacher forward passes (embed: every teacher
  on every view and caption; rescore: BLIP vision tokens and ITM); 1.0 would mean no cost besides the teachers.
  Also without the integrate pass, whose cost is fixed (its step count), not per sample, so on a small subset
  it weighs far more than on the whole set;
- ITM pairs per sample = distinct (image, caption) pairs the single-stream teacher scored / samples, and the
  list entries (+ positives) they serve per sample (before deduplication), and seconds per pass.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import (add_common_args, apply_threads, check_inputs, Figure, Inputs, inputs_from, machine,
                          markdown_table, publish, pyplot, quiet_progress, rounded, save_figure)

NAME = "stage1_k"


def ks(quick: bool) -> list[int]:
    return [1, 3] if quick else [1, 5, 11, 21]


def subset_dir(manifest: dict, n_shards: int, where: Path) -> Path:
    """A directory of links to the first ``n_shards`` shards the store was made from (stage 1 lists a directory)."""
    shards = manifest["shards"][:n_shards]
    where.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        (where / Path(shard["path"]).name).symlink_to(Path(shard["path"]).resolve())
    return where


def cache_config(manifest: dict, shards: Path, store: Path, k: int, n_shards: int, threads: int):
    """The store's stage-1 config (teachers, tokenizer, views, weights, fusion, integration) with another k,
    shards and store, every shard in one block."""
    from mcad_cache.config import CacheConfig

    single = manifest["single_teacher"]
    duals = tuple(manifest["teachers"][name]["name"] + (f":{manifest['teachers'][name]['pretrained']}"
                                                         if manifest["teachers"][name].get("pretrained") else "")
                  for name in manifest["dual_teachers"])
    pre, search = manifest["preprocessing"], manifest["search"]
    return CacheConfig(
        shards=str(shards), store=store, teachers_dir=None, dual=duals, single=manifest["teachers"][single]["name"],
        tokenizer=manifest["tokenizer"]["path"], context_length=int(manifest["tokenizer"]["context_length"]),
        source_size=pre["source_size"], views=pre["views"], view_scale=tuple(pre["view_scale"]), seed=pre["seed"],
        k=k, block_shards=n_shards, dual_weights=tuple(search["dual_weights"]), fusion_rule=manifest["fusion"]["rule"],
        fusion_a=manifest["fusion"]["a"], integration_dim=int(manifest["integration"]["dim"]),
        integration_steps=int(manifest["integration"]["steps"]), threads=threads, device="cpu",
    )


def one_run(manifest: dict, shards: Path, store: Path, k: int, n_shards: int, threads: int) -> dict:
    from mcad_cache.store import CacheStore
    from mcad_cache.job import PASSES, run_cache
    from mcad_core.dist import explicit_place

    cfg = cache_config(manifest, shards, store, k, n_shards, threads)
    summary = run_cache(cfg, PASSES, explicit_place(0, 1), progress=False)
    made = CacheStore.open(store).manifest["teachers"]
    changed = [n for n, t in made.items() if t["weights_sha256"] not in
               {u["weights_sha256"] for u in manifest["teachers"].values()}]
    if changed:
        raise RuntimeError(f"teachers {changed} no longer have the weights the reference store was made with")
    wall = sum(summary.seconds.values())
    per_sample_wall = wall - summary.seconds.get("integrate", 0.0)
    return {
        "k": k, "samples": summary.samples, "wall_s": rounded(wall), "teacher_s": rounded(summary.teacher_seconds),
        "overhead_ratio": rounded(wall / summary.teacher_seconds) if summary.teacher_seconds else None,
        "overhead_ratio_without_integrate": rounded(per_sample_wall / summary.teacher_seconds)
        if summary.teacher_seconds else None,
        "itm_pairs": summary.itm_pairs, "pairs_per_sample": rounded(summary.itm_pairs / max(1, summary.samples)),
        "entries_per_sample": rounded(summary.itm_positions / max(1, summary.samples)),
        "seconds_per_pass": {p: rounded(s) for p, s in summary.seconds.items()},
        "store_mib": rounded(summary.bytes_on_disk / 2**20),
    }


def figures(results: dict) -> list[Figure]:
    """Reported without targets: the brief sets none for stage 1 (docs/results.md: 1.08 and 36.8 pairs at k=11)."""
    out = [Figure(NAME, f"stage-1 overhead ratio (k={r['k']}, {r['samples']} samples)", r["overhead_ratio"], "x", "",
                  None) for r in results["runs"]]
    out += [Figure(NAME, f"stage-1 overhead ratio without integrate (k={r['k']})",
                   r["overhead_ratio_without_integrate"], "x", "", None) for r in results["runs"]]
    out += [Figure(NAME, f"ITM pairs per sample (k={r['k']})", r["pairs_per_sample"], "pairs", "", None)
            for r in results["runs"]]
    return out


def markdown(results: dict) -> str:
    rows = [[r["k"], r["samples"], r["wall_s"], r["teacher_s"], r["overhead_ratio"],
             r["overhead_ratio_without_integrate"], r["pairs_per_sample"],
             r["entries_per_sample"], ", ".join(f"{p} {s}" for p, s in r["seconds_per_pass"].items())]
            for r in results["runs"]]
    return "\n".join([
        f"# Stage-1 cost vs k ({results['n_shards']} shards of {results['store']}, one block)", "",
        markdown_table(["k", "samples", "wall s", "teacher-forward s", "overhead ratio", "ratio w/o integrate",
                        "ITM pairs/sample",
                        "list entries/sample", "seconds per pass"], rows), "",
        "overhead ratio = wall seconds of all passes / seconds inside teacher forward passes; "
        f"the store itself was made with k = {results['store_k']}.",
    ])


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    runs = results["runs"]
    k = [r["k"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(k, [r["overhead_ratio"] for r in runs], "o-", label="all passes")
    left.plot(k, [r["overhead_ratio_without_integrate"] for r in runs], "s--", label="without integrate")
    left.legend()
    left.axhline(1.0, color="grey", lw=0.8, ls="--")
    left.set_xticks(k)
    left.set_xlabel("k")
    left.set_ylabel("wall / teacher-forward seconds")
    left.set_title("stage-1 overhead ratio")
    right.plot(k, [r["pairs_per_sample"] for r in runs], "o-", label="distinct ITM pairs")
    right.plot(k, [r["entries_per_sample"] for r in runs], "s--", label="list entries + positives")
    right.set_xticks(k)
    right.set_xlabel("k")
    right.set_ylabel("per sample")
    right.set_title("single-stream ITM work per sample")
    right.legend()
    save_figure(fig, path)


def run(inputs: Inputs, n_shards: int | None = None) -> dict:
    from mcad_cache.store import CacheStore

    check_inputs(inputs, need_shards=False)
    apply_threads(inputs.threads)
    manifest = CacheStore.open(inputs.store).manifest
    n_shards = n_shards or (1 if inputs.quick else 2)
    missing = [s["path"] for s in manifest["shards"][:n_shards] if not Path(s["path"]).exists()]
    if missing:
        raise SystemExit(f"bench: the store's source shards are missing ({missing}); run `make data` first")
    results: dict = {"part": NAME, "quick": inputs.quick, "machine": machine(), "store": str(inputs.store),
                     "n_shards": n_shards, "store_k": int(manifest["search"]["k"]), "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench_stage1_") as work:
        shards = subset_dir(manifest, n_shards, Path(work) / "shards")
        for k in ks(inputs.quick):
            results["runs"].append(one_run(manifest, shards, Path(work) / f"k{k}.zarr", k, n_shards,
                                           inputs.threads))
    return publish(inputs.out, NAME, results, figures, markdown, plot)


def main(argv: list[str] | None = None) -> None:
    quiet_progress()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--n-shards", type=int, default=None, help="training shards to run stage 1 on (default 2)")
    args = parser.parse_args(argv)
    print(markdown(run(inputs_from(args), args.n_shards)))


if __name__ == "__main__":
    main()
