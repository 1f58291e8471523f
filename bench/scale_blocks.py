"""Stage 1's block passes over several tasks, and the integrate pass's memory as the store grows.

Figures (``measure``; ``python -m bench.scale_blocks --out DIR`` writes DIR/scale_blocks.{json,md}):

- ``block_pass_2_tasks_identical``: every array of a store whose block passes (search, rescore, fuse,
  integrate) ran as 2 task processes side by side equals, byte for byte, the one a single task wrote
  from the same embedded store (generated shards, tiny random-init teachers as tests/conftest.py's,
  every process on one torch thread: the thread count decides a float sum's last bit).
- ``block_pass_2_tasks_wall_ratio``: wall time of that block job with 2 tasks over 1 task. Each task
  process loads its imports, waits for a common start, then runs ``run_cache`` (teacher loading
  included); the wall is the first start to the last end. Rounds alternate 1 and 2 tasks; medians.
  Beside it, ``block_pass_2_tasks_busiest_cpu_ratio``: the CPU seconds of the busiest task, 2 tasks
  over 1, which bounds the wall ratio where each task has a core of its own (on shared, loaded cores
  the wall ratio says more about the other processes than about the split).
- ``integrate_rss_8_blocks_over_2_blocks``: peak RSS (VmHWM) of a process running the integrate pass
  on 8 blocks over 2 blocks of the same size. The stores hold generated block arrays at real widths
  (two 512-wide CLIPs, a 768-wide fused BLIP feature, 2 captions per image, k 11): what tiny teachers
  write is too small for a process's memory to see. The pass before streaming
  (``integrate_in_memory``, every feature concatenated in memory) is measured beside it.

    python -m bench.scale_blocks [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.common import Figure, machine, markdown_table, publish, quiet_progress, rounded, tiny_teachers

NAME = "scale_blocks"
GOALS = {"block_pass_2_tasks_wall_ratio": 0.6, "integrate_rss_8_blocks_over_2_blocks": 1.2}  # at most
BLOCK_PASSES = ("search", "rescore", "fuse", "integrate")
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- the integrate pass before streaming


def integrate_in_memory(store, cfg):
    """(model, integrated images, integrated texts) of the integrate pass as it was before it streamed: every
    block's features concatenated in memory, then trained on and integrated at once. The reference the
    streaming pass is checked against (tests/test_block_tasks.py) and measured beside."""
    import numpy as np
    import torch

    from mcad_cache import blocks as block_ops
    from mcad_cache.integrate import IntegrationConfig, integrated_features, train_integration
    from mcad_cache.job import load_block_embeddings
    from mcad_cache.store import block_name

    manifest = store.manifest
    duals, weights = manifest["dual_teachers"], manifest["search"]["dual_weights"]
    scales = [manifest["teachers"][name]["logit_scale"] for name in duals]
    dual_scale = float(sum(w * s for w, s in zip(weights, scales, strict=True)))
    parts: dict[str, list] = {key: [] for key in ("dual_image", "dual_text", "single_image", "single_text",
                                                  "text_image", "i2t_ids", "i2t_fused", "t2i_ids", "t2i_fused")}
    n = t = 0
    for index, shards in enumerate(manifest["search"]["blocks"]):
        group = store.block_group(block_name(index))
        emb = load_block_embeddings(store, shards, duals)
        image_vecs, text_vecs = block_ops.dual_logit_embeddings(emb, duals, weights, scales)
        pos = torch.from_numpy(group["pos/feature"][...].astype(np.float32))
        n_b, t_b = len(emb.keys), len(emb.text_image)
        counts = torch.bincount(emb.text_image, minlength=n_b).clamp(min=1).unsqueeze(1)
        parts["dual_image"].append(image_vecs / dual_scale**0.5)
        parts["dual_text"].append(text_vecs / dual_scale**0.5)
        parts["single_image"].append(torch.zeros(n_b, pos.shape[1]).index_add_(0, emb.text_image, pos) / counts)
        parts["single_text"].append(pos)
        parts["text_image"].append(emb.text_image + n)
        parts["i2t_ids"].append(torch.from_numpy(group["i2t/ids"][...].astype(np.int64)) + t)
        parts["t2i_ids"].append(torch.from_numpy(group["t2i/ids"][...].astype(np.int64)) + n)
        parts["i2t_fused"].append(torch.from_numpy(group["i2t/fused"][...]))
        parts["t2i_fused"].append(torch.from_numpy(group["t2i/fused"][...]))
        n, t = n + n_b, t + t_b
    features = {key: torch.cat(value) for key, value in parts.items()}
    count = torch.bincount(features["text_image"], minlength=n)
    features.update(first=torch.cumsum(count, 0) - count, count=count, dual_scale=dual_scale)
    icfg = IntegrationConfig(dim=cfg.integration_dim, steps=cfg.integration_steps, seed=cfg.seed)
    model, _ = train_integration(features, icfg, progress=False)
    images, texts = integrated_features(model, features["dual_image"], features["single_image"],
                                        features["dual_text"], features["single_text"])
    return model, images, texts


# ---------------------------------------------------------------------- processes


def _memory_kib() -> dict[str, int]:
    """This process's resident memory now (VmRSS) and its high-water mark (VmHWM), KiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def _child_env() -> dict[str, str]:
    """One torch thread (equal arrays need equal thread counts), and this repository importable."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)


def _task_child(config: Path, rank: int, world: int, ready: Path, go: Path, out: Path) -> None:
    """One block-job task: imports loaded, it says so, waits for ``go``, runs the block passes, writes its times."""
    from mcad_cache.config import CacheConfig
    from mcad_cache.job import run_cache
    from mcad_core.config import load_config_file
    from mcad_core.dist import explicit_place

    import resource

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    cfg = load_config_file(config, CacheConfig)
    ready.touch()
    while not go.exists():
        time.sleep(0.005)
    start, cpu_start = time.time(), cpu()
    summary = run_cache(cfg, BLOCK_PASSES, explicit_place(rank, world), progress=False)
    end = time.time()
    out.write_text(json.dumps({"rank": rank, "start": start, "end": end, "cpu_s": round(cpu() - cpu_start, 3),
                               "itm_pairs": summary.itm_pairs,
                               "seconds": {k: round(v, 3) for k, v in summary.seconds.items()}}))


def block_job(cfg, world: int, work: Path) -> dict:
    """The block passes on ``cfg.store`` as ``world`` task processes started together; wall and per-task times."""
    work.mkdir(parents=True)
    config = work / "cache.json"
    config.write_text(json.dumps(cfg.to_dict()))
    go = work / "go"
    procs = []
    for rank in range(world):
        command = [sys.executable, "-m", "bench.scale_blocks", "--task", str(config), str(rank), str(world),
                   str(work / f"ready{rank}"), str(go), str(work / f"task{rank}.json")]
        procs.append(subprocess.Popen(command, env=_child_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    while not all((work / f"ready{rank}").exists() for rank in range(world)):
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.01)
    load = os.getloadavg()[0]
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=1800)
        if p.returncode:
            raise RuntimeError(f"block task failed ({p.returncode}):\n{err[-3000:]}")
    tasks = [json.loads((work / f"task{rank}.json").read_text()) for rank in range(world)]
    wall = max(t["end"] for t in tasks) - min(t["start"] for t in tasks)
    return {"tasks": world, "wall_s": round(wall, 3), "busiest_task_cpu_s": max(t["cpu_s"] for t in tasks),
            "load_average_1min_before": round(load, 2), "per_task": tasks}


def _integrate_child(store: Path, way: str, dim: int, steps: int) -> None:
    """The integrate pass (``way`` "streaming") or the in-memory reference ("in_memory") on ``store``; prints
    its memory and seconds as JSON."""
    from mcad_cache.config import CacheConfig
    from mcad_cache.job import integrate_pass
    from mcad_cache.store import CacheStore

    opened = CacheStore.open(store)
    cfg = CacheConfig(store=store, teachers_dir=None, integration_dim=dim, integration_steps=steps)
    before = _memory_kib()["VmRSS"]
    start = time.perf_counter()
    if way == "streaming":
        integrate_pass(opened, cfg, progress=False)
    else:
        integrate_in_memory(opened, cfg)
    seconds = time.perf_counter() - start
    print(json.dumps({"rss_before_kib": before, "peak_rss_kib": _memory_kib()["VmHWM"], "seconds": seconds}))


def integrate_memory(store: Path, way: str, dim: int, steps: int) -> dict:
    command = [sys.executable, "-m", "bench.scale_blocks", "--integrate", str(store), way, str(dim), str(steps)]
    done = subprocess.run(command, env=_child_env(), cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"integrate child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- inputs


def synthetic_store(path: Path, blocks: int, shards_per_block: int, images_per_shard: int, widths=(512, 512),
                    fused: int = 768, captions: int = 2, k: int = 11, seed: int = 0) -> None:
    """A store holding what the integrate pass reads, generated: shard groups (unit float16 embeddings of two dual
    teachers) and block groups (candidate ids, fused logits, fused features), every block marked fused."""
    import numpy as np
    import zarr

    from mcad_cache.schema import BLOCK_PASSES as SPECS, SCHEMA_VERSION, write_array, write_shard_group
    from mcad_cache.store import CacheStore, block_name

    rng = np.random.default_rng(seed)
    teachers = {f"dual{i}": width for i, width in enumerate(widths)}
    plan = [[f"{b * shards_per_block + s:05d}" for s in range(shards_per_block)] for b in range(blocks)]
    root = zarr.open_group(str(path), mode="w")
    root.attrs["manifest"] = {"schema_version": SCHEMA_VERSION, "dual_teachers": list(teachers),
                              "teachers": {name: {"logit_scale": 100.0} for name in teachers},
                              "search": {"k": k, "blocks": plan, "dual_weights": [1 / len(teachers)] * len(teachers)}}
    for name in ("shards", "blocks"):
        root.require_group(name)

    def unit(rows: int, width: int) -> np.ndarray:
        x = rng.standard_normal((rows, width), dtype=np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)

    key = 0
    for b, shards in enumerate(plan):
        for shard in shards:
            n, t = images_per_shard, images_per_shard * captions
            arrays = {"keys": np.array([f"{key + i:09d}" for i in range(n)]),
                      "text_image": np.repeat(np.arange(n, dtype=np.int32), captions),
                      "text_tokens": np.zeros((t, 4), dtype=np.int32),
                      "view_params": np.tile(np.array([0, 0, 1, 1], dtype=np.float32), (n, 1, 1))}
            for name, width in teachers.items():
                arrays[f"emb/{name}/image"] = unit(n, width)[:, None]
                arrays[f"emb/{name}/text"] = unit(t, width)
            write_shard_group(root, shard, arrays, teachers)
            key += n
        n = images_per_shard * shards_per_block
        t = n * captions
        group = root.require_group(f"blocks/{block_name(b)}")
        arrays = {"i2t/ids": rng.integers(0, t, (n, k)), "t2i/ids": rng.integers(0, n, (t, k)),
                  "i2t/fused": rng.standard_normal((n, k)), "t2i/fused": rng.standard_normal((t, k)),
                  "pos/feature": rng.standard_normal((t, fused))}
        sizes = {"n": n, "t": t, "k": k, "H": fused}
        for spec in (s for specs in SPECS.values() for s in specs if s.path in arrays):
            write_array(group, spec, arrays[spec.path], sizes)
        group.attrs["passes"] = {name: {} for name in ("search", "rescore", "fuse")}
    CacheStore.open(path)  # what the pass opens: a readable store


# ---------------------------------------------------------------------- measurements


def same_arrays(a: Path, b: Path) -> tuple[bool, list[str]]:
    """Whether two stores hold the same arrays byte for byte; the names of those that differ."""
    import zarr

    def arrays(path: Path) -> dict:
        root = zarr.open_group(str(path), mode="r")
        return {name: m[...] for name, m in root.members(max_depth=None) if isinstance(m, zarr.Array)}

    left, right = arrays(a), arrays(b)
    differ = sorted(set(left) ^ set(right))
    differ += [name for name in sorted(set(left) & set(right))
               if left[name].dtype != right[name].dtype or left[name].tobytes() != right[name].tobytes()]
    return not differ, differ


def block_tasks(root: Path, quick: bool, rounds: int) -> dict:
    """The block job as 1 task and as 2 tasks, alternating, from one embedded store; identity and wall times."""
    from mcad_cache.config import CacheConfig
    from mcad_cache.job import run_cache
    from mcad_core.dist import explicit_place
    from bench.scale import make_world

    shards, per_shard, block_shards, k = (4, 16, 1, 8) if quick else (8, 128, 2, 16)
    shards_dir, tokenizer_dir = make_world(root, shards, per_shard, 32)
    clip, blip = tiny_teachers(tokenizer_dir, root)
    cfg = CacheConfig(shards=str(shards_dir), store=root / "embedded.zarr", teachers_dir=None, dual=(clip,),
                      single=blip, tokenizer=str(tokenizer_dir), source_size=32, views=1, k=k,
                      block_shards=block_shards, batch_size=64, itm_batch_size=256, integration_dim=16,
                      integration_steps=20, device="cpu")
    run_cache(cfg, ["embed"], explicit_place(0, 1), progress=False)
    runs, identical, differing = [], True, []
    for r in range(rounds):
        stores = {}
        for world in ((1, 2) if r % 2 == 0 else (2, 1)):
            store = root / f"round{r}_{world}tasks.zarr"
            shutil.copytree(cfg.store, store)
            stores[world] = store
            runs.append({"round": r, **block_job(replace(cfg, store=store), world, root / f"round{r}_{world}")})
        same, names = same_arrays(stores[1], stores[2])
        identical, differing = identical and same, differing + names
        for store in stores.values():
            shutil.rmtree(store)
    walls = {w: statistics.median(run["wall_s"] for run in runs if run["tasks"] == w) for w in (1, 2)}
    busiest = {w: statistics.median(run["busiest_task_cpu_s"] for run in runs if run["tasks"] == w) for w in (1, 2)}
    return {"identical": identical, "differing_arrays": sorted(set(differing)), "runs": runs,
            "median_wall_s": {str(w): v for w, v in walls.items()}, "wall_ratio": walls[2] / walls[1],
            "median_busiest_task_cpu_s": {str(w): v for w, v in busiest.items()},
            "busiest_task_cpu_ratio": busiest[2] / busiest[1],
            "setup": {"shards": shards, "per_shard": per_shard, "block_shards": block_shards,
                      "blocks": shards // block_shards, "k": cfg.k, "views": cfg.views, "torch_threads_per_task": 1,
                      "teachers": "tiny random-init open_clip CLIP + BLIP ITM (width 32, 1 layer, 32 px)"}}


def integrate_rss(root: Path, quick: bool) -> dict:
    """Peak RSS of the integrate pass (and of the in-memory reference) on 2 and on 8 blocks of one size."""
    shards_per_block, per_shard = (2, 250) if quick else (2, 2000)
    dim, steps = 128, 30
    points = []
    for blocks in (2, 8):
        store = root / f"synthetic{blocks}.zarr"
        synthetic_store(store, blocks, shards_per_block, per_shard)
        for way in ("streaming", "in_memory"):
            point = integrate_memory(store, way, dim, steps)
            points.append({"blocks": blocks, "way": way, **point})
        shutil.rmtree(store)

    def peak(blocks: int, way: str, above_start: bool = False) -> float:
        p = next(p for p in points if p["blocks"] == blocks and p["way"] == way)
        return p["peak_rss_kib"] - (p["rss_before_kib"] if above_start else 0)

    ratios = {way: {"peak": peak(8, way) / peak(2, way),
                    "peak_above_start": peak(8, way, True) / peak(2, way, True)} for way in ("streaming", "in_memory")}
    return {"points": points, "ratios": ratios,
            "setup": {"images_per_block": shards_per_block * per_shard, "captions_per_image": 2,
                      "dual_widths": [512, 512], "fused_width": 768, "k": 11, "integration_dim": dim,
                      "integration_steps": steps}}


def measure(quick: bool = False) -> dict:
    """Every figure of this part, and the numbers they come from (``details``)."""
    quiet_progress()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        saved = os.environ.get("XDG_CACHE_HOME")
        os.environ["XDG_CACHE_HOME"] = str(root / "xdg")  # shard fingerprints stay in the temp dir
        try:
            tasks = block_tasks(root, quick, rounds=1 if quick else 4)
            memory = integrate_rss(root, quick)
        finally:
            if saved is None:
                os.environ.pop("XDG_CACHE_HOME", None)
            else:
                os.environ["XDG_CACHE_HOME"] = saved
    return {
        "block_pass_2_tasks_identical": tasks["identical"],
        "block_pass_2_tasks_wall_ratio": rounded(tasks["wall_ratio"]),
        "integrate_rss_8_blocks_over_2_blocks": rounded(memory["ratios"]["streaming"]["peak"]),
        "block_pass_wall_s": tasks["median_wall_s"],
        "block_pass_2_tasks_busiest_cpu_ratio": rounded(tasks["busiest_task_cpu_ratio"]),
        "integrate_rss_8_over_2_above_start": rounded(memory["ratios"]["streaming"]["peak_above_start"]),
        "integrate_in_memory_rss_8_blocks_over_2_blocks": rounded(memory["ratios"]["in_memory"]["peak"]),
        "details": {"block_tasks": tasks, "integrate_rss": memory, "quick": quick, "machine": machine(),
                    "load_average": [round(v, 2) for v in os.getloadavg()]},
    }


# ---------------------------------------------------------------------- report


def figures(results: dict) -> list[Figure]:
    out = [Figure(NAME, "block_pass_2_tasks_identical", float(results["block_pass_2_tasks_identical"]), "bool",
                  "== 1", results["block_pass_2_tasks_identical"])]
    for name, goal in GOALS.items():
        value = results[name]
        out.append(Figure(NAME, name, value, "x", f"<= {goal}", value <= goal))
    return out


def markdown(results: dict) -> str:
    tasks, memory = results["details"]["block_tasks"], results["details"]["integrate_rss"]
    rows = [[f.name, f.value, f.target, {True: "met", False: "**missed**", None: "-"}[f.met]]
            for f in (Figure(**d) for d in results["figures"])]
    runs = [[r["round"], r["tasks"], r["wall_s"], r["busiest_task_cpu_s"], r["load_average_1min_before"],
             "; ".join(f"task {t['rank']}: " + ", ".join(f"{k} {v}" for k, v in t["seconds"].items())
                       for t in r["per_task"])] for r in tasks["runs"]]
    points = [[p["blocks"], p["way"], round(p["rss_before_kib"] / 1024, 1), round(p["peak_rss_kib"] / 1024, 1),
               round(p["seconds"], 2)] for p in memory["points"]]
    s, m = tasks["setup"], memory["setup"]
    return "\n\n".join([
        "# Stage 1 block passes over tasks, integrate memory",
        markdown_table(["figure", "measured", "goal", ""], rows),
        f"## Block job, 1 task and 2 tasks ({s['blocks']} blocks of {s['block_shards']} x {s['per_shard']} samples, "
        f"k {s['k']}, {s['teachers']}, one torch thread per task)",
        f"Arrays identical: {tasks['identical']} (differing: {tasks['differing_arrays'] or 'none'}). Median wall: "
        f"1 task {tasks['median_wall_s']['1']:.2f} s, 2 tasks {tasks['median_wall_s']['2']:.2f} s. CPU seconds of the "
        f"busiest task (what bounds the wall on free cores): 1 task {tasks['median_busiest_task_cpu_s']['1']:.2f}, "
        f"2 tasks {tasks['median_busiest_task_cpu_s']['2']:.2f} (ratio {tasks['busiest_task_cpu_ratio']:.3f}).",
        markdown_table(["round", "tasks", "wall s", "busiest task CPU s", "load average before", "seconds per pass"],
                       runs),
        f"## Integrate pass memory ({m['images_per_block']} images per block, {m['captions_per_image']} captions "
        f"each, dual widths {m['dual_widths']}, fused {m['fused_width']}, k {m['k']}, {m['integration_steps']} steps)",
        markdown_table(["blocks", "pass", "RSS before MiB", "peak RSS MiB", "seconds"], points),
        f"Peak RSS 8 / 2 blocks: streaming {memory['ratios']['streaming']['peak']:.3f} (above the RSS at its start "
        f"{memory['ratios']['streaming']['peak_above_start']:.3f}), in memory "
        f"{memory['ratios']['in_memory']['peak']:.3f} ({memory['ratios']['in_memory']['peak_above_start']:.3f}).",
    ])


def main() -> None:
    if sys.argv[1:2] == ["--task"]:
        config, rank, world, ready, go, out = sys.argv[2:8]
        _task_child(Path(config), int(rank), int(world), Path(ready), Path(go), Path(out))
        return
    if sys.argv[1:2] == ["--integrate"]:
        store, way, dim, steps = sys.argv[2:6]
        _integrate_child(Path(store), way, int(dim), int(steps))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="write scale_blocks.{json,md} here")
    args = parser.parse_args()
    results = measure(args.quick)
    if args.out is not None:
        publish(args.out, NAME, results, figures, markdown)
    print(json.dumps({k: v for k, v in results.items() if k != "details"}, indent=2))


if __name__ == "__main__":
    main()
