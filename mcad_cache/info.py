"""`mcad cache-info`: what a store holds, how big it is per sample and view, and what is missing."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import zarr

from mcad_cache import list_quality
from mcad_cache.schema import BLOCK_PASSES, SchemaError, block_text_image
from mcad_cache.store import CacheMismatchError, CacheStore, block_name
from mcad_core.errors import InputError


class StoreNotFoundError(InputError):
    """`mcad cache-info` was pointed at a path that holds no cache store this code can read (exit 3)."""


def open_store(path: str | Path) -> CacheStore:
    """The store at ``path``, or a ``StoreNotFoundError`` saying what is there instead and what to do."""
    path = Path(path)
    if not path.exists():
        raise StoreNotFoundError(f"no cache store at {path}: nothing is there. Check the path, or make the store "
                                 f"with `mcad cache --store {path}`")
    if not path.is_dir():
        raise StoreNotFoundError(f"{path} is a file, not a cache store (a store is a Zarr directory made by "
                                 "`mcad cache`)")
    try:
        return CacheStore.open(path)
    except FileNotFoundError as err:
        raise StoreNotFoundError(f"{path} is a directory but not a cache store ({err})") from err
    except (SchemaError, CacheMismatchError) as err:
        raise StoreNotFoundError(f"{path} cannot be read as a cache store: {err}") from err


def _array_sizes(group: zarr.Group) -> dict[str, tuple[int, int]]:
    """path -> (stored bytes, uncompressed bytes) of every array under ``group``."""
    out = {}
    for path, member in group.members(max_depth=None):
        if isinstance(member, zarr.Array):
            out[path] = (int(member.nbytes_stored()), int(member.nbytes))
    return out


def block_lists(store: CacheStore, group: zarr.Group, shards: list[str]) -> tuple[dict, np.ndarray]:
    """A searched block's lists (``"<direction>/<ids|dual|itm|fused>"``, those present) and ``text_image``: every
    caption's image row in the block, from its shards' local rows (the shape mcad_cache.list_quality reads)."""
    groups = [store.shard_group(shard) for shard in shards]
    text_image = block_text_image([g["text_image"][...] for g in groups], [g["keys"].shape[0] for g in groups])
    lists = {f"{d}/{name}": group[f"{d}/{name}"][...] for d in list_quality.DIRECTIONS
             for name in ("ids", *list_quality.SCORES) if f"{d}/{name}" in group}
    return lists, text_image


def block_weight_counts(store: CacheStore, shards: list[str], grid: list[tuple[float, ...]]):
    """(``weighing.embedding_counts`` of one block, its images, its captions), from the block's embeddings as
    the search pass reads them."""
    from mcad_cache import weighing
    from mcad_cache.job import load_block_embeddings  # only here: cache-info without --weights loads no torch

    manifest = store.manifest
    duals = list(manifest["dual_teachers"])
    emb = load_block_embeddings(store, shards, duals)
    scales = [manifest["teachers"][t]["logit_scale"] for t in duals]
    return weighing.embedding_counts(emb, duals, scales, grid), len(emb.keys), len(emb.text_image)


def describe(path: str | Path, lists: bool = False, weight_steps: int = 0) -> dict:
    """The store's report; with ``lists``, also how well each cached score ranks the true pairs in its lists
    (every searched block is read: n x k and t x k values per block); with ``weight_steps``, how well each
    weighting of the dual-stream teachers on a grid of that many steps ranks each block's true pairs
    (``mcad_cache.weighing``; every embedded block's view-0 embeddings are read)."""
    store = open_store(path)
    manifest = store.manifest
    shards = {"done": [], "missing": [], "failed": []}
    samples = texts = skipped = 0
    truncated: list[str] = []
    embed_seconds = teacher_seconds = 0.0
    sizes: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for source in manifest["shards"]:
        status = store.shard_status(source["name"])
        if not status.get("done"):
            shards["missing"].append(source["name"])
            continue
        shards["failed" if status.get("failed") else "done"].append(source["name"])
        samples += status.get("samples", 0)
        texts += status.get("texts", 0)
        skipped += status.get("skipped_samples", status.get("skipped", 0))
        if status.get("truncated"):
            truncated.append(status["truncated"].get("message", source["name"]))
        embed_seconds += status.get("seconds", 0.0)
        teacher_seconds += status.get("teacher_seconds", 0.0)
        for array, (stored, raw) in _array_sizes(store.shard_group(source["name"])).items():
            sizes[f"shards/*/{array}"][0] += stored
            sizes[f"shards/*/{array}"][1] += raw
    blocks, list_counts, weight_counts = [], [], []
    grid: list[tuple[float, ...]] = []
    if weight_steps:
        from mcad_cache import weighing
        grid = weighing.weighting_grid(len(manifest["dual_teachers"]), weight_steps)
    weighed = {"images": 0, "captions": 0}
    for index, block_shards in enumerate(manifest["search"]["blocks"]):
        if grid and all(store.shard_status(s).get("done") for s in block_shards):
            counts, n_images, n_captions = block_weight_counts(store, list(block_shards), grid)
            weight_counts.append(counts)
            weighed["images"] += n_images
            weighed["captions"] += n_captions
        name = block_name(index)
        group = store.root["blocks"].get(name)
        passes = dict(group.attrs.get("passes", {})) if group is not None else {}
        blocks.append({"name": name, "shards": len(block_shards), "passes": passes,
                       "missing": [p for p in BLOCK_PASSES if p not in passes]})
        if group is not None:
            for array, (stored, raw) in _array_sizes(group).items():
                sizes[f"blocks/*/{array}"][0] += stored
                sizes[f"blocks/*/{array}"][1] += raw
            if lists and "search" in passes:
                list_counts.append(list_quality.count_block(*block_lists(store, group, block_shards)))
    views = manifest["preprocessing"]["views"]
    total = sum(stored for stored, _ in sizes.values())
    return {
        "store": str(path),
        "manifest": manifest,
        "integration": dict(store.root.attrs.get("integration", {})),
        "shards": {k: len(v) for k, v in shards.items()},
        "missing_shards": shards["missing"],
        "failed_shards": shards["failed"],
        "samples": samples,
        "texts": texts,
        "skipped_samples": skipped,
        "truncated_shards": truncated,
        "embed_seconds": round(embed_seconds, 3),
        "teacher_seconds": round(teacher_seconds, 3),
        "blocks": blocks,
        "arrays": {k: {"stored_bytes": v[0], "raw_bytes": v[1]} for k, v in sorted(sizes.items())},
        "stored_bytes": total,
        "bytes_per_sample_per_view": round(total / (samples * views), 1) if samples else None,
        "itm_pairs": sum(b["passes"].get("rescore", {}).get("pairs", 0) for b in blocks),
        **({"list_quality": {"blocks": len(list_counts), **list_quality.summarize(list_counts)}} if lists else {}),
        **({"dual_weighting": {"blocks": len(weight_counts),
                               **weighing.summarize(manifest["dual_teachers"], grid, weight_counts, **weighed)}}
           if grid and weight_counts else {}),
    }


def format_report(report: dict) -> str:
    m = report["manifest"]
    lines = [f"cache store {report['store']}  (schema v{m['schema_version']})"]
    lines.append("teachers:")
    for name, t in m["teachers"].items():
        role = "single-stream" if name == m["single_teacher"] else "dual-stream"
        tag = f" [{t['pretrained']}]" if t.get("pretrained") else ""
        lines.append(f"  {name:<10} {role:<13} {t['name']}{tag}  width {t['embed_dim']}  "
                     f"sha256 {t['weights_sha256'][:12]}")
    p, s, f = m["preprocessing"], m["search"], m["fusion"]
    lines.append(f"views {p['views']} (source {p['source_size']}px, seed {p['seed']}); k {s['k']}; "
                 f"{len(s['blocks'])} blocks of {s['block_shards']} shards; dual weights {s['dual_weights']}"
                 f"{' (ranked on the first block)' if s.get('dual_weighting') == 'ranked' else ''}; "
                 f"fusion {f['rule']} a={f['a']}")
    sh = report["shards"]
    lines.append(f"shards: {sh['done']} done, {sh['failed']} failed, {sh['missing']} missing "
                 f"(of {len(m['shards'])}); {report['samples']} samples, {report['texts']} captions, "
                 f"{report['skipped_samples']} skipped samples")
    for message in report.get("truncated_shards", []):
        lines.append(f"  TRUNCATED: {message}")
    if report["missing_shards"]:
        more = " ..." if len(report["missing_shards"]) > 10 else ""
        lines.append(f"  missing: {report['missing_shards'][:10]}{more}")
    if report["failed_shards"]:
        lines.append(f"  failed: {report['failed_shards']}")
    lines.append(f"embed: {report['embed_seconds']:.1f}s in shard tasks, of which teacher forward "
                 f"{report['teacher_seconds']:.1f}s")
    for block in report["blocks"]:
        done = ", ".join(f"{k} {v.get('seconds', 0):.1f}s" for k, v in block["passes"].items()) or "-"
        missing = f"; missing {block['missing']}" if block["missing"] else ""
        lines.append(f"  block {block['name']} ({block['shards']} shards): {done}{missing}")
    if report["itm_pairs"]:
        per = report["itm_pairs"] / max(1, report["samples"])
        lines.append(f"ITM pairs scored: {report['itm_pairs']} ({per:.1f} per sample)")
    integration = report["integration"]
    if integration:
        lines.append(f"integration: dim {integration['config']['dim']}, {integration['config']['steps']} steps, "
                     f"loss {integration['summary'].get('first_loss')} -> {integration['summary'].get('last_loss')}")
    lines.append("arrays (stored / raw MiB):")
    for name, size in report["arrays"].items():
        lines.append(f"  {name:<34} {size['stored_bytes'] / 2**20:8.2f} / {size['raw_bytes'] / 2**20:8.2f}")
    if "list_quality" in report:
        lines.extend(_format_list_quality(report["list_quality"]))
    if "dual_weighting" in report:
        lines.extend(_format_dual_weighting(report["dual_weighting"], m["search"]["dual_weights"]))
    per = report["bytes_per_sample_per_view"]
    lines.append(f"total {report['stored_bytes'] / 2**20:.1f} MiB; "
                 f"{per if per is not None else '-'} bytes per sample per view")
    return "\n".join(lines)


def _format_list_quality(quality: dict) -> list[str]:
    lines = [f"cached lists ({quality['blocks']} searched blocks): share of anchors whose top-scored candidate is a "
             "true pair, by score; and whose list holds one at all"]
    for direction in list_quality.DIRECTIONS:
        if direction not in quality:
            continue
        q = quality[direction]
        tops = "  ".join(f"{name} {q[f'top1_{name}']:.1%}" for name in list_quality.SCORES if f"top1_{name}" in q)
        lines.append(f"  {direction} ({q['anchors']} anchors): top-1 {tops}; true pair in list {q['in_list']:.1%}")
    return lines


def _format_dual_weighting(weighting: dict, cached: list[float]) -> list[str]:
    teachers = " / ".join(weighting["teachers"])
    lines = [f"dual weights ({teachers}) on the embedded pairs ({weighting['blocks']} blocks, {weighting['images']} "
             f"images, {weighting['captions']} captions): share whose top-scored partner over the block is theirs"]
    for row in weighting["rows"]:
        mark = "  <- best" if row["weights"] == weighting["best"] else ""
        own = isinstance(cached, list) and all(abs(a - b) < 1e-6 for a, b in zip(row["weights"], cached, strict=True))
        mark += "  (this store's)" if own else ""
        weights = " / ".join(f"{w:.2f}" for w in row["weights"])
        lines.append(f"  {weights}: i2t {row['i2t_top1']:.1%}  t2i {row['t2i_top1']:.1%}  "
                     f"mean {row['mean_top1']:.1%}{mark}")
    chosen = ",".join(f"{w:g}" for w in weighting["chosen"])
    lines.append(f"  best - equal weights: {weighting['gain']:+.1%} of mean top-1 (2 standard errors: "
                 f"{weighting['margin']:.1%}): the rule keeps {chosen} here; `mcad cache --dual-weighting ranked` "
                 "applies it to the first block alone")
    return lines
