"""Where the search process's resident memory goes: RSS and peak RSS after each step, in fresh processes.

    .venv/bin/python bench/search_rss_parts.py [--work artifacts/search_bench] [--rows 100000]

Two processes, each started clean and free of torch:

- ``default``: `mcad search`'s default path step by step: numpy, tokenizers, onnxruntime and faiss
  imported, the searcher opened (tokenizer, ONNX text session, faiss's copy of the gallery), then
  the queries (the first caption of evenly spaced ``--shards`` samples, as search_latency.py picks them).
- ``floor``: what any exact faiss search over this gallery needs before a text encoder exists:
  numpy, tokenizers, faiss, the gallery and the tokenizer, then as many tokenizations and scans of
  random query vectors, with no onnxruntime.

Needs the export and index that ``bench/search_latency.py`` leaves in ``--work``. Writes
``bench/results/search_rss_parts.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_MB = 80.0  # issue 21's goal for the search process's peak RSS


def _memory() -> dict[str, float]:
    """This process's VmHWM (peak RSS), VmRSS and its anonymous / file-backed parts, in MB."""
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def worker(mode: str, index: Path, export: Path, queries: list[str]) -> list[dict]:
    steps: list[dict] = []

    def mark(name: str) -> None:
        steps.append({"step": name, **_memory()})

    mark("python")
    import numpy as np

    mark("+ numpy")
    import tokenizers  # noqa: F401

    mark("+ tokenizers")
    if mode == "default":
        import onnxruntime  # noqa: F401

        mark("+ onnxruntime")
    import faiss  # noqa: F401

    mark("+ faiss")
    from pipeline import search as ps

    if mode == "default":
        searcher = ps.Searcher(index, export_dir=export, scorer="faiss", threads=1)
        mark("+ searcher opened (tokenizer, ONNX text session, gallery in faiss)")
        for text in queries:
            searcher.query(text, k=10)
        mark(f"+ {len(queries)} queries")
    else:
        manifest = ps.read_export_manifest(export)
        handle = open(index / ps.EMBEDDINGS, "rb")  # noqa: SIM115 - open for the process's life
        gallery, _mapping, offset = ps._map_npy(handle)
        shape = gallery.shape
        faiss_index = ps._faiss_fp16_index(handle, offset, shape, 1)
        mark("+ gallery in faiss")
        tokenizer = ps.load_tokenizer(ps.resolve_inside(export, manifest["text"]["tokenizer"], "tokenizer"), manifest)
        mark("+ tokenizer")
        rng = np.random.default_rng(0)
        for text in queries:
            tokenizer.encode_batch([text])
            faiss_index.search(rng.standard_normal((1, shape[1])).astype(np.float32), 10)
        mark(f"+ {len(queries)} tokenizations and scans")
    return steps


def _queries(shards: str, count: int) -> list[str]:
    from mcad_core.shards import iter_samples, list_shards

    samples = list(iter_samples(list_shards(shards)))
    return [s.captions[0] for s in samples[:: max(1, len(samples) // count)][:count]]


def _markdown(result: dict) -> str:
    lines = [
        "# Search process memory, step by step",
        "",
        (f"Gallery: `{result['index']}` ({result['rows']:,} rows), one thread, {result['queries']} queries. "
         "Each column is read from /proc/self/status after the step; RSS counts the file-backed pages of "
         "the shared libraries (RssFile) as well as the process's own memory (RssAnon)."),
        "",
    ]
    for mode, title in (("default", "`mcad search` (default: faiss QT_fp16, onnxruntime text encoder)"),
                        ("floor", "The floor: faiss over the gallery + tokenizer, no text encoder at all")):
        lines += [f"## {title}", "", "| step | peak RSS MB | RSS MB | anon MB | file MB |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {s['step']} | {s['VmHWM']} | {s['VmRSS']} | {s['RssAnon']} | {s['RssFile']} |"
                  for s in result[mode]]
        lines.append("")
    lines.append(f"Peak RSS: default {result['default_peak_mb']} MB, floor without a text encoder "
                 f"{result['floor_peak_mb']} MB; target {TARGET_MB:.0f} MB.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="artifacts/search_bench", help="bench/search_latency.py's work directory")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--shards", default="data/default/test", help="Where the query captions come from.")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: the mode of the measuring subprocess
    parser.add_argument("--queries-file", help=argparse.SUPPRESS)  # internal: the parent's captions, as JSON
    args = parser.parse_args(argv)
    work = Path(args.work)
    index, export = work / f"index_{args.rows}", work / "export"
    if not (index / "index.json").is_file() or not (export / "export.json").is_file():
        raise SystemExit(f"{index} or {export} is missing: run bench/search_latency.py first (make bench)")
    if args.worker:
        queries = json.loads(Path(args.queries_file).read_text())
        print(json.dumps(worker(args.worker, index, export, queries)))
        return None
    queries = _queries(args.shards, args.queries)
    queries_file = Path(args.out) / ".search_rss_queries.json"
    queries_file.write_text(json.dumps(queries))
    result: dict = {"index": str(index), "rows": args.rows, "queries": len(queries), "target_mb": TARGET_MB}
    for mode in ("default", "floor"):
        done = subprocess.run([sys.executable, __file__, "--work", str(work), "--rows", str(args.rows),
                               "--worker", mode, "--queries-file", str(queries_file)],
                              check=True, capture_output=True, text=True)
        result[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        result[f"{mode}_peak_mb"] = max(step["VmHWM"] for step in result[mode])
    queries_file.unlink()
    from bench.common import Figure, write_results

    result["figures"] = [
        Figure("search_rss_parts", "search peak RSS MB, 100k gallery, without any text encoder (floor)",
               result["floor_peak_mb"], "MB", f"<= {TARGET_MB:.0f}", result["floor_peak_mb"] <= TARGET_MB).to_dict(),
        Figure("search_rss_parts", "search process RSS MB after importing onnxruntime (default path)",
               next(s["VmRSS"] for s in result["default"] if s["step"] == "+ onnxruntime"), "MB", "", None).to_dict(),
    ]

    write_results(Path(args.out), "search_rss_parts", result, _markdown(result))
    print(_markdown(result))
    return result


if __name__ == "__main__":
    main()
