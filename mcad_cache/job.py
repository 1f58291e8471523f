"""`mcad cache`: the stage-1 teacher pass, as one job or as cluster tasks.

Passes, in order (each skips what is already marked done, so a killed job is
simply run again):

1. ``embed``      per shard, partitioned over tasks (torchrun / Slurm array)
2. ``search``     per block: top-k candidates by fused dual-stream logit
3. ``rescore``    per block: ITM logits of the candidates and positives
4. ``fuse``       per block: the fusion rule on (dual, ITM) logits
5. ``integrate``  all blocks: train the integration module, write integrated features

Passes 2-5 need every shard embedded: with several tasks they run in a job of
their own after the embed tasks (on Slurm: a job that depends on the embed
array job; see ``jobs/``). Passes 2-4 split the blocks over that job's tasks as
the embed pass splits the shards; integrate runs once, in the task that finds
every block fused (``integrate_when_fused``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext

from mcad_cache import blocks as block_ops
from mcad_cache import weighing
from mcad_cache.embed import (READ_ERRORS, ReadFailure, ShardInput, TeacherSet, build_manifest, drop_repeated_keys,
                              embed_input, load_teacher_set, read_shard, shard_loader, teacher_autocast)
from mcad_cache.fusion import FUSION_RULES
from mcad_cache.schema import BLOCK_PASSES, read_array, read_block_rows, write_array, write_shard_group
from mcad_cache.store import CacheIncompleteError, CacheStore, block_name, plan_blocks, shard_name, writer_locks
from mcad_cache.config import CacheConfig
from mcad_cache.teachers.single import TextBatch
from mcad_core.dist import TaskPlace, local_rank, partition
from mcad_core.lock import WriterBusyError, WriterLock
from mcad_core.runlog import RunLog
from mcad_core.shards import (
    IMAGE_EXTENSIONS,
    DuplicateKeyError,
    NotATarError,
    SplitData,
    list_shards,
    load_split,
    tar_problem,
)

log = logging.getLogger(__name__)

PASSES = ("embed", "search", "rescore", "fuse", "integrate")
ONE_TASK = TaskPlace(0, 1, "single")
BLOCK_PASS_ORDER = ("search", "rescore", "fuse", "integrate")


@dataclass
class CacheSummary:
    store: str
    place: TaskPlace
    seconds: dict[str, float] = field(default_factory=dict)
    shards_embedded: int = 0
    shards_skipped_done: int = 0
    shards_failed: list[str] = field(default_factory=list)
    samples: int = 0
    skipped_samples: int = 0  # skip events (status "skipped"): bad samples + one per truncated/unreadable shard
    bad_samples: int = 0  # samples known lost: bad, duplicate key, or cut in half by a truncation
    shards_truncated: list[str] = field(default_factory=list)  # what each truncated shard lost, in words
    itm_pairs: int = 0
    itm_positions: int = 0  # candidate-list entries + positives the pairs serve (before deduplication)
    teacher_seconds: float = 0.0  # inside teacher forward passes, every pass
    embed_teacher_seconds: float = 0.0
    bytes_on_disk: int = 0
    wall_seconds: float = 0.0  # the whole run_cache call: teacher loading and store checks included

    def to_dict(self) -> dict:
        """Everything above as JSON values, with the overhead ratios (None without teacher time)."""
        out = asdict(self)
        out["place"] = {"rank": self.place.rank, "world_size": self.place.world_size, "source": self.place.source}
        teacher = self.teacher_seconds or None
        out["overhead_ratio"] = round(self.wall_seconds / teacher, 4) if teacher else None
        out["passes_overhead_ratio"] = round(sum(self.seconds.values()) / teacher, 4) if teacher else None
        return out

    def lines(self) -> list[str]:
        out = [f"store {self.store} (task {self.place.rank}/{self.place.world_size}, {self.place.source})"]
        if "embed" in self.seconds:
            out.append(f"  embed: {self.shards_embedded} shards ({self.shards_skipped_done} already done), "
                       f"{self.samples} samples, {self.bad_samples} skipped samples, "
                       f"teacher forward {self.embed_teacher_seconds:.1f}s of {self.seconds['embed']:.1f}s")
        if self.shards_truncated:
            out.append(f"  TRUNCATED shards ({len(self.shards_truncated)}); samples past a cut are not counted above:")
            out.extend(f"    {message}" for message in self.shards_truncated)
        if self.shards_failed:
            out.append(f"  FAILED shards (recorded in the store): {self.shards_failed}")
        if self.itm_pairs:
            out.append(f"  rescore: {self.itm_pairs} distinct pairs scored by the single-stream teacher "
                       f"for {self.itm_positions} list entries")
        out.append("  seconds per pass: " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()))
        if self.teacher_seconds:
            passes = sum(self.seconds.values())
            out.append(f"  teacher forward {self.teacher_seconds:.1f}s of {passes:.1f}s in the passes "
                       f"({self.wall_seconds:.1f}s with loading): overhead ratio {passes / self.teacher_seconds:.2f} "
                       f"({self.wall_seconds / self.teacher_seconds:.2f})")
        out.append(f"  store size: {self.bytes_on_disk / 2**20:.1f} MiB")
        return out


def run_cache(cfg: CacheConfig, passes: Sequence[str], place: TaskPlace, progress: bool = True) -> CacheSummary:
    """Run ``passes`` as this task, under the store's writer locks: a second copy is refused before it does anything.

    The run's milestones are appended to the log beside the store (``store_log_path``).
    """
    with writer_locks(cfg.store, place.rank, place.world_size, passes), _store_log(cfg.store, place) as run_log:
        return _run_cache(cfg, passes, place, progress, run_log)


def store_log_path(store: str | os.PathLike, rank: int = 0) -> Path:
    """The log file of the runs on ``store``: ``<store name>.log`` beside it (a store holds only its own
    arrays), ``<store name>.rank<R>.log`` for task R > 0 of several, which may run on other machines."""
    store = Path(os.path.abspath(store))
    return store.with_name(f"{store.name}.log" if rank == 0 else f"{store.name}.rank{rank}.log")


@contextlib.contextmanager
def _store_log(store: str | os.PathLike, place: TaskPlace) -> Iterator[RunLog]:
    """The run's ``RunLog`` (opened by ``_run_cache`` once the store exists); a run that leaves no store (refused,
    or it removed the store it made) leaves no log it made either."""
    path = store_log_path(store, place.rank)
    existed = path.exists()
    try:
        with RunLog(path) as run_log:
            yield run_log
    finally:
        if not existed and not os.path.lexists(store):
            path.unlink(missing_ok=True)


def _run_cache(cfg: CacheConfig, passes: Sequence[str], place: TaskPlace, progress: bool,
               run_log: RunLog | None = None) -> CacheSummary:
    started = time.perf_counter()
    unknown = sorted(set(passes) - set(PASSES))
    if unknown:
        raise ValueError(f"unknown passes {unknown}; known: {list(PASSES)}")
    block_passes = [p for p in BLOCK_PASS_ORDER if p in passes]
    if block_passes and "embed" in passes and place.world_size > 1:
        raise ValueError(f"passes {block_passes} run after all embed tasks; this is task {place.rank} of "
                         f"{place.world_size} ({place.source}). Run them in a separate job: a single-task job, "
                         "or several tasks that split the blocks (see jobs/README.md).")
    if cfg.fusion_rule not in FUSION_RULES:
        raise ValueError(f"unknown fusion rule {cfg.fusion_rule!r}; known: {sorted(FUSION_RULES)}")
    check_fusion_a(cfg.fusion_rule, cfg.fusion_a)
    check_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    shards = list_shards(cfg.shards)
    check_k_fits_blocks(shards, cfg.k, cfg.block_shards)
    teachers = load_teacher_set(cfg, resolve_device(cfg.device))
    if cfg.source_size is None:
        cfg = replace(cfg, source_size=max(t.image_size for t in [*teachers.duals.values(), teachers.single]))
    created = not os.path.lexists(cfg.store)
    store = CacheStore.create_or_open(cfg.store, build_manifest(cfg, teachers, shards))
    if run_log is not None:
        run_log.open()
    _log_start(cfg, passes, place, store, created)
    summary = CacheSummary(str(cfg.store), place)
    if "embed" in passes:
        start = time.perf_counter()
        # One task running embed and block passes runs a block's passes as soon as it has embedded the block.
        early = [p for p in block_passes if p != "integrate"] if place.world_size == 1 else []
        blocks = EmbeddedBlocks(store, cfg, teachers, early, summary, progress) if early else None
        with _removed_if_nothing_embedded(store, created and place.world_size == 1, summary):
            embed_pass(store, cfg, teachers, partition(shards, place), summary, progress,
                       on_embedded=blocks.add if blocks else None)
        summary.seconds["embed"] = time.perf_counter() - start - (blocks.seconds if blocks else 0.0)
        log.info("pass embed done in %.1fs", time.perf_counter() - start)
    if block_passes:
        missing = [s["name"] for s in store.manifest["shards"] if not store.shard_done(s["name"])]
        if missing:
            raise CacheIncompleteError(f"{len(missing)} shard(s) are not embedded yet, e.g. {missing[:5]}: "
                                       "run the embed pass (all tasks) first")
        for pass_name in block_passes:
            start = time.perf_counter()
            if pass_name != "integrate":
                blocks_pass(store, cfg, teachers, pass_name, summary, progress, place=place)
            elif not integrate_when_fused(store, cfg, place, progress):
                continue
            summary.seconds[pass_name] = summary.seconds.get(pass_name, 0.0) + time.perf_counter() - start
            log.info("pass %s done in %.1fs", pass_name, time.perf_counter() - start)
    summary.bytes_on_disk = store.bytes_on_disk()
    summary.wall_seconds = time.perf_counter() - started
    log.info("cache done in %.1fs: %d shards embedded (%d already done, %d failed), %d samples; store %.1f MiB",
             summary.wall_seconds, summary.shards_embedded, summary.shards_skipped_done, len(summary.shards_failed),
             summary.samples, summary.bytes_on_disk / 2**20)
    return summary


def _log_start(cfg: CacheConfig, passes: Sequence[str], place: TaskPlace, store: CacheStore, created: bool) -> None:
    """The run log's first lines: passes, task, the whole config, and what the store already holds."""
    log.info("cache start on %s: passes %s, task %d of %d (%s)", store.path, ",".join(passes), place.rank,
             place.world_size, place.source)
    log.info("config: %s", json.dumps(cfg.to_dict(), sort_keys=True, default=str))
    if created:
        log.info("created the store")
    else:
        names = [s["name"] for s in store.manifest["shards"]]
        done = sum(store.shard_done(n) for n in names)
        log.info("resuming the store: %d of %d shards embedded already", done, len(names))


def check_fusion_a(rule: str, a: float) -> None:
    """Refuse a weight ``a`` the fusion rule refuses (e.g. reconstruction's 0 <= a <= 1), before any work.

    The rule itself is asked, on one zero logit, so its own check is the only one.
    """
    try:
        FUSION_RULES[rule](torch.zeros(1, 1), torch.zeros(1, 1), a)
    except ValueError as err:
        raise ValueError(f"fusion_a (--fusion-a) does not suit the fusion rule {rule!r}: {err}") from err


def check_device(device: str) -> None:
    """Refuse a device string torch does not know, or a CUDA device this machine lacks, before any work."""
    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} is not a torch device (auto, cpu, cuda, cuda:0, ...)") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine (use auto or cpu)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


@contextlib.contextmanager
def _removed_if_nothing_embedded(store: CacheStore, created: bool, summary: CacheSummary) -> Iterator[None]:
    """On a failure: remove the store again if this run created it and the embed pass stored no shard.

    Such a store holds only its manifest; a store with a stored shard stays, since a re-run resumes it.
    ``created`` is False for a store of several tasks: another task may be writing it.
    """
    try:
        yield
    except BaseException:
        if created and summary.shards_embedded == 0:
            log.info("removing the store %s: this run created it and stored no shard before it stopped", store.path)
            shutil.rmtree(store.path, ignore_errors=True)
        raise


def check_k_fits_blocks(shards: Sequence[str], k: int, block_shards: int) -> None:
    """Refuse a k larger than the smallest candidate pool, before any teacher runs or a store is made.

    A block's pool is its images (t2i lists) and its captions (i2t lists, at least
    one per image), so the images bound k. They are counted from the tar headers
    of local shards (no member is read or decoded); remote or piped shards cannot
    be counted cheaply, and the search pass checks them instead.
    """
    local = [s for s in shards if os.path.isfile(s)]
    if len(local) < len(shards):
        return
    for block in plan_blocks(local, block_shards):
        images = 0
        for shard in block:  # counting stops once the block holds k images
            images += _count_images(shard, stop_at=k - images)
        if k > images:
            names = ", ".join(os.path.basename(s) for s in block)
            for shard in block:  # a file that is no tar at all is the input's fault, not k's: name it
                problem = tar_problem(shard)
                if problem:
                    raise NotATarError(shard, problem, f" (candidate block [{names}] has {images} images for k={k})")
            raise ValueError(f"k={k} exceeds the {images} images of the candidate block [{names}] (a block is "
                             f"{block_shards} shard(s)): lower k or raise block_shards")


def _count_images(shard: str, stop_at: int | None = None) -> int:
    """Distinct sample keys with an image member, from the tar headers alone; at most ``stop_at`` of them."""
    keys: set[str] = set()
    if stop_at is not None and stop_at <= 0:
        return 0
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile():
                    key, ext = base_plus_ext(member.name)  # webdataset's own key/extension split
                    if ext is not None and ext.lower() in IMAGE_EXTENSIONS:
                        keys.add(key)
                        if stop_at is not None and len(keys) >= stop_at:
                            break
    except (tarfile.TarError, OSError, EOFError):
        return len(keys)  # a broken shard is the embed pass's to report (raise or a counted skip)
    return len(keys)


def resolve_device(device: str) -> str:
    """``auto`` picks this task's GPU when CUDA is available, else the CPU: ``cuda:<local rank>`` read as stage 2
    reads it (``mcad_core.dist.local_rank``: torchrun's LOCAL_RANK, else Slurm's SLURM_LOCALID, a blank one unset),
    so that several tasks on one machine take one GPU each rather than all the first."""
    if device != "auto":
        return device
    return f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------- embed


def embed_pass(store: CacheStore, cfg: CacheConfig, teachers: TeacherSet, shards: Sequence[str],
               summary: CacheSummary, progress: bool,
               on_embedded: Callable[[str, ShardInput | None], None] | None = None) -> None:
    """Embed this task's shards in order, skipping those already done.

    The next shard to embed is read (decoded, tokenized: ``read_shard``) in a
    thread while this one's teacher forwards run, so reading leaves the critical
    path; at most two shards are in memory at once (plus what ``on_embedded``
    keeps). Each read has a thread of its own, which ends with the read: an idle
    reader's OpenMP team would slow the main thread's forwards (see
    ``_reader_pool``). ``on_embedded(shard, input)`` is called once a shard is
    stored, with its input, or None if it failed. A shard recorded as failed
    (under ``warn``) is retried: failures can pass (a file server that was
    away), and a failed shard would otherwise stay empty for good. Keys are
    checked against every earlier shard of this task, done ones included; other
    tasks' shards are checked when a block is read (``check_block_keys``).

    With ``cfg.workers`` > 0, worker processes read the shards instead (``shard_loader``: up to
    ``workers`` shards decoded and tokenized ahead, in order), and render their views and, with the
    teachers on the CPU, prepare their pixels, up to a byte budget (``views_ahead``): the main process
    is left the forwards and the store writes, so that it does not bound the rate the workers give. The
    key check against earlier shards runs here as each is taken (``drop_repeated_keys``: a shard that
    loses a sample to it is rendered here again), so the store is the one a reader thread writes.
    """
    widths = teachers.widths()
    previous = {shard: store.shard_status(shard_name(shard)) for shard in shards}
    todo = [i for i, shard in enumerate(shards) if not previous[shard].get("done") or previous[shard].get("failed")]
    summary.shards_skipped_done += len(shards) - len(todo)
    seen: dict[str, str] = {}  # key -> the shard it was first read from
    remembered = 0  # shards[:remembered] have their keys in ``seen``
    items = iter(shard_loader([shards[i] for i in todo], cfg, teachers)) if cfg.workers and todo else None

    def read_next(index: int) -> Future | _WorkerRead:
        """Start reading ``shards[index]`` once ``seen`` holds the keys of every shard before it."""
        nonlocal remembered
        for shard in shards[remembered:index]:  # done shards; the todo ones were remembered as they were read
            _remember_keys(seen, store.shard_group(shard_name(shard))["keys"][...], shard)
        remembered = index
        if items is not None:  # the workers read the todo shards in this order already
            return _WorkerRead(items, shards[index], seen, cfg, teachers)
        # ``seen`` is not changed again until this read's result is taken, so the thread may read it as it is.
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcad-read")
        future = pool.submit(read_shard, shards[index], cfg, teachers, seen)
        pool.shutdown(wait=False)  # the thread ends once the read is done
        return future

    bar = tqdm(total=len(shards), initial=len(shards) - len(todo), desc="embed shards", unit="shard",
               disable=not progress)
    with bar, _workers_stopped(items):
        pending = read_next(todo[0]) if todo else None
        for position, index in enumerate(todo):
            shard = shards[index]
            name = shard_name(shard)
            if previous[shard].get("failed"):
                # Unmarked before the retry writes: a retry killed half-way leaves a shard the next run redoes.
                store.shard_group(name).attrs.put({})
            try:
                shard_input = pending.result()
            except READ_ERRORS as err:
                if cfg.on_error == "raise":
                    raise
                shard_input = err
            _remember_keys(seen, shard_input.data.keys if isinstance(shard_input, ShardInput) else [], shard)
            remembered = index + 1
            pending = read_next(todo[position + 1]) if position + 1 < len(todo) else None
            if isinstance(shard_input, ShardInput):
                arrays, status = embed_input(shard_input, cfg, teachers)
            else:
                # An unreadable shard is recorded as failed, with zero rows, never dropped silently.
                log.warning("shard %s failed: %s", shard, shard_input)
                arrays = _empty_shard(cfg, teachers, widths)
                status = {"samples": 0, "failed": f"{type(shard_input).__name__}: {shard_input}"}
                summary.shards_failed.append(name)
            if status.get("failed") and name not in summary.shards_failed:
                summary.shards_failed.append(name)
            write_shard_group(store.root, name, arrays, widths, teachers.single_name, _single_views(cfg))
            if previous[shard].get("failed") and (previous[shard].get("samples") or status["samples"]):
                _forget_block_passes(store, name)
            store.mark_shard(name, status)
            log.info("shard %s embedded: %d samples", name, status["samples"])
            summary.shards_embedded += 1
            summary.samples += status["samples"]
            summary.skipped_samples += status.get("skipped", 0)
            summary.bad_samples += status.get("skipped_samples", 0)
            if status.get("truncated"):
                summary.shards_truncated.append(status["truncated"]["message"])
            summary.teacher_seconds += status.get("teacher_seconds", 0.0)
            summary.embed_teacher_seconds += status.get("teacher_seconds", 0.0)
            bar.update()
            if on_embedded is not None:
                on_embedded(shard, shard_input if isinstance(shard_input, ShardInput) and not status.get("failed")
                            else None)


class _WorkerRead:
    """The workers' next shard, taken like a Future: ``result()`` raises its read error, or checks its keys
    against ``seen`` (as it is when taken: every earlier shard's keys) and returns it."""

    def __init__(self, items: Iterator, shard: str, seen: dict[str, str], cfg: CacheConfig,
                 teachers: TeacherSet) -> None:
        self.items, self.shard, self.seen, self.cfg, self.teachers = items, shard, seen, cfg, teachers

    def result(self) -> ShardInput:
        item = next(self.items)
        if isinstance(item, ReadFailure):
            raise item.error
        return drop_repeated_keys(item, self.shard, self.seen, self.cfg, self.teachers)


@contextlib.contextmanager
def _workers_stopped(items: Iterator | None) -> Iterator[None]:
    """Stop the loader's worker processes on the way out, at once, even when the pass failed part-way."""
    try:
        yield
    finally:
        stop = getattr(items, "_shutdown_workers", None)  # torch's multiprocessing loader iterator
        if stop is not None:
            stop()


def _reader_pool() -> ThreadPoolExecutor:
    """The rescore pass's read-ahead thread; its torch ops run on one thread.

    Left at the default, this reader's first parallel op (stacking a block's images) starts a second
    OpenMP team; libgomp then manages more threads than there are cores and has every team sleep at
    barriers instead of spinning, and the main thread's forwards slowed down even while the reader
    idled: one block's rescore forwards took 62.2 s with a default reader, 47.8 s with this one and
    51.1 s reading in the main thread (2 cores). The embed pass's reader keeps the default: one
    thread there measured slower (6 shards, 2 runs each: 30.5 / 27.9 s against 26.7 / 27.2 s).
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcad-read", initializer=torch.set_num_threads,
                              initargs=(1,))


def _remember_keys(seen: dict[str, str], keys: np.ndarray, shard: str) -> None:
    """Add ``keys`` read from ``shard`` to ``seen``, keeping the first shard of a key already there."""
    seen.update(dict.fromkeys(set(np.asarray(keys).tolist()).difference(seen), shard))


def _forget_block_passes(store: CacheStore, name: str) -> None:
    """A retried shard's rows changed, so the block passes of its block are stale (integrate then reruns too)."""
    for index, block in enumerate(store.manifest["search"]["blocks"]):
        if name in block:
            store.clear_passes(block_name(index), BLOCK_PASS_ORDER)


def _single_views(cfg: CacheConfig) -> int:
    return cfg.views if cfg.single_itc_views == "all" else 1


def _empty_shard(cfg: CacheConfig, teachers: TeacherSet, widths: dict[str, int]) -> dict[str, np.ndarray]:
    arrays = {
        "keys": np.zeros(0, dtype=str),
        "text_image": np.zeros(0, dtype=np.int32),
        "text_tokens": np.zeros((0, teachers.context_length), dtype=np.int32),
        "view_params": np.zeros((0, cfg.views, 4), dtype=np.float32),
    }
    for name, width in widths.items():
        views = _single_views(cfg) if name == teachers.single_name else cfg.views
        arrays[f"emb/{name}/image"] = np.zeros((0, views, width), dtype=np.float16)
        arrays[f"emb/{name}/text"] = np.zeros((0, width), dtype=np.float16)
    return arrays


# ---------------------------------------------------------------------- blocks


def load_block_embeddings(store: CacheStore, shards: Sequence[str], teacher_names: Sequence[str]):
    """View-0 embeddings of a block's rows, float32, and its caption-to-image map."""
    rows = read_block_rows(store.root, list(shards), list(teacher_names))
    check_block_keys(rows["keys"], shards, [store.shard_group(name)["keys"].shape[0] for name in shards])
    return block_ops.BlockEmbeddings(
        keys=rows["keys"], text_image=torch.from_numpy(rows["text_image"]),
        images={t: torch.from_numpy(rows[f"emb/{t}/image"][:, 0].astype(np.float32)) for t in teacher_names},
        texts={t: torch.from_numpy(rows[f"emb/{t}/text"].astype(np.float32)) for t in teacher_names},
    )


def search_dual_weights(store: CacheStore) -> list[float]:
    """The store's dual weights for the candidate search; a "ranked" store's are chosen here the first time.

    "ranked" takes the weighting, on a grid of ``weighing.RANKED_STEPS``, whose weighted logits put a true pair
    first most often over the first block (``weighing.block_top1``), unless it passes equal weights by no more
    than two standard errors (``weighing.summarize``'s ``chosen``).
    The first block is embedded before any block is searched, in a one-task run (which searches each block as
    soon as it is embedded) and in a run of several tasks alike, so every task and every re-run reads one choice,
    published once (``CacheStore.publish_dual_weights``).
    """
    manifest = store.manifest
    weights = manifest["search"]["dual_weights"]
    if weights != "ranked":
        return weights
    duals = manifest["dual_teachers"]
    emb = load_block_embeddings(store, manifest["search"]["blocks"][0], duals)
    grid = weighing.weighting_grid(len(duals), weighing.RANKED_STEPS)
    counts = weighing.embedding_counts(emb, duals, [manifest["teachers"][t]["logit_scale"] for t in duals], grid)
    report = weighing.summarize(duals, grid, [counts], images=len(emb.keys), captions=len(emb.text_image))
    chosen = store.publish_dual_weights({"dual_weights": report["chosen"], "rule": "ranked", "block": block_name(0),
                                         **{key: report[key] for key in ("images", "captions", "best", "gain",
                                                                         "margin", "rows")}})
    log.info("dual weights ranked on %s: %s %s", block_name(0), duals, chosen["dual_weights"])
    return chosen["dual_weights"]


def check_block_keys(keys: np.ndarray, shards: Sequence[str], rows_per_shard: Sequence[int]) -> None:
    """Refuse a block whose rows repeat a key, naming the key and both shards.

    Each embed task checks keys only across its own shards, so a repeat between
    shards of different tasks first meets here, where a block's keys are read
    anyway; a numpy unique over the block keeps it cheap.
    """
    unique, first = np.unique(keys, return_index=True)
    if len(unique) == len(keys):
        return
    repeated = np.ones(len(keys), dtype=bool)
    repeated[first] = False
    row = int(np.flatnonzero(repeated)[0])
    first_row = int(first[np.searchsorted(unique, keys[row])])
    owner = np.repeat(np.arange(len(shards)), rows_per_shard)
    raise DuplicateKeyError(str(keys[row]), shards[owner[first_row]], shards[owner[row]])


def blocks_pass(store: CacheStore, cfg: CacheConfig, teachers: TeacherSet, pass_name: str,
                summary: CacheSummary, progress: bool, read_ahead: bool | None = None,
                place: TaskPlace = ONE_TASK) -> None:
    """Run a per-block pass over this task's blocks not done yet (in one task's full run, the blocks that
    ``EmbeddedBlocks`` did not already run during the embed pass).

    Task ``place.rank`` of ``place.world_size`` takes blocks ``rank, rank + world_size, ...``
    (``mcad_core.dist.partition``, as the embed pass takes shards), so every pass of a block runs in the
    same task, and a block's arrays are the ones a single task writes.

    With ``read_ahead`` (default: when the teachers run on a GPU) the rescore pass reads the next
    block's images and captions (decoded, tokenized for the single-stream teacher:
    ``read_rescore_input``) in a thread while this block's ITM forwards run; at most two blocks'
    decoded images are then in memory. On CPU the reader only competes with the forwards for the
    same cores: rescore of 2 blocks on 2 cores took 104.3 / 118.1 s reading ahead against
    103.2 / 111.1 s reading in turn (docs/results.md, "Stage 1"), so there each block reads its own.
    """
    if read_ahead is None:
        read_ahead = torch.device(resolve_device(cfg.device)).type != "cpu"
    blocks = store.manifest["search"]["blocks"]
    mine = partition(range(len(blocks)), place)
    todo = [i for i in mine if not store.pass_done(block_name(i), pass_name)]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=pass_name, unit="block",
               disable=not progress)
    with bar, _reader_pool() as pool:
        def read(position: int) -> Future | None:
            if not read_ahead or pass_name != "rescore" or position >= len(todo):
                return None
            return pool.submit(read_rescore_input, cfg, teachers, blocks[todo[position]])

        pending = read(0)
        for position, index in enumerate(todo):
            rescore_input = pending.result() if pending is not None else None
            pending = read(position + 1)
            block_pass(store, cfg, teachers, pass_name, block_name(index), blocks[index], summary, progress,
                       rescore_input)
            bar.update()


def block_pass(store: CacheStore, cfg: CacheConfig, teachers: TeacherSet, pass_name: str, block: str,
               shards: Sequence[str], summary: CacheSummary, progress: bool,
               rescore_input: RescoreInput | None = None) -> None:
    """One pass over one block; ``rescore`` reads its input itself unless ``rescore_input`` is given."""
    if store.pass_done(block, pass_name):
        return
    start = time.perf_counter()
    manifest = store.manifest
    group = store.block_group(block)
    duals = manifest["dual_teachers"]
    emb = load_block_embeddings(store, shards, duals)
    sizes = {"n": len(emb.keys), "t": len(emb.text_image), "k": cfg.k,
             "H": teachers.single.fused_dim, "E": cfg.integration_dim}
    info: dict = {"rows": [sizes["n"], sizes["t"]]}
    if pass_name == "search":
        scales = [manifest["teachers"][name]["logit_scale"] for name in duals]
        image_vecs, text_vecs = block_ops.dual_logit_embeddings(emb, duals, search_dual_weights(store), scales)
        arrays = block_ops.search(image_vecs, text_vecs, cfg.k)
    elif pass_name == "rescore":
        lists = {spec.path: read_array(group, spec) for spec in BLOCK_PASSES["search"]}
        plan = block_ops.plan_pairs(torch.from_numpy(lists["i2t/ids"]), torch.from_numpy(lists["t2i/ids"]),
                                    emb.text_image)
        if rescore_input is None:
            rescore_input = read_rescore_input(cfg, teachers, shards)
        vision_tokens, itm, clock = _single_stream_scorer(teachers, shards, emb, rescore_input, cfg.precision)
        logits, fused = block_ops.rescore(plan, vision_tokens, itm, max(1, cfg.itm_batch_size // (2 * cfg.k)),
                                          cfg.itm_batch_size, teachers.single.fused_dim, progress)
        arrays = block_ops.rescore_arrays(plan, logits, fused)
        positions = plan.i2t_slot.numel() + plan.t2i_slot.numel() + plan.pos_slot.numel()
        info.update(pairs=len(plan), positions=positions, teacher_seconds=round(clock["seconds"], 3),
                    input=rescore_input.source)
        summary.teacher_seconds += clock["seconds"]
        summary.itm_pairs += len(plan)
        summary.itm_positions += positions
    elif pass_name == "fuse":
        lists = {spec.path: read_array(group, spec) for spec in BLOCK_PASSES["search"] + BLOCK_PASSES["rescore"]}
        arrays = block_ops.fuse_arrays(lists, manifest["fusion"]["rule"], manifest["fusion"]["a"])
    else:
        raise ValueError(f"{pass_name} is not a per-block pass")
    for spec in BLOCK_PASSES[pass_name]:
        write_array(group, spec, arrays[spec.path], sizes)
    group.attrs["shards"] = list(shards)
    later = BLOCK_PASS_ORDER[BLOCK_PASS_ORDER.index(pass_name) + 1 :]
    store.clear_passes(block, later)
    store.mark_pass(block, pass_name, {**info, "seconds": round(time.perf_counter() - start, 3)})


@dataclass
class RescoreInput:
    """A block's images and captions as the rescore pass reads them: decoded, and tokenized for the single teacher."""

    data: SplitData
    texts: TextBatch  # the single-stream teacher's tokens of every caption, in caption order
    source: str = "shards"  # "shards": read for the pass; "embed pass": kept from the embed pass's read


def read_rescore_input(cfg: CacheConfig, teachers: TeacherSet, shards: Sequence[str]) -> RescoreInput:
    """Decode a block's shards and tokenize their captions for the single-stream teacher (no forward)."""
    paths = {shard_name(path): path for path in list_shards(cfg.shards)}  # this run's, checked against the store
    data = load_split([paths[name] for name in shards], image_size=cfg.source_size, policy=cfg.on_error,
                      max_image_pixels=cfg.max_image_pixels)
    texts = teachers.single.tokenize([text for captions in data.captions for text in captions])
    return RescoreInput(data, texts)


def rescore_input_from(inputs: Sequence[ShardInput], single_name: str) -> RescoreInput:
    """A block's RescoreInput from its shards as the embed pass read them (no second decode or tokenization).

    The single-stream teacher's tokens come in batches; batches padded to different widths are joined at the
    widest, the added positions masked out.
    """
    data = SplitData(keys=[key for i in inputs for key in i.data.keys],
                     images=torch.cat([i.data.images for i in inputs]),
                     captions=[c for i in inputs for c in i.data.captions],
                     shard_of=[s for i in inputs for s in i.data.shard_of])
    batches = [batch for i in inputs for batch in i.teacher_tokens[single_name]]
    if not batches:  # no caption at all: the search pass refuses such a block before rescore reads this
        return RescoreInput(data, TextBatch(torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long)),
                            "embed pass")
    width = max(b.input_ids.shape[1] for b in batches)

    def padded(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]))

    return RescoreInput(data, TextBatch(torch.cat([padded(b.input_ids) for b in batches]),
                                        torch.cat([padded(b.attention_mask) for b in batches])), "embed pass")


class EmbeddedBlocks:
    """Runs a block's per-block passes as soon as the embed pass has stored every shard of the block.

    The shards' inputs, as ``read_shard`` read them, are kept until then, so rescore takes its images and the
    single-stream teacher's tokens from memory instead of decoding and tokenizing the block a second time
    (what the rescore pass reads anyway: one block's images). A block with a shard embedded earlier (a
    resumed run) or failed now is left to the passes after the embed pass, which read it from its shards.
    """

    def __init__(self, store: CacheStore, cfg: CacheConfig, teachers: TeacherSet, passes: Sequence[str],
                 summary: CacheSummary, progress: bool) -> None:
        self.store, self.cfg, self.teachers, self.passes = store, cfg, teachers, list(passes)
        self.summary, self.progress = summary, progress
        self.blocks: list[list[str]] = store.manifest["search"]["blocks"]
        self.block_of = {name: index for index, block in enumerate(self.blocks) for name in block}
        self.kept: dict[int, dict[str, ShardInput] | None] = {}  # None: a shard of it failed
        self.seconds = 0.0  # spent in block passes

    def add(self, shard: str, shard_input: ShardInput | None) -> None:
        name = shard_name(shard)
        index = self.block_of[name]
        kept = self.kept.setdefault(index, {})
        # Shards are embedded in block order: one that is not the next of its block means an earlier one was
        # embedded before this run, and the block is read again later; nothing of it is kept meanwhile.
        if kept is None or shard_input is None or name != self.blocks[index][len(kept)]:
            self.kept[index] = None
            return
        kept[name] = shard_input
        if len(kept) < len(self.blocks[index]):
            return
        del self.kept[index]
        shards = self.blocks[index]
        rescore_input = rescore_input_from([kept[name] for name in shards], self.teachers.single_name)
        for pass_name in self.passes:
            start = time.perf_counter()
            block_pass(self.store, self.cfg, self.teachers, pass_name, block_name(index), shards, self.summary,
                       self.progress, rescore_input if pass_name == "rescore" else None)
            elapsed = time.perf_counter() - start
            self.summary.seconds[pass_name] = self.summary.seconds.get(pass_name, 0.0) + elapsed
            self.seconds += elapsed


def _single_stream_scorer(teachers: TeacherSet, shards: Sequence[str], emb: block_ops.BlockEmbeddings,
                          rescore_input: RescoreInput, precision: str = "fp32"):
    """Closures giving vision tokens of block image rows and ITM scores of (tokens, image rows, text rows),
    their forwards under ``precision``'s autocast."""
    from mcad_core.views import FULL_VIEW, render_views

    data, texts = rescore_input.data, rescore_input.texts
    if list(data.keys) != [str(k) for k in emb.keys]:
        raise CacheIncompleteError(f"block {shards}: the shards no longer yield the samples the store holds; "
                                   "they changed after the embed pass")
    single = teachers.single
    full = torch.tensor(FULL_VIEW).expand(len(data), 4)
    clock = {"seconds": 0.0}  # time inside the teacher's forward passes, for the overhead ratio
    autocast = teacher_autocast(precision, teachers.device)

    @torch.no_grad()
    def vision_tokens(rows: torch.Tensor) -> torch.Tensor:
        pixels = single.pixels_from_uint8(render_views(data.images[rows], full[: len(rows)], single.image_size))
        start = time.perf_counter()
        with autocast():
            tokens = single.vision_tokens(pixels)
        clock["seconds"] += time.perf_counter() - start
        return tokens

    @torch.no_grad()
    def itm(tokens: torch.Tensor, image_rows: torch.Tensor, text_rows: torch.Tensor):
        batch = texts.select(text_rows)
        start = time.perf_counter()
        with autocast():
            out = single.itm(tokens, batch, image_rows=image_rows)
        clock["seconds"] += time.perf_counter() - start
        return out.logits, out.fused

    return vision_tokens, itm, clock


def integrate_when_fused(store: CacheStore, cfg: CacheConfig, place: TaskPlace, progress: bool) -> bool:
    """The integrate pass, run by one task once every block is fused; whether this task ran it.

    Each task of a block job fuses its own blocks and then reads the blocks' done markers (its own
    are written by then): the task that finds every block fused, i.e. the last to finish, runs
    integrate, under the store's integrate lock (``.<store>.lock-integrate``). A task that finds a
    block not fused leaves integrate to the task still fusing it, and one that finds the lock taken
    leaves it to the holder; a killed task's re-run finishes its blocks and integrates. No process
    group is needed, so Slurm array tasks synchronize the same way as torchrun workers. A single
    task must find every block fused.
    """
    names = [block_name(i) for i in range(len(store.manifest["search"]["blocks"]))]
    unfused = [name for name in names if not store.pass_done(name, "fuse")]
    if unfused:
        if place.world_size == 1:
            raise CacheIncompleteError(f"{len(unfused)} block(s) are not fused yet, e.g. {unfused[:5]}: "
                                       "run the search, rescore and fuse passes first")
        log.info("integrate left to the task that fuses the last block (%d not fused yet)", len(unfused))
        return False
    try:
        with WriterLock(store.path, "-integrate", what=f"cache store {store.path} (integrate pass)"):
            integrate_pass(store, cfg, progress)
    except WriterBusyError as err:
        log.warning("integrate left to the process running it: %s", err)
        return False
    return True


def integrate_pass(store: CacheStore, cfg: CacheConfig, progress: bool) -> None:
    """Train the integration module on every block's cached features, then write its features per block.

    Memory does not grow with the store's features: they go block by block to float32 scratch files
    beside the store (``integrate.RowFile``, ``.<store>.integrate-scratch/``, removed afterwards and at the
    next start), each training step reads its batch's rows, and the integrated features are computed and
    written one block at a time (``integrate.integrated_spans``). Per row, memory keeps only what the
    batch planner walks: candidate ids, fused logits and the caption-to-image map. The numbers are those of
    training on every block's features concatenated in memory, bit for bit.
    """
    from mcad_cache.integrate import IntegrationConfig, integrated_spans, train_integration

    manifest = store.manifest
    names = [block_name(i) for i in range(len(manifest["search"]["blocks"]))]
    if all(store.pass_done(name, "integrate") for name in names) and "integration" in store.root.attrs:
        return
    start = time.perf_counter()
    scratch = store.path.with_name(f".{store.path.name}.integrate-scratch")
    shutil.rmtree(scratch, ignore_errors=True)  # a killed run's
    scratch.mkdir()
    try:
        features, rows = _integration_features(store, names, manifest, scratch)
        icfg = IntegrationConfig(dim=cfg.integration_dim, steps=cfg.integration_steps, seed=cfg.seed)
        model, train_summary = train_integration(features, icfg, progress=progress)
        # The weights live in the store as plain float32 arrays (group "integration"), read back without pickle.
        weight_group = store.root.require_group("integration")
        for key, value in model.state_dict().items():
            weight_group.create_array(key, data=value.detach().float().numpy(), overwrite=True)
        images = integrated_spans(model, "image", features["dual_image"], features["single_image"],
                                  [(n0, n1) for n0, n1, _, _ in rows])
        texts = integrated_spans(model, "text", features["dual_text"], features["single_text"],
                                 [(t0, t1) for _, _, t0, t1 in rows])
        for name, image_int, text_int in zip(names, images, texts, strict=True):
            group = store.block_group(name)
            sizes = {"n": len(image_int), "t": len(text_int), "E": cfg.integration_dim}
            arrays = {"integrated/image": image_int.numpy(), "integrated/text": text_int.numpy()}
            for spec in BLOCK_PASSES["integrate"]:
                write_array(group, spec, arrays[spec.path], sizes)
            store.mark_pass(name, "integrate", {"rows": [sizes["n"], sizes["t"]]})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    store.root.attrs["integration"] = {
        "config": {k: getattr(icfg, k) for k in icfg.__dataclass_fields__},
        "dual_dim": int(features["dual_image"].shape[1]), "single_dim": int(features["single_image"].shape[1]),
        "dual_scale": float(features["dual_scale"]), "weights": "integration/",
        "summary": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in train_summary.items()},
        "seconds": round(time.perf_counter() - start, 3),
    }


def _integration_features(store: CacheStore, names: list[str], manifest: dict, scratch: Path):
    """Every block's lists, concatenated with ids offset to the concatenated rows, and its features appended to
    ``RowFile``s in ``scratch`` (the four feature tables of the result), block by block.

    The lists are filled into tables made once at their full size (the rows counted from the shard arrays'
    shapes): tables that grew block by block would leave a block's worth of freed memory between them.
    """
    from mcad_cache.integrate import RowFile

    duals = manifest["dual_teachers"]
    weights = manifest["search"]["dual_weights"]
    scales = [manifest["teachers"][name]["logit_scale"] for name in duals]
    # The fused dual vectors have squared norm sum_t w_t s_t; unit vectors times that scale give the same logits.
    dual_scale = float(sum(w * s for w, s in zip(weights, scales, strict=True)))
    shards = [store.shard_group(name) for block in manifest["search"]["blocks"] for name in block]
    n_all, t_all = sum(g["keys"].shape[0] for g in shards), sum(g["text_image"].shape[0] for g in shards)
    k = manifest["search"]["k"]
    lists = {"text_image": torch.empty(t_all, dtype=torch.long), "i2t_ids": torch.empty(n_all, k, dtype=torch.long),
             "i2t_fused": torch.empty(n_all, k), "t2i_ids": torch.empty(t_all, k, dtype=torch.long),
             "t2i_fused": torch.empty(t_all, k)}
    tables: dict[str, RowFile] = {}
    rows, n, t = [], 0, 0
    for name, block in zip(names, manifest["search"]["blocks"], strict=True):
        group = store.block_group(name)
        emb = load_block_embeddings(store, block, duals)
        image_vecs, text_vecs = block_ops.dual_logit_embeddings(emb, duals, weights, scales)
        pos = torch.from_numpy(group["pos/feature"][...].astype(np.float32))
        n_b, t_b = len(emb.keys), len(emb.text_image)
        counts = torch.bincount(emb.text_image, minlength=n_b).clamp(min=1).unsqueeze(1)
        single_image = torch.zeros(n_b, pos.shape[1]).index_add_(0, emb.text_image, pos) / counts
        block_features = {"dual_image": image_vecs / dual_scale**0.5, "dual_text": text_vecs / dual_scale**0.5,
                          "single_image": single_image, "single_text": pos}
        for key, value in block_features.items():
            if key not in tables:
                tables[key] = RowFile(scratch / f"{key}.f32", value.shape[1])
            tables[key].append(value)
        lists["text_image"][t : t + t_b] = emb.text_image + n
        lists["i2t_ids"][n : n + n_b] = torch.from_numpy(group["i2t/ids"][...].astype(np.int64)) + t
        lists["t2i_ids"][t : t + t_b] = torch.from_numpy(group["t2i/ids"][...].astype(np.int64)) + n
        lists["i2t_fused"][n : n + n_b] = torch.from_numpy(group["i2t/fused"][...])
        lists["t2i_fused"][t : t + t_b] = torch.from_numpy(group["t2i/fused"][...])
        rows.append((n, n + n_b, t, t + t_b))
        n, t = n + n_b, t + t_b
        del emb, image_vecs, text_vecs, pos, single_image, block_features  # before the next block's arrays come
    features = {**tables, **lists}
    count = torch.bincount(features["text_image"], minlength=n)
    features.update(first=torch.cumsum(count, 0) - count, count=count, dual_scale=dual_scale)
    return features, rows
