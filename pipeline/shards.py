"""Reading webdataset shards (img2dataset layout) with a named error policy.

The pipeline is webdataset's own: shard list -> split by node -> split by
worker -> tar -> decode -> ``Sample``. Every stage shares one error handler, so
a bad sample or shard is either skipped and counted (``"warn"``) or stops the
read with a ``ShardReadError`` naming the shard and key (``"raise"``).

Stats are per process: with DataLoader workers each worker counts its own.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm
from webdataset.autodecode import IMAGE_EXTENSIONS as _DECODED_AS_IMAGE
from webdataset.tariterators import base_plus_ext

logger = logging.getLogger(__name__)

ErrorPolicy = Literal["warn", "raise"]
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_TAR_BLOCK = 512
_END_MARKER = 2 * _TAR_BLOCK  # a tar archive ends with two zero blocks


class NoShardsError(FileNotFoundError):
    """A shard spec matched no readable shard file."""


class ShardReadError(RuntimeError):
    """A bad sample or shard, named by shard url, key and reason."""

    def __init__(self, shard: str, key: str | None, reason: str, detail: str = "") -> None:
        self.shard, self.key, self.reason = shard, key, reason
        where = f"key {key}" if key is not None else "no key read yet"
        super().__init__(f"{reason} in shard {shard} ({where})" + (f": {detail}" if detail else ""))


@dataclass
class ReadStats:
    """What a read saw: good samples, and every skipped sample or shard by reason."""

    samples_ok: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    records: list[tuple[str, str | None, str]] = field(default_factory=list)

    def record(self, err: ShardReadError) -> None:
        self.by_reason[err.reason] += 1
        self.records.append((err.shard, err.key, err.reason))

    @property
    def skipped(self) -> int:
        return sum(self.by_reason.values())


@dataclass
class Sample:
    key: str
    image: Image.Image  # RGB
    captions: list[str]
    shard: str  # the url it came from
    meta: dict[str, Any]  # the sample's json, or {}


@dataclass
class SplitData:
    keys: list[str]
    images: torch.Tensor  # uint8, N x 3 x H x W
    captions: list[list[str]]
    shard_of: list[str]

    def __len__(self) -> int:
        return len(self.keys)


# --------------------------------------------------------------- shard lists


def list_shards(path: str | Path) -> list[str]:
    """Shard paths from a directory (its ``*.tar``), one tar, or a brace pattern."""
    spec = str(path)
    if "{" in spec:
        return _expand_pattern(spec)
    p = Path(spec)
    if p.is_dir():
        shards = sorted(str(s) for s in p.glob("*.tar"))
        if not shards:
            raise NoShardsError(f"no *.tar shards in directory {p}")
        return shards
    if p.is_file():
        return [spec]
    raise NoShardsError(f"no shard file or directory at {spec}")


def _expand_pattern(spec: str) -> list[str]:
    shards = list(braceexpand.braceexpand(spec))
    missing = [s for s in shards if not Path(s).is_file()]
    if len(missing) == len(shards):
        raise NoShardsError(f"no shard of {spec} exists")
    if missing:
        # A pattern names its shards; reading only some of them would silently shrink the data.
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise NoShardsError(f"{len(missing)} of {len(shards)} shards of {spec} are missing: {shown}")
    return shards


# ------------------------------------------------------------------- reading


class _ReadContext:
    """Error handling shared by all stages of one pipeline.

    webdataset hands tar-level exceptions to the handler without a reliable
    shard/key (the url only sometimes rides in ``exn.args``), so this tracks the
    shard being opened and the member being read itself.
    """

    def __init__(self, policy: ErrorPolicy, stats: ReadStats) -> None:
        if policy not in ("warn", "raise"):
            raise ValueError(f"error policy must be 'warn' or 'raise', got {policy!r}")
        self.policy, self.stats = policy, stats
        self.shard = ""
        self.key: str | None = None
        self.suspect = False  # the shard lacks a tar end marker
        self.failed: set[str] = set()  # shards already reported as broken

    def follow_shards(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Pipeline stage: notes each shard as the tar stage opens it."""
        self.failed.clear()  # a new epoch reports its broken shards again
        for source in src:
            self._finish_shard()
            self.shard, self.key = source["url"], None
            self.suspect = _lacks_end_marker(self.shard)
            yield source
        self._finish_shard()

    def _finish_shard(self) -> None:
        # tarfile ends quietly when a shard is cut at a header; the missing end
        # marker is then the only sign that samples were lost.
        if self.suspect and self.shard not in self.failed:
            detail = "no tar end marker: whatever followed this key is lost"
            self.report(ShardReadError(self.shard, self.key, "truncated_tar", detail))

    def note_member(self, fname: str) -> str:
        """``rename_files`` hook of the tar stage: remembers which key is being read."""
        self.key = base_plus_ext(fname)[0]  # the same split webdataset uses for __key__
        return fname

    def handle(self, exn: Exception) -> bool:
        """webdataset handler: True skips the bad item, raising stops the read."""
        if isinstance(exn, ShardReadError):
            return self.report(exn)
        if isinstance(exn, wds.DecodingError):
            reason = "corrupt_image" if str(exn.k).lower() in _DECODED_AS_IMAGE else "corrupt_field"
            return self.report(ShardReadError(str(exn.url), exn.key, reason, f".{exn.k}: {exn.__cause__!r}"))
        if self.shard in self.failed:
            return True  # tarfile keeps failing on a shard it already failed on
        reason = "truncated_tar" if _is_truncation(exn) else "unreadable_shard"
        return self.report(ShardReadError(self.shard, self.key, reason, repr(exn)))

    def report(self, err: ShardReadError) -> bool:
        self.stats.record(err)
        if err.reason in ("truncated_tar", "unreadable_shard"):
            self.failed.add(err.shard)
        if self.policy == "raise":
            raise err
        logger.warning("skipping: %s", err)
        return True

    def to_sample(self, sample: dict[str, Any]) -> Sample | None:
        """Map stage: decoded webdataset dict -> Sample, or a ShardReadError."""
        shard, key = sample["__url__"], sample["__key__"]
        image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
        captions = _captions(sample)
        if image is None or not captions:
            if shard in self.failed:
                return None  # the half-read last sample of a truncated shard, already reported
            if self.suspect and (shard, key) == (self.shard, self.key):
                raise ShardReadError(shard, key, "truncated_tar", "the shard's last sample is cut off")
            raise ShardReadError(shard, key, "missing_image" if image is None else "missing_caption")
        self.stats.samples_ok += 1
        meta = sample.get("json")
        return Sample(key=key, image=image, captions=captions, shard=shard, meta=meta if isinstance(meta, dict) else {})


def _captions(sample: dict[str, Any]) -> list[str]:
    meta = sample.get("json")
    listed = meta.get("captions") if isinstance(meta, dict) else None
    if isinstance(listed, list):
        captions = [c.strip() for c in listed if isinstance(c, str) and c.strip()]
        if captions:
            return captions
    text = sample.get("txt")
    return [text.strip()] if isinstance(text, str) and text.strip() else []


def _is_truncation(exn: BaseException) -> bool:
    # tarfile says "unexpected end of data" / "truncated header"; gzip raises EOFError.
    if isinstance(exn, EOFError):
        return True
    return isinstance(exn, tarfile.ReadError) and ("unexpected end" in str(exn) or "truncated" in str(exn))


def _lacks_end_marker(url: str) -> bool:
    """True for a local uncompressed tar that can't be complete.

    Only checkable for local ``.tar`` files; other urls rely on tarfile's errors.
    """
    if not url.endswith(".tar") or not os.path.isfile(url):
        return False
    size = os.path.getsize(url)
    if size % _TAR_BLOCK or size < _END_MARKER:
        return True
    with open(url, "rb") as f:
        f.seek(size - _END_MARKER)
        return f.read(_END_MARKER).count(0) != _END_MARKER


def build_pipeline(
    shards: Sequence[str],
    policy: ErrorPolicy = "raise",
    stats: ReadStats | None = None,
    split_by_node: bool = False,
    split_by_worker: bool = False,
) -> wds.DataPipeline:
    """The webdataset pipeline yielding ``Sample``s from ``shards``."""
    if not shards:
        raise NoShardsError("empty shard list")
    ctx = _ReadContext(policy, stats if stats is not None else ReadStats())
    # DataPipeline drops None stages, which makes the splitters optional.
    return wds.DataPipeline(
        wds.SimpleShardList(list(shards)),
        wds.split_by_node if split_by_node else None,
        wds.split_by_worker if split_by_worker else None,
        ctx.follow_shards,
        wds.tarfile_to_samples(handler=ctx.handle, rename_files=ctx.note_member),
        wds.decode("pil", handler=ctx.handle),
        wds.map(ctx.to_sample, handler=ctx.handle),
    )


def iter_samples(
    shards: Sequence[str],
    policy: ErrorPolicy = "raise",
    stats: ReadStats | None = None,
    split_by_node: bool = False,
    split_by_worker: bool = False,
) -> Iterator[Sample]:
    """Iterate the good samples of ``shards``, handling bad ones by ``policy``."""
    return iter(build_pipeline(shards, policy, stats, split_by_node, split_by_worker))


# -------------------------------------------------------------- whole splits


def load_split(
    shards: Sequence[str],
    image_size: int | None = None,
    policy: ErrorPolicy = "raise",
    stats: ReadStats | None = None,
) -> SplitData:
    """Read a small split into memory, images resized to ``image_size`` if given."""
    keys: list[str] = []
    pixels: list[np.ndarray] = []
    captions: list[list[str]] = []
    shard_of: list[str] = []
    samples = iter_samples(shards, policy=policy, stats=stats)
    for sample in tqdm(samples, desc=f"load {len(shards)} shards", unit="img"):
        image = sample.image
        if image_size is not None and image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        keys.append(sample.key)
        pixels.append(np.asarray(image, dtype=np.uint8))
        captions.append(sample.captions)
        shard_of.append(sample.shard)
    return SplitData(keys=keys, images=_stack_chw(pixels, image_size), captions=captions, shard_of=shard_of)


def _stack_chw(pixels: list[np.ndarray], image_size: int | None) -> torch.Tensor:
    if not pixels:
        side = image_size or 0
        return torch.empty((0, 3, side, side), dtype=torch.uint8)
    sizes = {p.shape for p in pixels}
    if len(sizes) > 1:
        raise ValueError(f"images have different sizes {sorted(sizes)[:3]}...; pass image_size to resize them")
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
