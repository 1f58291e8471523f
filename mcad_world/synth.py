"""The embedded default data set: a small compositional image-text world.

Every image shows two objects (colour, shape, size, position) in an unambiguous
spatial relation, and every caption is a true description of it. Scenes come in
*contrast twins* -- the same scene with the two objects' colours (or shapes)
swapped -- whose captions use the same bag of words, so only a model that binds
attributes to objects can tell a twin pair apart.

Shards are written in img2dataset's webdataset layout (``{key}.jpg``,
``{key}.txt``, ``{key}.json``; shards ``00000.tar``, ...), so the reading side
treats this world exactly like a downloaded data set.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw
from tqdm import tqdm

logger = logging.getLogger(__name__)

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 155, 50),
    "blue": (35, 70, 215),
    "yellow": (235, 200, 20),
    "purple": (135, 45, 165),
    "orange": (245, 125, 15),
}
SHAPES = ("circle", "square", "triangle", "cross")
# Half-extent of each size as a fraction of the image side.
SIZE_EXTENT: dict[str, float] = {"small": 0.09, "large": 0.16}
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SPLITS = ("train", "val", "test")

_EDGE = 0.03  # keeps objects off the image border
_MIN_GAP = 0.08  # free space between the two objects along the relation axis
_SUPERSAMPLE = 2  # PIL draws without antialiasing; render large, then downscale
_NOISE = 6  # amplitude of the uniform pixel noise, in grey levels
_MAX_KEYS = 10**9  # img2dataset keys are 9 digits
_SHARD_NAME = re.compile(r"^\d{5}\.tar$")


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    image_size: int = 64
    n_train: int = 20000
    n_val: int = 1000
    n_test: int = 1000
    samples_per_shard: int = 1000
    captions_per_image: int = 3
    twin_prob: float = 0.5
    jpeg_quality: int = 90
    colours: tuple[str, ...] = tuple(PALETTE)
    shapes: tuple[str, ...] = SHAPES

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "n_test", "samples_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"WorldConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < 16:
            raise ValueError(f"WorldConfig.image_size must be >= 16 to draw shapes, got {self.image_size}")
        if not 1 <= self.captions_per_image <= 5:
            raise ValueError(f"WorldConfig.captions_per_image must be in [1, 5], got {self.captions_per_image}")
        if not 0.0 <= self.twin_prob <= 1.0:
            raise ValueError(f"WorldConfig.twin_prob must be in [0, 1], got {self.twin_prob}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"WorldConfig.jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.n_train + self.n_val + self.n_test > _MAX_KEYS:
            raise ValueError(f"at most {_MAX_KEYS} samples fit in 9-digit keys")
        _check_choices("colours", self.colours, tuple(PALETTE))
        _check_choices("shapes", self.shapes, SHAPES)

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}


def _check_choices(name: str, chosen: tuple[str, ...], known: tuple[str, ...]) -> None:
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise ValueError(f"WorldConfig.{name}: unknown {unknown}; choose from {list(known)}")
    # Both objects must differ in every attribute a twin may swap.
    if len(set(chosen)) < 2:
        raise ValueError(f"WorldConfig.{name} needs at least 2 distinct values, got {list(chosen)}")


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    x: float  # centre, as a fraction of the image width
    y: float  # centre, as a fraction of the image height (downwards)


@dataclass(frozen=True)
class Scene:
    """Two objects where ``objects[0]`` is ``relation`` ``objects[1]``."""

    objects: tuple[SceneObject, SceneObject]
    relation: str
    background: tuple[int, int, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "relation": self.relation,
            "objects": [dataclasses.asdict(o) for o in self.objects],
            "background": list(self.background),
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> Scene:
        a, b = (SceneObject(**o) for o in d["objects"])
        r, g, bl = d["background"]
        return Scene(objects=(a, b), relation=d["relation"], background=(r, g, bl))


# --------------------------------------------------------------------- scenes


def sample_scene(cfg: WorldConfig, rng: np.random.Generator) -> Scene:
    c0, c1 = rng.choice(len(cfg.colours), size=2, replace=False)
    s0, s1 = rng.choice(len(cfg.shapes), size=2, replace=False)
    sizes = [list(SIZE_EXTENT)[i] for i in rng.integers(len(SIZE_EXTENT), size=2)]
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    (x0, y0), (x1, y1) = _place(relation, SIZE_EXTENT[sizes[0]], SIZE_EXTENT[sizes[1]], rng)
    objects = (
        SceneObject(cfg.colours[c0], cfg.shapes[s0], sizes[0], x0, y0),
        SceneObject(cfg.colours[c1], cfg.shapes[s1], sizes[1], x1, y1),
    )
    return Scene(objects=objects, relation=relation, background=_background(rng))


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    # Light and only slightly tinted, so every palette colour stands out on it.
    grey = int(rng.integers(190, 236))
    r, g, b = (int(np.clip(grey + t, 0, 255)) for t in rng.integers(-18, 19, size=3))
    return (r, g, b)


def _place(
    relation: str, h0: float, h1: float, rng: np.random.Generator
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres for object 0 (half-extent h0) and 1 (h1) with object 0 ``relation`` object 1.

    Along the relation's axis the objects are separated by at least _MIN_GAP of
    free space; across it they differ by at most 0.4x the along-axis distance,
    so the relation can't be read any other way.
    """
    first_h, second_h = (h0, h1) if relation in ("left of", "above") else (h1, h0)
    lo, hi = _EDGE + first_h, 1.0 - _EDGE - second_h
    dist = rng.uniform(first_h + second_h + _MIN_GAP, hi - lo)
    first = rng.uniform(lo, hi - dist)
    along = (first, first + dist) if relation in ("left of", "above") else (first + dist, first)

    hmax = max(h0, h1)
    centre = rng.uniform(_EDGE + hmax, 1.0 - _EDGE - hmax)
    across = tuple(
        float(np.clip(centre + rng.uniform(-0.2, 0.2) * dist, _EDGE + h, 1.0 - _EDGE - h)) for h in (h0, h1)
    )
    pairs = zip(along, across) if relation in ("left of", "right of") else zip(across, along)
    (x0, y0), (x1, y1) = ((round(float(x), 4), round(float(y), 4)) for x, y in pairs)
    return (x0, y0), (x1, y1)


def make_twin(scene: Scene, swap: str) -> Scene:
    """The contrast twin: same layout, colours or shapes exchanged between the objects."""
    a, b = scene.objects
    if swap == "colour":
        pair = (dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour))
    elif swap == "shape":
        pair = (dataclasses.replace(a, shape=b.shape), dataclasses.replace(b, shape=a.shape))
    else:
        raise ValueError(f"swap must be 'colour' or 'shape', got {swap!r}")
    return dataclasses.replace(scene, objects=pair)


# ------------------------------------------------------------------ rendering


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw the scene as an RGB image of ``image_size`` pixels square."""
    canvas = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (canvas, canvas), scene.background)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_object(draw, obj, canvas)
    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    noise = rng.integers(-_NOISE, _NOISE + 1, size=(image_size, image_size, 3), dtype=np.int16)
    pixels = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, canvas: int) -> None:
    cx, cy, h = obj.x * canvas, obj.y * canvas, SIZE_EXTENT[obj.size] * canvas
    fill = PALETTE[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif obj.shape == "cross":
        arm = 0.35 * h
        draw.rectangle((cx - h, cy - arm, cx + h, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - h, cx + arm, cy + h), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


# ------------------------------------------------------------------- captions

# {s}: the subject, {o}: the other object, {r}: where the subject is relative to
# the other, {its}: the same seen from the other object ("to its right").
_PATTERNS = (
    "{s} {r} {o}",
    "{s} is {r} {o}",
    "{r} {o} there is {s}",
    "a picture of {o} and, {its}, {s}",
    "{s} placed {r} {o}",
)
_RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "beneath"),
}
_ITS = {"left of": "to its left", "right of": "to its right", "above": "above it", "below": "below it"}
# The world's attribute words and relation-word inverses: what the BLIP teacher's
# rule-made hard negatives edit (mcad_world/negatives.py).
CAPTION_WORDS: dict[str, tuple[str, ...]] = {
    "colour": tuple(PALETTE),
    "shape": SHAPES,
    "size": tuple(SIZE_EXTENT),
}
RELATION_FLIPS = {"left": "right", "right": "left", "above": "below", "below": "above",
                  "over": "beneath", "beneath": "over"}


def caption_edit_words() -> dict[str, Any]:
    """The world's own description of its caption vocabulary, for rule-made ITM negatives.

    Written into ``world.json`` so the teacher recipe reads it from the data it
    trains on instead of importing this module's constants: a world from another
    generator either describes its own words the same way or trains without
    edited negatives.
    """
    return {"groups": {name: list(words) for name, words in CAPTION_WORDS.items()}, "flips": dict(RELATION_FLIPS)}


# Every (pattern, with size?, subject object) combination reads differently.
_N_PHRASINGS = len(_PATTERNS) * 2 * 2


def describe(scene: Scene, rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct true captions of ``scene``.

    The random draws don't depend on the scene, so the same rng state gives a
    twin pair the same phrasings -- hence captions with the same bag of words.
    """
    if not 1 <= n <= _N_PHRASINGS:
        raise ValueError(f"n must be in [1, {_N_PHRASINGS}], got {n}")
    picks = rng.choice(_N_PHRASINGS, size=n, replace=False)
    word_draws = rng.integers(0, 2**16, size=n)
    return [_phrase(scene, int(p), int(w)) for p, w in zip(picks, word_draws)]


def _phrase(scene: Scene, pick: int, word_draw: int) -> str:
    pattern, rest = divmod(pick, 4)
    with_size, subject_is_first = divmod(rest, 2)
    subject, other = scene.objects if subject_is_first else scene.objects[::-1]
    relation = scene.relation if subject_is_first else INVERSE[scene.relation]
    words = _RELATION_WORDS[relation]
    return _PATTERNS[pattern].format(
        s=_noun_phrase(subject, bool(with_size)),
        o=_noun_phrase(other, bool(with_size)),
        r=words[word_draw % len(words)],
        its=_ITS[relation],
    )


def _noun_phrase(obj: SceneObject, with_size: bool) -> str:
    words = f"{obj.size} {obj.colour} {obj.shape}" if with_size else f"{obj.colour} {obj.shape}"
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words}"


# ----------------------------------------------------------------- generation


@dataclass(frozen=True)
class _Record:
    key: str
    scene: Scene
    captions: list[str]
    twin_of: str | None


def _split_records(cfg: WorldConfig, split: str, first_key: int) -> Iterator[tuple[_Record, Image.Image]]:
    # Each split has its own stream, so one split's size doesn't change the other splits' scenes.
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split)])
    n, index = cfg.split_sizes()[split], 0
    while index < n:
        scene = sample_scene(cfg, rng)
        caption_seed = int(rng.integers(2**63))
        group: list[tuple[Scene, str | None]] = [(scene, None)]
        if index + 1 < n and rng.random() < cfg.twin_prob:
            swap = "colour" if rng.random() < 0.5 else "shape"
            group.append((make_twin(scene, swap), _key(first_key + index)))
        for member, twin_of in group:
            captions = describe(member, np.random.default_rng(caption_seed), cfg.captions_per_image)
            record = _Record(_key(first_key + index), member, captions, twin_of)
            yield record, render_scene(member, cfg.image_size, rng)
            index += 1


def _key(i: int) -> str:
    return f"{i:09d}"


def _encode(record: _Record, image: Image.Image, quality: int) -> dict[str, Any]:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    meta: dict[str, Any] = {
        "key": record.key,
        "status": "success",
        "caption": record.captions[0],
        "captions": record.captions,
        "width": image.width,
        "height": image.height,
        "scene": record.scene.to_json(),
    }
    if record.twin_of is not None:
        meta["twin_of"] = record.twin_of
    return {
        "__key__": record.key,
        "jpg": buf.getvalue(),
        "txt": record.captions[0].encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def _write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Run ``write(fileobj)`` into a temp file, then move it to ``path``.

    A crash leaves at most a ``.tmp`` file behind, never a half-written file
    under a name the readers pick up.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # makes the rename itself durable
    finally:
        os.close(dir_fd)


def _write_shard(path: Path, samples: list[dict[str, Any]]) -> None:
    def write(f: BinaryIO) -> None:
        # Fixed mtime so the same config gives byte-identical shards.
        with wds.TarWriter(f, encoder=False, mtime=0) as sink:
            for sample in samples:
                sink.write(sample)

    _write_atomic(path, write)


def _write_split(cfg: WorldConfig, split: str, out: Path, first_key: int, bar: tqdm) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    shard, pending, twins = 0, [], 0
    for record, image in _split_records(cfg, split, first_key):
        pending.append(_encode(record, image, cfg.jpeg_quality))
        twins += record.twin_of is not None
        bar.update(1)
        if len(pending) == cfg.samples_per_shard:
            _write_shard(out / f"{shard:05d}.tar", pending)
            shard, pending = shard + 1, []
    if pending:
        _write_shard(out / f"{shard:05d}.tar", pending)
        shard += 1
    _remove_stale_shards(out, shard)
    return {"samples": cfg.split_sizes()[split], "shards": shard, "twins": twins}


def _remove_stale_shards(out: Path, n_shards: int) -> None:
    # A previous, larger world in the same directory must not leak into this one.
    for path in out.iterdir():
        if _SHARD_NAME.match(path.name) and int(path.name[:5]) >= n_shards:
            logger.info("removing stale shard %s", path)
            path.unlink()


def generate(out_dir: Path, cfg: WorldConfig, progress: bool = True) -> dict[str, Any]:
    """Write the world's train/val/test shards and ``world.json`` under ``out_dir``.

    Returns the ``world.json`` content. ``world.json`` is written last, so its
    presence marks a complete world.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "world.json").unlink(missing_ok=True)
    sizes = cfg.split_sizes()
    splits: dict[str, dict[str, int]] = {}
    first_key = 0
    with tqdm(total=sum(sizes.values()), desc="synth world", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            splits[split] = _write_split(cfg, split, out_dir / split, first_key, bar)
            splits[split]["first_key"] = first_key
            first_key += sizes[split]
    world = {"config": dataclasses.asdict(cfg), "splits": splits, "caption_edits": caption_edit_words()}
    text = json.dumps(world, indent=2, sort_keys=True) + "\n"
    _write_atomic(out_dir / "world.json", lambda f: f.write(text.encode("utf-8")))
    return world
