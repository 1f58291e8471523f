"""The quadrant world: a second image-text world, made unlike ``mcad_world/synth.py`` on purpose.

``mcad data --world quadrants`` writes it; the tests run every command on it with default
options (tests/test_other_world.py), and docs/results.md reports the distillation regime on it.
It shares no code with the default world's generator and differs from it in every way a reader
could silently depend on:

- images: 96x96 RGB **PNG** (``{key}.png``), not 64px JPEG;
- vocabulary: other colours (teal, magenta, olive, navy, coral, maroon) and
  other shapes (star, hexagon, ring, diamond), drawn with ``PIL.ImageDraw``;
- layout: 1 to 3 objects, each alone in a quadrant ("top left", ...), not two
  objects in a left/right/above/below relation;
- captions: another grammar ("There is a teal star in the top left corner and a
  navy ring at the bottom right."), **5** per image in the json ``"captions"``
  list, the first also in ``{key}.txt``;
- keys: ``tr00000000`` / ``va00000000`` / ``te00000000`` (letters, 10 chars);
- shards: ``part-0000.tar``, ``part-0001.tar``, ... (not ``00000.tar``);
- no ``world.json`` beside the splits (other generators do not write one).

Deterministic from ``seed``; written with ``webdataset.TarWriter``.
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw

IMAGE_SIZE = 96
COLOURS: dict[str, tuple[int, int, int]] = {
    "teal": (0, 128, 128),
    "magenta": (220, 0, 200),
    "olive": (128, 128, 0),
    "navy": (20, 20, 120),
    "coral": (255, 127, 80),
    "maroon": (120, 10, 30),
}
SHAPES = ("star", "hexagon", "ring", "diamond")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
PREFIX = {"train": "tr", "val": "va", "test": "te"}
CAPTIONS_PER_IMAGE = 5


def _regular_polygon(cx: float, cy: float, radius: float, sides: int, rotation: float) -> list[tuple[float, float]]:
    return [(cx + radius * math.cos(rotation + 2 * math.pi * i / sides),
             cy + radius * math.sin(rotation + 2 * math.pi * i / sides)) for i in range(sides)]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    if shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + math.pi * i / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    elif shape == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, 0.0), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, int(r * 0.35)))
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _quadrant_centre(quadrant: str, rng: random.Random) -> tuple[float, float]:
    half = IMAGE_SIZE / 2
    x0 = half if quadrant.endswith("right") else 0.0
    y0 = half if quadrant.startswith("bottom") else 0.0
    return x0 + half * rng.uniform(0.4, 0.6), y0 + half * rng.uniform(0.4, 0.6)


def _phrase(obj: dict) -> str:
    return f"a {obj['colour']} {obj['shape']}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _captions(objects: list[dict], rng: random.Random) -> list[str]:
    """Five true captions of a scene, one per template (shuffled object order where the grammar allows)."""
    order = objects[:]
    rng.shuffle(order)
    first, rest = order[0], order[1:]
    there = f"There is {_phrase(first)} in the {first['quadrant']} corner"
    there += "".join(f" and {_phrase(o)} at the {o['quadrant']}" for o in rest) + "."
    count = {1: "One object", 2: "Two objects", 3: "Three objects"}[len(objects)]
    listing = f"{count}: " + "; ".join(f"{o['colour']} {o['shape']} ({o['quadrant']})" for o in order) + "."
    corners = " ".join(f"In the {o['quadrant']} corner sits {_phrase(o)}." for o in order)
    showing = "A picture showing " + _join([f"{_phrase(o)} at the {o['quadrant']}" for o in order]) + "."
    bag = _join([_phrase(o) for o in sorted(objects, key=lambda o: QUADRANTS.index(o["quadrant"]))])
    plain = f"{bag[0].upper()}{bag[1:]} on a pale background."
    return [there, listing, corners, showing, plain]


def _sample(rng: random.Random) -> tuple[bytes, list[dict]]:
    background = tuple(rng.randint(225, 250) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    objects = []
    for quadrant in rng.sample(QUADRANTS, rng.randint(1, 3)):
        obj = {"colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES), "quadrant": quadrant}
        cx, cy = _quadrant_centre(quadrant, rng)
        _draw(draw, obj["shape"], cx, cy, IMAGE_SIZE * rng.uniform(0.13, 0.2), COLOURS[obj["colour"]])
        objects.append(obj)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), objects


def write_other_world(out: str | Path, *, seed: int = 0, n_train: int = 64, n_val: int = 16, n_test: int = 16,
                      per_shard: int = 16, progress: bool = False) -> dict[str, list[Path]]:
    """Write ``out/{train,val,test}/part-NNNN.tar``; returns the shard paths of each split.

    Each split is its own random stream of ``seed``, so another seed is another, disjoint
    stream of the same world (the teachers' own data, apart from the distillation shards).
    """
    from tqdm import tqdm

    if min(n_train, n_val, n_test) < 1 or per_shard < 1:
        raise ValueError(f"every split needs >= 1 sample and shards >= 1 sample, got train {n_train}, "
                         f"val {n_val}, test {n_test}, {per_shard} per shard")
    out = Path(out)
    written: dict[str, list[Path]] = {}
    bar = tqdm(total=n_train + n_val + n_test, desc="quadrant world", unit="img", disable=not progress,
               mininterval=2.0)
    for split_index, (split, count) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        rng = random.Random(seed * 1000 + split_index)
        split_dir = out / split
        split_dir.mkdir(parents=True, exist_ok=True)
        written[split] = []
        for start in range(0, count, per_shard):
            path = split_dir / f"part-{start // per_shard:04d}.tar"
            with wds.TarWriter(str(path), encoder=False, mtime=0.0) as sink:
                for index in range(start, min(start + per_shard, count)):
                    png, objects = _sample(rng)
                    captions = _captions(objects, rng)
                    key = f"{PREFIX[split]}{index:08d}"
                    meta = {"key": key, "captions": captions, "objects": objects, "width": IMAGE_SIZE,
                            "height": IMAGE_SIZE, "status": "success"}
                    sink.write({"__key__": key, "png": png, "txt": captions[0].encode(),
                                "json": json.dumps(meta).encode()})
            bar.update(min(start + per_shard, count) - start)
            written[split].append(path)
    bar.close()
    return written
