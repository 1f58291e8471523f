"""clip_benchmark (the unmodified ``clip-benchmark`` package) against ``mcad eval``: same split, same student.

    .venv/bin/python bench/clip_benchmark_check.py [--export exports/default | --student runs/default/student]
        [--shards data/default/test] [--work artifacts/clip_benchmark] [--out bench/results]

1. Writes ``--shards`` in clip_benchmark's webdataset retrieval layout under ``WORK/wds``
   (``pipeline/wds_retrieval.py``: lossless PNG of the decoded pixels, captions one a line).
2. Runs both command lines in subprocesses, on CPU (``CUDA_VISIBLE_DEVICES=""``; ``mcad eval`` runs on CPU)::

       clip_benchmark eval --dataset wds/mcad --dataset_root WORK/wds --split test --task zeroshot_retrieval \\
           --model local-dir:$PWD/EXPORT/open_clip --pretrained '' --recall_k 1 5 10 --no_amp \\
           --num_workers 0 --batch_size 256 --output WORK/clip_benchmark.json
       mcad eval --dual local-dir:$PWD/EXPORT/open_clip --shards SHARDS --out WORK/mcad_eval.json

   ``--task`` must be given: for a ``wds/`` name clip_benchmark would guess classification.
   ``--pretrained`` is ignored by open_clip for a ``local-dir:`` model. ``--no_amp``: clip_benchmark's
   default autocast runs the towers in bfloat16 on CPU (float16 on CUDA), ``mcad eval`` in float32.
   ``--num_workers 0``: with more DataLoader workers than shards, webdataset stops on an empty worker.
3. In this process, checks what both feed the model: clip_benchmark's own model loader
   (``clip_benchmark.models.load_clip``), wds reader, transform and tokenizer against ``mcad eval``'s split,
   pixels and tokenizer, and the embeddings of both paths (clip_benchmark's encode step replicated:
   ``F.normalize(model.encode_*)`` on its batches). It also runs clip_benchmark's own recall code
   (``zeroshot_retrieval.recall_at_k``) on those embeddings, which must reproduce its CLI output.

Directions: clip_benchmark's ``text_retrieval_recall@k`` is image -> text (mcad ``i2t_R@k``: an image is
a hit if ANY of its captions is in the top k) and ``image_retrieval_recall@k`` is text -> image (``t2i_R@k``).

What agreement to expect: both load the same open_clip checkpoint; for images already at the model's
size the pixels and token ids are identical, so the embeddings are equal up to float noise (here:
bitwise). The recalls can still differ where scores tie exactly: ``mcad eval`` ranks a wrong candidate
that ties the right one above it, clip_benchmark keeps ``torch.topk``'s order. Such ties are real in
the default world: a caption shared by several images embeds identically for each of them. So for each
metric the check computes, from ``mcad eval``'s embeddings, the fewest and most hits any tie-breaking
allows when scores may move by up to ``--score-atol`` (a query whose right candidate is within
``2 * score_atol`` of a wrong one may go either way). It passes when the two paths see the same data,
their scores differ by at most ``--score-atol``, clip_benchmark's recall code on the replicated
embeddings reproduces its CLI, and for all six metrics both tools' hit counts lie in that range. With
no ties the range is a single number: exact equality. Exit status 1 on a mismatch, 2 on missing inputs.

Results: ``OUT/clip_benchmark.json`` and ``OUT/clip_benchmark.md``; the two tools' own outputs and logs
in ``WORK``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

NAME = "clip_benchmark"
DATASET = "wds/mcad"
KS = (1, 5, 10)
SCORE_ATOL = 1e-6  # cosine scores; float32 noise of other batch sizes is ~1e-7
BATCH = 256  # mcad eval's batch (EvalConfig.batch_size), also given to clip_benchmark
SHOWN_TIES = 20
VERSIONED = ("clip-benchmark", "open_clip_torch", "torch", "torchvision", "webdataset", "pillow", "transformers")
# mcad metric -> clip_benchmark metric
PAIRS = {**{f"i2t_R@{k}": f"text_retrieval_recall@{k}" for k in KS},
         **{f"t2i_R@{k}": f"image_retrieval_recall@{k}" for k in KS}}


class CheckInputError(Exception):
    """A prerequisite is missing (exit status 2, with what to run first)."""


# ---------------------------------------------------------------------------- commands


def model_spec(export: str | None, student: str | None) -> str:
    """``local-dir:`` spec of the open_clip checkpoint to evaluate."""
    if student:
        path = Path(student.removeprefix("local-dir:")).resolve()
        config = path / "open_clip_config.json"
        if not config.is_file():
            raise CheckInputError(f"{path} is not a saved student (no {config.name}); run `mcad distill` first")
        text_dir = json.loads(config.read_text())["model_cfg"]["text_cfg"].get("hf_model_name", "")
        if text_dir.startswith("/") and not Path(text_dir).is_dir():
            raise CheckInputError(f"{path} was moved since it was saved (its config names {text_dir}); "
                                  "plain open_clip cannot load it: use `mcad export` and --export")
        return f"local-dir:{path}"
    from pipeline.export import OPEN_CLIP_DIR, ExportError, read_manifest

    path = Path(export).resolve()
    try:
        read_manifest(path)
    except ExportError as err:
        raise CheckInputError(f"{err} (e.g. `.venv/bin/mcad export --student runs/default/student "
                              f"--out {export}`)") from err
    return f"local-dir:{path / OPEN_CLIP_DIR}"


def _script(name: str, module: str) -> list[str]:
    """The console script installed beside this interpreter, else its module run by this interpreter."""
    script = Path(sys.executable).parent / name
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def clip_benchmark_argv(spec: str, wds_dir: Path, split: str, output: Path, batch_size: int = BATCH) -> list[str]:
    return [*_script("clip_benchmark", "clip_benchmark.cli"), "eval",
            "--dataset", DATASET, "--dataset_root", str(wds_dir), "--split", split,
            "--task", "zeroshot_retrieval", "--model", spec, "--pretrained", "",
            "--recall_k", *map(str, KS), "--no_amp", "--num_workers", "0",
            "--batch_size", str(batch_size), "--output", str(output)]


def mcad_eval_argv(spec: str, shards: str, output: Path) -> list[str]:
    return [*_script("mcad", "pipeline.cli"), "eval", "--dual", spec, "--shards", shards, "--out", str(output)]


def subprocess_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    return env


def shown(text: str, root: str | None = None) -> str:
    """``text`` without the working directory's absolute path (``/repo/x`` -> ``x``, ``local-dir:/repo/x`` ->
    ``local-dir:x``): how the results record paths and commands, so they name no machine's directories."""
    root = os.path.abspath(root or os.getcwd())
    return text if root == os.sep else text.replace(root + os.sep, "")


def run_cli(argv: list[str], env: dict[str, str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "wb") as handle:
        proc = subprocess.run(argv, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"exit {proc.returncode}: {shlex.join(argv)}\n{tail}")
    return time.perf_counter() - start


# ---------------------------------------------------------------------------- analysis


def hit_bounds(image_emb, text_emb, image_of, ks=KS, eps: float = 0.0, block: int = 1024) -> dict:
    """Per mcad metric: ``{"n", "fewest", "most", "mcad_rule", "undecided", "undecided_queries"}``.

    ``fewest``: hits when every wrong candidate within ``eps`` of the query's best right one ranks above
    it; ``most``: when only those more than ``eps`` above it do. ``mcad_rule``: ``mcad eval``'s rule (exact
    ties against the query) on these embeddings, with its score blocks. ``undecided``: how many queries
    the (near-)ties decide, ``undecided_queries`` their indices (images for i2t, texts for t2i).
    """
    import torch

    ranks: dict[str, list[tuple]] = {"i2t": [], "t2i": []}
    n_images = image_emb.shape[0]
    for s in range(0, n_images, block):
        scores = image_emb[s:s + block] @ text_emb.t()
        positive = image_of[None, :] == torch.arange(s, min(s + block, n_images))[:, None]
        best = scores.masked_fill(~positive, float("-inf")).max(1).values[:, None]
        ranks["i2t"].append(_ranks(scores, best, ~positive, eps))
    for s in range(0, text_emb.shape[0], block):
        scores = text_emb[s:s + block] @ image_emb.t()
        target = image_of[s:s + block, None]
        wrong = torch.ones_like(scores, dtype=torch.bool).scatter_(1, target, False)
        ranks["t2i"].append(_ranks(scores, scores.gather(1, target), wrong, eps))
    out = {}
    for direction, parts in ranks.items():
        above, at_or_above, mcad = (torch.cat(p) for p in zip(*parts, strict=True))
        for k in ks:
            undecided = (at_or_above >= k) & (above < k)
            out[f"{direction}_R@{k}"] = {
                "n": int(above.numel()),
                "fewest": int((at_or_above < k).sum()),
                "most": int((above < k).sum()),
                "mcad_rule": int((mcad < k).sum()),
                "undecided": int(undecided.sum()),
                "undecided_queries": undecided.nonzero().flatten().tolist(),
            }
    return out


def _ranks(scores, right, wrong, eps: float):
    return (((scores > right + eps) & wrong).sum(1), ((scores >= right - eps) & wrong).sum(1),
            ((scores >= right) & wrong).sum(1))


def clip_benchmark_recalls(image_emb, text_emb, image_of, batch_size: int = BATCH, ks=KS) -> dict[str, float]:
    """clip_benchmark's own recall code (``zeroshot_retrieval.recall_at_k`` / ``batchify``, as its
    ``evaluate`` calls them) on given embeddings: its CLI's numbers for these embeddings."""
    import torch
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    scores = text_emb @ image_emb.t()
    positive_pairs = torch.zeros_like(scores, dtype=torch.bool)
    positive_pairs[torch.arange(len(scores)), image_of] = True
    block = min(batch_size, image_emb.shape[0])  # evaluate's batchify block: its first image batch
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (
            batchify(recall_at_k, scores, positive_pairs, block, "cpu", k=k) > 0).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (
            batchify(recall_at_k, scores.T, positive_pairs.T, block, "cpu", k=k) > 0).float().mean().item()
    return out


def max_score_diff(img_a, txt_a, img_b, txt_b, block: int = 1024) -> float:
    if img_a.shape != img_b.shape or txt_a.shape != txt_b.shape:
        return float("inf")
    worst = 0.0
    for s in range(0, txt_a.shape[0], block):
        diff = (txt_a[s:s + block] @ img_a.t() - txt_b[s:s + block] @ img_b.t()).abs().max()
        worst = max(worst, float(diff))
    return worst


def _max_abs(a, b) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def compare_inputs(spec: str, shards: list[str], wds_dir: Path, split: str, batch_size: int = BATCH) -> dict:
    """What clip_benchmark (batches of ``batch_size`` images) and ``mcad eval`` each feed the model, and the
    embeddings they get.

    clip_benchmark side: its model loader, wds reader, transform and tokenizer, batched as its CLI
    batches wds datasets, encoded as its ``zeroshot_retrieval.evaluate`` encodes (float32, no autocast).
    mcad side: ``DualStreamTeacher`` on ``load_split``, embedded by ``embed_split`` (what ``mcad eval`` runs).
    """
    import torch
    import torch.nn.functional as F
    from clip_benchmark.datasets.builder import build_wds_dataset
    from clip_benchmark.models import load_clip

    from mcad_cache.teachers.dual import DualStreamTeacher
    from mcad_core.config import EvalConfig
    from mcad_core.evaluation import embed_split, flat_captions
    from mcad_cache.teachers.specs import parse_dual
    from mcad_core.shards import load_split

    teacher = DualStreamTeacher.load(parse_dual(spec))
    split_data = load_split(shards, image_size=teacher.image_size)
    image_emb, text_emb, image_of = embed_split(teacher, split_data, EvalConfig.batch_size)
    texts, _ = flat_captions(split_data)

    model, transform, tokenizer = load_clip(model_type="open_clip", model_name=spec, pretrained="", cache_dir=None,
                                            device="cpu")
    model.eval()
    dataset = build_wds_dataset(DATASET.split("/", 1)[1], transform=transform, split=split, data_dir=str(wds_dir))
    loader = torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None, shuffle=False, num_workers=0)
    pixels, captions, cb_images, cb_texts = [], [], [], []
    with torch.no_grad():
        for batch_images, batch_texts in loader:
            flat = [text for texts_of_image in batch_texts for text in texts_of_image]
            pixels.append(batch_images)
            captions.extend(list(c) for c in batch_texts)
            cb_images.append(F.normalize(model.encode_image(batch_images), dim=-1))
            cb_texts.append(F.normalize(model.encode_text(tokenizer(flat)), dim=-1))
    cb_pixels, cb_image_emb, cb_text_emb = torch.cat(pixels), torch.cat(cb_images), torch.cat(cb_texts)
    cb_image_of = torch.repeat_interleave(torch.arange(len(captions)), torch.tensor([len(c) for c in captions]))
    flat_cb = [text for texts_of_image in captions for text in texts_of_image]
    return {
        "mcad_embeddings": (image_emb, text_emb, image_of),
        "clip_benchmark_embeddings": (cb_image_emb, cb_text_emb, cb_image_of),
        "keys": split_data.keys,
        "texts": texts,
        "report": {
            "n_images": {"clip_benchmark": len(captions), "mcad": len(split_data)},
            "n_texts": {"clip_benchmark": len(flat_cb), "mcad": len(texts)},
            "model_image_size": teacher.image_size,
            "captions_identical": captions == split_data.captions,
            "token_ids_identical": flat_cb == texts and bool(torch.equal(tokenizer(flat_cb), teacher.tokenize(texts))),
            "pixels_max_abs_diff": _max_abs(cb_pixels, teacher.pixels_from_uint8(split_data.images)),
            "image_emb_max_abs_diff": _max_abs(cb_image_emb, image_emb),
            "text_emb_max_abs_diff": _max_abs(cb_text_emb, text_emb),
            "score_max_abs_diff": max_score_diff(cb_image_emb, cb_text_emb, image_emb, text_emb),
        },
    }


def compare(mcad: dict, cb: dict, bounds: dict, exact: dict, cb_on_mcad: dict | None = None) -> list[dict]:
    """One row per metric: both recalls (percent), hit counts, the allowed range, and whether it holds."""
    rows = []
    for ours, theirs in PAIRS.items():
        b, n = bounds[ours], bounds[ours]["n"]
        cb_hits, mcad_hits = round(cb[theirs] * n), round(mcad[ours] * n / 100.0)
        row = {
            "metric": ours, "clip_benchmark_metric": theirs, "n_queries": n,
            "mcad_eval": mcad[ours], "clip_benchmark": 100.0 * cb[theirs],
            "abs_diff": abs(100.0 * cb[theirs] - mcad[ours]),
            "mcad_hits": mcad_hits, "clip_benchmark_hits": cb_hits,
            "allowed_hits": [b["fewest"], b["most"]],
            "exact_tie_hits": [exact[ours]["fewest"], exact[ours]["most"]],
            "exact_tie_queries": exact[ours]["undecided"], "near_tie_queries": b["undecided"],
            "ok": b["fewest"] <= cb_hits <= b["most"] and b["fewest"] <= mcad_hits <= b["most"],
        }
        if cb_on_mcad is not None:
            row["clip_benchmark_code_on_mcad_embeddings_hits"] = round(cb_on_mcad[theirs] * n)
        rows.append(row)
    mean = {"mcad_eval": mcad["mean_recall"], "clip_benchmark": sum(r["clip_benchmark"] for r in rows) / len(rows)}
    rows.append({"metric": "mean_recall", "clip_benchmark_metric": "mean of the six", **mean,
                 "abs_diff": abs(mean["clip_benchmark"] - mean["mcad_eval"]),
                 "ok": all(r["ok"] for r in rows)})
    return rows


def tie_examples(exact: dict, keys: list[str], texts: list[str], image_of) -> dict[str, list]:
    """The first few queries an exact tie decides, named: image keys (i2t), or (image key, caption) (t2i)."""
    out = {}
    for metric, entry in exact.items():
        queries = entry["undecided_queries"][:SHOWN_TIES]
        if metric.startswith("i2t"):
            out[metric] = [keys[q] for q in queries]
        else:
            out[metric] = [[keys[int(image_of[q])], texts[q]] for q in queries]
    return out


# ---------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    inputs = result["inputs"]
    lines = [
        "# clip_benchmark vs `mcad eval`",
        "",
        f"Model `{result['model']}`, split `{result['shards']}` ({inputs['n_images']['mcad']} images, "
        f"{inputs['n_texts']['mcad']} captions), clip_benchmark {result['versions']['clip-benchmark']}, "
        f"open_clip {result['versions']['open_clip_torch']}, torch {result['versions']['torch']}, CPU.",
        "",
        "| metric | clip_benchmark metric | mcad eval | clip_benchmark | abs diff | hits: mcad / clip_benchmark "
        "| allowed hits | exact-tie queries | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ok = "yes" if r["ok"] else "NO"
        if "n_queries" in r:
            lines.append(f"| {r['metric']} | {r['clip_benchmark_metric']} | {r['mcad_eval']:.2f} | "
                         f"{r['clip_benchmark']:.2f} | {r['abs_diff']:.2f} | {r['mcad_hits']} / "
                         f"{r['clip_benchmark_hits']} of {r['n_queries']} | {r['allowed_hits'][0]}-"
                         f"{r['allowed_hits'][1]} | {r['exact_tie_queries']} | {ok} |")
        else:
            lines.append(f"| {r['metric']} | {r['clip_benchmark_metric']} | {r['mcad_eval']:.2f} | "
                         f"{r['clip_benchmark']:.2f} | {r['abs_diff']:.2f} | | | | {ok} |")
    same = result["clip_benchmark_code_on_mcad_embeddings_equals_cli"]
    lines += [
        "",
        f"Max abs difference: **{result['max_abs_diff']:.4f}** recall points (tolerance: the allowed hits). "
        f"Verdict: **{result['verdict']}**.",
        *(f"- {p}" for p in result["problems"]),
        "",
        "Inputs, clip_benchmark's loader/reader/transform/tokenizer vs mcad eval's: "
        f"captions identical {inputs['captions_identical']}, token ids identical {inputs['token_ids_identical']}, "
        f"pixels max |diff| {inputs['pixels_max_abs_diff']:.3g}, embeddings max |diff| image "
        f"{inputs['image_emb_max_abs_diff']:.3g} / text {inputs['text_emb_max_abs_diff']:.3g}, scores max |diff| "
        f"{inputs['score_max_abs_diff']:.3g} (score tolerance {result['score_atol']:g}). clip_benchmark's own "
        f"recall code on mcad eval's embeddings gives its CLI's numbers: {same}"
        + (" -- so every difference comes from the ranking rule, none from the embeddings." if same else "."),
        "",
        "Why they may differ: `mcad eval` ranks a wrong candidate that ties the right one above it (no credit "
        "for ties); clip_benchmark keeps `torch.topk`'s order. *Allowed hits*: the range over all tie-breakings "
        f"with scores moved by up to {result['score_atol']:g}. *Exact-tie queries*: those an exact tie decides "
        "(a caption shared by several images embeds identically); they are listed in the JSON.",
        "",
        "Commands:",
        "",
        "```",
        *result["commands"].values(),
        "```",
    ]
    return "\n".join(lines)


def _versions() -> dict:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run(args: argparse.Namespace) -> dict:
    import torch

    from mcad_core.atomic import atomic_write_bytes, atomic_write_json
    from mcad_core.shards import NoShardsError, list_shards
    from pipeline.wds_retrieval import write_retrieval_layout

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = model_spec(args.export, args.student)
    try:
        shards = list_shards(args.shards)
    except NoShardsError as err:
        raise CheckInputError(f"{err}: run `mcad data` first (or pass --shards)") from err
    work = Path(args.work)
    wds_dir = work / "wds"
    if "{" in str(wds_dir.resolve()) or "}" in str(wds_dir.resolve()):
        raise CheckInputError(f"--work {work}: clip_benchmark formats --dataset_root, braces break it")
    layout = write_retrieval_layout(shards, wds_dir, split=args.split)

    env = subprocess_env(args.threads)
    cb_json, mcad_json = work / "clip_benchmark.json", work / "mcad_eval.json"
    for stale in (cb_json, mcad_json):
        stale.unlink(missing_ok=True)
    cb_argv = clip_benchmark_argv(spec, wds_dir, args.split, cb_json, args.batch_size)
    mcad_argv = mcad_eval_argv(spec, args.shards, mcad_json)
    seconds = {"clip_benchmark": run_cli(cb_argv, env, work / "clip_benchmark.log"),
               "mcad_eval": run_cli(mcad_argv, env, work / "mcad_eval.log")}
    cb_out, mcad_out = json.loads(cb_json.read_text()), json.loads(mcad_json.read_text())
    (mcad_metrics,) = mcad_out["results"].values()
    cb_metrics = cb_out["metrics"]

    start = time.perf_counter()
    inputs = compare_inputs(spec, shards, wds_dir, args.split, args.batch_size)
    seconds["input_check"] = time.perf_counter() - start
    image_emb, text_emb, image_of = inputs["mcad_embeddings"]
    bounds = hit_bounds(image_emb, text_emb, image_of, eps=2 * args.score_atol)
    exact = hit_bounds(image_emb, text_emb, image_of, eps=0.0)
    cb_replicated = clip_benchmark_recalls(*inputs["clip_benchmark_embeddings"], batch_size=args.batch_size)
    cb_on_mcad = clip_benchmark_recalls(image_emb, text_emb, image_of, batch_size=args.batch_size)
    rows = compare(mcad_metrics, cb_metrics, bounds, exact, cb_on_mcad)

    report = inputs["report"]
    problems = [f"{r['metric']}: clip_benchmark {r['clip_benchmark_hits']} / mcad eval {r['mcad_hits']} hits, "
                f"allowed {r['allowed_hits']}" for r in rows[:-1] if not r["ok"]]
    if not (report["n_images"]["clip_benchmark"] == report["n_images"]["mcad"] == mcad_out["n_images"]
            and report["n_texts"]["clip_benchmark"] == report["n_texts"]["mcad"] == mcad_out["n_texts"]):
        problems.append(f"different data: images {report['n_images']}, texts {report['n_texts']}")
    if not report["score_max_abs_diff"] <= args.score_atol:
        problems.append(f"scores differ by {report['score_max_abs_diff']:.3g} > score_atol {args.score_atol:g}")
    if cb_replicated != cb_metrics:
        problems.append("clip_benchmark's recall code on the replicated embeddings does not give its CLI's "
                        f"numbers ({cb_replicated} vs {cb_metrics}): the replication is not what the CLI ran")
    result = {
        "model": shown(spec), "shards": shown(args.shards), "wds_dir": shown(str(wds_dir)), "layout": layout,
        "outputs": {"clip_benchmark": shown(str(cb_json)), "mcad_eval": shown(str(mcad_json))},
        "commands": {name: shlex.join(shown(arg) for arg in argv)
                     for name, argv in (("clip_benchmark", cb_argv), ("mcad_eval", mcad_argv))},
        "mcad_eval": mcad_metrics, "clip_benchmark_raw": cb_metrics, "rows": rows,
        "max_abs_diff": max(r["abs_diff"] for r in rows), "score_atol": args.score_atol,
        "clip_benchmark_code_on_replicated_embeddings": cb_replicated,
        "clip_benchmark_code_on_mcad_embeddings": cb_on_mcad,
        "clip_benchmark_code_on_mcad_embeddings_equals_cli": cb_on_mcad == cb_metrics,
        "exact_tie_examples": tie_examples(exact, inputs["keys"], inputs["texts"], image_of),
        "inputs": report, "problems": problems, "verdict": "match" if not problems else "MISMATCH",
        "seconds": seconds, "versions": _versions(),
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "threads": args.threads,
                    "device": "cpu"},
    }
    out = Path(args.out)
    atomic_write_json(out / f"{NAME}.json", result)
    atomic_write_bytes(out / f"{NAME}.md", (markdown(result) + "\n").encode())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--export", default="exports/default", help="`mcad export` directory (default)")
    source.add_argument("--student", help="a saved student directory instead of an export")
    parser.add_argument("--shards", default="data/default/test", help="split to evaluate on")
    parser.add_argument("--split", default="test", help="split name inside the clip_benchmark layout")
    parser.add_argument("--work", default="artifacts/clip_benchmark",
                        help="WORK/wds: the clip_benchmark layout (replaced); the tools' outputs and logs")
    parser.add_argument("--out", default="bench/results", help="results directory")
    parser.add_argument("--batch-size", type=int, default=BATCH, help="clip_benchmark's --batch_size")
    parser.add_argument("--score-atol", type=float, default=SCORE_ATOL,
                        help="max |cosine score difference| allowed between the two paths")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.student:
        args.export = None
    try:
        result = run(args)
    except CheckInputError as err:
        print(f"clip_benchmark_check: {err}", file=sys.stderr)
        return 2
    print(markdown(result))
    for problem in result["problems"]:
        print(f"MISMATCH: {problem}", file=sys.stderr)
    return 0 if not result["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
