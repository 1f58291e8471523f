"""Does a BLIP teacher's ITM prefer a caption's own image? No training.

    .venv/bin/python experiments/itm_pairs.py [BLIP_DIR]

For the first caption of each of 512 validation images: the share whose ITM score with its own image beats
the score with a random image, and with the image ITC ranks highest after its own (a near twin). Prints one line.
"""
import sys

import torch

from mcad_cache.teachers.single import SingleTeacherSpec, load_single
from mcad_core.shards import list_shards, load_split

torch.manual_seed(0)
t = load_single(SingleTeacherSpec(sys.argv[1] if len(sys.argv) > 1 else "artifacts/teachers/blip"))
s = load_split(list_shards("data/default/val"))
n = 512
with torch.no_grad():
    v = t.vision_tokens(t.pixels_from_uint8(s.images[:n]))
    tb = t.tokenize([c[0] for c in s.captions[:n]])
    pos = t.itm(v, tb).logits
    neg = t.itm(v[torch.randperm(n)], tb).logits
    ie, te = t.itc_images(v), t.itc_texts(tb)
    sim = te @ ie.t()
    sim.fill_diagonal_(-9)
    hard = sim.argmax(1)
    hn = t.itm(v[hard], tb).logits
print(f"ITM own > random {(pos > neg).float().mean():.1%}, own > ITC's nearest {(pos > hn).float().mean():.1%}; "
      f"ITC own > ITC's nearest {((te * ie).sum(1) > (te * ie[hard]).sum(1)).float().mean():.1%}")
