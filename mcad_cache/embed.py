"""Stage-1 pass 1, embed: every teacher's embeddings of every sample and view, one shard at a time.

A shard is the unit of work: ``read_shard`` decodes one shard, draws its views
and tokenizes its captions for every teacher and for the student (the stored
tokens); ``embed_input`` embeds every stored view with every dual-stream teacher
and the single-stream teacher's ITC towers and returns the arrays of its shard
group. The caller writes them and then the done marker; ``job.embed_pass`` reads
the next shard in a thread while this one's forwards run.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mcad_cache.schema import SCHEMA_VERSION, VIEW_PARAMS
from mcad_cache.sources import path_hints
from mcad_cache.store import file_sha256, plan_blocks, source_list
from mcad_cache.teachers.dual import DualStreamTeacher
from mcad_cache.teachers.single import SingleStreamTeacher, load_single, parse_single
from mcad_cache.config import CacheConfig
from mcad_core.shards import DuplicateKeyError, ReadStats, SplitData, load_split
from mcad_core.views import render_views, view_boxes

log = logging.getLogger(__name__)


@dataclass
class TeacherSet:
    """The loaded teachers of a cache run, under the names the store uses."""

    duals: dict[str, DualStreamTeacher]
    single_name: str
    single: SingleStreamTeacher
    tokenizer: object  # a transformers tokenizer: the student's, for the stored caption tokens
    tokenizer_path: str
    context_length: int

    def widths(self) -> dict[str, int]:
        return {**{name: t.embed_dim for name, t in self.duals.items()}, self.single_name: self.single.embed_dim}

    def dual_weights(self, cfg: CacheConfig) -> list[float]:
        """Per-teacher weights of the fused dual-stream similarity, summing to 1."""
        if not cfg.dual_weights:
            return [1.0 / len(self.duals)] * len(self.duals)
        if len(cfg.dual_weights) != len(self.duals):
            raise ValueError(f"dual_weights has {len(cfg.dual_weights)} entries for {len(self.duals)} dual teachers")
        total = sum(cfg.dual_weights)
        if total <= 0 or any(w < 0 for w in cfg.dual_weights):
            raise ValueError(f"dual_weights must be non-negative with a positive sum, got {cfg.dual_weights}")
        return [w / total for w in cfg.dual_weights]


def teacher_name(spec: str) -> str:
    """A store-safe name for an explicitly given teacher: 'ViT-B-16:openai' -> 'ViT-B-16_openai'."""
    tail = spec.rstrip("/").split("local-dir:")[-1].split("hf-hub:")[-1]
    if "/" in tail:
        tail = tail.rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", tail).strip("_") or "teacher"


def load_teacher_set(cfg: CacheConfig, device: str = "cpu") -> TeacherSet:
    from transformers import AutoTokenizer

    from mcad_cache.teachers.specs import parse_dual, teacher_specs

    if cfg.dual or cfg.single:
        if not (cfg.dual and cfg.single and cfg.tokenizer):
            raise ValueError("explicit teachers need all of dual (one or more), single and tokenizer")
        names = [teacher_name(text) for text in cfg.dual]
        dual_specs = dict(zip(names, [parse_dual(text) for text in cfg.dual], strict=True))
        single_name, single_spec = teacher_name(cfg.single), parse_single(cfg.single)
        tokenizer_path = cfg.tokenizer
    elif cfg.teachers_dir is not None:
        dual_specs, singles = teacher_specs(cfg.teachers_dir)
        if not dual_specs or len(singles) != 1:
            raise ValueError(f"{cfg.teachers_dir}/teachers.json lists {len(dual_specs)} dual-stream and "
                             f"{len(singles)} single-stream teachers; a cache needs one or more and exactly one")
        (single_name, single_spec), = singles.items()
        tokenizer_path = cfg.tokenizer or str(Path(cfg.teachers_dir) / "tokenizer")
    else:
        raise ValueError("no teachers: set teachers_dir, or dual + single + tokenizer")
    if len(set(dual_specs) | {single_name}) != len(dual_specs) + 1:
        raise ValueError(f"teacher names collide: {list(dual_specs)} + {single_name!r}; give distinct specs")
    duals = {name: DualStreamTeacher.load(spec, device) for name, spec in dual_specs.items()}
    single = load_single(single_spec, device)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return TeacherSet(duals, single_name, single, tokenizer, str(tokenizer_path), cfg.context_length)


def build_manifest(cfg: CacheConfig, teachers: TeacherSet, shards: Sequence[str]) -> dict:
    """Everything that decides what the stored numbers mean; no timings, so it is the same for every task."""
    described = {}
    for name, teacher in teachers.duals.items():
        described[name] = {**teacher.identity().to_dict(), "embed_dim": teacher.embed_dim,
                           "logit_scale": round(teacher.logit_scale, 6), "image_size": teacher.image_size}
    single = teachers.single
    described[teachers.single_name] = {**single.identity().to_dict(), "spec": str(single.spec),
                                       "embed_dim": single.embed_dim,
                                       "fused_dim": single.fused_dim, "image_size": single.image_size}
    sources = [{**source, **path_hints(source["path"], cfg.store)} for source in source_list(shards)]
    tokenizer_file = Path(teachers.tokenizer_path) / "tokenizer.json"
    local_tokenizer = Path(teachers.tokenizer_path).is_dir()
    return {
        "schema_version": SCHEMA_VERSION,
        "teachers": described,
        "dual_teachers": list(teachers.duals),
        "single_teacher": teachers.single_name,
        "tokenizer": {
            **(path_hints(teachers.tokenizer_path, cfg.store) if local_tokenizer else {"path": teachers.tokenizer_path}),
            "local": local_tokenizer,
            "sha256": file_sha256(tokenizer_file) if tokenizer_file.exists() else None,
            "context_length": teachers.context_length,
        },
        "preprocessing": {"source_size": cfg.source_size, "views": cfg.views, "view_scale": list(cfg.view_scale),
                          "single_itc_views": cfg.single_itc_views,
                          "view_params": list(VIEW_PARAMS), "seed": cfg.seed},
        "search": {"k": cfg.k, "block_shards": cfg.block_shards, "dual_weights": teachers.dual_weights(cfg),
                   "blocks": plan_blocks([s["name"] for s in sources], cfg.block_shards)},
        "fusion": {"rule": cfg.fusion_rule, "a": cfg.fusion_a},
        "integration": {"dim": cfg.integration_dim, "steps": cfg.integration_steps},
        "shards": sources,
    }


@dataclass
class ShardInput:
    """One shard read and made ready for the teachers: all of embedding a shard that is not a teacher forward
    or a view render, so that it can run in a thread while the previous shard's forwards run (``job.embed_pass``).
    """

    data: SplitData
    stats: ReadStats
    texts: list[str]
    boxes: np.ndarray  # (N, views, len(VIEW_PARAMS)) view parameters
    tokens: np.ndarray  # (texts, context_length) the student tokenizer's ids, stored with the shard
    teacher_tokens: dict[str, list]  # teacher name -> its tokenizer's output per batch of ``cfg.batch_size`` texts
    seconds: float  # wall time of the read
    read_seconds: float  # of it, decoding and the duplicate-key check


def read_shard(shard: str, cfg: CacheConfig, teachers: TeacherSet,
               seen: Mapping[str, str] | None = None) -> ShardInput:
    """Decode ``shard``, drop repeated keys, draw the views and tokenize the captions for every teacher.

    ``seen`` maps the keys of the job's earlier shards to the shard each was read
    from: a key read again (there, or earlier in this shard) is refused here,
    before stage 2 would trip over it (see ``drop_duplicate_keys``). ``seen`` is
    only read, so a caller may hand the same dict on while this runs in a thread.
    """
    start = time.perf_counter()
    stats = ReadStats()
    data = load_split([shard], image_size=cfg.source_size, policy=cfg.on_error, stats=stats)
    data = drop_duplicate_keys(data, shard, seen or {}, cfg.on_error, stats)
    read_seconds = time.perf_counter() - start
    texts = [text for captions in data.captions for text in captions]
    boxes = view_boxes(data.keys, cfg.views, cfg.seed, tuple(cfg.view_scale))
    tokens = teachers.tokenizer(texts, padding="max_length", truncation=True, max_length=teachers.context_length,
                                return_tensors="np")["input_ids"] if texts else np.zeros((0, teachers.context_length))
    tokenizers = {**{name: t.tokenize for name, t in teachers.duals.items()},
                  teachers.single_name: teachers.single.tokenize}
    teacher_tokens = {name: [tokenize(texts[i : i + cfg.batch_size]) for i in range(0, len(texts), cfg.batch_size)]
                      for name, tokenize in tokenizers.items()}
    return ShardInput(data, stats, texts, boxes, np.asarray(tokens, dtype=np.int32), teacher_tokens,
                      time.perf_counter() - start, read_seconds)


@torch.no_grad()
def embed_input(shard: ShardInput, cfg: CacheConfig, teachers: TeacherSet) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays of one shard group, and its status (samples, skips by reason, truncation, seconds)."""
    start = time.perf_counter()
    data, stats, texts, boxes = shard.data, shard.stats, shard.texts, shard.boxes
    text_image = np.repeat(np.arange(len(data)), [len(c) for c in data.captions]).astype(np.int32)
    arrays: dict[str, np.ndarray] = {
        "keys": np.asarray(data.keys, dtype=str),
        "text_image": text_image,
        "text_tokens": shard.tokens,
        "view_params": boxes,
    }
    clock = {"seconds": 0.0}  # time inside teacher forward passes only, for the overhead ratio
    for name, teacher in teachers.duals.items():
        arrays[f"emb/{name}/image"] = _image_embeddings(
            data.images, boxes, teacher.image_size, teacher.pixels_from_uint8, teacher.encode_images,
            cfg.batch_size, teacher.embed_dim, clock)
        arrays[f"emb/{name}/text"] = _text_embeddings(
            shard.teacher_tokens[name], len(texts), teacher.encode_texts, teacher.embed_dim, clock)
    single = teachers.single
    single_boxes = boxes if cfg.single_itc_views == "all" else boxes[:, :1]
    arrays[f"emb/{teachers.single_name}/image"] = _image_embeddings(
        data.images, single_boxes, single.image_size, single.pixels_from_uint8,
        lambda px: single.itc_images(single.vision_tokens(px)), cfg.batch_size, single.embed_dim, clock)
    arrays[f"emb/{teachers.single_name}/text"] = _text_embeddings(
        shard.teacher_tokens[teachers.single_name], len(texts), single.itc_texts, single.embed_dim, clock)
    status = {
        "samples": len(data),
        "texts": len(texts),
        "skipped": stats.skipped,  # skip events: bad samples plus one per truncated or unreadable shard
        "skipped_samples": stats.samples_skipped,  # samples known lost; a truncated shard's rest is not known
        "skipped_by_reason": dict(stats.by_reason),
        "skip_records": [list(r) for r in stats.records[:20]],
        # the work of this shard: its read (in a thread beside the previous shard's forwards) and its embed
        "seconds": round(shard.seconds + time.perf_counter() - start, 3),
        "read_seconds": round(shard.read_seconds, 3),
        "prepare_seconds": round(shard.seconds, 3),
        "teacher_seconds": round(clock["seconds"], 3),
    }
    if stats.truncated:  # one shard read: at most one truncation
        status["truncated"] = stats.truncated[0].to_dict()
    if stats.by_reason.get("unreadable_shard"):
        status["failed"] = "unreadable_shard: " + "; ".join(
            f"{key or '-'}: {reason}" for _, key, reason in stats.records if reason.startswith("unreadable"))[:500]
    return arrays, status


def drop_duplicate_keys(data: SplitData, shard: str, seen: Mapping[str, str], policy: str,
                        stats: ReadStats) -> SplitData:
    """``data`` without the samples whose key was read before: in ``seen`` or earlier in this shard.

    Stage 2 addresses samples by key, so a repeated key must not reach the store.
    Under ``raise`` the first repeat is a ``DuplicateKeyError`` naming both
    shards; under ``warn`` every repeat is a counted ``duplicate_key`` skip. Found
    with a numpy unique and one set intersection, not a lookup per sample.
    """
    keys = np.asarray(data.keys, dtype=str)
    repeated = np.ones(len(keys), dtype=bool)
    repeated[np.unique(keys, return_index=True)[1]] = False  # all but each key's first row in this shard
    earlier = seen.keys() & set(data.keys)
    if earlier:
        repeated |= np.isin(keys, list(earlier))
    rows = np.flatnonzero(repeated)
    if not len(rows):
        return data

    def error(row: int) -> DuplicateKeyError:
        key = str(keys[row])
        return DuplicateKeyError(key, seen.get(key, shard), shard)

    if policy == "raise":
        raise error(rows[0])
    for row in rows:
        stats.record(error(row))
    log.warning("shard %s: skipping %d sample(s) whose key was already read, e.g. %s", shard, len(rows), error(rows[0]))
    keep = ~repeated
    return SplitData(keys=keys[keep].tolist(), images=data.images[torch.from_numpy(keep)],
                     captions=[c for c, k in zip(data.captions, keep, strict=True) if k],
                     shard_of=[s for s, k in zip(data.shard_of, keep, strict=True) if k])


def _image_embeddings(images: torch.Tensor, boxes: np.ndarray, size: int, prepare, encode, batch: int, dim: int,
                      clock: dict) -> np.ndarray:
    n, views = boxes.shape[:2]
    out = np.zeros((n, views, dim), dtype=np.float16)
    box_tensor = torch.from_numpy(boxes)
    for view in range(views):
        for start in range(0, n, batch):
            stop = min(n, start + batch)
            pixels = prepare(render_views(images[start:stop], box_tensor[start:stop, view], size))
            tick = time.perf_counter()
            out[start:stop, view] = encode(pixels).float().cpu().numpy()
            clock["seconds"] += time.perf_counter() - tick
    return out


def _text_embeddings(batches: list, n: int, encode, dim: int, clock: dict) -> np.ndarray:
    """Embeddings of ``n`` texts from their tokenized ``batches``, in order."""
    out = np.zeros((n, dim), dtype=np.float16)
    start = 0
    for tokens in batches:
        tick = time.perf_counter()
        embedded = encode(tokens).float().cpu().numpy()
        clock["seconds"] += time.perf_counter() - tick
        out[start : start + len(embedded)] = embedded
        start += len(embedded)
    return out
