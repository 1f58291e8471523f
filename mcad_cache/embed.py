"""Stage-1 pass 1, embed: every teacher's embeddings of every sample and view, one shard at a time.

A shard is the unit of work: ``read_shard`` decodes one shard, draws its views
and tokenizes its captions for every teacher and for the student (the stored
tokens); ``embed_input`` embeds every stored view with every dual-stream teacher
and the single-stream teacher's ITC towers and returns the arrays of its shard
group. The caller writes them and then the done marker; ``job.embed_pass`` reads
the next shard in a thread while this one's forwards run, or, with ``workers``,
has worker processes read the shards ahead (``shard_loader``). Each view of a
batch is rendered once per input size and shared by every teacher of that size;
the forwards run under the configured autocast (``teacher_autocast``).
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mcad_cache.schema import SCHEMA_VERSION, VIEW_PARAMS
from mcad_cache.sources import path_hints
from mcad_cache.store import file_sha256, plan_blocks, source_list
from mcad_cache.teachers.available import check_teachers, hub_access
from mcad_cache.teachers.dual import DualStreamTeacher, DualTeacherSpec
from mcad_cache.teachers.single import SingleStreamTeacher, SingleTeacherSpec, load_single, parse_single
from mcad_cache.config import CacheConfig
from mcad_core.shards import (DEFAULT_MAX_IMAGE_PIXELS, DuplicateKeyError, NoShardsError, ReadStats, ShardReadError,
                              SplitData, load_split)
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
    device: str = "cpu"  # where the teachers run (the autocast device type)

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


def teacher_specs_of(cfg: CacheConfig) -> tuple[dict[str, DualTeacherSpec], str, SingleTeacherSpec, str]:
    """The run's dual specs by store name, the single-stream teacher's name and spec, and the tokenizer path.

    Reads teachers.json at most; loads nothing.
    """
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
    return dual_specs, single_name, single_spec, str(tokenizer_path)


def load_teacher_set(cfg: CacheConfig, device: str = "cpu") -> TeacherSet:
    """Every teacher and the student tokenizer.

    First the preflight (mcad_cache/teachers/available.py): a teacher or tokenizer this machine
    cannot load (a missing directory; offline, and not in the local hub cache) is a
    ``TeacherUnavailableError`` naming every such model before any of them loads; offline with
    everything cached, they load from the cache in offline mode (no hub request is retried).
    """
    from transformers import AutoTokenizer

    check_precision(cfg.precision, device)  # before anything loads: amp-fp16 on a CPU is a bad option
    dual_specs, single_name, single_spec, tokenizer_path = teacher_specs_of(cfg)
    offline = check_teachers(dual_specs.values(), [single_spec], tokenizer_path)
    duals = {name: DualStreamTeacher.load(spec, device) for name, spec in dual_specs.items()}
    single = load_single(single_spec, device)
    with hub_access(offline):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return TeacherSet(duals, single_name, single, tokenizer, str(tokenizer_path), cfg.context_length, str(device))


AUTOCAST_DTYPES = {"fp32": None, "amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}


class PrecisionUnavailableError(ValueError):
    """``precision`` asks for an autocast dtype the teachers' device cannot run (a bad option: exit 2)."""


def check_precision(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None: fp32), or a ``PrecisionUnavailableError``.

    float16 autocast is refused off CUDA (CPU float16 matmuls are slow or missing), and bfloat16 on a GPU
    without it; checked before any teacher loads.
    """
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {precision!r}")
    dtype, kind = AUTOCAST_DTYPES[precision], torch.device(device).type
    if dtype is torch.float16 and kind != "cuda":
        raise PrecisionUnavailableError(f"precision amp-fp16 needs a CUDA device, the teachers run on {device}; "
                                        "use --precision amp-bf16 or fp32 there")
    if dtype is torch.bfloat16 and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionUnavailableError(f"{device} does not support bfloat16; use --precision amp-fp16 or fp32")
    return dtype


def teacher_autocast(precision: str, device: str | torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context the teacher forwards run in: nothing for fp32, else ``torch.autocast``."""
    dtype = check_precision(precision, device)
    if dtype is None:
        return contextlib.nullcontext
    kind = torch.device(device).type
    return lambda: torch.autocast(kind, dtype=dtype)


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
                          "view_params": list(VIEW_PARAMS), "seed": cfg.seed,
                          # only when not the default, so stores made before the limit existed still match
                          **({"max_image_pixels": cfg.max_image_pixels}
                             if cfg.max_image_pixels != DEFAULT_MAX_IMAGE_PIXELS else {})},
        "search": {"k": cfg.k, "block_shards": cfg.block_shards, "dual_weights": teachers.dual_weights(cfg),
                   "blocks": plan_blocks([s["name"] for s in sources], cfg.block_shards)},
        "fusion": {"rule": cfg.fusion_rule, "a": cfg.fusion_a},
        "integration": {"dim": cfg.integration_dim, "steps": cfg.integration_steps},
        "shards": sources,
        # only when not the default, so stores made before the setting existed still match
        **({"precision": cfg.precision} if cfg.precision != "fp32" else {}),
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
               seen: Mapping[str, str] | None = None, drop_repeats: bool = True) -> ShardInput:
    """Decode ``shard``, drop repeated keys, draw the views and tokenize the captions for every teacher.

    ``seen`` maps the keys of the job's earlier shards to the shard each was read
    from: a key read again (there, or earlier in this shard) is refused here,
    before stage 2 would trip over it (see ``drop_duplicate_keys``). ``seen`` is
    only read, so a caller may hand the same dict on while this runs in a thread.
    Without ``drop_repeats`` (a worker process, which has no ``seen``) the caller
    drops them afterwards with ``drop_repeated_keys``.
    """
    start = time.perf_counter()
    stats = ReadStats()
    data = load_split([shard], image_size=cfg.source_size, policy=cfg.on_error, stats=stats,
                      max_image_pixels=cfg.max_image_pixels)
    if drop_repeats:
        data = drop_duplicate_keys(data, shard, seen or {}, cfg.on_error, stats)
    return _prepared(data, stats, cfg, teachers, start, time.perf_counter() - start)


def drop_repeated_keys(shard_input: ShardInput, shard: str, seen: Mapping[str, str], cfg: CacheConfig,
                       teachers: TeacherSet) -> ShardInput:
    """A shard read with ``drop_repeats=False`` as ``read_shard(..., seen)`` would have read it.

    The same ``drop_duplicate_keys`` call on the same decoded samples; only when it drops a sample
    (rare) are the views and tokens made again, from the kept samples.
    """
    start = time.perf_counter()
    data = drop_duplicate_keys(shard_input.data, shard, seen, cfg.on_error, shard_input.stats)
    if data is shard_input.data:
        return shard_input
    redone = _prepared(data, shard_input.stats, cfg, teachers, start, shard_input.read_seconds)
    redone.seconds += shard_input.seconds
    return redone


def _prepared(data: SplitData, stats: ReadStats, cfg: CacheConfig, teachers: TeacherSet, start: float,
              read_seconds: float) -> ShardInput:
    """The views and every tokenizer's tokens of decoded ``data``: the rest of ``read_shard``."""
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


class ReadFailure:
    """A worker's read error, carried back to the main process as a value.

    The reader's errors (``ShardReadError`` and kin) take several constructor arguments, which a
    DataLoader worker cannot hand back: its re-raise calls ``type(message)`` and falls back to a
    RuntimeError. This pickles the error's class, args and attributes instead and rebuilds it unchanged.
    """

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __reduce__(self):
        err = self.error
        native = {name: getattr(err, name) for name in ("errno", "strerror", "filename", "filename2")
                  if isinstance(err, OSError) and getattr(err, name) is not None}  # outside OSError's __dict__
        # webdataset appends its stream to an error's args: anything that does not pickle goes as its repr
        return _rebuild_failure, (type(err), tuple(_picklable(a) for a in err.args),
                                  {k: _picklable(v) for k, v in {**vars(err), **native}.items()})


def _picklable(value):
    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 - any failure to pickle: send the repr instead
        return repr(value)
    return value


def _rebuild_failure(cls: type, args: tuple, state: dict) -> ReadFailure:
    error = cls.__new__(cls, *args)
    error.args = args
    for name, value in state.items():
        setattr(error, name, value)
    return ReadFailure(error)


READ_ERRORS = (ShardReadError, NoShardsError, OSError)  # what a failed shard read raises; job.embed_pass's policy


class ShardReader(torch.utils.data.Dataset):
    """``shards[i]`` read by ``read_shard`` without the cross-shard key check: one DataLoader item per shard."""

    def __init__(self, shards: Sequence[str], cfg: CacheConfig, teachers: TeacherSet) -> None:
        self.shards, self.cfg, self.teachers = list(shards), cfg, teachers

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> ShardInput | ReadFailure:
        try:
            return read_shard(self.shards[index], self.cfg, self.teachers, drop_repeats=False)
        except READ_ERRORS as err:
            return ReadFailure(err)


def _as_is(item):
    return item


def shard_loader(shards: Sequence[str], cfg: CacheConfig, teachers: TeacherSet) -> torch.utils.data.DataLoader:
    """``cfg.workers`` processes reading ``shards`` in order, one shard each at a time (``ShardReader``).

    Workers are forked where the platform can (so the teachers' tokenizers are inherited, not pickled),
    and each has one shard to read at a time (``prefetch_factor`` 1): at most ``workers`` shards are read
    ahead of the one the teachers embed. Their images come back in shared memory.
    """
    import multiprocessing

    context = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    return torch.utils.data.DataLoader(ShardReader(shards, cfg, teachers), batch_size=None, shuffle=False,
                                       num_workers=cfg.workers, collate_fn=_as_is, prefetch_factor=1,
                                       multiprocessing_context=context, persistent_workers=False)


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
    autocast = teacher_autocast(cfg.precision, teachers.device)
    single = teachers.single
    towers = [ImageTower(f"emb/{name}/image", t.image_size, t.pixels_from_uint8, t.encode_images, t.embed_dim,
                         cfg.views) for name, t in teachers.duals.items()]
    towers.append(ImageTower(f"emb/{teachers.single_name}/image", single.image_size, single.pixels_from_uint8,
                             lambda px: single.itc_images(single.vision_tokens(px)), single.embed_dim,
                             cfg.views if cfg.single_itc_views == "all" else 1))
    arrays.update(_image_embeddings(data.images, boxes, towers, cfg.batch_size, clock, autocast))
    for name, teacher in teachers.duals.items():
        arrays[f"emb/{name}/text"] = _text_embeddings(
            shard.teacher_tokens[name], len(texts), teacher.encode_texts, teacher.embed_dim, clock, autocast)
    arrays[f"emb/{teachers.single_name}/text"] = _text_embeddings(
        shard.teacher_tokens[teachers.single_name], len(texts), single.itc_texts, single.embed_dim, clock, autocast)
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


@dataclass
class ImageTower:
    """One teacher's image side as the embed pass runs it: the array it fills and the views it embeds."""

    key: str  # the shard group's array, "emb/NAME/image"
    size: int  # its input side: views are rendered at this size
    prepare: Callable[[torch.Tensor], torch.Tensor]  # uint8 renders -> its normalized pixels
    encode: Callable[[torch.Tensor], torch.Tensor]  # pixels -> embeddings
    dim: int
    views: int  # views 0..views-1 are embedded


def _image_embeddings(images: torch.Tensor, boxes: np.ndarray, towers: Sequence[ImageTower], batch: int,
                      clock: dict, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                      ) -> dict[str, np.ndarray]:
    """Every tower's float16 embeddings ``(n, tower.views, dim)`` of ``images`` cut by ``boxes``.

    Each (view, batch) is rendered once per input size, as uint8, and that render is shared by every
    tower of that size, each normalizing it its own way: two 224-px teachers render a view once, not twice.
    Per tower the batches and their rows are those of a tower-by-tower loop, so the numbers are the same.
    """
    n = boxes.shape[0]
    out = {tower.key: np.zeros((n, tower.views, tower.dim), dtype=np.float16) for tower in towers}
    box_tensor = torch.from_numpy(boxes)
    for view in range(max((tower.views for tower in towers), default=0)):
        for start in range(0, n, batch):
            stop = min(n, start + batch)
            rendered: dict[int, torch.Tensor] = {}  # input size -> uint8 renders of this view and batch
            for tower in towers:
                if view >= tower.views:
                    continue
                if tower.size not in rendered:
                    rendered[tower.size] = render_views(images[start:stop], box_tensor[start:stop, view], tower.size)
                pixels = tower.prepare(rendered[tower.size])
                tick = time.perf_counter()
                with autocast():
                    embedded = tower.encode(pixels)
                out[tower.key][start:stop, view] = embedded.float().cpu().numpy()
                clock["seconds"] += time.perf_counter() - tick
    return out


def _text_embeddings(batches: list, n: int, encode, dim: int, clock: dict,
                     autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> np.ndarray:
    """Embeddings of ``n`` texts from their tokenized ``batches``, in order."""
    out = np.zeros((n, dim), dtype=np.float16)
    start = 0
    for tokens in batches:
        tick = time.perf_counter()
        with autocast():
            embedded = encode(tokens)
        embedded = embedded.float().cpu().numpy()
        clock["seconds"] += time.perf_counter() - tick
        out[start : start + len(embedded)] = embedded
        start += len(embedded)
    return out
