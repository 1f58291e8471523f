"""Text-to-image search latency, peak memory and exactness over a 100k-image gallery, one thread.

Exports the student (reused when the export holds the same weights), indexes the real test
split with the ONNX image encoder, then builds the gallery: the real index tiled up to --rows
rows, every copy after the first perturbed (Gaussian noise, renormalized). The default world
has only 22k images, so 100k distinct real images do not exist; the gallery says so in its
manifest. Variants, side by side in one run (``--variants``):

- ``numpy``, ``onnxruntime``, ``faiss``: ``pipeline.search.Searcher``'s scorers (faiss: a
  ``QT_fp16`` scalar-quantizer index read straight from ``embeddings.npy``; see its docstring);
- ``faiss_flat``: ``faiss.IndexFlatIP`` over the float32 gallery (built here, in the worker);
- ``faiss_sq8``: ``faiss.IndexScalarQuantizer`` ``QT_8bit`` (trained on a strided sample of
  ``TRAIN_ROWS`` rows; built here);
- ``faiss_int8_text``: the faiss scorer with the text encoder dynamically quantized by
  ``onnxruntime.quantization.quantize_dynamic`` (QInt8 weights), from a search-only copy of
  the export (``export.json`` + tokenizer + the quantized encoder).

Each variant runs the queries (one real caption per test image) in a fresh subprocess with
one thread (OMP/MKL/OpenBLAS, onnxruntime, faiss's OpenMP), which imports neither torch nor
transformers. Per query: text encode, then the gallery scan + top-k, timed apart. Then the
same queries in batches of ``BATCH`` (one encoder run and one scan per batch), per-query cost
reported. Peak RSS is the subprocess's own VmHWM (not ru_maxrss: Linux carries the forking
parent's high-water mark, here the exporting process with torch loaded, into the child's),
read after the single queries and again after the batches. Exactness: the recall of the exact
top-k (float64 scores of the stored float16 rows with the float text encoder's query; the
fraction of those rows a variant returns, averaged over queries) and the own-image hit rate
(the query caption's image, any copy, in the top k). With ``--wide-dim 256`` the scans also
run scan-only over a 256-d gallery (the 128-d gallery concatenated with a noisy copy of itself,
queries likewise doubled) for comparison with the older 256-d students.

Results: bench/results/search_latency.{json,md}; its figures (median ms and peak RSS of the
scorer ``mcad search`` uses by default) are the ones bench/results/summary.json collects.

    .venv/bin/python bench/search_latency.py [--student runs/default/student] [--rows 100000] [--queries 200]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: bench.common
    sys.path.insert(0, str(ROOT))

NAME = "search_latency"
TARGET_MS, TARGET_P95_MS, TARGET_MB = 5.0, 7.0, 80.0  # README: per query, 100k gallery, one thread
NOISE = 0.02  # per-dimension std of the perturbation of the tiled copies
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
WARMUP = 5
BATCH = 64
TRAIN_ROWS = 16_384  # QT_8bit's per-dimension ranges come from this many (strided) gallery rows
BUILD_ROWS = 8192  # rows converted per step when the worker builds a faiss index itself
VARIANTS = ("numpy", "onnxruntime", "faiss", "faiss_flat", "faiss_sq8", "faiss_int8_text")
SCANS = {  # variant -> (Searcher scorer, index built in the worker or None, text encoder)
    "numpy": ("numpy", None, "float"),
    "onnxruntime": ("onnxruntime", None, "float"),
    "faiss": ("faiss", None, "float"),
    "faiss_flat": ("numpy", "flat", "float"),
    "faiss_sq8": ("numpy", "sq8", "float"),
    "faiss_int8_text": ("faiss", None, "int8"),
}
DESCRIPTION = {
    "numpy": "numpy: float16 -> float32 chunks (bit trick) + matmul",
    "onnxruntime": "onnxruntime: score.onnx (Cast + MatMul) over chunks",
    "faiss": "faiss IndexScalarQuantizer QT_fp16 (exact values)",
    "faiss_flat": "faiss IndexFlatIP, float32 copy",
    "faiss_sq8": "faiss IndexScalarQuantizer QT_8bit",
    "faiss_int8_text": "faiss QT_fp16 + int8 (dynamic) text encoder",
}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default="runs/default/student")
    parser.add_argument("--shards", default="data/default/test", help="Real gallery images and query captions.")
    parser.add_argument("--work", default="artifacts/search_bench", help="Export and indexes (reused).")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--wide-dim", type=int, default=256,
                        help="Also time the scans alone over a gallery this wide (0: skip).")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: a JSON spec for the measuring subprocess
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return None
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    return run(args, variants)


# ---------------------------------------------------------------------- the measured process


def worker(spec: dict) -> None:
    """The measured process: only pipeline.search (numpy, onnxruntime, tokenizers, faiss) is imported."""
    import numpy as np

    start = time.perf_counter()
    from pipeline.search import Searcher

    faiss_import_s = None
    if spec["scorer"] == "faiss" or spec.get("build"):  # timed apart from building the index
        tick = time.perf_counter()
        import faiss  # noqa: F401

        faiss_import_s = time.perf_counter() - tick
    searcher = Searcher(spec["index"], export_dir=spec.get("export"), scorer=spec["scorer"], threads=1)
    load_s = searcher.load_seconds
    if spec.get("build"):
        tick = time.perf_counter()
        index = _build_faiss(searcher, spec["build"])
        load_s = time.perf_counter() - tick

        def search_batch(vectors, k):
            k = min(k, index.ntotal)
            scores, rows = index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
            return [searcher._hits(s[r >= 0], r[r >= 0]) for s, r in zip(scores, rows)]

        def search(vector, k):
            return search_batch(vector[None], k)[0]
    else:
        search, search_batch = searcher.search, searcher.search_batch
    startup = time.perf_counter() - start
    texts, k = spec["queries"], spec["k"]
    if spec.get("vectors"):  # scan only: the query embeddings are given
        given = np.asarray(spec["vectors"], np.float32)

        def encode(i):
            return given[i]

        def encode_batch(ids):
            return given[ids]
    else:
        def encode(i):
            return searcher.encode(texts[i])

        def encode_batch(ids):
            return searcher.encode_batch([texts[i] for i in ids])
    for i in range(min(WARMUP, len(texts))):
        search(encode(i), k)
    encode_ms, search_ms, top = [], [], []
    for i in range(len(texts)):
        t0 = time.perf_counter()
        vector = encode(i)
        t1 = time.perf_counter()
        hits = search(vector, k)
        t2 = time.perf_counter()
        encode_ms.append((t1 - t0) * 1e3)
        search_ms.append((t2 - t1) * 1e3)
        top.append([h.row for h in hits])
    single_hwm = _vm_hwm_mb()
    n, size = len(texts), spec["batch"]
    rounds = max(3, -(-n // size))
    batch_encode_ms, batch_search_ms, batch_top = [], [], {}
    for r in range(-1, rounds):  # round -1: warm-up
        ids = [(max(r, 0) * size + j) % n for j in range(size)]
        t0 = time.perf_counter()
        vectors = encode_batch(ids)
        t1 = time.perf_counter()
        hits = search_batch(vectors, k)
        t2 = time.perf_counter()
        if r >= 0:
            batch_encode_ms.append((t1 - t0) * 1e3)
            batch_search_ms.append((t2 - t1) * 1e3)
            for i, found in zip(ids, hits):
                batch_top.setdefault(i, [h.row for h in found])
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "timm", "open_clip"})
    result = {"startup_s": startup, "load_s": load_s, "faiss_import_s": faiss_import_s,
              "encode_ms": encode_ms, "search_ms": search_ms, "top": top,
              "batch_encode_ms": batch_encode_ms, "batch_search_ms": batch_search_ms,
              "batch_top": {str(i): rows for i, rows in batch_top.items()},
              "vm_hwm_mb": single_hwm, "vm_hwm_batch_mb": _vm_hwm_mb(), "heavy_modules": heavy,
              "rows": len(searcher), "dim": searcher.dim}
    Path(spec["result"]).write_text(json.dumps(result))


def _build_faiss(searcher, kind: str):
    """``faiss.IndexFlatIP`` (``flat``) or a ``QT_8bit`` scalar quantizer (``sq8``) of the searcher's gallery.

    The code buffer is sized once and filled chunk by chunk (``sa_encode`` of float32 chunks), so
    building holds no float32 copy of the gallery beyond what the index itself stores.
    """
    import faiss
    import numpy as np

    from pipeline.search import half_to_float32

    faiss.omp_set_num_threads(1)
    gallery = searcher.gallery
    n, d = gallery.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "sq8":
        index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        sample = gallery[:: max(1, n // TRAIN_ROWS)]
        index.train(half_to_float32(sample, np.empty(sample.shape, np.int32)))
        del sample
        searcher._released = 0
        searcher._release(n)  # the mapped pages the strided sample touched leave the resident set
    else:
        raise ValueError(f"unknown faiss index {kind!r}")
    size = index.code_size
    index.codes.resize(n * size)
    codes = faiss.rev_swig_ptr(index.codes.data(), n * size).reshape(n, size)
    work = np.empty((BUILD_ROWS, d), np.int32)
    searcher._released = 0
    for start in range(0, n, BUILD_ROWS):
        chunk = gallery[start:start + BUILD_ROWS]
        codes[start:start + len(chunk)] = index.sa_encode(half_to_float32(chunk, work[:len(chunk)]))
        searcher._release(start + len(chunk))  # as the chunked scorers do: mapped pages do not pile up
    index.ntotal = n
    return index


# ---------------------------------------------------------------------- the driver


def run(args, variants: list[str]) -> dict:
    from bench.common import Figure, publish
    from mcad_core.shards import iter_samples, list_shards

    work = (ROOT / args.work).resolve()
    export_dir = _ensure_export(ROOT / args.student, work / "export")
    real = _ensure_real_index(export_dir, args.shards, work / "index_real")
    gallery = _ensure_gallery(real, export_dir, args.rows, work / f"index_{args.rows}")
    int8_export = _ensure_int8_export(export_dir, work / "export_int8") if "faiss_int8_text" in variants else None
    samples = list(iter_samples(list_shards(args.shards)))
    step = max(1, len(samples) // args.queries)
    picked = samples[::step][: args.queries]
    queries, targets = [s.captions[0] for s in picked], [s.key for s in picked]
    vectors = _float_queries(gallery, queries)
    load = os.getloadavg()
    exact = {real: _exact_top(real, vectors, args.k), gallery: _exact_top(gallery, vectors, args.k)}
    plan = [("real_numpy", real, "numpy", None)] + [(v, gallery, v, None) for v in variants]
    if args.wide_dim:
        wide, wide_export, wide_vectors = _ensure_wide(gallery, export_dir, vectors, args.wide_dim, work)
        exact[wide] = _exact_top(wide, wide_vectors, args.k)
        plan += [(f"wide_{v}", wide, v, (wide_export, wide_vectors)) for v in variants if v != "faiss_int8_text"]
    runs = {}
    for name, index, variant, scan_only in plan:
        scorer, build, text = SCANS[variant]
        spec = {"index": str(index), "scorer": scorer, "build": build, "queries": queries, "k": args.k,
                "batch": BATCH, "export": str(int8_export) if text == "int8" else None}
        if scan_only:
            spec["export"], spec["vectors"] = str(scan_only[0]), scan_only[1].tolist()
        runs[name] = {"variant": variant, "scan": DESCRIPTION[variant], "text_encoder": "none (scan only)"
                      if scan_only else text, **_measure(name, spec, targets, exact[index], work)}
        print(f"{name}: {_line(runs[name])}", flush=True)
    result = {
        "gallery": json.loads((gallery / "index.json").read_text())["synthetic"],
        "real_index": {"dir": str(real), "rows": runs["real_numpy"]["rows"]},
        "queries": {"count": len(queries), "k": args.k, "warmup": WARMUP, "batch": BATCH,
                    "source": f"first caption of every {step}th image of {args.shards}"},
        "targets": {"median_ms": TARGET_MS, "p95_ms": TARGET_P95_MS, "peak_rss_mb": TARGET_MB},
        "default_scorer": _default_scorer(),
        "wide_dim": args.wide_dim or None,
        "runs": runs,
        "machine": {"cpu": _cpu(), "nproc": os.cpu_count(), "loadavg_at_start": load,
                    "loadavg_at_end": os.getloadavg(), "python": platform.python_version(), "threads": 1},
        "export": str(export_dir), "export_int8": str(int8_export) if int8_export else None,
    }

    def figures(res: dict) -> list:
        default = res["runs"].get(res["default_scorer"])
        rows = res["gallery"]["rows"]
        label = f"{rows // 1000}k" if rows % 1000 == 0 else f"{rows:,}-row"
        median, rss = (default["median_ms"], default["peak_rss_mb"]) if default else (None, None)
        return [Figure(NAME, f"search median ms, {label} gallery", median, "ms", f"<= {TARGET_MS:g}",
                       None if median is None else median <= TARGET_MS),
                Figure(NAME, f"search peak RSS MB, {label} gallery", rss, "MB", f"<= {TARGET_MB:g}",
                       None if rss is None else rss <= TARGET_MB)]

    out = ROOT / args.out
    publish(out, NAME, result, figures, _markdown)
    print(_markdown(result))
    return result


def _measure(name: str, spec: dict, targets: list[str], exact: list[list[int]], work: Path) -> dict:
    import numpy as np

    spec_path, result_path = work / f"spec_{name}.json", work / f"result_{name}.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} ({spec['index']}) failed with {proc.returncode}")
    raw = json.loads(result_path.read_text())
    keys = np.load(Path(spec["index"]) / "keys.npy", mmap_mode="r")
    encode, search = np.asarray(raw["encode_ms"]), np.asarray(raw["search_ms"])
    total = encode + search
    k = spec["k"]
    hits = [t in {bytes(keys[r]).decode().split("~")[0] for r in top} for t, top in zip(targets, raw["top"])]
    batch_encode, batch_search = np.asarray(raw["batch_encode_ms"]), np.asarray(raw["batch_search_ms"])
    batch_top = {int(i): rows for i, rows in raw["batch_top"].items()}
    scan_only = bool(spec.get("vectors"))
    return {
        "scorer": spec["scorer"], "rows": raw["rows"], "dim": raw["dim"],
        "median_ms": float(np.median(total)), "p95_ms": float(np.percentile(total, 95)),
        "mean_ms": float(total.mean()), "min_ms": float(total.min()),
        "encode_median_ms": None if scan_only else float(np.median(encode)),
        "search_median_ms": float(np.median(search)), "search_p95_ms": float(np.percentile(search, 95)),
        "peak_rss_mb": raw["vm_hwm_mb"], "peak_rss_batch_mb": raw["vm_hwm_batch_mb"],
        "startup_s": raw["startup_s"], "load_s": raw["load_s"], "faiss_import_s": raw["faiss_import_s"],
        "heavy_modules": raw["heavy_modules"],
        "recall_at_k": _recall(raw["top"], exact, k), "hit_at_k": float(np.mean(hits)),
        "batch": {"size": BATCH, "batches": len(batch_search),
                  "per_query_ms": float(np.median(batch_encode + batch_search)) / BATCH,
                  "encode_per_query_ms": None if scan_only else float(np.median(batch_encode)) / BATCH,
                  "search_per_query_ms": float(np.median(batch_search)) / BATCH,
                  "recall_at_k": _recall([batch_top[i] for i in sorted(batch_top)],
                                         [exact[i] for i in sorted(batch_top)], k)},
    }


def _recall(found: list[list[int]], exact: list[list[int]], k: int) -> float:
    """Mean over queries of the fraction of the exact top-k rows among the rows found."""
    return float(sum(len(set(f) & set(e)) / min(k, len(e)) for f, e in zip(found, exact)) / len(exact))


def _float_queries(index: Path, queries: list[str]):
    """float32 (Q, D) embeddings of the queries with the float text encoder (one at a time, as the workers)."""
    import numpy as np

    from pipeline.search import Searcher

    searcher = Searcher(index, scorer="numpy", threads=1)
    vectors = np.stack([searcher.encode(q) for q in queries])
    searcher.close()
    return vectors


def _exact_top(index: Path, vectors, k: int) -> list[list[int]]:
    """Per query, the k rows with the highest float64 score of the stored float16 rows, best first (ties: lower row)."""
    import numpy as np

    gallery = np.load(index / "embeddings.npy", mmap_mode="r")
    q = np.asarray(vectors, np.float64)
    best_scores, best_rows = np.empty((len(q), 0)), np.empty((len(q), 0), np.int64)
    for start in range(0, len(gallery), 16_384):
        block = np.asarray(gallery[start:start + 16_384], np.float64)
        scores = np.concatenate([best_scores, q @ block.T], axis=1)
        rows = np.concatenate([best_rows, np.broadcast_to(np.arange(start, start + len(block)), (len(q), len(block)))],
                              axis=1)
        keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # stable: earlier (lower) rows first on ties
        best_scores, best_rows = np.take_along_axis(scores, keep, 1), np.take_along_axis(rows, keep, 1)
    return best_rows.tolist()


# ---------------------------------------------------------------------- inputs (reused across runs)


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
    from mcad_core.shards import list_shards
    from pipeline.search import build_index

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
                 "source": str(real), "score_graph": "batched",
                 "note": f"the {real_index['count']}-image real index (ONNX image encoder) "
                 f"tiled to {rows} rows; copies after the first get N(0, {NOISE}) noise per dimension, "
                 "renormalized (the default world has too few real images for 100k)"}
    if _same_synthetic(out, real_index["export_id"], synthetic):
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


def _ensure_wide(gallery: Path, export_dir: Path, vectors, dim: int, work: Path):
    """A ``dim``-wide copy of the gallery for scan-only runs: (index, export, queries).

    Rows: the gallery's rows, then a noisy copy of them (and so on up to ``dim``), renormalized;
    queries: the query embeddings repeated likewise, renormalized. The export is a search-only copy
    of the real one (same export_id, ``embed_dim`` = ``dim``), so ``Searcher`` opens the index; its
    text encoder is loaded but not used (the queries are given).
    """
    import numpy as np

    from pipeline.search import write_index

    base_dim = vectors.shape[1]
    reps = -(-dim // base_dim)
    wide_export = _search_only_export(export_dir, work / f"export_{dim}", {"embed_dim": dim})
    manifest = json.loads((wide_export / "export.json").read_text())
    out = work / f"index_{json.loads((gallery / 'index.json').read_text())['count']}_{dim}d"
    synthetic = {"rows": json.loads((gallery / "index.json").read_text())["count"], "dim": dim, "source": str(gallery),
                 "noise_std": NOISE, "seed": 1, "score_graph": "batched",
                 "note": f"the gallery's rows and {reps - 1} noisy copies of them side by side, cut to {dim} "
                 "dimensions and renormalized (scan-only runs)"}
    q = np.tile(vectors, (1, reps))[:, :dim]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    if not _same_synthetic(out, manifest["export_id"], synthetic):
        base = np.load(gallery / "embeddings.npy").astype(np.float32)
        rng = np.random.default_rng(1)
        parts = [base] + [base + rng.standard_normal(base.shape, dtype=np.float32) * NOISE for _ in range(reps - 1)]
        wide = np.concatenate(parts, axis=1)[:, :dim]
        wide /= np.linalg.norm(wide, axis=1, keepdims=True)
        keys = [bytes(k).decode() for k in np.load(gallery / "keys.npy")]
        write_index(out, wide.astype(np.float16), keys, wide_export, manifest, {"synthetic": synthetic})
    return out, wide_export, q.astype(np.float32)


def _ensure_int8_export(export_dir: Path, out: Path) -> Path:
    """A search-only copy of the export whose text encoder is ``quantize_dynamic``'s (QInt8 weights)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    manifest = json.loads((export_dir / "export.json").read_text())
    quantized = {"tool": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8",
                 "source": manifest["files"]["text_onnx"]}
    if (out / "export.json").is_file():
        saved = json.loads((out / "export.json").read_text())
        if saved.get("export_id") == manifest["export_id"] and saved.get("quantized") == quantized:
            return out
    name = "text_encoder.int8.onnx"
    staging = out.parent / (out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    quantize_dynamic(export_dir / manifest["files"]["text_onnx"], staging / name, weight_type=QuantType.QInt8)
    _search_only_export(export_dir, staging, {"quantized": quantized}, text_onnx=name)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def _search_only_export(export_dir: Path, out: Path, changes: dict, text_onnx: str | None = None) -> Path:
    """``out``: export.json (with ``changes``), the tokenizer, and the text encoder unless ``text_onnx`` names one."""
    manifest = json.loads((export_dir / "export.json").read_text())
    files = dict(manifest["files"])
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Path(manifest["text"]["tokenizer"])
    (out / tokenizer).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(export_dir / tokenizer, out / tokenizer)
    if text_onnx is None:
        source = export_dir / files["text_onnx"]
        for path in [source, *source.parent.glob(source.name + ".data")]:
            shutil.copy2(path, out / path.name)
    else:
        files["text_onnx"] = text_onnx
    (out / "export.json").write_text(json.dumps({**manifest, **changes, "files": files}, indent=2) + "\n")
    return out


def _same_synthetic(out: Path, export_id: str, synthetic: dict) -> bool:
    manifest = out / "index.json"
    if not manifest.is_file():
        return False
    saved = json.loads(manifest.read_text())
    return saved.get("export_id") == export_id and saved.get("synthetic") == synthetic


def _default_scorer() -> str:
    from pipeline.search import DEFAULT_SCORER

    return DEFAULT_SCORER


# ---------------------------------------------------------------------- reporting


def _markdown(result: dict) -> str:
    g, q, m = result["gallery"], result["queries"], result["machine"]
    k = q["k"]
    lines = [
        f"Text-to-image search, 1 thread, {q['count']} real captions as queries (k={k}, {q['warmup']} warm-up "
        f"queries not timed). Gallery: {g['note']}. Latency per query = text encode (tokenizers + onnxruntime) "
        f"+ scan of every row + top-{k}. Peak RSS: the search subprocess's VmHWM after the single queries. "
        f"`mcad search`'s default scorer: **{result['default_scorer']}**.",
        "",
        f"Machine: {m['cpu']}, {m['nproc']} cores (1-minute load average {m['loadavg_at_start'][0]:.2f} at start, "
        f"{m['loadavg_at_end'][0]:.2f} at end).",
        "",
        f"| run | scan | dim | rows | text encoder | median ms (target {TARGET_MS:g}) | p95 ms (target "
        f"{TARGET_P95_MS:g}) | min ms | encode ms | scan ms | peak RSS MB (target {TARGET_MB:g}) | load s | "
        f"recall of exact top-{k} | own image in top {k} | batch of {q['batch']}: ms/query (encode + scan) | "
        f"batch of {q['batch']}: peak RSS MB | "
        "torch imported |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in result["runs"].items():
        b = r["batch"]
        encode = "-" if r["encode_median_ms"] is None else f"{r['encode_median_ms']:.2f}"
        batch_encode = "-" if b["encode_per_query_ms"] is None else f"{b['encode_per_query_ms']:.3f}"
        lines.append(
            f"| {name} | {r['scan']} | {r['dim']} | {r['rows']:,} | {r['text_encoder']} | {r['median_ms']:.2f} | "
            f"{r['p95_ms']:.2f} | {r['min_ms']:.2f} | {encode} | {r['search_median_ms']:.2f} | "
            f"{r['peak_rss_mb']:.1f} | {r['load_s']:.3f} | {r['recall_at_k']:.3f} | {r['hit_at_k']:.3f} | "
            f"{b['per_query_ms']:.3f} ({batch_encode} + {b['search_per_query_ms']:.3f}) | "
            f"{r['peak_rss_batch_mb']:.1f} | {'yes' if r['heavy_modules'] else 'no'} |")
    lines += [
        "",
        "encode / scan ms: medians of the two parts of a single query. min ms: the fastest query, the least "
        "disturbed by other jobs on the machine. load s: building the scorer's own copy of the gallery when the "
        "searcher opens (0 for the chunked scorers, which map the file; `import faiss` is timed apart: "
        f"{_faiss_import(result)}). "
        f"recall of exact top-{k}: the fraction of the exact top-{k} rows (float64 scores of the stored float16 "
        "rows with the float text encoder's query) that the run returns, averaged over queries. own image: the "
        f"query caption's image (any copy) among the top {k}. batch: {q['batch']} queries per encoder run and per "
        "scan, the median batch's time divided by its size (recall of the batched results: in the JSON); its peak "
        "RSS is the VmHWM after the batches too.",
    ]
    if result["wide_dim"]:
        lines[-1] += (f" wide_* runs: scan only, over the {result['wide_dim']}-d copy of the gallery with given "
                      "query embeddings (no text encoder, so their ms are scan + top-k).")
    return "\n".join(lines) + "\n"


def _faiss_import(result: dict) -> str:
    times = sorted(r["faiss_import_s"] for r in result["runs"].values() if r.get("faiss_import_s") is not None)
    return f"median {times[len(times) // 2]:.3f} s" if times else "not run"


def _line(r: dict) -> str:
    return (f"median {r['median_ms']:.2f} ms (target {TARGET_MS:g}), p95 {r['p95_ms']:.2f} ms, scan "
            f"{r['search_median_ms']:.2f} ms, peak RSS {r['peak_rss_mb']:.1f} MB (target {TARGET_MB:g}), load "
            f"{r['load_s']:.3f} s, recall {r['recall_at_k']:.3f}, hit@k {r['hit_at_k']:.3f}, batch "
            f"{r['batch']['per_query_ms']:.3f} ms/query")


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
