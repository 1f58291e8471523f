"""Finding a store's source shards and tokenizer again, wherever they (and the store) now live.

The manifest identifies the data by content: each shard by name and fingerprint
(size + hash of its whole content, remembered per user by path and stat so that an
unchanged shard is not read again; stores made earlier hold a hash of the first and
last MiB, still checked that way), the tokenizer by the SHA-256 of its
``tokenizer.json``. Paths are only hints, kept two ways: absolute, and relative
to the store, so a store moved together with its data still finds it. Stage 2
(and anything else that reads a store's sources) asks here, gets each shard's
current path, and every shard is checked against its fingerprint before the
first training step: a missing or rewritten shard is a named error, never a
silent join against other images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from mcad_cache.store import current_fingerprints, file_sha256


class SourceShardsError(FileNotFoundError):
    """The shards a store was made from are missing or changed since (names the shards and what to do)."""


class TokenizerMismatchError(ValueError):
    """The tokenizer found for a store is not the one its caption tokens were made with."""


def path_hints(path: str | Path, store: str | Path) -> dict[str, str]:
    """Where ``path`` is, absolute and relative to the store directory (the manifest's hints)."""
    absolute = os.path.abspath(path)
    return {"path": absolute, "store_relative": os.path.relpath(absolute, os.path.abspath(store))}


def _candidates(entry: dict, store: str | Path, override_dir: str | Path | None, file_name: str) -> list[Path]:
    if override_dir is not None:
        return [Path(override_dir) / file_name]
    found = [Path(entry["path"])]
    if entry.get("store_relative"):
        found.append(Path(os.path.normpath(os.path.join(os.path.abspath(store), entry["store_relative"]))))
    return found


def locate_shards(manifest: dict, store: str | Path, shards_dir: str | Path | None = None,
                  names: Sequence[str] | None = None) -> dict[str, str]:
    """Current path of every source shard (or of ``names``), each checked against its fingerprint.

    ``shards_dir`` overrides the manifest's hints: the shards are looked up there
    by file name. Raises ``SourceShardsError`` naming every missing and changed shard.
    """
    wanted = set(names) if names is not None else None
    missing, changed, paths, found_entries = [], [], {}, []
    for entry in manifest["shards"]:
        name = entry["name"]
        if wanted is not None and name not in wanted:
            continue
        file_name = Path(entry["path"]).name
        found = next((p for p in _candidates(entry, store, shards_dir, file_name) if p.is_file()), None)
        if found is None:
            missing.append(name)
        else:
            found_entries.append((entry, str(found)))
    now = current_fingerprints([found for _, found in found_entries], [e["fingerprint"] for e, _ in found_entries])
    for (entry, found), fingerprint in zip(found_entries, now, strict=True):
        if fingerprint != entry["fingerprint"]:
            changed.append(f"{entry['name']} ({found})")
        else:
            paths[entry["name"]] = found
    if missing or changed:
        where = f"in {shards_dir}" if shards_dir is not None else "at the paths the store records"
        lines = []
        if missing:
            lines.append(f"{len(missing)} source shard(s) not found {where}: {_some(missing)}")
        if changed:
            lines.append(f"{len(changed)} source shard(s) changed content since the store was made: {_some(changed)}")
        hint = ("Pass the directory that now holds the store's shards (--shards DIR), or rebuild the store "
                "with `mcad cache` if the data changed.")
        raise SourceShardsError("\n  ".join([f"the store {store} cannot use its source shards:", *lines]) + "\n" + hint)
    return paths


def locate_tokenizer(manifest: dict, store: str | Path, override: str | Path | None = None) -> str:
    """The tokenizer the store's caption tokens were made with: a local directory checked by hash, or a hub id."""
    entry = manifest["tokenizer"]
    if not entry.get("local", os.path.isdir(entry["path"])):
        return str(override) if override is not None else entry["path"]  # a hub id: transformers resolves it
    candidates = [Path(override)] if override is not None else _candidates(entry, store, None, "")
    found = next((p for p in candidates if (p / "tokenizer.json").is_file() or p.is_dir()), None)
    if found is None:
        raise SourceShardsError(f"the store {store} was made with the tokenizer at {entry['path']}, which is not "
                                "there any more: pass its new directory (--tokenizer DIR)")
    expected = entry.get("sha256")
    tokenizer_file = found / "tokenizer.json"
    if expected and (not tokenizer_file.is_file() or file_sha256(tokenizer_file) != expected):
        raise TokenizerMismatchError(f"the tokenizer at {found} is not the one the store {store} was made with "
                                     "(tokenizer.json differs): the cached caption tokens would mean other words")
    return str(found)


def _some(items: list[str], shown: int = 5) -> str:
    return ", ".join(items[:shown]) + (f", ... ({len(items) - shown} more)" if len(items) > shown else "")
