"""Orchestration on top of the library (the only pipeline module besides the CLI that imports the stages)."""

from __future__ import annotations

import time
from pathlib import Path

from mcad_core.atomic import atomic_write_json
from mcad_core.config import EvalConfig
from mcad_core.evaluation import evaluate_dual_stream
from mcad_core.shards import ReadStats, SplitData, list_shards, load_split
from mcad_cache.teachers.specs import parse_dual, teacher_specs

METRIC_COLUMNS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_recall")


def evaluate_models(
    cfg: EvalConfig, teachers_dir: Path | None, duals: list[str], singles: list[str]
) -> tuple[dict, dict]:
    """Evaluate every named model on ``cfg.shards``.

    Returns ({row name: metrics + seconds}, {skip reason: count}).
    """
    from mcad_cache.evaluate import evaluate_single_stream
    from mcad_cache.teachers.available import check_teachers
    from mcad_cache.teachers.dual import DualStreamTeacher
    from mcad_cache.teachers.single import load_single, parse_single

    dual_specs = [parse_dual(text) for text in duals]
    single_specs = [parse_single(text) for text in singles]
    if teachers_dir is not None:
        trained_duals, trained_singles = teacher_specs(teachers_dir)
        dual_specs += list(trained_duals.values())
        single_specs += list(trained_singles.values())
    if not dual_specs and not single_specs:
        raise ValueError("nothing to evaluate: give --teachers DIR, --dual SPEC or --single SPEC")
    # Every model loadable here, or a TeacherUnavailableError naming each one, before a shard is read.
    check_teachers(dual_specs, single_specs)

    shards = list_shards(cfg.shards)
    splits: dict[int, SplitData] = {}
    stats = ReadStats()

    def split_at(size: int):
        if size not in splits:
            # count skips on the first read only: later reads at other sizes see the same samples
            splits[size] = load_split(shards, image_size=size, policy=cfg.on_error, stats=None if splits else stats)
        return splits[size]

    results: dict[str, dict] = {}
    for spec in dual_specs:
        start = time.perf_counter()
        teacher = DualStreamTeacher.load(spec)
        metrics = evaluate_dual_stream(teacher, split_at(teacher.image_size), cfg.ks, cfg.batch_size)
        results[_row_name(spec.name)] = {**metrics, "seconds": time.perf_counter() - start,
                                         "parameters": _parameters(teacher.model)}
    for spec in single_specs:
        start = time.perf_counter()
        teacher = load_single(spec)
        both = evaluate_single_stream(teacher, split_at(teacher.image_size), cfg.ks, cfg.rerank_k, cfg.batch_size)
        seconds = time.perf_counter() - start
        rows = {"itc": "itc", "itm_rerank": f"itm rerank top-{cfg.rerank_k}",
                "itm_itc_rerank": f"itm+itc rerank top-{cfg.rerank_k}"}
        for key, label in rows.items():
            results[f"{_row_name(spec.name)} ({label})"] = {**both[key], "seconds": seconds,
                                                             "parameters": _parameters(teacher)}

    if cfg.out_json is not None:
        split = next(iter(splits.values()))
        n_texts = sum(len(captions) for captions in split.captions)
        atomic_write_json(cfg.out_json, {"shards": shards, "n_images": len(split.keys), "n_texts": n_texts,
                                         "skipped": dict(stats.by_reason), "results": results})
    return results, dict(stats.by_reason)


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _row_name(name: str) -> str:
    return Path(name.removeprefix("local-dir:")).name if name.startswith("local-dir:") or Path(name).exists() else name


def format_table(results: dict[str, dict]) -> str:
    """A markdown table, one row per model."""
    header = "| model | " + " | ".join(METRIC_COLUMNS) + " | parameters |"
    rule = "|---|" + "---:|" * (len(METRIC_COLUMNS) + 1)
    rows = [f"| {name} | " + " | ".join(f"{metrics[c]:.1f}" for c in METRIC_COLUMNS)
            + (f" | {metrics['parameters'] / 1e6:.2f}M |" if "parameters" in metrics else " | |")
            for name, metrics in results.items()]
    return "\n".join([header, rule, *rows])
