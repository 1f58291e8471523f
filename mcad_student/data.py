"""Stage-2 input: the training shards joined with their cache rows, block by block, in neighbour-aware batches.

A block's cache rows are read whole: every array of its shard groups and its block group in one read each
(Zarr chunks follow shard order, so this is sequential I/O), and its source shards streamed once through the
webdataset pipeline. Samples are joined to cache rows by key; an image stays as the bytes its shard holds
(``EncodedImages``) and is decoded when a batch takes its row, so a block costs its encoded size, not
``n x 3 x S x S`` pixels. Within the block, batches are built so that each anchor's cached candidates share its
batch (``neighbor_batches``); the batch carries everything the losses need, including the rebuilt target
logits, so the trainer never touches the store. While the trainer works on one block, the next one is read
(and planned) in a background thread, at most one block ahead (``ReadAhead``).

The epoch plan is a pure function of ``(seed, epoch)``: block order, batches
and per-sample view/caption choices come from generators seeded by the
position, so a resumed run replays exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import torch

from mcad_cache.fusion import FUSION_RULES, fuse
from mcad_cache.schema import BLOCK_PASSES, read_block_rows
from mcad_cache.sources import locate_shards
from mcad_cache.store import CacheStore, block_name
from mcad_cache.targets import candidates_in_batch, neighbor_batches, rebuild_target_logits, rebuild_target_rows
from mcad_core.shards import DEFAULT_MAX_IMAGE_PIXELS, ImageDecoder, ReadStats, iter_samples, square
from mcad_core.views import render_views
from mcad_student.choices import BATCHINGS
from mcad_student.parallel import local_rows


class CacheJoinError(RuntimeError):
    """The shards and the cache disagree: a cached sample is missing from its shard."""


@dataclass(frozen=True)
class EncodedImages:
    """A block's source images as the bytes their shards hold, in cache row order: ``images[rows]`` decodes only
    those rows, exactly as stage 1 decoded them (``ImageDecoder``, then ``square`` to ``size``), to a
    (len(rows), 3, size, size) uint8 tensor."""

    data: list[bytes]
    extensions: list[str]  # each row's image member extension ("jpg", "png", ...)
    size: int
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        decode = ImageDecoder(self.max_pixels)
        out = np.empty((len(rows), 3, self.size, self.size), dtype=np.uint8)
        for i, row in enumerate(rows.tolist()):
            image = decode(f".{self.extensions[row]}", self.data[row])
            if image.size != (self.size, self.size):
                image = square(image, self.size)
            out[i] = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
        return torch.from_numpy(out)

    @property
    def nbytes(self) -> int:
        return sum(len(d) for d in self.data)


@dataclass
class Block:
    """One block in memory: cache rows and the joined source images, both in cache row order."""

    name: str
    keys: np.ndarray
    images: EncodedImages  # (n,) as the shards hold them, joined by key; images[rows]: (len(rows), 3, S, S) uint8
    text_image: torch.Tensor  # (t,)
    first: torch.Tensor  # (n,)
    count: torch.Tensor  # (n,)
    text_tokens: torch.Tensor  # (t, L) as stored (int32); a batch's rows are made int64
    view_params: torch.Tensor  # (n, V, 4)
    image_emb: dict[str, torch.Tensor]  # dual teacher -> (n, V, D) float16
    text_emb: dict[str, torch.Tensor]  # dual teacher -> (t, D) float16
    lists: dict[str, torch.Tensor]  # "i2t/ids", "i2t/fused", "t2i/ids", "t2i/fused"
    integrated_image: torch.Tensor  # (n, E) float16
    integrated_text: torch.Tensor  # (t, E) float16
    captions: list[str] = field(default_factory=list)  # (t,) caption strings (the online baseline needs them)
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


def read_block(store: CacheStore, index: int, policy: str = "warn", paths: dict[str, str] | None = None,
               fusion: tuple[str, float] | None = None) -> Block:
    """Block ``index`` with its images joined from the source shards (``paths``: from ``locate_shards``).

    ``fusion`` (rule, a) re-derives the fused list logits from the cached dual and ITM logits of the
    same candidates, in place of the rule the cache was made with: a fusion rule costs no teacher
    pass, so stage 2 can compare rules on one cache.
    """
    manifest = store.manifest
    shards = manifest["search"]["blocks"][index]
    paths = paths if paths is not None else locate_shards(manifest, store.path, names=shards)
    duals = manifest["dual_teachers"]
    name = block_name(index)
    group = store.root["blocks"].get(name)
    if group is None or any(p not in group.attrs.get("passes", {}) for p in BLOCK_PASSES):
        raise CacheJoinError(f"block {name} is not complete in {store.path}; finish `mcad cache` first")
    rows = read_block_rows(store.root, shards, duals)
    keys = rows["keys"]
    text_image = torch.from_numpy(rows["text_image"])
    count = torch.bincount(text_image, minlength=len(keys))
    lists = {path: torch.from_numpy(group[path][...]) for path in ("i2t/ids", "i2t/fused", "t2i/ids", "t2i/fused")}
    lists["i2t/ids"], lists["t2i/ids"] = lists["i2t/ids"].long(), lists["t2i/ids"].long()
    if fusion is not None:
        for side in ("i2t", "t2i"):
            dual, itm = (torch.from_numpy(group[f"{side}/{kind}"][...]) for kind in ("dual", "itm"))
            lists[f"{side}/fused"] = fuse(fusion[0], dual, itm, fusion[1]).to(lists[f"{side}/fused"].dtype)
    images, captions, skipped = _join_images([paths[s] for s in shards], keys,
                                             manifest["preprocessing"]["source_size"], policy,
                                             source_pixel_limit(manifest))
    if len(captions) != len(text_image):
        raise CacheJoinError(f"block {name}: shards give {len(captions)} captions, the cache holds {len(text_image)}")
    return Block(
        name=name, keys=keys, images=images, text_image=text_image, first=torch.cumsum(count, 0) - count,
        count=count, text_tokens=torch.from_numpy(rows["text_tokens"]),
        view_params=torch.from_numpy(rows["view_params"]),
        image_emb={t: torch.from_numpy(rows[f"emb/{t}/image"]) for t in duals},
        text_emb={t: torch.from_numpy(rows[f"emb/{t}/text"]) for t in duals},
        lists=lists, integrated_image=torch.from_numpy(group["integrated/image"][...]),
        integrated_text=torch.from_numpy(group["integrated/text"][...]), captions=captions, skipped=skipped,
    )


def source_pixel_limit(manifest: dict) -> int | None:
    """The pixel limit stage 1 read the source shards with (``CacheConfig.max_image_pixels``; None: none), so
    stage 2 decodes the same images: the manifest records it only when it is not the default."""
    return manifest["preprocessing"].get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)


def _join_images(shards: list[str], keys: np.ndarray, size: int, policy: str,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[EncodedImages, list[str], dict]:
    """Stream the block's source shards (images over ``max_image_pixels`` are bad samples, as in stage 1) and
    place each image's bytes and captions at its cache row (by key; a key read again keeps its first sample, as
    stage 1 kept it). Returns (images, the captions in cache text order, skipped samples by reason)."""
    stats = ReadStats()
    row_of = {str(k): i for i, k in enumerate(keys)}
    data: list[bytes | None] = [None] * len(keys)
    extensions, by_row = [""] * len(keys), [[] for _ in range(len(keys))]
    skipped: dict[str, int] = {}
    for sample in encoded_samples(shards, policy, stats, max_image_pixels=max_image_pixels):
        row = row_of.get(sample.key, -1)
        reason = "not_in_cache" if row < 0 else "duplicate_key" if data[row] is not None else None
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        extensions[row], data[row] = sample.image
        by_row[row] = sample.captions
    missing = [str(k) for k, d in zip(keys, data, strict=True) if d is None]
    if missing:
        raise CacheJoinError(f"{len(missing)} cached samples are missing from shards {shards}, e.g. {missing[:5]}")
    images = EncodedImages(data, extensions, size, max_image_pixels)  # type: ignore[arg-type]
    return images, [c for row in by_row for c in row], {**stats.by_reason, **skipped}


def encoded_samples(shards: list[str], policy: str, stats: ReadStats,
                    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Iterator:
    """``iter_samples`` with each ``Sample.image`` left as ``(extension, bytes)``: the same stages, error policy
    and pixel limit (checked from the header), only no image is decoded."""
    return iter_samples(shards, policy, stats, max_image_pixels=max_image_pixels, decode_images=False)


@dataclass(frozen=True)
class TargetSpec:
    """How the batch targets are built: which teachers, with what weights, and whether fused lists apply."""

    teachers: tuple[str, ...]
    weights: tuple[float, ...]  # fixed weights of the ensemble target (the cache's dual weights)
    scales: tuple[float, ...]  # each teacher's logit scale
    fused: bool  # overwrite candidate entries with the cache's fused logits


def target_spec(manifest: dict, fused: bool) -> TargetSpec:
    duals = tuple(manifest["dual_teachers"])
    return TargetSpec(duals, tuple(manifest["search"]["dual_weights"]),
                      tuple(manifest["teachers"][t]["logit_scale"] for t in duals), fused)


def batch_targets(block: Block, images: torch.Tensor, texts: torch.Tensor, views: torch.Tensor, spec: TargetSpec,
                  positions: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Target logits per teacher and for the weighted ensemble ("ensemble"): (i2t, t2i), each (B, B).

    Teacher logits are rebuilt from the cached embeddings of exactly the views and
    captions in the batch; with ``spec.fused`` the candidate entries take the fused logits.
    ``positions``: build only the i2t rows of those batch images and the t2i rows of those batch texts, each
    (len(positions), B), what one data-parallel rank holds (None: every row).
    """
    if positions is not None:
        return _target_rows(block, images, texts, views, spec, positions)
    out = {}
    ensemble = None
    for teacher, weight, scale in zip(spec.teachers, spec.weights, spec.scales, strict=True):
        image = block.image_emb[teacher][images, views].float()
        text = block.text_emb[teacher][texts].float()
        logits = scale * image @ text.t()
        ensemble = weight * logits if ensemble is None else ensemble + weight * logits
        out[teacher] = _overwrite_or_plain(block, logits, images, texts, spec.fused)
    out["ensemble"] = _overwrite_or_plain(block, ensemble, images, texts, spec.fused)
    return out


def _target_rows(block: Block, images: torch.Tensor, texts: torch.Tensor, views: torch.Tensor, spec: TargetSpec,
                 positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``batch_targets`` for the rows of ``positions`` only: (b, B) matmuls instead of one (B, B)."""
    out = {}
    ensemble = None
    for teacher, weight, scale in zip(spec.teachers, spec.weights, spec.scales, strict=True):
        image = block.image_emb[teacher][images, views].float()
        text = block.text_emb[teacher][texts].float()
        rows = (scale * image[positions] @ text.t(), scale * text[positions] @ image.t())
        ensemble = tuple(weight * r for r in rows) if ensemble is None else tuple(
            e + weight * r for e, r in zip(ensemble, rows, strict=True))
        out[teacher] = _overwrite_rows_or_plain(block, rows, positions, images, texts, spec.fused)
    out["ensemble"] = _overwrite_rows_or_plain(block, ensemble, positions, images, texts, spec.fused)
    return out


def _overwrite_rows_or_plain(block: Block, rows: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor,
                             images: torch.Tensor, texts: torch.Tensor, fused: bool):
    if not fused:
        return rows
    return rebuild_target_rows(*rows, positions, images, texts, block.text_image, block.lists["i2t/ids"],
                               block.lists["i2t/fused"], block.lists["t2i/ids"], block.lists["t2i/fused"])


def _overwrite_or_plain(block: Block, logits: torch.Tensor, images: torch.Tensor, texts: torch.Tensor, fused: bool):
    if not fused:
        return logits, logits.t()
    return rebuild_target_logits(logits, images, texts, block.text_image, block.lists["i2t/ids"],
                                 block.lists["i2t/fused"], block.lists["t2i/ids"], block.lists["t2i/fused"])


def choose_texts(block: Block, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One caption row per batch image: the caption an earlier anchor's list named, else a random one.

    Neighbour batching pulls in the *images* of an anchor's candidate captions; an
    image has several captions, so picking one at random would drop most cached
    candidates from the batch. Where batch image ``j`` is the image of a cached
    candidate of another batch anchor, ``j`` takes that very caption (best slot first, then lowest anchor).

    O(B k log B): each candidate's image is looked up among the sorted batch rows and the winner per image is
    one ``scatter_reduce`` (min over candidate order), where comparing every slot with every batch image built
    a (B, k, B) tensor (``bench/choose_texts.py`` keeps that formulation; the results are identical).
    """
    texts = block.first[rows] + (torch.rand(len(rows), generator=gen) * block.count[rows]).long()
    n, k = len(rows), block.lists["i2t/ids"].shape[1]
    if n == 0 or k == 0:
        return texts
    named = block.lists["i2t/ids"][rows].t().reshape(-1)  # (k*B,) slot-major: candidate c = slot * B + anchor
    owners = block.text_image[named]  # their images
    sorted_rows, order = torch.sort(rows, stable=True)
    first = torch.searchsorted(sorted_rows, owners)
    count = torch.searchsorted(sorted_rows, owners, right=True) - first  # batch positions holding that image
    candidate = torch.repeat_interleave(count)  # one entry per (candidate, batch position) match
    within = torch.arange(len(candidate)) - (torch.cumsum(count, 0) - count)[candidate]
    position = order[first[candidate] + within]
    own = position == candidate % n  # an anchor does not pick its own caption
    best = torch.full((n,), k * n, dtype=torch.long)
    best.scatter_reduce_(0, position[~own], candidate[~own], reduce="amin")
    return torch.where(best < k * n, named[best.clamp(max=k * n - 1)], texts)


def trim_padding(input_ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Drop the trailing columns that are padding in every row: the text tower masks padding, so the
    embeddings are unchanged and the step does less work (captions here use <= 19 of 24 positions)."""
    used = int((input_ids != pad_id).sum(1).max()) if len(input_ids) else 0
    return input_ids[:, : max(1, used)]


@dataclass(frozen=True)
class Position:
    """Where the data stream is: epoch and batches already taken within it (saved in checkpoints)."""

    epoch: int = 0
    batch: int = 0


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


T = TypeVar("T")
R = TypeVar("R")


class ReadAhead(Generic[T, R]):
    """Reads one item at a time, in a background thread (``ahead``) or else in the caller's: ``start(item)``
    begins the read of ``item`` unless one is under way or not yet taken (so at most one read is ahead of the
    caller), ``take()`` waits for it and returns ``(item, result)`` (a read's error is raised here). A context
    manager: leaving it waits for a read under way and stops the thread, however the caller ends."""

    def __init__(self, read: Callable[[T], R], ahead: bool = True) -> None:
        self.read = read
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mcad-read-ahead") if ahead else None
        self.pending: tuple[T, Future | None] | None = None

    def start(self, item: T) -> None:
        if self.pending is None:
            self.pending = (item, self.pool.submit(self.read, item) if self.pool is not None else None)

    def take(self) -> tuple[T, R]:
        item, future = self.pending
        self.pending = None
        return item, self.read(item) if future is None else future.result()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        if self.pending is not None and self.pending[1] is not None:
            self.pending[1].cancel()
        if self.pool is not None:
            self.pool.shutdown(wait=True)


@dataclass(frozen=True)
class Visit:
    """One pass over a block: its epoch, index, and the batches of that epoch taken before it (``taken``) and of
    the block itself already taken (``skip``: a resume point inside the block)."""

    epoch: int
    index: int
    taken: int
    skip: int


class CacheBatches:
    """The batch stream of stage 2 over a cache store: ``iter_from(position)`` yields (position_after, batch)."""

    def __init__(self, store: str | Path | CacheStore, batch_size: int, image_size: int, seed: int, fused: bool,
                 policy: str = "warn", expected_manifest: dict | None = None, batching: str = "neighbor",
                 shards_dir: str | Path | None = None, fusion: tuple[str, float] | None = None,
                 paths: dict[str, str] | None = None, rank: int = 0, world: int = 1, sources: bool = True,
                 neighbors: int | None = None, prefetch: bool = True) -> None:
        """``store``: a path, or a store already opened (and validated) by the caller, e.g. ``train.check_inputs``;
        ``expected_manifest`` is checked when this opens it. ``rank``/``world``: under torchrun, every rank plans the
        same global batches but renders views, tokens and target rows only for its positions ``rank::world`` (see
        ``make_batch``). ``sources``: batches carry the global batch's source images and caption strings (what the
        online baseline's teachers read); the cached run leaves them out, a (B, 3, S, S) copy per batch it never
        reads. ``prefetch``: read and plan the next block in a background thread (``ReadAhead``); the batches are
        the same either way."""
        if batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {BATCHINGS}, got {batching!r}")
        self.batching = batching
        self.neighbors = neighbors  # neighbour batching: candidates per anchor pulled in (None: all k)
        if fusion is not None and fusion[0] not in FUSION_RULES:
            raise ValueError(f"unknown fusion rule {fusion[0]!r}; known: {sorted(FUSION_RULES)}")
        self.fusion = fusion
        if isinstance(store, CacheStore):
            if expected_manifest is not None:
                raise ValueError("expected_manifest is checked when CacheBatches opens the store; open it with "
                                 "CacheStore.open(path, expected=...) instead")
            self.store = store
        else:
            self.store = CacheStore.open(store, expected=expected_manifest)
        self.manifest = self.store.manifest
        # Every source shard found and checked against its fingerprint now, before the first step
        # (``paths``: a caller that already did so, e.g. ``train.check_inputs``).
        self.paths = paths if paths is not None else locate_shards(self.manifest, self.store.path, shards_dir)
        incomplete = [block_name(i) for i in range(len(self.manifest["search"]["blocks"]))
                      if not all(self.store.pass_done(block_name(i), p) for p in BLOCK_PASSES)]
        if incomplete:
            raise CacheJoinError(f"{len(incomplete)} block(s) of {self.store.path} are not complete, e.g. "
                                 f"{incomplete[:3]}: finish `mcad cache` first")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.rank, self.world = rank, world
        self.sources = sources
        self.batch_size = batch_size
        self.image_size = image_size
        self.seed = seed
        self.policy = policy
        self.prefetch = prefetch
        self.spec = target_spec(self.manifest, fused)
        self.n_blocks = len(self.manifest["search"]["blocks"])
        self.views = self.manifest["preprocessing"]["views"]
        self._cache: tuple[int, Block] | None = None
        self._sizes: list[int] | None = None
        self.in_batch_hits: list[float] = []
        self.skipped: dict[str, int] = {}

    def read(self, index: int) -> Block:
        """Block ``index`` read from the store and its shards (no caching; safe to call from another thread)."""
        return read_block(self.store, index, self.policy, self.paths, self.fusion)

    def block(self, index: int) -> Block:
        if self._cache is None or self._cache[0] != index:
            self._take(index, self.read(index))
        return self._cache[1]

    def _take(self, index: int, block: Block) -> None:
        """Make ``block`` the current one (in the consumer's thread): its skipped samples are counted here, once
        per read."""
        if self._cache is not None and self._cache[1] is block:
            return
        for reason, n in block.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        self._cache = (index, block)

    def block_sizes(self) -> list[int]:
        """Images per block, from the shard done markers (no array reads; read once)."""
        if self._sizes is None:
            self._sizes = [sum(self.store.shard_status(s).get("samples", 0) for s in shards)
                           for shards in self.manifest["search"]["blocks"]]
        return list(self._sizes)

    def batches_per_epoch(self) -> int:
        return sum(-(-n // self.batch_size) for n in self.block_sizes())

    def visits(self, position: Position) -> Iterator[Visit]:
        """The blocks the stream passes through from ``position`` on, in order (endless: epoch after epoch);
        blocks wholly taken before ``position`` are left out. A pure function of (seed, position)."""
        epoch, skip = position.epoch, position.batch
        sizes = self.block_sizes()
        while True:
            order = torch.randperm(self.n_blocks, generator=_generator(self.seed, epoch)).tolist()
            taken = 0
            for index in order:
                n_batches = -(-sizes[index] // self.batch_size)
                if taken + n_batches > skip:  # else the whole block was consumed before the resume point
                    yield Visit(epoch, index, taken, max(0, skip - taken))
                taken += n_batches
            epoch, skip = epoch + 1, 0

    def plan(self, block: Block, epoch: int, index: int) -> list[torch.Tensor]:
        """The batches (block image rows) of ``block`` in ``epoch``: a pure function of (seed, epoch, index)."""
        gen = _generator(self.seed, epoch, index)
        if self.batching == "neighbor":
            return neighbor_batches(block.lists["i2t/ids"], block.text_image, self.batch_size, gen, self.neighbors)
        return list(torch.randperm(len(block), generator=gen).split(self.batch_size))

    def _reader(self) -> Callable[[Visit], tuple[Block, list[torch.Tensor]]]:
        """A visit's block and plan; a block visited twice in a row (one block a store, or the last of an epoch
        first again) is read once. The reads run one at a time, so the closure needs no lock."""
        last: dict[int, Block] = {}

        def read(visit: Visit) -> tuple[Block, list[torch.Tensor]]:
            block = last[visit.index] if visit.index in last else self.read(visit.index)
            last.clear()
            last[visit.index] = block
            return block, self.plan(block, visit.epoch, visit.index)

        return read

    def iter_from(self, position: Position) -> Iterator[tuple[Position, dict]]:
        """Batches from ``position`` on, endless. With ``prefetch`` the next block is read and planned in a
        background thread from the moment this block's first batch is built (so the read runs beside the
        trainer's step, not beside that batch). Close the iterator when done (``train.distill`` does): that
        stops the thread."""
        visits = self.visits(position)
        with ReadAhead(self._reader(), self.prefetch) as reads:
            reads.start(next(visits))
            while True:
                visit, (block, plan) = reads.take()
                self._take(visit.index, block)
                following = next(visits)
                taken = visit.taken + visit.skip
                for rows in plan[visit.skip:]:
                    taken += 1
                    batch = self.make_batch(block, rows, _generator(self.seed, visit.epoch, visit.index, taken))
                    reads.start(following)  # once per block: a no-op after its first batch
                    yield Position(visit.epoch, taken), batch
                reads.start(following)

    def make_batch(self, block: Block, rows: torch.Tensor, gen: torch.Generator) -> dict:
        """The batch of block ``rows``. The plan (rows, captions, views) is the global batch's on every rank;
        "pixels", "input_ids" and the "targets" rows are this rank's positions "local" only (every position in
        one process); the rest (integrated features, boxes, with ``sources`` the source images and caption
        strings) is the global batch's. Only the images this batch needs are decoded."""
        texts = choose_texts(block, rows, gen)
        views = torch.randint(0, self.views, (len(rows),), generator=gen)
        boxes = block.view_params[rows, views]
        # A batch of one image is skipped by the loop (no in-batch negative), so it need not split over ranks.
        mine = local_rows(len(rows), self.rank, self.world) if self.world > 1 and len(rows) > 1 else None
        local = torch.arange(len(rows)) if mine is None else mine
        sources = block.images[rows] if self.sources else None
        pixels = render_views(sources[local] if sources is not None else block.images[rows[local]], boxes[local],
                              self.image_size)
        targets = batch_targets(block, rows, texts, views, self.spec, mine)
        hits = candidates_in_batch(rows, texts, block.lists["i2t/ids"], block.lists["t2i/ids"])
        self.in_batch_hits.append(hits)
        return {
            "local": local,
            "pixels": pixels,
            "input_ids": trim_padding(block.text_tokens[texts[local]].long()),
            "targets": targets,
            "integrated_image": block.integrated_image[rows].float(),
            "integrated_text": block.integrated_text[texts].float(),
            "block": block.name,
            "rows": rows,
            "texts": texts,
            "source_images": sources,
            "boxes": boxes,
            "captions": [block.captions[t] for t in texts.tolist()] if self.sources else None,
            "views": views,
            "candidates_in_batch": hits,
        }
