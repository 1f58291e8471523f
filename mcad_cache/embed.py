"""Stage-1 pass 1, embed: every teacher's embeddings of every sample and view, one shard at a time.

A shard is the unit of work: ``read_shard`` decodes one shard, draws its views
and tokenizes its captions for every teacher and for the student (the stored
tokens); ``embed_input`` embeds every stored view with every dual-stream teacher
and the single-stream teacher's ITC towers and returns the arrays of its shard
group. The caller writes them and then the done marker; ``job.embed_pass`` reads
the next shard in a thread while this one's forwards run, or, with ``workers``,
has worker processes read the shards ahead (``shard_loader``). Each view of a
batch is rendered once per input size and shared by every teacher of that size;
the forwards run under the configured autocast (``teacher_autocast``). A worker
also renders the shard's views, and with the teachers on the CPU prepares their
pixels, up to a byte budget (``views_ahead``), so the main process is left the
forwards and the store writes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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

    def dual_weights(self, cfg: CacheConfig) -> list[float] | str:
        """Per-teacher weights of the fused dual-stream similarity, summing to 1; or ``"ranked"``: chosen from
        the data once the first block is embedded (``mcad_cache.job.ranked_dual_weights``)."""
        if not cfg.dual_weights:
            if cfg.dual_weighting == "ranked" and len(self.duals) > 1:
                return "ranked"
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
    # renders and prepared pixels a worker made ahead (``views_ahead``); ``embed_input`` uses them up
    ahead: ViewsAhead | None = None


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
    if shard_input.ahead is not None:  # rendered from rows that are no longer all there
        shard_input.ahead.release()
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
        self.view_budget = worker_view_budget(cfg.workers)  # here, in the main process: once for every worker

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> ShardInput | ReadFailure:
        try:
            shard_input = read_shard(self.shards[index], self.cfg, self.teachers, drop_repeats=False)
        except READ_ERRORS as err:
            return ReadFailure(err)
        start = time.perf_counter()
        shard_input.ahead = views_ahead(shard_input, self.cfg, self.teachers, self.view_budget)
        shard_input.seconds += time.perf_counter() - start
        return shard_input


def _as_is(item):
    return item


def shard_loader(shards: Sequence[str], cfg: CacheConfig, teachers: TeacherSet) -> torch.utils.data.DataLoader:
    """``cfg.workers`` processes reading ``shards`` in order, one shard each at a time (``ShardReader``).

    Workers are forked where the platform can (so the teachers' tokenizers are inherited, not pickled),
    and each has one shard to read at a time (``prefetch_factor`` 1): at most ``workers`` shards are read
    ahead of the one the teachers embed. Their images, and the views each rendered ahead (``views_ahead``,
    within ``worker_view_budget``), come back in shared memory.
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
    ahead, shard.ahead = shard.ahead, None  # used up here: a shard kept for its block keeps no renders
    arrays.update(_image_embeddings(data.images, boxes, image_towers(cfg, teachers), cfg.batch_size, clock, autocast,
                                    ahead))
    if ahead is not None:
        ahead.release()  # every tensor taken from it is gone with _image_embeddings' frame
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


def image_towers(cfg: CacheConfig, teachers: TeacherSet) -> list[ImageTower]:
    """Every teacher's image tower, in the order the embed pass runs them: the dual-stream ones, then the ITC one."""
    single = teachers.single
    towers = [ImageTower(f"emb/{name}/image", t.image_size, t.pixels_from_uint8, t.encode_images, t.embed_dim,
                         cfg.views) for name, t in teachers.duals.items()]
    towers.append(ImageTower(f"emb/{teachers.single_name}/image", single.image_size, single.pixels_from_uint8,
                             lambda px: single.itc_images(single.vision_tokens(px)), single.embed_dim,
                             cfg.views if cfg.single_itc_views == "all" else 1))
    return towers


def _steps(n: int, towers: Sequence[ImageTower], batch: int) -> Iterator[tuple[int, int, int, list[ImageTower]]]:
    """``(view, start, stop, towers embedding that view)`` in the order ``_image_embeddings`` embeds them."""
    for view in range(max((tower.views for tower in towers), default=0)):
        for start in range(0, n, batch):
            yield view, start, min(n, start + batch), [tower for tower in towers if view < tower.views]


# What the workers may render ahead, in all. Each worker holds two buffers (``_worker_buffer``): the shard it sends
# next and the one the teachers embed (or the main process is done with, to be filled again), so each shard gets
# ``WORKER_VIEW_BYTES // (2 * workers)``, and its views beyond that are rendered in the main process as before.
# The buffers are shared memory: where /dev/shm is small (a container's 64 MB), the budget is half its free space.
# A shard's renders are rows x views x 3 x size^2 bytes per input size, and prepared pixels (teachers on the CPU)
# 4x that per distinct preparation: 256 samples, 1 view, 224 px is 38.5 MB of renders or 154 MB of float32 pixels
# per teacher; 1000 samples x 30 views at 224 px is 4.5 GB of renders, far past the budget.
WORKER_VIEW_BYTES = 1536 << 20
_ALIGN = 64  # byte offset of every tensor in a buffer: a float32 (or any dtype) view of it is aligned
_IN_USE = 0  # a buffer's first byte (of _ALIGN): 1 from its filling until the main process has embedded it


def worker_view_budget(workers: int) -> int:
    """Bytes of one shard's views a worker renders ahead: ``WORKER_VIEW_BYTES``, or half the free shared memory
    if that is less (writing past a full /dev/shm kills a worker), over the two buffers of each worker."""
    total = WORKER_VIEW_BYTES
    with contextlib.suppress(OSError):  # no /dev/shm (not Linux): the default
        shm = os.statvfs("/dev/shm")
        total = min(total, shm.f_bavail * shm.f_frsize // 2)
    return total // (2 * max(workers, 1))


@dataclass
class ViewsAhead:
    """Tensors ``_image_embeddings`` would make, made before it runs, packed in one flat buffer.

    ``(view, start, tower key)``: that tower's prepared pixels of that view and batch; ``(view, start, size)``:
    the uint8 render of that view and batch at that size. A worker's buffer is in shared memory (one file
    descriptor a shard, not one a tensor; sent as it is) and is the worker's to fill again once the main process
    calls ``release`` (``_worker_buffer``): shared-memory pages are faulted in and freed once per worker, not
    once per shard (measured: a fresh 154 MB buffer cost the worker 0.36 ms a sample to fill, against 0.06 ms
    for a filled one, and the main process 0.1 ms a sample to free).
    """

    buffer: torch.Tensor  # uint8, flat; byte _IN_USE its flag
    index: dict[tuple, tuple[int, torch.dtype, tuple[int, ...]]]  # key -> (byte offset, dtype, shape)

    def pop(self, key: tuple) -> torch.Tensor | None:
        entry = self.index.pop(key, None)
        if entry is None:
            return None
        offset, dtype, shape = entry
        size = math.prod(shape) * dtype.itemsize
        return self.buffer[offset : offset + size].view(dtype).view(shape)

    def release(self) -> None:
        """No tensor of this buffer is used any more: its worker may fill it again."""
        self.index.clear()
        self.buffer[_IN_USE] = 0


_worker_buffers: list[torch.Tensor] = []  # this worker process's buffers, oldest first (empty outside workers)


def _worker_buffer(nbytes: int, budget: int) -> torch.Tensor:
    """A buffer of at least ``nbytes`` for a shard's views, marked in use: a released one, or a new one.

    In a DataLoader worker: a shared-memory buffer of ``budget`` bytes (pages are only allocated as they are
    written), kept to be filled again once the main process releases it; at most two are kept (the shard sent
    and the one embedded), so one the main process dropped unreleased is freed with the third. Elsewhere: a
    plain tensor of ``nbytes``.
    """
    if torch.utils.data.get_worker_info() is None:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
    else:
        buffer = next((b for b in _worker_buffers if int(b[_IN_USE]) == 0 and b.numel() >= nbytes), None)
        if buffer is None:
            buffer = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(nbytes, budget)))
            _worker_buffers[:] = [*[b for b in _worker_buffers if int(b[_IN_USE])][-1:], buffer]
    buffer[_IN_USE] = 1
    return buffer


def views_ahead(shard: ShardInput, cfg: CacheConfig, teachers: TeacherSet, budget: int,
                prepare: bool | None = None) -> ViewsAhead | None:
    """The first (view, batch) steps of ``shard``'s image loop, rendered and (``prepare``) prepared: what a
    worker does so that the main process is left the forwards. At most ``budget`` bytes.

    Step by step in ``_image_embeddings``'s order, each view and batch is rendered once per input size (the
    same ``render_views`` calls). With ``prepare`` (default: the teachers run on the CPU, where their
    ``pixels_from_uint8`` is plain CPU work a worker may do) every tower's pixels of the step are kept; once a
    step's pixels no longer fit, only its renders (a quarter of the bytes, or less), and at the first step whose
    renders would not fit either, the rest is left to ``_image_embeddings``. A step is taken whole or not at all,
    and not rendered unless its renders fit, so each (view, batch, size) is still rendered once, here or there. Renders and pixels are the very tensors the
    main process would compute (the same calls on the same rows), copied bit for bit: the store is unchanged.

    Towers of one size that prepare the same bytes (CLIP and BLIP teachers share OpenAI's mean and std) are
    given one copy: the main process hands them the same tensor, as it hands them one render to prepare
    (teachers read their inputs, they do not write them). Three such teachers fit three times the steps in the
    budget, for a comparison that costs about what the copy would (0.06 ms a sample at 224 px).
    """
    if prepare is None:
        prepare = torch.device(teachers.device).type == "cpu"
    towers = image_towers(cfg, teachers)
    box_tensor = torch.from_numpy(shard.boxes)
    images = shard.data.images
    items: list[tuple[tuple, torch.Tensor | tuple]] = []  # key -> its tensor, or the key of the same bytes
    used = 0
    for view, start, stop, active in _steps(len(shard.data), towers, cfg.batch_size):
        sizes = list(dict.fromkeys(tower.size for tower in active))
        if used + sum(_aligned((stop - start) * images.shape[1] * size * size) for size in sizes) > budget:
            break  # not even its renders fit (known before rendering: none is made twice)
        rendered = {size: render_views(images[start:stop], box_tensor[start:stop, view], size) for size in sizes}
        step: list[tuple[tuple, torch.Tensor | tuple]] = []
        if prepare:
            made: list[tuple[tuple, torch.Tensor]] = []
            for tower in active:
                pixels = tower.prepare(rendered[tower.size])
                if not (isinstance(pixels, torch.Tensor) and pixels.device.type == "cpu"):
                    break
                key = (view, start, tower.key)
                step.append((key, next((k for k, p in made if _same_bytes(p, pixels)), pixels)))
                made.append((key, pixels))
            else:
                if used + _packed_bytes(step) <= budget:
                    items.extend(step)
                    used += _packed_bytes(step)
                    continue
            prepare = False  # from here on, renders only
        step = [((view, start, size), render) for size, render in rendered.items()]
        items.extend(step)
        used += _packed_bytes(step)
    if not items:
        return None
    buffer = _worker_buffer(_ALIGN + used, _ALIGN + budget)
    index: dict[tuple, tuple[int, torch.dtype, tuple[int, ...]]] = {}
    offset = _ALIGN
    for key, tensor in items:
        if isinstance(tensor, tuple):  # the same bytes as an earlier tower's
            index[key] = index[tensor]
            continue
        index[key] = (offset, tensor.dtype, tuple(tensor.shape))
        buffer[offset : offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
        offset += _aligned(tensor.nbytes)
    return ViewsAhead(buffer, index)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _packed_bytes(step: Sequence[tuple[tuple, torch.Tensor | tuple]]) -> int:
    return sum(_aligned(tensor.nbytes) for _, tensor in step if isinstance(tensor, torch.Tensor))


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit the same tensor (not ``torch.equal``'s numbers: it has -0.0 == 0.0 and NaN != NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape or not (a.is_contiguous() and b.is_contiguous()):
        return False
    a, b = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    if a.numel() % 8 == 0:
        a, b = a.view(torch.int64), b.view(torch.int64)  # 8 bytes a comparison: 4x faster than bytes
    return torch.equal(a[:512], b[:512]) and torch.equal(a, b)


def _image_embeddings(images: torch.Tensor, boxes: np.ndarray, towers: Sequence[ImageTower], batch: int,
                      clock: dict, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                      ahead: ViewsAhead | None = None) -> dict[str, np.ndarray]:
    """Every tower's float16 embeddings ``(n, tower.views, dim)`` of ``images`` cut by ``boxes``.

    Each (view, batch) is rendered once per input size, as uint8, and that render is shared by every
    tower of that size, each normalizing it its own way: two 224-px teachers render a view once, not twice.
    Per tower the batches and their rows are those of a tower-by-tower loop, so the numbers are the same.
    What ``ahead`` holds (a worker's renders and prepared pixels, ``views_ahead``) is taken from it instead.
    """
    n = boxes.shape[0]
    out = {tower.key: np.zeros((n, tower.views, tower.dim), dtype=np.float16) for tower in towers}
    box_tensor = torch.from_numpy(boxes)
    take = ahead.pop if ahead is not None else (lambda key: None)
    for view, start, stop, active in _steps(n, towers, batch):
        rendered: dict[int, torch.Tensor] = {}  # input size -> uint8 renders of this view and batch
        for tower in active:
            pixels = take((view, start, tower.key))
            if pixels is None:
                if tower.size not in rendered:
                    render = take((view, start, tower.size))
                    rendered[tower.size] = (render if render is not None else
                                            render_views(images[start:stop], box_tensor[start:stop, view], tower.size))
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
