"""How many images does each caption truly describe? Reads the scenes in the shards' json; no model.

    .venv/bin/python -m experiments.caption_ambiguity [SHARD_DIR]

A caption names both objects' colour and shape (and their sizes if it says "small"/"large") and their
relation; every image of the split whose scene has those, in either order, fits it. Prints the share of
captions that fit more than one image and the t2i R@1 a model gets by picking at random among the fits.
"""
import collections
import sys
from pathlib import Path

from bench.common import caption_meaning, shard_metas

shard_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "data/default/test")
records = shard_metas(shard_dir)

fits = {size: collections.Counter(caption_meaning(r["scene"], size) for r in records) for size in (True, False)}
shares = []
for r in records:
    for caption in r["captions"]:
        with_size = bool({"small", "large"} & set(caption.split()))
        shares.append(1 / fits[with_size][caption_meaning(r["scene"], with_size)])
print(f"{len(records)} images, {len(shares)} captions: {sum(s < 1 for s in shares) / len(shares):.1%} fit more than "
      f"one image; t2i R@1 picking at random among the fits: {sum(shares) / len(shares):.1%}")
