"""The cache store schema (Zarr v3): every array's name, dtype, shape and chunking, and the version.

Writer and reader both go through this module, so a store is never read with
assumptions the writer did not make. Layout (schema version 1):

    STORE.zarr/                        attrs["manifest"]: see ``Manifest``
      shards/<shard>/                  one group per input shard: its writer owns it whole
        keys            (n,)           str      sample keys, in shard order
        text_image      (t,)           int32    local image row of every caption
        text_tokens     (t, L)         int32    captions tokenized with the store's tokenizer
        view_params     (n, V, P)      float32  augmentation parameters of every view
        emb/<teacher>/image (n, V, D)  float16  normalized image embedding per view
        emb/<teacher>/text  (t, D)     float16  normalized text embedding

Because each shard's writer owns a whole group, two writers never share a
chunk, which is what lets Slurm array tasks write one store concurrently.
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


def teacher_arrays(teacher: str) -> tuple[ArraySpec, ...]:
    return (
        ArraySpec(f"emb/{teacher}/image", "float16", ("n", "V", "D")),
        ArraySpec(f"emb/{teacher}/text", "float16", ("t", "D")),
    )


class SchemaError(ValueError):
    """A store, or data written to it, does not match the schema."""


def compressors(spec: ArraySpec):
    """Zstd for numbers; strings keep zarr's default codec chain."""
    return None if spec.dtype == "str" else zarr.codecs.ZstdCodec(level=3)


def write_shard_group(
    root: zarr.Group, shard: str, arrays: dict[str, np.ndarray], teachers: dict[str, int]
) -> zarr.Group:
    """Write one shard's arrays as one group, each array a single chunk, checked against the schema.

    ``teachers`` maps teacher name to embedding width. Returns the group.
    """
    specs = SHARD_ARRAYS + tuple(s for name in teachers for s in teacher_arrays(name))
    expected = {s.path for s in specs}
    if set(arrays) != expected:
        raise SchemaError(f"shard {shard}: missing {sorted(expected - set(arrays))}, "
                          f"unexpected {sorted(set(arrays) - expected)}")
    sizes = _sizes(arrays)
    group = root.require_group(f"shards/{shard}")
    for spec in specs:
        value = np.asarray(arrays[spec.path])
        dims = dict(sizes, D=teachers[spec.path.split("/")[1]]) if spec.path.startswith("emb/") else sizes
        shape = spec.shape(dims)
        if value.shape != shape:
            raise SchemaError(f"shard {shard}: {spec.path} has shape {value.shape}, schema says {shape}")
        dtype = str if spec.dtype == "str" else spec.dtype
        array = group.create_array(spec.path, shape=shape, dtype=dtype, chunks=shape or (1,),
                                   compressors=compressors(spec), overwrite=True)
        array[...] = value.astype(spec.dtype) if spec.dtype != "str" else value.astype(str)
    return group


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


def _sizes(arrays: dict[str, np.ndarray]) -> dict[str, int]:
    n = len(arrays["keys"])
    t, context = np.asarray(arrays["text_tokens"]).shape
    _, views, params = np.asarray(arrays["view_params"]).shape
    if params != len(VIEW_PARAMS):
        raise SchemaError(f"view_params has {params} parameters, schema says {len(VIEW_PARAMS)} ({VIEW_PARAMS})")
    return {"n": n, "t": t, "L": context, "V": views, "P": params}
