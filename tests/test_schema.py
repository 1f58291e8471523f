import numpy as np
import pytest
import zarr

from mcad_cache.schema import SCHEMA_VERSION, SchemaError, read_shard_group, write_shard_group


def _arrays(n=4, t=7, views=2, context=5, widths=None):
    rng = np.random.default_rng(0)
    widths = widths or {"clip_a": 8, "blip_itc": 6}
    arrays = {
        "keys": np.array([f"{i:09d}" for i in range(n)]),
        "text_image": rng.integers(0, n, t).astype(np.int32),
        "text_tokens": rng.integers(0, 100, (t, context)).astype(np.int32),
        "view_params": rng.random((n, views, 4)).astype(np.float32),
    }
    for name, width in widths.items():
        arrays[f"emb/{name}/image"] = rng.standard_normal((n, views, width)).astype(np.float16)
        arrays[f"emb/{name}/text"] = rng.standard_normal((t, width)).astype(np.float16)
    return arrays, widths


def test_shard_group_round_trip(tmp_path):
    root = zarr.open_group(tmp_path / "store.zarr", mode="w")
    arrays, widths = _arrays()
    write_shard_group(root, "00000", arrays, widths)
    back = read_shard_group(zarr.open_group(tmp_path / "store.zarr", mode="r"), "00000", list(widths))
    assert set(back) == set(arrays)
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype or name == "keys", name
        assert np.array_equal(back[name].astype(value.dtype), value), name
    assert SCHEMA_VERSION == 1


def test_schema_refuses_wrong_shapes_and_names(tmp_path):
    root = zarr.open_group(tmp_path / "store.zarr", mode="w")
    arrays, widths = _arrays()
    bad = dict(arrays, **{"emb/clip_a/text": arrays["emb/clip_a/text"][:, :3]})
    with pytest.raises(SchemaError, match=r"emb/clip_a/text: shape \(7, 3\), schema says \(7, 8\)"):
        write_shard_group(root, "00000", bad, widths)
    with pytest.raises(SchemaError, match="missing"):
        write_shard_group(root, "00000", {k: v for k, v in arrays.items() if k != "text_image"}, widths)
    with pytest.raises(SchemaError, match="no shard group"):
        read_shard_group(root, "00001", list(widths))
