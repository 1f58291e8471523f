"""The cache store schema (Zarr v3): every array's name, dtype, shape and chunking, and the version.

Writer and reader both go through this module, so a store is never read with
assumptions the writer did not make. Layout (schema version 1):

    STORE.zarr/                        attrs["manifest"]: see ``Manifest``
      shards/<shard>/                  one group per input shard: its writer owns it whole
        keys            (n,)           str      sample keys, in shard order
        text_image      (t,)           int32    local image row of every caption
        text_tokens     (t, L)         int32    captions tokenized with the store's tokenizer
        view_params     (n, V, P)      float32  augmentation parameters of every view
        emb/<teacher>/image (n, V, D)  float16  normalized image embedding per view (dual-stream teachers)
        emb/<single>/image (n, S, D)   float16  the single-stream teacher's ITC image embedding: view 0 only
                                                (S = 1) unless CacheConfig.single_itc_views = "all" (S = V)
        emb/<teacher>/text  (t, D)     float16  normalized text embedding

      blocks/<block>/                  one group per candidate-search block (rows = its shards' rows, in order)
        i2t/ids  (n, k)  int32     top-k candidate text rows per image, best first (search)
        i2t/dual (n, k)  float32   their dual-stream logits                        (search)
        i2t/itm  (n, k)  float32   their single-stream ITM logits                  (rescore)
        i2t/fused (n, k) float32   the fused target logits                         (fuse)
        t2i/...  (t, k)            the same per text, candidates are image rows
        pos/itm  (t,)    float32   ITM logit of every caption with its own image   (rescore)
        pos/feature (t, H) float16 the fused (cross-attended) feature of that pair (rescore)
        integrated/image (n, E), integrated/text (t, E) float16                    (integrate)
      integration/<param>              float32  the integration module's weights (its state dict)
      weighing/                        attrs: the dual weights a "ranked" store chose (its manifest says
                                       "ranked"), with the counts they were chosen by; written once

Because each shard's writer owns a whole group, two writers never share a
chunk, which is what lets Slurm array tasks write one store concurrently.
Block groups are split over the tasks that run the block passes, a block to one task
(its own writer lock), so no two tasks write one block group either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

SCHEMA_VERSION = 1
VIEW_PARAMS = ("crop_x", "crop_y", "crop_w", "crop_h")  # normalized crop box of a view


@dataclass(frozen=True)
class ArraySpec:
    """One array: its path under a shard group, dtype, and symbolic shape.

    Dims are names resolved per shard: ``n`` samples, ``t`` captions, ``V`` views,
    ``L`` context length, ``P`` view parameters, ``D`` the teacher's width.
    """

    path: str
    dtype: str
    dims: tuple[str, ...]

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        missing = [d for d in self.dims if d not in sizes]
        if missing:
            raise KeyError(f"array {self.path} needs sizes for {missing}")
        return tuple(int(sizes[d]) for d in self.dims)


SHARD_ARRAYS = (
    ArraySpec("keys", "str", ("n",)),
    ArraySpec("text_image", "int32", ("t",)),
    ArraySpec("text_tokens", "int32", ("t", "L")),
    ArraySpec("view_params", "float32", ("n", "V", "P")),
)


def teacher_arrays(teacher: str, views: str = "V") -> tuple[ArraySpec, ...]:
    """A teacher's embeddings; ``views`` is the symbol of its image views: "V" (every view) or "S"."""
    return (
        ArraySpec(f"emb/{teacher}/image", "float16", ("n", views, "D")),
        ArraySpec(f"emb/{teacher}/text", "float16", ("t", "D")),
    )


def shard_specs(teachers: dict[str, int], single: str | None = None) -> tuple[ArraySpec, ...]:
    """Every array of a shard group; the ``single`` teacher's image embeddings have "S" views."""
    return SHARD_ARRAYS + tuple(s for name in teachers for s in teacher_arrays(name, "S" if name == single else "V"))


def _direction(prefix: str, rows: str, names: tuple[str, ...]) -> tuple[ArraySpec, ...]:
    dtypes = {"ids": "int32"}
    return tuple(ArraySpec(f"{prefix}/{name}", dtypes.get(name, "float32"), (rows, "k")) for name in names)


SEARCH_ARRAYS = _direction("i2t", "n", ("ids", "dual")) + _direction("t2i", "t", ("ids", "dual"))
RESCORE_ARRAYS = _direction("i2t", "n", ("itm",)) + _direction("t2i", "t", ("itm",)) + (
    ArraySpec("pos/itm", "float32", ("t",)),
    ArraySpec("pos/feature", "float16", ("t", "H")),
)
FUSE_ARRAYS = _direction("i2t", "n", ("fused",)) + _direction("t2i", "t", ("fused",))
INTEGRATE_ARRAYS = (
    ArraySpec("integrated/image", "float16", ("n", "E")),
    ArraySpec("integrated/text", "float16", ("t", "E")),
)
BLOCK_PASSES = {"search": SEARCH_ARRAYS, "rescore": RESCORE_ARRAYS, "fuse": FUSE_ARRAYS,
                "integrate": INTEGRATE_ARRAYS}


class SchemaError(ValueError):
    """A store, or data written to it, does not match the schema."""


def compressors(spec: ArraySpec):
    """Zstd for numbers; strings keep zarr's default codec chain."""
    return None if spec.dtype == "str" else zarr.codecs.ZstdCodec(level=3)


def write_shard_group(
    root: zarr.Group, shard: str, arrays: dict[str, np.ndarray], teachers: dict[str, int],
    single: str | None = None, single_views: int = 1,
) -> zarr.Group:
    """Write one shard's arrays as one group, each array a single chunk, checked against the schema.

    ``teachers`` maps teacher name to embedding width; ``single`` names the single-stream teacher, whose
    image embeddings hold ``single_views`` views (1, or every view). Returns the group.
    """
    specs = shard_specs(teachers, single)
    expected = {s.path for s in specs}
    if set(arrays) != expected:
        raise SchemaError(f"shard {shard}: missing {sorted(expected - set(arrays))}, "
                          f"unexpected {sorted(set(arrays) - expected)}")
    sizes = {**_sizes(arrays), "S": single_views}
    group = root.require_group(f"shards/{shard}")
    for spec in specs:
        dims = dict(sizes, D=teachers[spec.path.split("/")[1]]) if spec.path.startswith("emb/") else sizes
        write_array(group, spec, arrays[spec.path], dims)
    return group


def write_array(group: zarr.Group, spec: ArraySpec, value: np.ndarray, sizes: dict[str, int]) -> None:
    """One schema array written whole as a single chunk: its writer owns the chunk."""
    shape = spec.shape(sizes)
    value = np.asarray(value)
    if value.shape != shape:
        raise SchemaError(f"{group.path}/{spec.path}: shape {value.shape}, schema says {shape}")
    chunks = tuple(max(1, s) for s in shape) or (1,)
    dtype = str if spec.dtype == "str" else spec.dtype
    array = group.create_array(spec.path, shape=shape, dtype=dtype, chunks=chunks,
                               compressors=compressors(spec), overwrite=True)
    if value.size:
        array[...] = value.astype(str) if spec.dtype == "str" else value.astype(spec.dtype)


def read_array(group: zarr.Group, spec: ArraySpec) -> np.ndarray:
    try:
        return group[spec.path][...]
    except KeyError as err:
        raise SchemaError(f"{group.path}: array {spec.path} is missing") from err


def read_shard_group(root: zarr.Group, shard: str, teachers: list[str]) -> dict[str, np.ndarray]:
    """Every schema array of one shard, in one read each."""
    try:
        group = root[f"shards/{shard}"]
    except KeyError as err:
        raise SchemaError(f"store has no shard group {shard!r}") from err
    specs = SHARD_ARRAYS + tuple(s for name in teachers for s in teacher_arrays(name))
    out = {}
    for spec in specs:
        try:
            out[spec.path] = group[spec.path][...]
        except KeyError as err:
            raise SchemaError(f"shard {shard}: array {spec.path} is missing") from err
    return out


def read_block_rows(root: zarr.Group, shards: list[str], teachers: list[str]) -> dict[str, np.ndarray]:
    """Every schema array of ``shards`` concatenated in shard order, as one block's rows.

    ``text_image`` is offset to block image rows (int64). Both stages read blocks through this.
    """
    parts = [read_shard_group(root, shard, teachers) for shard in shards]
    out = {path: np.concatenate([part[path] for part in parts]) for path in parts[0] if path != "text_image"}
    out["text_image"] = block_text_image([part["text_image"] for part in parts], [len(part["keys"]) for part in parts])
    return out


def block_text_image(local: list[np.ndarray], images: list[int]) -> np.ndarray:
    """One block's ``text_image`` (int64 block image rows) from its shards' local ones and image counts."""
    offsets = np.cumsum([0] + images[:-1])
    return np.concatenate([rows.astype(np.int64) + offset for rows, offset in zip(local, offsets, strict=True)])


def _sizes(arrays: dict[str, np.ndarray]) -> dict[str, int]:
    n = len(arrays["keys"])
    t, context = np.asarray(arrays["text_tokens"]).shape
    _, views, params = np.asarray(arrays["view_params"]).shape
    if params != len(VIEW_PARAMS):
        raise SchemaError(f"view_params has {params} parameters, schema says {len(VIEW_PARAMS)} ({VIEW_PARAMS})")
    return {"n": n, "t": t, "L": context, "V": views, "P": params}
