"""Which Zarr codec for the cache's shard arrays: bytes per sample and read throughput, side by side.

Copies the shard groups of an existing store (default: the one `make cache` writes)
into scratch stores, one per codec, then reads every array of every shard back
(as stage 2 does, a whole shard group at a time) and times it. Results go to
bench/results/cache_codecs.{json,md}.

    .venv/bin/python bench/cache_codecs.py [--store artifacts/cache/default.zarr] [--repeats 3]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from mcad_core.atomic import atomic_write_bytes, atomic_write_json

CODECS = {
    "none": lambda: None,
    "zstd-1": lambda: ZstdCodec(level=1),
    "zstd-3": lambda: ZstdCodec(level=3),
    "zstd-9": lambda: ZstdCodec(level=9),
    "blosc-lz4-shuffle": lambda: BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "blosc-zstd-shuffle": lambda: BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
}


def _numeric_arrays(group: zarr.Group) -> dict[str, np.ndarray]:
    return {path: member[...] for path, member in group.members(max_depth=None)
            if isinstance(member, zarr.Array) and member.dtype.kind in "fiu"}


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@click.command()
@click.option("--store", type=click.Path(path_type=Path, exists=True), default=Path("artifacts/cache/default.zarr"))
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results"))
def main(store: Path, repeats: int, out: Path) -> None:
    root = zarr.open_group(str(store), mode="r")
    shards = {name: _numeric_arrays(group) for name, group in root["shards"].groups()}
    samples = sum(root[f"shards/{name}/keys"].shape[0] for name in shards)
    views = root.attrs["manifest"]["preprocessing"]["views"]
    raw = sum(a.nbytes for arrays in shards.values() for a in arrays.values())
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, make in CODECS.items():
            path = Path(scratch) / f"{name}.zarr"
            target = zarr.open_group(str(path), mode="w")
            start = time.perf_counter()
            for shard, arrays in shards.items():
                group = target.require_group(shard)
                for array_path, value in arrays.items():
                    compressors = make()
                    group.create_array(array_path, shape=value.shape, dtype=value.dtype,
                                       chunks=tuple(max(1, s) for s in value.shape),
                                       compressors=compressors if compressors is not None else None)[...] = value
            write_s = time.perf_counter() - start
            stored = _dir_bytes(path)
            best = float("inf")
            for _ in range(repeats):
                reader = zarr.open_group(str(path), mode="r")
                start = time.perf_counter()
                for shard, arrays in shards.items():
                    for array_path in arrays:
                        reader[f"{shard}/{array_path}"][...]
                best = min(best, time.perf_counter() - start)
            rows.append({"codec": name, "stored_bytes": stored, "bytes_per_sample_per_view": stored / samples / views,
                         "ratio": raw / stored, "write_s": write_s, "read_samples_per_s": samples / best})
            shutil.rmtree(path)
    result = {"store": str(store), "samples": samples, "views": views, "raw_bytes": raw, "repeats": repeats,
              "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "cache_codecs.json", result)
    lines = [f"Shard arrays of `{store}` ({samples} samples, {views} view(s), raw {raw / 2**20:.1f} MiB), "
             f"best of {repeats} full reads.", "",
             "| codec | bytes/sample/view | compression | write s | read samples/s |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['codec']} | {r['bytes_per_sample_per_view']:.0f} | {r['ratio']:.2f}x | "
                     f"{r['write_s']:.2f} | {r['read_samples_per_s']:,.0f} |")
    atomic_write_bytes(out / "cache_codecs.md", ("\n".join(lines) + "\n").encode())
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
