"""Text-to-image search latency and peak memory over a 100k-image gallery, one thread.

Exports the student (reused when the export holds the same weights), indexes the real test
split with the ONNX image encoder, then builds the gallery: the real index tiled up to --rows
rows, every copy after the first perturbed (Gaussian noise, renormalized). The default world
has only 22k images, so 100k distinct real images do not exist; the gallery says so in its
manifest. Each scorer then runs the queries (one real caption per test image) in a fresh
subprocess with one thread (OMP/MKL/OpenBLAS and onnxruntime), which imports neither torch nor
transformers; latency is text encode + gallery search per query, peak RSS the subprocess's own
VmHWM (not ru_maxrss: Linux carries the forking parent's high-water mark, here the exporting
process with torch loaded, into the child's). Results: bench/results/search_latency.{json,md}.

    .venv/bin/python bench/search_latency.py [--student runs/default/student] [--rows 100000] [--queries 200]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_MS, TARGET_MB = 8.0, 100.0
NOISE = 0.02  # per-dimension std of the perturbation of the tiled copies
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
WARMUP = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default="runs/default/student")
    parser.add_argument("--shards", default="data/default/test", help="Real gallery images and query captions.")
    parser.add_argument("--work", default="artifacts/search_bench", help="Export and indexes (reused).")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--scorers", default="numpy,onnxruntime")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: a JSON spec for the measuring subprocess
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return
    run(args)


def worker(spec: dict) -> None:
    """The measured process: only pipeline.search (numpy, onnxruntime, tokenizers) is imported."""
    start = time.perf_counter()
    from pipeline.search import Searcher

    searcher = Searcher(spec["index"], scorer=spec["scorer"], threads=1)
    startup = time.perf_counter() - start
    queries = spec["queries"]
    for text in queries[:WARMUP]:
        searcher.query(text, spec["k"])
    encode_ms, search_ms, top = [], [], []
    for text in queries:
        t0 = time.perf_counter()
        vector = searcher.encode(text)
        t1 = time.perf_counter()
        hits = searcher.search(vector, spec["k"])
        t2 = time.perf_counter()
        encode_ms.append((t1 - t0) * 1e3)
        search_ms.append((t2 - t1) * 1e3)
        top.append([h.key for h in hits])
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "timm", "open_clip"})
    result = {"startup_s": startup, "encode_ms": encode_ms, "search_ms": search_ms, "top": top,
              "vm_hwm_mb": _vm_hwm_mb(), "heavy_modules": heavy, "rows": len(searcher)}
    Path(spec["result"]).write_text(json.dumps(result))


def run(args) -> None:
    from mcad_core.atomic import atomic_write_bytes, atomic_write_json
    from mcad_core.shards import iter_samples, list_shards

    work = (ROOT / args.work).resolve()
    export_dir = _ensure_export(ROOT / args.student, work / "export")
    real = _ensure_real_index(export_dir, args.shards, work / "index_real")
    gallery = _ensure_gallery(real, export_dir, args.rows, work / f"index_{args.rows}")
    samples = list(iter_samples(list_shards(args.shards)))
    step = max(1, len(samples) // args.queries)
    picked = samples[::step][: args.queries]
    queries, targets = [s.captions[0] for s in picked], [s.key for s in picked]
    load = os.getloadavg()
    runs = {}
    for name, index in [("real", real)] + [(f"gallery_{s}", gallery) for s in args.scorers.split(",")]:
        scorer = name.split("_", 1)[1] if name.startswith("gallery_") else "numpy"
        runs[name] = _measure(index, scorer, queries, targets, args.k, work)
        print(f"{name}: {_line(runs[name])}", flush=True)
    result = {
        "gallery": json.loads((gallery / "index.json").read_text())["synthetic"],
        "real_index": {"dir": str(real), "rows": runs["real"]["rows"]},
        "queries": {"count": len(queries), "k": args.k, "warmup": WARMUP,
                    "source": f"first caption of every {step}th image of {args.shards}"},
        "targets": {"median_ms": TARGET_MS, "peak_rss_mb": TARGET_MB},
        "runs": runs,
        "machine": {"cpu": _cpu(), "nproc": os.cpu_count(), "loadavg_at_start": load,
                    "python": platform.python_version(), "threads": 1},
        "export": str(export_dir),
    }
    out = ROOT / args.out
    atomic_write_json(out / "search_latency.json", result)
    atomic_write_bytes(out / "search_latency.md", _markdown(result).encode())
    print(_markdown(result))


def _measure(index: Path, scorer: str, queries: list[str], targets: list[str], k: int, work: Path) -> dict:
    import numpy as np

    spec_path, result_path = work / f"spec_{scorer}.json", work / f"result_{scorer}.json"
    spec_path.write_text(json.dumps({"index": str(index), "scorer": scorer, "queries": queries, "k": k,
                                     "result": str(result_path)}))
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker for {index} ({scorer}) failed with {proc.returncode}")
    raw = json.loads(result_path.read_text())
    total = np.asarray(raw["encode_ms"]) + np.asarray(raw["search_ms"])
    hits = [t in {key.split("~")[0] for key in top} for t, top in zip(targets, raw["top"])]
    return {
        "scorer": scorer, "rows": raw["rows"],
        "median_ms": float(np.median(total)), "p95_ms": float(np.percentile(total, 95)), "mean_ms": float(total.mean()),
        "min_ms": float(total.min()),
        "encode_median_ms": float(np.median(raw["encode_ms"])), "search_median_ms": float(np.median(raw["search_ms"])),
        "peak_rss_mb": raw["vm_hwm_mb"], "startup_s": raw["startup_s"],
        "heavy_modules": raw["heavy_modules"], "hit_at_k": float(np.mean(hits)),
    }


def _ensure_export(student: Path, export_dir: Path) -> Path:
    """Reuse ``export_dir`` when its open_clip weights are the student's, else export again."""
    from pipeline.export import export_student

    weights = "open_clip_model.safetensors"
    exported = export_dir / "open_clip" / weights
    if not (export_dir / "export.json").is_file() or not exported.is_file() or \
            _sha256(exported) != _sha256(student / weights):
        print(f"exporting {student} -> {export_dir}", flush=True)
        export_student(student, export_dir)
    return export_dir


def _ensure_real_index(export_dir: Path, shards: str, out: Path) -> Path:
    from pipeline.search import build_index
    from mcad_core.shards import list_shards

    export_id = json.loads((export_dir / "export.json").read_text())["export_id"]
    manifest = out / "index.json"
    if not manifest.is_file() or json.loads(manifest.read_text()).get("export_id") != export_id or \
            json.loads(manifest.read_text()).get("shards") != list_shards(shards):
        build_index(export_dir, shards, out, threads=1)
    return out


def _ensure_gallery(real: Path, export_dir: Path, rows: int, out: Path) -> Path:
    """The real index tiled to ``rows`` rows; copy c > 0 of each row is perturbed and renormalized."""
    import numpy as np

    from pipeline.search import write_index

    real_index = json.loads((real / "index.json").read_text())
    synthetic = {"rows": rows, "source_rows": real_index["count"], "noise_std": NOISE, "seed": 0,
                 "source": str(real), "note": f"the {real_index['count']}-image real index (ONNX image encoder) "
                 f"tiled to {rows} rows; copies after the first get N(0, {NOISE}) noise per dimension, "
                 "renormalized (the default world has too few real images for 100k)"}
    manifest = out / "index.json"
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
        if saved.get("export_id") == real_index["export_id"] and saved.get("synthetic") == synthetic:
            return out
    base = np.load(real / "embeddings.npy").astype(np.float32)
    keys = [k.decode() for k in np.load(real / "keys.npy").tolist()]
    copies = -(-rows // len(base))
    rng = np.random.default_rng(0)
    tiled = np.tile(base, (copies, 1))[:rows]
    tiled[len(base):] += rng.standard_normal(tiled[len(base):].shape, dtype=np.float32) * NOISE
    tiled /= np.linalg.norm(tiled, axis=1, keepdims=True)
    all_keys = [keys[i % len(keys)] + ("" if i < len(keys) else f"~{i // len(keys)}") for i in range(rows)]
    export = json.loads((export_dir / "export.json").read_text())
    write_index(out, tiled.astype(np.float16), all_keys, export_dir, export, {"synthetic": synthetic})
    return out


def _markdown(result: dict) -> str:
    g, q = result["gallery"], result["queries"]
    lines = [
        f"Text-to-image search, 1 thread, {q['count']} real captions as queries (k={q['k']}, {q['warmup']} warm-up "
        f"queries not timed). Gallery: {g['note']}. Latency per query = text encode (tokenizers + onnxruntime) "
        "+ scoring every row + top-k. Peak RSS: the search subprocess's VmHWM.",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['nproc']} cores "
        f"(1-minute load average at start {result['machine']['loadavg_at_start'][0]:.2f}).",
        "",
        f"| run | rows | median ms (target ~{TARGET_MS:g}) | p95 ms | min ms | encode ms | search ms | "
        f"peak RSS MB (target ~{TARGET_MB:g}) | hit@k | torch imported |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in result["runs"].items():
        lines.append(f"| {name} ({r['scorer']}) | {r['rows']:,} | {r['median_ms']:.2f} | {r['p95_ms']:.2f} | "
                     f"{r['min_ms']:.2f} | {r['encode_median_ms']:.2f} | {r['search_median_ms']:.2f} | "
                     f"{r['peak_rss_mb']:.1f} | "
                     f"{r['hit_at_k']:.3f} | {'yes' if r['heavy_modules'] else 'no'} |")
    lines += ["", "encode / search ms: medians of the two parts. min ms: the fastest query, the least disturbed by "
              "the other job on the machine. hit@k: the query caption's own image (any copy) among the top k."]
    return "\n".join(lines) + "\n"


def _line(r: dict) -> str:
    return (f"median {r['median_ms']:.2f} ms (target ~{TARGET_MS:g}), p95 {r['p95_ms']:.2f} ms, "
            f"peak RSS {r['peak_rss_mb']:.1f} MB (target ~{TARGET_MB:g}), hit@k {r['hit_at_k']:.3f}")


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    main()
