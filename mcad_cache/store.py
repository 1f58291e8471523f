"""The cache store on disk: creation, the manifest, validation, done markers, and block arrays.

The manifest (root attrs ``"manifest"``) holds everything that decides what the
stored numbers mean: schema version, teacher identities (with weight hashes),
tokenizer, preprocessing and views, k, block layout, fusion rule and the source
shards with a fingerprint each. It is written once, when the store is created,
and never changes afterwards; it carries no timings, so every task that
creates the same store writes the same bytes.

What changes as work proceeds lives next to the data it describes, in groups
that exactly one writer owns:

    shards/<shard>.attrs  {"done": true, "samples", "skipped", "errors", "seconds", ...}
    blocks/<block>.attrs  {"passes": {"search": {...}, "rescore": {...}, ...}} written by the block's task
    root attrs            {"integration": {...}} written by the one task that integrates
    weighing/.attrs       {"dual_weights", ...} of a "ranked" store: the first task to choose them
                          publishes the group whole by a rename; a task that loses reads the winner's

``CacheStore.manifest`` reads a "ranked" store's manifest with the chosen weights in place of the word, so every
reader sees numbers once they are chosen; the manifest on disk (``stored_manifest``) never changes.

A done marker is written after the group's arrays, so a killed writer leaves an
unmarked group that the re-run overwrites.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import zarr

from mcad_cache.schema import SCHEMA_VERSION, SchemaError
from mcad_core.atomic import atomic_write_json, fsync_dir
from mcad_core.errors import NoSpaceError, is_no_space
from mcad_core.lock import WriterLock

log = logging.getLogger(__name__)

FINGERPRINT_BYTES = 1 << 20  # the legacy fingerprint's head and tail
FINGERPRINT_PREFIX = "b2:"  # "b2:<size>:<BLAKE2b-128 of the whole content>"
LEGACY_FINGERPRINT = re.compile(r"^\d+:[0-9a-f]{32}$")  # "<size>:<BLAKE2b-128 of the first and last MiB>"
FINGERPRINT_CACHE_FORMAT = 1
FINGERPRINT_CACHE_ENTRIES = 100_000  # the oldest entries go first beyond this
_READ_BUFFER = 8 << 20
# A file modified within this long before it was hashed may change again with the same stat (timestamps are
# coarse); such an entry is hashed again next time, as git treats "racily clean" index entries.
RACY_NS = 2_000_000_000
_HASH_THREADS = 4  # hashlib releases the GIL on large buffers: shards hash in parallel
_cache_write = threading.Lock()  # one writer of the cache file per process (its scratch name holds the pid)


class CacheMismatchError(ValueError):
    """A store was made for other teachers, shards, k, preprocessing or schema than this run's config."""

    def __init__(self, store: str | Path, differences: list[str]) -> None:
        self.differences = differences
        lines = "\n  ".join(differences)
        super().__init__(f"cache store {store} does not match this run's config:\n  {lines}\n"
                         "Point the run at a new store path, or rebuild this one.")


class CacheIncompleteError(RuntimeError):
    """A pass needs work that an earlier pass has not finished (e.g. search before every shard is embedded)."""


# ------------------------------------------------------------------ identity of inputs


def shard_name(path: str) -> str:
    """Group name of a source shard: its file name without ``.tar``."""
    name = os.path.basename(path)
    return name[: -len(".tar")] if name.endswith(".tar") else name


def shard_fingerprint(path: str) -> str:
    """``b2:<size>:<BLAKE2b of the whole content>``: any changed byte changes it (see ``shard_fingerprints``)."""
    return shard_fingerprints([path])[0]


def shard_fingerprints(paths: Sequence[str]) -> list[str]:
    """The whole-content fingerprint of every file in ``paths``, reading only files changed since last time.

    Hashing reads every byte (about 1 GB/s per thread), so each result is remembered in a per-user
    cache file (``fingerprint_cache_path``) under the file's absolute path and its stat (size,
    mtime, inode, ctime); an unchanged file is not read again. A file that changes while it is
    read is not remembered, and one modified just before it was read is read again next time
    (``RACY_NS``). A missing, corrupt or unwritable cache file only costs a recompute.
    """
    cache_file = fingerprint_cache_path()
    cached = _read_fingerprint_cache(cache_file)
    keys = [os.path.abspath(p) for p in paths]
    stats = [_stat_key(os.stat(p)) for p in paths]
    results: list[str | None] = [None] * len(paths)
    todo = []
    for i, (key, stat) in enumerate(zip(keys, stats, strict=True)):
        entry = cached.get(key)
        if _cache_hit(entry, stat):
            results[i] = entry["fingerprint"]
        else:
            todo.append(i)
    if todo:
        learned = {}
        with ThreadPoolExecutor(min(len(todo), _HASH_THREADS)) as pool:
            for i, (fingerprint, after, started) in zip(todo, pool.map(lambda i: _content_fingerprint(paths[i]), todo)):
                results[i] = fingerprint
                if after == stats[i]:
                    learned[keys[i]] = {"stat": stats[i], "fingerprint": fingerprint, "checked_ns": started}
        if learned:
            _remember_fingerprints(cache_file, learned)
    return results  # type: ignore[return-value]


def fingerprint_cache_path() -> Path:
    """``$XDG_CACHE_HOME/mcad/shard-fingerprints.json`` (``~/.cache/mcad/...`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mcad" / "shard-fingerprints.json"


def is_legacy_fingerprint(fingerprint) -> bool:
    """Whether ``fingerprint`` is the first-and-last-MiB format that stores made before ``b2:`` hold."""
    return isinstance(fingerprint, str) and LEGACY_FINGERPRINT.match(fingerprint) is not None


def current_fingerprints(paths: Sequence[str], recorded: Sequence[str]) -> list[str]:
    """Each file's fingerprint now, in the format of the one ``recorded`` for it (so old stores still verify)."""
    out = [legacy_shard_fingerprint(p) if is_legacy_fingerprint(r) else None
           for p, r in zip(paths, recorded, strict=True)]
    todo = [i for i, value in enumerate(out) if value is None]
    for i, value in zip(todo, shard_fingerprints([paths[i] for i in todo])):
        out[i] = value
    return out  # type: ignore[return-value]


def _cache_hit(entry, stat: list[int]) -> bool:
    """Whether a cache entry holds the fingerprint of a file with this stat, hashed well after its last change."""
    if not isinstance(entry, dict) or entry.get("stat") != stat:
        return False
    fingerprint, checked = entry.get("fingerprint"), entry.get("checked_ns")
    return (isinstance(fingerprint, str) and fingerprint.startswith(FINGERPRINT_PREFIX)
            and isinstance(checked, int) and stat[1] + RACY_NS <= checked)


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _content_fingerprint(path: str) -> tuple[str, list[int], int]:
    """(fingerprint of the whole content, the file's stat key after reading it, time.time_ns() before)."""
    started = time.time_ns()
    digest = hashlib.blake2b(digest_size=16)
    buffer = bytearray(_READ_BUFFER)
    view = memoryview(buffer)
    size = 0
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
            size += n
        after = _stat_key(os.fstat(handle.fileno()))
    return f"{FINGERPRINT_PREFIX}{size}:{digest.hexdigest()}", after, started


def _read_fingerprint_cache(cache_file: Path) -> dict:
    try:
        with open(cache_file, "rb") as handle:
            record = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("ignoring the shard fingerprint cache %s (%s); fingerprints are recomputed", cache_file, err)
        return {}
    if not isinstance(record, dict) or record.get("format") != FINGERPRINT_CACHE_FORMAT:
        return {}
    entries = record.get("entries")
    return entries if isinstance(entries, dict) else {}


def _remember_fingerprints(cache_file: Path, learned: dict) -> None:
    """Add ``learned`` to the cache file (re-read first: another process may have added to it)."""
    with _cache_write:
        entries = {k: v for k, v in _read_fingerprint_cache(cache_file).items() if k not in learned}
        entries.update(learned)
        if len(entries) > FINGERPRINT_CACHE_ENTRIES:
            entries = dict(list(entries.items())[-FINGERPRINT_CACHE_ENTRIES:])
        try:
            atomic_write_json(cache_file, {"format": FINGERPRINT_CACHE_FORMAT, "entries": entries})
        except OSError as err:
            log.warning("could not update the shard fingerprint cache %s (%s); the next run hashes these "
                        "shards again", cache_file, err)


def legacy_shard_fingerprint(path: str) -> str:
    """The fingerprint of stores made before ``b2:``: size plus BLAKE2b of the first and last MiB only."""
    size = os.path.getsize(path)
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            digest.update(f.read())
    return f"{size}:{digest.hexdigest()}"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_list(shards: Sequence[str]) -> list[dict]:
    names = [shard_name(s) for s in shards]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"shards with the same file name cannot share a store: {duplicates}")
    fingerprints = shard_fingerprints([str(s) for s in shards])
    return [{"name": n, "path": str(s), "fingerprint": f}
            for n, s, f in zip(names, shards, fingerprints, strict=True)]


def plan_blocks(names: Sequence[str], block_shards: int) -> list[list[str]]:
    """Consecutive groups of ``block_shards`` shards in source order: the candidate pools."""
    if block_shards < 1:
        raise ValueError(f"block_shards must be >= 1, got {block_shards}")
    return [list(names[i : i + block_shards]) for i in range(0, len(names), block_shards)]


def block_name(index: int) -> str:
    return f"b{index:05d}"


# ------------------------------------------------------------------ manifest checks

# Manifest fields a run must agree on, with the words a mismatch message uses.
CHECKED_FIELDS = {
    "schema_version": "schema version",
    "teachers": "teachers",
    "dual_teachers": "dual-stream teachers",
    "single_teacher": "single-stream teacher",
    "tokenizer": "tokenizer",
    "preprocessing": "preprocessing / views",
    "search": "candidate search (k, blocks, weights)",
    "fusion": "fusion rule",
    "shards": "source shards",
    "precision": "teacher precision (--precision)",
}


# Where the data lives is a hint (see mcad_cache/sources.py), not its identity: moved shards or a moved
# tokenizer, or a run from another directory, give the same store.
_PATH_HINTS = ("path", "store_relative")


def _identity(key: str, value):
    if key == "shards" and isinstance(value, list):
        return [{k: v for k, v in s.items() if k not in _PATH_HINTS} for s in value]
    if key == "tokenizer" and isinstance(value, dict) and value.get("sha256"):  # a local tokenizer: its hash
        return {k: v for k, v in value.items() if k not in (*_PATH_HINTS, "local")}
    if key == "precision":  # recorded only when not the default (mcad_cache/embed.py build_manifest)
        return value or "fp32"
    return value


def manifest_differences(stored: dict, expected: dict) -> list[str]:
    """Human-readable differences between a stored manifest and the one this run would write."""
    out = []
    for key, words in CHECKED_FIELDS.items():
        a, b = _identity(key, stored.get(key)), _identity(key, expected.get(key))
        if a == b:
            continue
        if key == "shards" and isinstance(a, list) and isinstance(b, list):
            out.extend(_shard_differences(a, b))
        elif key == "teachers" and isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    out.append(f"teacher {name!r}: store has {_brief(a.get(name))}, config gives {_brief(b.get(name))}")
        else:
            out.append(f"{words}: store has {_brief(a)}, config gives {_brief(b)}")
    return out


def _shard_differences(a: list[dict], b: list[dict]) -> list[str]:
    sa, sb = {s["name"]: s for s in a}, {s["name"]: s for s in b}
    out = []
    if only := sorted(set(sa) - set(sb)):
        out.append(f"source shards: store has {len(only)} shard(s) the config lacks, e.g. {only[:3]}")
    if only := sorted(set(sb) - set(sa)):
        out.append(f"source shards: config has {len(only)} shard(s) the store lacks, e.g. {only[:3]}")
    changed = sorted(n for n in set(sa) & set(sb) if sa[n]["fingerprint"] != sb[n]["fingerprint"])
    if changed:
        out.append(f"source shards: {len(changed)} shard(s) changed content since the store was made, "
                   f"e.g. {changed[:3]}")
    if not out:
        out.append("source shards: same shards in a different order (blocks would differ)")
    return out


def in_stored_formats(stored: dict, expected: dict) -> dict:
    """``expected`` with each shard fingerprint in the format ``stored`` recorded it in.

    A store made before whole-content fingerprints records the first-and-last-MiB kind; its
    shards are fingerprinted that way again (from this run's paths), so the store still opens.
    """
    recorded = {s.get("name"): s.get("fingerprint") for s in stored.get("shards") or [] if isinstance(s, dict)}
    shards = expected.get("shards")
    if not isinstance(shards, list):
        return expected
    legacy = [i for i, s in enumerate(shards) if is_legacy_fingerprint(recorded.get(s.get("name")))]
    if not legacy:
        return expected
    shards = list(shards)
    for i in legacy:
        shards[i] = {**shards[i], "fingerprint": legacy_shard_fingerprint(shards[i]["path"])}
    return {**expected, "shards": shards}


def _brief(value, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------ the store


@dataclass
class CacheStore:
    path: Path
    root: zarr.Group

    @property
    def stored_manifest(self) -> dict:
        """The manifest as it was written at creation (what a re-run is checked against)."""
        return dict(self.root.attrs["manifest"])

    @property
    def manifest(self) -> dict:
        """The manifest, with a "ranked" store's chosen dual weights in ``search.dual_weights`` once chosen."""
        manifest = self.stored_manifest
        chosen = self.chosen_dual_weights()
        if chosen is not None:
            manifest["search"] = {**manifest["search"], "dual_weights": chosen["dual_weights"],
                                  "dual_weighting": "ranked"}
        return manifest

    def chosen_dual_weights(self) -> dict | None:
        """The ``weighing`` group's record of a "ranked" store (None before the weights are chosen, or for a
        store whose manifest gives the weights)."""
        if self.stored_manifest.get("search", {}).get("dual_weights") != "ranked":
            return None
        group = self.root.get("weighing")
        return dict(group.attrs) if group is not None and "dual_weights" in group.attrs else None

    def publish_dual_weights(self, record: dict) -> dict:
        """Write the ``weighing`` group with ``record`` unless another task did first; the record that stands.

        The group is made whole under a temporary name and renamed into place: a rename onto an existing
        group fails, so exactly one task's record is kept and every task returns that one.
        """
        final = self.path / "weighing"
        if not final.exists():
            tmp = self.path / f".weighing.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                zarr.open_group(str(tmp), mode="w").attrs.update(record)
                _fsync_tree(tmp)
                os.rename(tmp, final)
            except OSError:
                if not final.exists():
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            fsync_dir(self.path)
        self.root = zarr.open_group(str(self.path), mode="r+")  # see the new member
        chosen = self.chosen_dual_weights()
        if chosen is None:
            raise SchemaError(f"{final} holds no dual weights")
        return chosen

    @classmethod
    def open(cls, path: str | Path, expected: dict | None = None) -> CacheStore:
        """Open an existing store; with ``expected``, refuse it unless its manifest matches."""
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise FileNotFoundError(f"no cache store at {path} (run `mcad cache` first)")
        root = zarr.open_group(str(path), mode="r+")
        if "manifest" not in root.attrs:
            raise SchemaError(f"{path} is a Zarr group but not an MCAD cache store (no manifest)")
        store = cls(path, root)
        version = store.stored_manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CacheMismatchError(path, [f"schema version: store has {version}, this code reads {SCHEMA_VERSION}"])
        if expected is not None:
            stored = store.stored_manifest
            differences = manifest_differences(stored, in_stored_formats(stored, expected))
            if differences:
                raise CacheMismatchError(path, differences)
        return store

    @classmethod
    def create_or_open(cls, path: str | Path, manifest: dict) -> CacheStore:
        """Create the store with ``manifest``, or open and validate it if it exists.

        Creation builds the store under a temporary name and renames it into
        place, so concurrent tasks either win the rename or find a complete
        store to validate; nobody reads a half-written manifest.
        """
        path = Path(path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                root = zarr.open_group(str(tmp), mode="w")
                root.attrs["manifest"] = manifest
                for name in ("shards", "blocks"):
                    root.require_group(name)
                _fsync_tree(tmp)
            except BaseException as err:  # nothing half-made stays (a full disk stays full otherwise)
                shutil.rmtree(tmp, ignore_errors=True)
                if is_no_space(err):
                    raise NoSpaceError(path) from err
                raise
            try:
                os.rename(tmp, path)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not path.exists():
                    raise
        return cls.open(path, expected=manifest)

    # -------------------------------------------------------------- shards

    def shard_status(self, name: str) -> dict:
        group = self.root["shards"].get(name)
        return dict(group.attrs) if group is not None else {}

    def shard_done(self, name: str) -> bool:
        return bool(self.shard_status(name).get("done"))

    def shard_group(self, name: str) -> zarr.Group:
        return self.root[f"shards/{name}"]

    def mark_shard(self, name: str, status: dict) -> None:
        """Written last: the arrays are complete when ``done`` is true."""
        self.root[f"shards/{name}"].attrs.update({**status, "done": True})

    # -------------------------------------------------------------- blocks

    def block_group(self, name: str) -> zarr.Group:
        return self.root.require_group(f"blocks/{name}")

    def pass_done(self, block: str, pass_name: str) -> bool:
        group = self.root["blocks"].get(block)
        return group is not None and pass_name in group.attrs.get("passes", {})

    def mark_pass(self, block: str, pass_name: str, info: dict) -> None:
        group = self.block_group(block)
        passes = dict(group.attrs.get("passes", {}))
        passes[pass_name] = info
        group.attrs["passes"] = passes

    def clear_passes(self, block: str, pass_names: Sequence[str]) -> None:
        """Forget later passes when an earlier one is redone: their inputs changed."""
        group = self.root["blocks"].get(block)
        if group is None:
            return
        passes = {k: v for k, v in group.attrs.get("passes", {}).items() if k not in pass_names}
        group.attrs["passes"] = passes

    def bytes_on_disk(self) -> int:
        """Bytes of the store's files; one that another task's write renames away while it is counted is left out."""
        total = 0
        for file in self.path.rglob("*"):
            with contextlib.suppress(FileNotFoundError):
                total += file.stat().st_size if file.is_file() else 0
        return total


@contextmanager
def writer_locks(path: str | Path, rank: int, world_size: int, passes: Sequence[str]) -> Iterator[None]:
    """Hold the store's writer locks for one `mcad cache` task; another run doing the same work is refused.

    The embed pass (or a run of no pass, which only makes the store) locks per task,
    ``.<store>.lock-r<rank>of<world>`` next to the store, so the ranked tasks of one job still work
    side by side while a second copy of any task is refused; the block passes lock
    ``.<store>.lock-blocks`` in a single task, ``.<store>.lock-blocks-r<rank>of<world>`` in each task
    of several (each owns its share of the blocks). Locks are taken before the store is opened or
    made: a refused run (``mcad_core.lock.WriterBusyError``) has touched nothing. The integrate
    pass, run by one task of the block job, takes ``.<store>.lock-integrate`` when it starts.
    """
    block_passes = [p for p in passes if p != "embed"]
    with contextlib.ExitStack() as stack:
        if "embed" in passes or not block_passes:
            stack.enter_context(WriterLock(path, f"-r{rank}of{world_size}",
                                           what=f"cache store {path} (embed task {rank} of {world_size})"))
        if block_passes and world_size == 1:
            stack.enter_context(WriterLock(path, "-blocks", what=f"cache store {path} (block passes)"))
        elif block_passes:
            stack.enter_context(WriterLock(path, f"-blocks-r{rank}of{world_size}",
                                           what=f"cache store {path} (block passes, task {rank} of {world_size})"))
        yield


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
