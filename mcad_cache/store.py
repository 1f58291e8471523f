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
    blocks/<block>.attrs  {"passes": {"search": {...}, "rescore": {...}, ...}}
    root attrs            {"integration": {...}} written by the single block job

A done marker is written after the group's arrays, so a killed writer leaves an
unmarked group that the re-run overwrites.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import zarr

from mcad_cache.schema import SCHEMA_VERSION, SchemaError

FINGERPRINT_BYTES = 1 << 20


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
    """Size plus BLAKE2b of the first and last MiB: cheap on terabyte sets, changes when a shard is rewritten."""
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
    return [{"name": n, "path": str(s), "fingerprint": shard_fingerprint(s)}
            for n, s in zip(names, shards, strict=True)]


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
}


# Where the data lives is a hint (see mcad_cache/sources.py), not its identity: moved shards or a moved
# tokenizer, or a run from another directory, give the same store.
_PATH_HINTS = ("path", "store_relative")


def _identity(key: str, value):
    if key == "shards" and isinstance(value, list):
        return [{k: v for k, v in s.items() if k not in _PATH_HINTS} for s in value]
    if key == "tokenizer" and isinstance(value, dict) and value.get("sha256"):  # a local tokenizer: its hash
        return {k: v for k, v in value.items() if k not in (*_PATH_HINTS, "local")}
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


def _brief(value, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------ the store


@dataclass
class CacheStore:
    path: Path
    root: zarr.Group

    @property
    def manifest(self) -> dict:
        return dict(self.root.attrs["manifest"])

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
        version = store.manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CacheMismatchError(path, [f"schema version: store has {version}, this code reads {SCHEMA_VERSION}"])
        if expected is not None:
            differences = manifest_differences(store.manifest, expected)
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
            root = zarr.open_group(str(tmp), mode="w")
            root.attrs["manifest"] = manifest
            for name in ("shards", "blocks"):
                root.require_group(name)
            _fsync_tree(tmp)
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
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
