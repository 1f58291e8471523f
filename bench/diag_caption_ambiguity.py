"""How many images does each caption truly describe? Reads the scenes in the shards' json; no model.

    .venv/bin/python bench/diag_caption_ambiguity.py [SHARD_DIR]

A caption names both objects' colour and shape (and their sizes if it says "small"/"large") and their
relation; every image of the split whose scene has those, in either order, fits it. Prints the share of
captions that fit more than one image and the t2i R@1 a model gets by picking at random among the fits.
"""
import collections
import json
import sys
import tarfile
from pathlib import Path

from pipeline.synth import INVERSE

shard_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "data/default/test")
records = []
for shard in sorted(shard_dir.glob("*.tar")):
    with tarfile.open(shard) as tar:
        records += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]


def meaning(scene: dict, with_size: bool) -> tuple:
    a, b = scene["objects"]

    def noun(obj: dict) -> tuple:
        return (obj["size"] if with_size else "", obj["colour"], obj["shape"])

    return min((noun(a), scene["relation"], noun(b)), (noun(b), INVERSE[scene["relation"]], noun(a)))


fits = {size: collections.Counter(meaning(r["scene"], size) for r in records) for size in (True, False)}
shares = []
for r in records:
    for caption in r["captions"]:
        with_size = bool({"small", "large"} & set(caption.split()))
        shares.append(1 / fits[with_size][meaning(r["scene"], with_size)])
print(f"{len(records)} images, {len(shares)} captions: {sum(s < 1 for s in shares) / len(shares):.1%} fit more than "
      f"one image; t2i R@1 picking at random among the fits: {sum(shares) / len(shares):.1%}")
