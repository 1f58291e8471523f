"""Can each teacher tell a caption's image from its contrast twin? No training.

    .venv/bin/python -m experiments.twins [SHARD_DIR] [TEACHERS_DIR] [BLIP_DIR]

Twins share the bag of words of their captions (mcad_world/synth.py), so this is a pure binding test; chance is 50 %.
For every twin pair (a, b) of the split and each caption c of a (and of b): does the model score (c, own image)
above (c, twin image)? ("text -> image"). And does each image score its own caption above its twin's caption
with the same phrasing? ("image -> text"). Prints one row per scorer: clip_a, clip_b, BLIP ITC, BLIP ITM.
"""
import sys
from pathlib import Path

import torch

from bench.common import shard_metas
from mcad_cache.teachers.dual import DualStreamTeacher, DualTeacherSpec
from mcad_cache.teachers.single import SingleTeacherSpec, load_single
from mcad_core.shards import list_shards, load_split

shards = Path(sys.argv[1] if len(sys.argv) > 1 else "data/default/test")
teachers = Path(sys.argv[2] if len(sys.argv) > 2 else "artifacts/teachers")
blip_dir = sys.argv[3] if len(sys.argv) > 3 else str(teachers / "blip")
split = load_split(list_shards(shards))
twin_of = {meta["key"]: meta["twin_of"] for meta in shard_metas(shards) if "twin_of" in meta}
row = {key: i for i, key in enumerate(split.keys)}
pairs = torch.tensor([(row[a], row[b]) for b, a in twin_of.items() if a in row and b in row])
n_caps = min(len(c) for c in split.captions)
# Both directions: image x with twin y, for x in a and in b.
own = torch.cat([pairs[:, 0], pairs[:, 1]])
twin = torch.cat([pairs[:, 1], pairs[:, 0]])
texts = [split.captions[i][c] for c in range(n_caps) for i in own.tolist()]  # caption c of own image
own_rep, twin_rep = own.repeat(n_caps), twin.repeat(n_caps)
twin_texts = [split.captions[i][c] for c in range(n_caps) for i in twin.tolist()]  # same phrasing, swapped


def report(name: str, pos: torch.Tensor, neg_image: torch.Tensor, neg_text: torch.Tensor) -> None:
    print(f"| {name} | {(pos > neg_image).float().mean():.1%} | {(pos > neg_text).float().mean():.1%} |")


print(f"{len(pairs)} twin pairs, {len(texts)} captions\n")
print("| scorer | text -> image: own > twin | image -> text: own > twin's caption |\n|---|---:|---:|")
with torch.no_grad():
    for name in ("clip_a", "clip_b"):
        t = DualStreamTeacher.load(DualTeacherSpec.local(teachers / name))
        ie = t.encode_images(t.pixels_from_uint8(split.images))
        te, tt = t.encode_texts(texts), t.encode_texts(twin_texts)
        pos = (te * ie[own_rep]).sum(1)
        report(name, pos, (te * ie[twin_rep]).sum(1), (tt * ie[own_rep]).sum(1))
    t = load_single(SingleTeacherSpec(blip_dir))
    v = torch.cat([t.vision_tokens(t.pixels_from_uint8(chunk)) for chunk in split.images.split(256)])
    tb, tw = t.tokenize(texts), t.tokenize(twin_texts)
    ie, te, tt = t.itc_images(v), t.itc_texts(tb), t.itc_texts(tw)
    report("blip ITC", (te * ie[own_rep]).sum(1), (te * ie[twin_rep]).sum(1), (tt * ie[own_rep]).sum(1))

    def itm(images: torch.Tensor, text) -> torch.Tensor:
        return torch.cat([t.itm(v[i], text.select(j)).logits
                          for i, j in zip(images.split(512), torch.arange(len(images)).split(512))])

    report("blip ITM", itm(own_rep, tb), itm(twin_rep, tb), itm(own_rep, tw))
