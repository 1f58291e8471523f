"""Reading webdataset shards (img2dataset layout) with a named error policy.

The pipeline is webdataset's own: shard list -> split by node -> split by
worker -> tar -> decode -> ``Sample``. Every stage shares one error handler, so
a bad sample or shard is either skipped and counted (``"warn"``) or stops the
read with a ``ShardReadError`` naming the shard and key (``"raise"``).

Shards are untrusted input, so two of webdataset's conveniences are left out, and
what a shard holds is checked before it is used:

- decoding: only the fields the tool uses (``USED_FIELDS``: the image, ``txt``
  and ``json``) are kept, each with its own handler. webdataset's default
  handlers would unpickle ``.pyd``/``.pkl``, ``torch.load`` a ``.pth`` and
  gunzip-then-decode ``.gz`` members: running code chosen by whoever wrote the tar.
- opening: a shard that exists as a local file is opened with ``open``.
  webdataset's ``gopen`` reads a ``scheme:`` prefix as a url, so a file *named*
  ``pipe:cmd;...tar`` would run ``cmd`` in a shell. Only a spec naming no local
  file (a ``pipe:`` or url spec the caller chose) goes to ``gopen``.
- keys: a key with a path separator, ``.``/``..`` or an absolute path is a bad
  sample (``unsafe_key``): keys become file names downstream.
- members: a sample holding one member name twice is a bad sample
  (``duplicate_member``: which one is the sample's is unknown); the shard goes on.
- images: one whose header gives more than ``max_image_pixels`` is a bad sample
  (``image_too_large``) and is never decoded.

Stats are per process: with DataLoader workers each worker counts its own.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence
from urllib.parse import urlparse

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from mcad_core.errors import InputError

logger = logging.getLogger(__name__)

ErrorPolicy = Literal["warn", "raise"]
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
USED_FIELDS = frozenset((*IMAGE_EXTENSIONS, "txt", "json"))  # every other tar member is dropped, never decoded
SHARD_REASONS = frozenset(("truncated_tar", "unreadable_shard"))  # a whole shard's problem, not one sample's
# Images larger than this are refused from their header, never decoded (``--max-image-pixels``): 50 M pixels
# is over 7000 x 7000, far above web image-text data, and its RGB decode alone is 150 MB.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
_TAR_BLOCK = 512
_END_MARKER = 2 * _TAR_BLOCK  # a tar archive ends with two zero blocks


class NoShardsError(FileNotFoundError):
    """A shard spec matched no readable shard file."""


class ShardReadError(InputError, RuntimeError):
    """A bad sample or shard, named by shard url, key and reason (``mcad`` exits 3 with the message)."""

    def __init__(self, shard: str, key: str | None, reason: str, detail: str = "") -> None:
        self.shard, self.key, self.reason = shard, key, reason
        self.reported = False  # recorded in a ReadStats already (webdataset hands a raised error on again)
        where = f"key {key}" if key is not None else "no key read yet"
        self.message = f"{reason} in shard {shard} ({where})" + (f": {detail}" if detail else "")
        super().__init__(self.message)

    def __str__(self) -> str:
        # webdataset appends (stream, url) to the args of errors passing through it; the message stays one line.
        return self.message


class NotATarError(ShardReadError):
    """A local shard that is not a tar archive at all (empty, or no tar header where one must be)."""

    def __init__(self, shard: str, problem: str, context: str = "") -> None:
        super().__init__(shard, None, "unreadable_shard", problem)
        self.message = (f"shard {shard} is not a tar archive ({problem}){context}: mcad reads webdataset tar "
                        "shards; replace the file or leave it out of --shards")


class ImageTooLargeError(ValueError):
    """An image whose header gives more pixels than the reader's limit; it is never decoded."""


class DuplicateKeyError(ShardReadError):
    """Two samples share a key. Stage 2 addresses samples by key, so the second one is refused in stage 1."""

    def __init__(self, key: str, first: str, second: str) -> None:
        self.first, self.second = first, second
        super().__init__(second, key, "duplicate_key", f"first read from shard {first}")


@dataclass
class Truncation:
    """A shard whose data ends early.

    What followed the cut is gone with no index of it, so the number of samples
    lost is unknown; what is known is how many were read and whether the sample
    being read was cut in half.
    """

    shard: str
    samples_read: int = 0  # good samples read from the shard before the cut
    key: str | None = None  # the key being read when the data ended
    cut_sample: bool = False  # that key's sample was cut off: one known lost sample

    def describe(self) -> str:
        if self.key is None:
            where = "before any key was read"
        else:
            where = f"sample {self.key} cut off" if self.cut_sample else f"last key {self.key}"
        return (f"shard {self.shard} truncated after {self.samples_read} samples ({where}): "
                "the rest of the shard is lost (count unknown)")

    def to_dict(self) -> dict[str, Any]:
        return {"samples_read": self.samples_read, "key": self.key, "cut_sample": self.cut_sample,
                "message": self.describe()}


@dataclass
class ReadStats:
    """What a read saw: good samples, every skip event by reason, and the truncated shards."""

    samples_ok: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    records: list[tuple[str, str | None, str]] = field(default_factory=list)
    truncated: list[Truncation] = field(default_factory=list)

    def record(self, err: ShardReadError) -> None:
        self.by_reason[err.reason] += 1
        self.records.append((err.shard, err.key, err.reason))

    @property
    def skipped(self) -> int:
        """Skip events: bad samples plus one per truncated or unreadable shard."""
        return sum(self.by_reason.values())

    @property
    def samples_skipped(self) -> int:
        """Samples known to be lost: bad ones, and a sample a truncation cut in half.

        A truncated shard's unknown rest and an unreadable shard are not counted
        here: calling them "1 skipped sample" would understate the loss (see ``truncated``).
        """
        bad = sum(n for reason, n in self.by_reason.items() if reason not in SHARD_REASONS)
        return bad + sum(t.cut_sample for t in self.truncated)


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
    """Local shard files from a directory (its ``*.tar``), one tar, or a brace pattern of local files.

    Each comes back spelled so that it can only be read as a local file (see
    ``local_path``): a directory's file names are whatever its writer chose.
    """
    spec = str(path)
    if "{" in spec:
        return [local_path(s) for s in _expand_pattern(spec)]
    p = Path(spec)
    if p.is_dir():
        shards = sorted(str(s) for s in p.glob("*.tar"))
        if not shards:
            raise NoShardsError(f"no *.tar shards in directory {p}")
        return [local_path(s) for s in shards]
    if p.is_file():
        return [local_path(spec)]
    raise NoShardsError(f"no shard file or directory at {spec}")


def local_path(path: str | Path) -> str:
    """``path`` spelled so that no url reader takes it for a url.

    webdataset's ``gopen`` (like ``urlparse``) reads a leading ``scheme:`` as a
    url: a file ``pipe:cmd;x.tar`` listed from ``.`` would run ``cmd``, and
    ``file:x.tar`` would open ``x.tar``. Such a path (and ``-``, stdin) is made
    absolute, so it starts with ``/``; every other path keeps its spelling, so
    shard lists that were stored before compare equal.
    """
    text = str(path)
    return os.path.abspath(text) if urlparse(text).scheme or text == "-" else text


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
        self.shard_ok = 0  # good samples of the current shard
        self.settled: str | None = None  # the current shard's last key yielded or skipped as a bad sample
        self.truncation: Truncation | None = None  # the current shard's, once reported
        self.dropped: set[tuple[str, str]] = set()  # (shard, key) of samples skipped while being grouped

    def follow_shards(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Pipeline stage: notes each shard as the tar stage opens it."""
        self.failed.clear()  # a new epoch reports its broken shards again
        for source in src:
            self._finish_shard()
            self.shard, self.key = source["url"], None
            self.shard_ok, self.settled, self.truncation = 0, None, None
            self.dropped.clear()
            self.suspect = _lacks_end_marker(self.shard)
            yield source
        self._finish_shard()

    def _finish_shard(self) -> None:
        # tarfile ends quietly when a shard is cut at a header; the missing end
        # marker is then the only sign that samples were lost.
        if self.suspect and self.shard not in self.failed:
            detail = "no tar end marker: whatever followed this key is lost"
            self.report(ShardReadError(self.shard, self.key, "truncated_tar", detail))
        self._update_truncation()  # the last complete sample may have come through after the report

    def _update_truncation(self) -> None:
        if self.truncation is not None:
            t = self.truncation
            t.samples_read = self.shard_ok
            t.cut_sample = t.key is not None and t.key != self.settled

    def tar_samples(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Pipeline stage: webdataset's tar reading, with the unused members dropped before any decoding.

        ``group_by_keys(suffixes=...)`` keeps a sample whose members are all
        unused (so it is reported as missing its image) but never stores those members.
        """
        files = tar_file_expander(self.open_shards(src), handler=self.handle, rename_files=self.note_member)
        return group_by_keys(files, suffixes=USED_FIELDS, handler=self.handle)

    def open_shards(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Pipeline stage: each shard as a byte stream; a local file is always opened as a file."""
        for source in src:
            url = source["url"]
            try:
                stream = open(url, "rb") if os.path.isfile(url) else gopen(url)
            except Exception as exn:  # noqa: BLE001 - the shared handler names it or re-raises it
                self.handle(exn)
                continue
            yield {**source, "stream": stream}

    def note_member(self, fname: str) -> str:
        """``rename_files`` hook of the tar stage: remembers which key is being read."""
        self.key = base_plus_ext(fname)[0]  # the same split webdataset uses for __key__
        return fname

    def handle(self, exn: Exception) -> bool:
        """webdataset handler: True skips the bad item, raising stops the read."""
        if isinstance(exn, ShardReadError):
            if exn.reported:  # raised by ``report`` in a stage below, handed on by the stage above: once is enough
                raise exn
            return self.report(exn)
        if isinstance(exn, wds.DecodingError):
            if isinstance(exn.__cause__, ImageTooLargeError):
                return self.report(ShardReadError(str(exn.url), exn.key, "image_too_large", f".{exn.k}: {exn.__cause__}"))
            reason = "corrupt_image" if str(exn.k).lower() in IMAGE_EXTENSIONS else "corrupt_field"
            return self.report(ShardReadError(str(exn.url), exn.key, reason, f".{exn.k}: {exn.__cause__!r}"))
        member = _duplicate_member(exn)
        if member is not None:
            # Two members of one name in one sample (group_by_keys): which one is the sample's is unknown, so the
            # sample is skipped (to_sample drops it), once however many repeats it has; the shard goes on.
            key = base_plus_ext(member)[0] or member
            if (self.shard, key) in self.dropped:
                return True
            self.dropped.add((self.shard, key))
            return self.report(ShardReadError(self.shard, key, "duplicate_member",
                                              f"{member} appears more than once in the sample"))
        if self.shard in self.failed:
            return True  # tarfile keeps failing on a shard it already failed on
        reason = "truncated_tar" if _is_truncation(exn) else "unreadable_shard"
        return self.report(ShardReadError(self.shard, self.key, reason, _describe(exn)))

    def report(self, err: ShardReadError) -> bool:
        err.reported = True
        self.stats.record(err)
        if err.reason in SHARD_REASONS:
            self.failed.add(err.shard)
        elif err.key is not None:
            self.settled = err.key
        if err.reason == "truncated_tar" and self.truncation is None:
            self.truncation = Truncation(err.shard, key=err.key)
            self.stats.truncated.append(self.truncation)
            self._update_truncation()
        if self.policy == "raise":
            raise err
        logger.warning("skipping: %s", err)
        return True

    def to_sample(self, sample: dict[str, Any]) -> Sample | None:
        """Map stage: decoded webdataset dict -> Sample, or a ShardReadError."""
        shard, key = sample["__url__"], sample["__key__"]
        if (shard, key) in self.dropped:
            return None  # reported when its repeated member was met
        if not safe_key(key):
            raise ShardReadError(shard, key, "unsafe_key", "a key with '/', '\\' or '..', or an absolute path, "
                                 "would become a file path downstream")
        image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
        captions = _captions(sample)
        if image is None or not captions:
            if shard in self.failed:
                return None  # the half-read last sample of a truncated shard, already reported
            if self.suspect and (shard, key) == (self.shard, self.key):
                raise ShardReadError(shard, key, "truncated_tar", "the shard's last sample is cut off")
            raise ShardReadError(shard, key, "missing_image" if image is None else "missing_caption")
        self.stats.samples_ok += 1
        self.shard_ok += 1
        self.settled = key
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


def safe_key(key: str) -> bool:
    """Whether a sample key can become a file name as it is: no path separator, not '.' or '..', no NUL."""
    return bool(key) and not any(c in key for c in "/\\\0") and key not in (".", "..")


def _duplicate_member(exn: BaseException) -> str | None:
    """The member name of webdataset's "duplicate file name" error (group_by_keys), else None."""
    if not isinstance(exn, ValueError) or not exn.args:
        return None
    first = str(exn.args[0])
    marker = ": duplicate file name in tar file"
    return first.split(marker, 1)[0] if marker in first else None


def _describe(exn: BaseException) -> str:
    """``ReadError: unexpected end of data``: the error without the stream webdataset appends to it."""
    first = str(exn.args[0]) if exn.args else str(exn)
    return f"{type(exn).__name__}: {first.split(' @ <', 1)[0]}"


def tar_problem(path: str) -> str | None:
    """Why the local file ``path`` cannot be read as a tar archive at all, else None.

    Reads the first header only: a tar that is truncated or bad further on is None (its good samples
    are read, the rest is reported by the read's error policy).
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with tarfile.open(path) as tar:
            tar.next()
    except tarfile.ReadError as err:
        return "empty file" if "empty file" in str(err) else "no tar header at its start"
    except (tarfile.TarError, EOFError) as err:
        return f"{type(err).__name__}: {err}"
    except OSError as err:
        return f"cannot be read: {err.strerror or err}"
    return None


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


def field_decoders(max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                   decode_images: bool = True) -> list[Callable[[str, bytes], Any]]:
    """One handler per used field: images to RGB PIL (at most ``max_image_pixels``; with ``decode_images`` False
    only checked and kept as ``(extension, bytes)``), ``txt`` to str, ``json`` parsed.

    Passed with ``pre=[]``/``post=[]``: webdataset's default pre (gunzip, then
    decode again) and post handlers (pickle, torch.load, numpy, msgpack, ...)
    are never installed.
    """
    return [
        ImageDecoder(max_image_pixels, keep_encoded=not decode_images),
        wds.handle_extension("txt", _utf8),
        wds.handle_extension("json", json.loads),
    ]


class ImageDecoder:
    """webdataset handler: an image member to an RGB PIL image, refused from its header if it has too many pixels.

    PIL reads the size from the header on ``open`` and decodes on ``load``, so an image over
    ``max_pixels`` is never decoded (``ImageTooLargeError``, reported as ``image_too_large``).
    PIL's own decompression-bomb warning is silenced: this limit is the one that applies (PIL
    still refuses images over twice its ``Image.MAX_IMAGE_PIXELS`` itself, also reported as too large).
    A class, not a closure, so the pipeline stays picklable for DataLoader workers.
    """

    def __init__(self, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, keep_encoded: bool = False) -> None:
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_image_pixels must be >= 1 (or None: no limit), got {max_pixels}")
        self.max_pixels = max_pixels
        # Checked from the header as above, then kept undecoded as ``(extension, bytes)`` (stage 2 decodes a
        # block's images only when a batch takes their rows).
        self.keep_encoded = keep_encoded

    def __call__(self, key: str, data: bytes) -> Image.Image | tuple[str, bytes] | None:
        extension = key.rsplit(".", 1)[-1].lower()
        if extension not in IMAGE_EXTENSIONS:
            return None
        with io.BytesIO(data) as stream:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                try:
                    image = Image.open(stream)
                except Image.DecompressionBombError as err:
                    raise ImageTooLargeError(str(err)) from None
            width, height = image.size
            if self.max_pixels is not None and width * height > self.max_pixels:
                raise ImageTooLargeError(f"{width}x{height} is {width * height:,} pixels, over the limit of "
                                         f"{self.max_pixels:,} (--max-image-pixels); it was not decoded")
            if self.keep_encoded:
                return extension, data
            image.load()
            return image.convert("RGB")


def _utf8(data: bytes) -> str:
    return data.decode("utf-8")  # a module function, not a lambda: the pipeline stays picklable for workers


def build_pipeline(
    shards: Sequence[str],
    policy: ErrorPolicy = "raise",
    stats: ReadStats | None = None,
    split_by_node: bool = False,
    split_by_worker: bool = False,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    decode_images: bool = True,
) -> wds.DataPipeline:
    """The webdataset pipeline yielding ``Sample``s from ``shards``; larger images than ``max_image_pixels`` are bad
    samples. With ``decode_images`` False each ``Sample.image`` is its member's ``(extension, bytes)``, checked
    from the header only (the same limit and error policy)."""
    if not shards:
        raise NoShardsError("empty shard list")
    ctx = _ReadContext(policy, stats if stats is not None else ReadStats())
    # DataPipeline drops None stages, which makes the splitters optional.
    return wds.DataPipeline(
        wds.SimpleShardList(list(shards)),
        wds.split_by_node if split_by_node else None,
        wds.split_by_worker if split_by_worker else None,
        ctx.follow_shards,
        ctx.tar_samples,
        wds.decode(*field_decoders(max_image_pixels, decode_images), pre=[], post=[], only=USED_FIELDS,
                   handler=ctx.handle),
        wds.map(ctx.to_sample, handler=ctx.handle),
    )


def iter_samples(
    shards: Sequence[str],
    policy: ErrorPolicy = "raise",
    stats: ReadStats | None = None,
    split_by_node: bool = False,
    split_by_worker: bool = False,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    decode_images: bool = True,
) -> Iterator[Sample]:
    """Iterate the good samples of ``shards``, handling bad ones by ``policy`` (see ``build_pipeline``)."""
    return iter(build_pipeline(shards, policy, stats, split_by_node, split_by_worker, max_image_pixels,
                               decode_images))


# -------------------------------------------------------------- whole splits


def load_split(
    shards: Sequence[str],
    image_size: int | None = None,
    policy: ErrorPolicy = "raise",
    stats: ReadStats | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> SplitData:
    """Read a small split into memory, images resized to ``image_size`` if given (see ``build_pipeline``)."""
    keys: list[str] = []
    pixels: list[np.ndarray] = []
    captions: list[list[str]] = []
    shard_of: list[str] = []
    samples = iter_samples(shards, policy=policy, stats=stats, max_image_pixels=max_image_pixels)
    for sample in tqdm(samples, desc=f"load {len(shards)} shards", unit="img"):
        image = sample.image
        if image_size is not None and image.size != (image_size, image_size):
            image = square(image, image_size)
        keys.append(sample.key)
        pixels.append(np.asarray(image, dtype=np.uint8))
        captions.append(sample.captions)
        shard_of.append(sample.shard)
    return SplitData(keys=keys, images=_stack_chw(pixels, image_size), captions=captions, shard_of=shard_of)


def square(image: Image.Image, size: int) -> Image.Image:
    """Shortest side resized to ``size``, then the centre ``size`` x ``size`` crop: no distortion of shapes."""
    width, height = image.size
    scale = size / min(width, height)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    return image.resize(resized, Image.Resampling.BICUBIC, box=None).crop((left, top, left + size, top + size))


def _stack_chw(pixels: list[np.ndarray], image_size: int | None) -> torch.Tensor:
    if not pixels:
        side = image_size or 0
        return torch.empty((0, 3, side, side), dtype=torch.uint8)
    sizes = {p.shape for p in pixels}
    if len(sizes) > 1:
        raise ValueError(f"images have different sizes {sorted(sizes)[:3]}...; pass image_size to resize them")
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
