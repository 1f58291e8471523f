"""Cache bytes per sample per view: measured on the store, and computed from the schema for realistic teachers.

- measured: ``mcad_cache.info.describe`` of the store (stored bytes of every shard and block array, Zstd
  included, / (samples * views)), and its uncompressed (raw) bytes;
- computed: for every array the schema defines (``mcad_cache.schema``: shard arrays, per-teacher embeddings,
  every block pass's arrays), elements per sample from its symbolic dims (``n`` = 1 per sample, ``t`` = the
  store's captions per sample, ``V`` views, ``L`` tokens, ``P`` view parameters, ``D`` the teacher's width,
  ``k``, ``H`` fused width, ``E`` integrated width) times its dtype's size. The toy store's own widths check
  the computation against the measured raw bytes; then ViT-L/14 (768-d) dual teacher(s) + BLIP-large (256-d
  ITC, 1024-d fused feature; integrated features 1024-d, the fused width) with the store's k, captions,
  tokens and dtypes, at the store's views and at DataCompDR's 30. "est. stored" applies the toy store's
  measured stored/raw ratio of each array.

Compared with DataCompDR (MobileCLIP's reinforced DataComp): ~111 KB per sample for 30 views, ~3.7 KB per
sample per view.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from bench.common import (add_common_args, check_inputs, Figure, Inputs, inputs_from, markdown_table, publish,
                          quiet_progress, rounded)

NAME = "cache_size"
DATACOMPDR_BYTES_PER_SAMPLE = 111_000
DATACOMPDR_VIEWS = 30
TARGET_BYTES = DATACOMPDR_BYTES_PER_SAMPLE / DATACOMPDR_VIEWS
HEADLINE = "2x ViT-L/14 + BLIP-large"  # the AMMKD configuration: two dual teachers, one single-stream


@dataclass(frozen=True)
class Widths:
    """Everything the schema's symbolic dims resolve to, per sample (``t`` as captions per sample)."""

    duals: dict[str, int]  # dual teacher name -> embedding width D
    single: tuple[str, int]  # (single teacher name, ITC width D)
    captions: float  # t per n
    views: int  # V
    context: int  # L
    params: int  # P
    k: int
    fused: int  # H
    integrated: int  # E
    single_views: int = 1  # S: views of the single teacher's ITC image embeddings (CacheConfig.single_itc_views)


def schema_arrays(w: Widths) -> list[tuple[str, object, dict[str, float]]]:
    """(path in the store, schema ArraySpec, per-sample size of each dim) of every array these teachers give."""
    from mcad_cache.schema import BLOCK_PASSES, SHARD_ARRAYS, teacher_arrays

    base = {"n": 1.0, "t": w.captions, "V": w.views, "L": w.context, "P": w.params, "k": w.k, "H": w.fused,
            "E": w.integrated, "S": w.single_views}
    out = [(f"shards/{s.path}", s, base) for s in SHARD_ARRAYS]
    for name, width in [*w.duals.items(), w.single]:
        views = "S" if name == w.single[0] else "V"
        out += [(f"shards/{s.path}", s, dict(base, D=width)) for s in teacher_arrays(name, views)]
    out += [(f"blocks/{s.path}", s, base) for specs in BLOCK_PASSES.values() for s in specs]
    return out


def bytes_per_sample(w: Widths, str_bytes: float = 16.0) -> dict[str, float]:
    """Uncompressed bytes per sample of every schema array (``str_bytes`` per string element)."""
    out = {}
    for path, spec, sizes in schema_arrays(w):
        item = str_bytes if spec.dtype == "str" else np.dtype(spec.dtype).itemsize
        out[path] = float(np.prod([sizes[d] for d in spec.dims])) * item
    return out


def role_of(path: str, w: Widths) -> str:
    for name in w.duals:
        path = re.sub(f"/emb/{re.escape(name)}/", "/emb/<dual>/", path)
    return re.sub(f"/emb/{re.escape(w.single[0])}/", "/emb/<single>/", path)


def measured(store: Path) -> tuple[dict, Widths, dict[str, float], float]:
    """(describe report, the store's widths, stored/raw ratio per role path, raw bytes per string element)."""
    from mcad_cache.info import describe
    from mcad_cache.schema import VIEW_PARAMS

    report = describe(store)
    m = report["manifest"]
    teachers = m["teachers"]
    single = m["single_teacher"]
    w = Widths(duals={t: int(teachers[t]["embed_dim"]) for t in m["dual_teachers"]},
               single=(single, int(teachers[single]["embed_dim"])), captions=report["texts"] / report["samples"],
               views=int(m["preprocessing"]["views"]), context=int(m["tokenizer"]["context_length"]),
               params=len(VIEW_PARAMS), k=int(m["search"]["k"]), fused=int(teachers[single]["fused_dim"]),
               integrated=int(m["integration"]["dim"]),
               # stores made before single_itc_views existed hold every view
               single_views=1 if m["preprocessing"].get("single_itc_views") == "first"
               else int(m["preprocessing"]["views"]))
    stored: dict[str, list[int]] = {}
    for path, size in report["arrays"].items():
        role = role_of(path.replace("/*/", "/"), w)
        acc = stored.setdefault(role, [0, 0])
        acc[0] += size["stored_bytes"]
        acc[1] += size["raw_bytes"]
    ratios = {role: s / r for role, (s, r) in stored.items() if r}
    keys = report["arrays"].get("shards/*/keys", {"raw_bytes": 16 * report["samples"]})
    return report, w, ratios, keys["raw_bytes"] / report["samples"]


def realistic_widths(toy: Widths, n_duals: int, views: int, single_all_views: bool = False) -> Widths:
    duals = {"ViT-L-14" if n_duals == 1 else f"ViT-L-14_{i}": 768 for i in range(n_duals)}
    return replace(toy, duals=duals, single=("BLIP-large", 256), fused=1024, integrated=1024, views=views,
                   single_views=views if single_all_views else 1)


def row(label: str, w: Widths, ratios: dict[str, float], str_bytes: float) -> dict:
    raw = bytes_per_sample(w, str_bytes)
    est = sum(b * ratios.get(role_of(p, w), 1.0) for p, b in raw.items())
    return {"config": label, "views": w.views, "raw_bytes_per_sample_per_view": rounded(sum(raw.values()) / w.views),
            "est_stored_bytes_per_sample_per_view": rounded(est / w.views),
            "raw_bytes_per_sample": rounded(sum(raw.values()))}


def figures(results: dict) -> list[Figure]:
    out = [Figure(NAME, "toy store, stored bytes per sample per view (measured)",
                  results["measured"]["stored_bytes_per_sample_per_view"], "B", "", None)]
    for r in results["rows"]:
        if r["config"].startswith("toy"):
            continue
        value = r["est_stored_bytes_per_sample_per_view"]
        target = r["views"] == DATACOMPDR_VIEWS
        out.append(Figure(NAME, f"{r['config']}, V={r['views']}: est. stored bytes per sample per view", value, "B",
                          f"<= {TARGET_BYTES:.0f} (DataCompDR)" if target else "",
                          (value <= TARGET_BYTES) if target else None))
    default = next(r for r in results["rows"] if r["config"] == HEADLINE and r["views"] == DATACOMPDR_VIEWS)
    value = default["est_stored_bytes_per_sample_per_view"]
    out.append(Figure(NAME, "cache bytes per sample per view, 2 dual + 1 single teacher at ViT-L widths, 30 views",
                      value, "B", f"<= {TARGET_BYTES:.0f} (DataCompDR)", value <= TARGET_BYTES))
    return out


def markdown(results: dict) -> str:
    m = results["measured"]
    rows = [[r["config"], r["views"], r["raw_bytes_per_sample_per_view"], r["est_stored_bytes_per_sample_per_view"],
             rounded(r["est_stored_bytes_per_sample_per_view"] / TARGET_BYTES)] for r in results["rows"]]
    return "\n".join([
        "# Cache bytes per sample per view", "",
        f"Measured ({results['store']}): {m['samples']} samples x {m['views']} view(s), {m['stored_bytes']} bytes "
        f"stored ({m['stored_bytes_per_sample_per_view']} B per sample per view; raw "
        f"{m['raw_bytes_per_sample_per_view']} B, the schema computation gives "
        f"{results['rows'][0]['raw_bytes_per_sample_per_view']} B).", "",
        markdown_table(["config", "views", "raw B/sample/view", "est. stored B/sample/view",
                        f"vs DataCompDR {TARGET_BYTES:.0f} B"], rows), "",
        f"DataCompDR: ~{DATACOMPDR_BYTES_PER_SAMPLE // 1000} KB per sample for {DATACOMPDR_VIEWS} views. Per-sample "
        "arrays (captions, lists, fused and integrated features) are shared by all views, so bytes per view fall "
        "as views grow; only the V=30 rows compare like for like.",
    ])


def run(inputs: Inputs) -> dict:
    check_inputs(inputs, need_shards=False)
    report, toy, ratios, str_bytes = measured(inputs.store)
    raw_total = sum(a["raw_bytes"] for a in report["arrays"].values())
    views = toy.views
    configs = [("toy (schema, store widths)", toy)]
    for v in sorted({views, DATACOMPDR_VIEWS}):
        configs += [("ViT-L/14 + BLIP-large", realistic_widths(toy, 1, v)),
                    (HEADLINE, realistic_widths(toy, 2, v)),
                    *([(HEADLINE + ", BLIP ITC at every view", realistic_widths(toy, 2, v, single_all_views=True))]
                      if v > 1 else [])]
    results = {
        "part": NAME, "quick": inputs.quick, "store": str(inputs.store),
        "measured": {"samples": report["samples"], "views": views, "stored_bytes": report["stored_bytes"],
                     "stored_bytes_per_sample_per_view": report["bytes_per_sample_per_view"],
                     "raw_bytes_per_sample_per_view": rounded(raw_total / (report["samples"] * views))},
        "widths": {"toy": asdict(toy)},
        "compression_ratios": {k: rounded(v) for k, v in sorted(ratios.items())},
        "rows": [row(label, w, ratios, str_bytes) for label, w in configs],
        "target_bytes_per_sample_per_view": TARGET_BYTES,
    }
    return publish(inputs.out, NAME, results, figures, markdown)


def main(argv: list[str] | None = None) -> None:
    quiet_progress()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    print(markdown(run(inputs_from(parser.parse_args(argv)))))


if __name__ == "__main__":
    main()
