"""The synthetic world (mcad_world.synth) and the shard readers (mcad_core.shards)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mcad_core.shards import (
    NoShardsError,
    ReadStats,
    ShardReadError,
    iter_samples,
    list_shards,
    load_split,
)
from mcad_world.synth import (
    INVERSE,
    PALETTE,
    SHAPES,
    SIZE_EXTENT,
    Scene,
    WorldConfig,
    describe,
    generate,
    make_twin,
    sample_scene,
)

TINY = WorldConfig(seed=0, n_train=40, n_val=10, n_test=10, samples_per_shard=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate(out, TINY, progress=False)
    return out


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def all_samples(world: Path, split: str = "train") -> list:
    return list(iter_samples(list_shards(world / split)))


# ------------------------------------------------------------------ the world


def test_layout_matches_img2dataset(world: Path) -> None:
    info = json.loads((world / "world.json").read_text())
    assert info["config"]["n_train"] == 40
    assert {s: info["splits"][s]["samples"] for s in ("train", "val", "test")} == {"train": 40, "val": 10, "test": 10}
    assert sorted(p.name for p in (world / "train").iterdir()) == [f"{i:05d}.tar" for i in range(4)]

    names = tar_members(world / "train" / "00000.tar")
    assert sorted(names)[:3] == ["000000000.jpg", "000000000.json", "000000000.txt"]
    meta = json.loads(names["000000000.json"])
    assert meta["key"] == "000000000"
    assert names["000000000.txt"].decode() == meta["captions"][0]
    assert len(meta["captions"]) == TINY.captions_per_image
    assert Image.open(io.BytesIO(names["000000000.jpg"])).size == (64, 64)


def test_keys_are_unique_across_splits(world: Path) -> None:
    keys = [s.key for split in ("train", "val", "test") for s in all_samples(world, split)]
    assert len(keys) == 60 == len(set(keys))
    assert all(re.fullmatch(r"\d{9}", k) for k in keys)


def test_same_seed_same_bytes_other_seed_other_bytes(world: Path, tmp_path: Path) -> None:
    generate(tmp_path / "again", TINY, progress=False)
    for path in sorted(world.rglob("*")):
        if path.is_file():
            assert (tmp_path / "again" / path.relative_to(world)).read_bytes() == path.read_bytes(), path

    generate(tmp_path / "other", dataclasses.replace(TINY, seed=1), progress=False)
    assert (tmp_path / "other/train/00000.tar").read_bytes() != (world / "train/00000.tar").read_bytes()


def test_regenerating_smaller_world_removes_stale_shards(tmp_path: Path) -> None:
    generate(tmp_path, TINY, progress=False)
    generate(tmp_path, dataclasses.replace(TINY, n_train=15), progress=False)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["00000.tar", "00001.tar"]


@pytest.mark.parametrize(
    "override",
    [
        {"captions_per_image": 0},
        {"captions_per_image": 6},
        {"n_train": 0},
        {"samples_per_shard": -1},
        {"twin_prob": 1.5},
        {"colours": ("red", "teal")},
        {"shapes": ("circle",)},
    ],
)
def test_config_rejects_bad_values(override: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(override))):
        WorldConfig(**override)


def test_objects_are_placed_unambiguously() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        scene = sample_scene(WorldConfig(), rng)
        a, b = scene.objects
        assert (a.colour != b.colour) and (a.shape != b.shape)
        horizontal = scene.relation in ("left of", "right of")
        along = (b.x - a.x) if horizontal else (b.y - a.y)
        across = (b.y - a.y) if horizontal else (b.x - a.x)
        assert (along > 0) == (scene.relation in ("left of", "above"))
        # free space between the objects, and clearly more apart along the axis than across it
        assert abs(along) >= SIZE_EXTENT[a.size] + SIZE_EXTENT[b.size] + 0.07
        assert abs(across) <= 0.4 * abs(along) + 1e-3
        for o in (a, b):
            h = SIZE_EXTENT[o.size]
            assert h <= o.x <= 1 - h and h <= o.y <= 1 - h


# ------------------------------------------------------------------- captions

_MENTION = re.compile(rf"\b(?:(small|large) )?({'|'.join(PALETTE)}) ({'|'.join(SHAPES)})\b")
_RELATION_WORD = {
    "left": "left of",
    "right": "right of",
    "above": "above",
    "over": "above",
    "below": "below",
    "beneath": "below",
}


def claim(caption: str) -> tuple[re.Match, str, re.Match]:
    """(subject mention, relation, other mention) read off a caption."""
    mentions = list(_MENTION.finditer(caption))
    assert len(mentions) == 2, caption
    relations = [_RELATION_WORD[w] for w in re.findall(r"[a-z]+", caption) if w in _RELATION_WORD]
    assert len(relations) == 1, caption
    first, second = mentions
    # "left of X there is Y" and "a picture of X and, to its right, Y" put the subject last.
    subject_last = "there is" in caption or caption.startswith("a picture of")
    return (second, relations[0], first) if subject_last else (first, relations[0], second)


def holds(a, relation: str, b) -> bool:
    return {"left of": a.x < b.x, "right of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[relation]


def test_every_caption_is_true(world: Path) -> None:
    n_captions = 0
    for sample in all_samples(world):
        scene = Scene.from_json(sample.meta["scene"])
        by_name = {(o.colour, o.shape): o for o in scene.objects}
        assert len(set(sample.captions)) == len(sample.captions) == 3
        for caption in sample.captions:
            subject, relation, other = claim(caption)
            a, b = by_name[subject.group(2, 3)], by_name[other.group(2, 3)]
            assert a is not b, caption
            assert subject.group(1) in (None, a.size) and other.group(1) in (None, b.size), caption
            assert holds(a, relation, b), (caption, scene)
            n_captions += 1
    assert n_captions == 40 * 3


def test_twins_share_words_but_not_pixels(world: Path) -> None:
    samples = {s.key: s for s in all_samples(world)}
    twins = [s for s in samples.values() if "twin_of" in s.meta]
    assert twins, "the tiny world should contain twin pairs"
    no_size_pairs = 0
    for twin in twins:
        original = samples[twin.meta["twin_of"]]
        assert int(twin.key) == int(original.key) + 1
        a, b = Scene.from_json(original.meta["scene"]), Scene.from_json(twin.meta["scene"])
        assert b in (make_twin(a, "colour"), make_twin(a, "shape"))
        for c_orig, c_twin in zip(original.captions, twin.captions, strict=True):
            assert c_orig != c_twin
            assert sorted(c_orig.split()) == sorted(c_twin.split())
            no_size_pairs += not re.search(r"\b(small|large)\b", c_orig)
        diff = np.abs(np.asarray(original.image, np.int16) - np.asarray(twin.image, np.int16)).mean()
        assert diff > 2.0
    assert no_size_pairs > 0


def test_describe_reuses_phrasings_for_the_same_rng_state() -> None:
    scene = sample_scene(WorldConfig(), np.random.default_rng(3))
    twin = make_twin(scene, "colour")
    for seed in range(20):
        plain = describe(scene, np.random.default_rng(seed), 5)
        swapped = describe(twin, np.random.default_rng(seed), 5)
        assert [sorted(c.split()) for c in plain] == [sorted(c.split()) for c in swapped]
        assert plain != swapped
    inverse_scene = Scene(objects=scene.objects[::-1], relation=INVERSE[scene.relation], background=scene.background)
    assert {w for c in describe(inverse_scene, np.random.default_rng(0), 20) for w in c.split()} == {
        w for c in describe(scene, np.random.default_rng(0), 20) for w in c.split()
    }


# -------------------------------------------------------------------- reading


def test_iter_samples_round_trips(world: Path) -> None:
    shard = world / "train" / "00001.tar"
    members = tar_members(shard)
    stats = ReadStats()
    samples = list(iter_samples([str(shard)], stats=stats))
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(10, 20)]
    for s in samples:
        assert s.captions == json.loads(members[f"{s.key}.json"])["captions"]
        assert s.shard == str(shard) and s.meta["key"] == s.key
        assert s.image.mode == "RGB" and s.image.size == (64, 64)
    assert stats.samples_ok == 10 and stats.skipped == 0


def test_txt_is_the_caption_without_json_captions(tmp_path: Path, world: Path) -> None:
    jpg = tar_members(world / "train" / "00000.tar")["000000000.jpg"]
    path = tmp_path / "00000.tar"
    with wds.TarWriter(str(path), encoder=False) as sink:
        sink.write({"__key__": "a", "jpg": jpg, "txt": b"  a red circle \n", "json": b"{}"})
    [sample] = iter_samples([str(path)])
    assert sample.captions == ["a red circle"] and sample.meta == {}


def write_bad_shard(path: Path, jpg: bytes) -> None:
    """good0, corrupt image, no caption, no image, good4."""

    def good(key: str) -> dict:
        return {"__key__": key, "jpg": jpg, "txt": f"caption {key}".encode(), "json": b'{"captions": []}'}

    with wds.TarWriter(str(path), encoder=False) as sink:
        sink.write(good("good0"))
        sink.write({"__key__": "corrupt1", "jpg": b"\xff\xd8 not a jpeg", "txt": b"a caption"})
        sink.write({"__key__": "nocap2", "jpg": jpg, "txt": b"   ", "json": b'{"captions": []}'})
        sink.write({"__key__": "noimg3", "txt": b"a caption"})
        sink.write(good("good4"))


def cut_mid_member(src: Path, dst: Path, member_index: int) -> str:
    """Copy ``src`` cut in the middle of a member's data; returns that member's key."""
    with tarfile.open(src) as tar:
        member = tar.getmembers()[member_index]
    data = src.read_bytes()
    dst.write_bytes(data[: member.offset_data + member.size // 2])
    return member.name.split(".")[0]


@pytest.fixture
def bad_shards(tmp_path: Path, world: Path) -> dict[str, Path]:
    jpg = tar_members(world / "train" / "00000.tar")["000000000.jpg"]
    write_bad_shard(tmp_path / "00000.tar", jpg)
    cut_key = cut_mid_member(world / "train" / "00000.tar", tmp_path / "00001.tar", member_index=3 * 5 + 1)
    assert cut_key == "000000005"
    return {"bad": tmp_path / "00000.tar", "truncated": tmp_path / "00001.tar"}


def test_warn_skips_and_counts_bad_input(bad_shards: dict[str, Path], world: Path, caplog) -> None:
    shards = [str(bad_shards["bad"]), str(bad_shards["truncated"]), str(world / "train" / "00002.tar")]
    stats = ReadStats()
    with caplog.at_level(logging.WARNING, logger="mcad_core.shards"):
        keys = [s.key for s in iter_samples(shards, policy="warn", stats=stats)]
    # Everything readable comes through, including the samples before the cut and the shard after it.
    assert keys == ["good0", "good4"] + [f"{i:09d}" for i in range(5)] + [f"{i:09d}" for i in range(20, 30)]
    assert stats.samples_ok == len(keys)
    assert dict(stats.by_reason) == {"corrupt_image": 1, "missing_caption": 1, "missing_image": 1, "truncated_tar": 1}
    assert set(stats.records) == {
        (shards[0], "corrupt1", "corrupt_image"),
        (shards[0], "nocap2", "missing_caption"),
        (shards[0], "noimg3", "missing_image"),
        (shards[1], "000000005", "truncated_tar"),
    }
    assert sum(shards[1] in r.message for r in caplog.records) == 1


@pytest.mark.parametrize(
    ("which", "good_before", "key", "reason"),
    [
        ("bad", ["good0"], "corrupt1", "corrupt_image"),
        ("truncated", [f"{i:09d}" for i in range(5)], "000000005", "truncated_tar"),
    ],
)
def test_raise_names_shard_and_key(bad_shards: dict[str, Path], which: str, good_before, key, reason) -> None:
    shard = str(bad_shards[which])
    seen: list[str] = []
    with pytest.raises(ShardReadError) as err:
        for sample in iter_samples([shard], policy="raise"):
            seen.append(sample.key)
    assert seen == good_before
    assert (err.value.shard, err.value.key, err.value.reason) == (shard, key, reason)
    assert shard in str(err.value) and key in str(err.value)


def test_raise_on_missing_caption_names_its_key(tmp_path: Path, world: Path) -> None:
    jpg = tar_members(world / "train" / "00000.tar")["000000000.jpg"]
    path = tmp_path / "00000.tar"
    with wds.TarWriter(str(path), encoder=False) as sink:
        sink.write({"__key__": "nocap", "jpg": jpg})
    with pytest.raises(ShardReadError, match=r"missing_caption in shard .*00000\.tar \(key nocap\)"):
        list(iter_samples([str(path)]))


def test_truncation_at_a_header_is_still_caught(tmp_path: Path, world: Path) -> None:
    # tarfile reads a tar cut inside a member header as a shorter, valid tar.
    with tarfile.open(world / "train" / "00000.tar") as tar:
        header_start = tar.getmembers()[3 * 7].offset
    path = tmp_path / "00000.tar"
    path.write_bytes((world / "train" / "00000.tar").read_bytes()[: header_start + 100])
    stats = ReadStats()
    keys = [s.key for s in iter_samples([str(path)], policy="warn", stats=stats)]
    assert keys == [f"{i:09d}" for i in range(7)]
    assert dict(stats.by_reason) == {"truncated_tar": 1}

    seen: list[str] = []
    with pytest.raises(ShardReadError, match="truncated_tar") as err:
        for sample in iter_samples([str(path)], policy="raise"):
            seen.append(sample.key)
    assert seen == keys and (err.value.shard, err.value.key) == (str(path), "000000006")


def test_unreadable_shard(tmp_path: Path) -> None:
    path = tmp_path / "00000.tar"
    path.write_bytes(b"this is not a tar file at all" * 40)
    stats = ReadStats()
    assert list(iter_samples([str(path)], policy="warn", stats=stats)) == []
    assert stats.records == [(str(path), None, "unreadable_shard")]


# ------------------------------------------------------------- shard listing


def test_list_shards(world: Path, tmp_path: Path) -> None:
    expected = [str(world / "train" / f"{i:05d}.tar") for i in range(4)]
    assert list_shards(world / "train") == expected
    assert list_shards(str(world / "train" / "{00000..00003}.tar")) == expected
    assert list_shards(world / "train" / "00002.tar") == [expected[2]]

    (tmp_path / "empty").mkdir()
    with pytest.raises(NoShardsError, match="empty"):
        list_shards(tmp_path / "empty")
    with pytest.raises(NoShardsError):
        list_shards(tmp_path / "nowhere")
    with pytest.raises(NoShardsError, match="2 of 6 shards"):
        list_shards(str(world / "train" / "{00000..00005}.tar"))


# ---------------------------------------------------------------- load_split


def test_load_split(world: Path) -> None:
    shards = list_shards(world / "val")
    split = load_split(shards)
    assert split.images.shape == (10, 3, 64, 64) and split.images.dtype == torch.uint8
    assert split.keys == [f"{i:09d}" for i in range(40, 50)]
    assert split.shard_of == shards * 10 and all(len(c) == 3 for c in split.captions)
    first = next(iter_samples(shards))
    assert torch.equal(split.images[0], torch.from_numpy(np.array(first.image)).permute(2, 0, 1))

    small = load_split(shards, image_size=32)
    assert small.images.shape == (10, 3, 32, 32) and small.images.dtype == torch.uint8
    assert small.captions == split.captions


def test_load_split_warn_keeps_good_samples(bad_shards: dict[str, Path]) -> None:
    stats = ReadStats()
    split = load_split([str(bad_shards["bad"])], image_size=16, policy="warn", stats=stats)
    assert split.keys == ["good0", "good4"] and split.images.shape == (2, 3, 16, 16)
    assert stats.skipped == 3
