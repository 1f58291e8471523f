"""Is ITM from scratch stuck on a plateau, and does image-conditioned MLM get it off? A 150-step probe.

    .venv/bin/python experiments/itm_plateau.py plain|mlm [LR]

A fresh default-world BLIP trains *only* ITM on the validation images (batch 64, one random negative image per
caption, so half the pairs match), plus with ``mlm`` the image-conditioned masked-word loss
(``MaskedWords``, 30 %). Prints the ITM loss every 25 steps: ln 2 = 0.693 is a constant guess.
"""
import sys

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from mcad_cache.teachers.blip import fused_states
from mcad_world.train import build_blip, masked_words_for, normalize_pixels, tokenize_captions
from mcad_world.config import TeachersConfig
from mcad_core.shards import list_shards, load_split

mode, lr = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 5e-4
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained("artifacts/teachers/tokenizer")
val = load_split(list_shards("data/default/val"))
table = tokenize_captions(tok, val.captions, 24)
pixels = normalize_pixels(val.images)
model = build_blip(TeachersConfig(), tok, 64).train()
mlm = masked_words_for(model, tok, 0.3)
optimizer = torch.optim.AdamW(list(model.parameters()) + list(mlm.parameters()), lr=lr)
generator = torch.Generator().manual_seed(0)
batch = 64
for step in range(150):
    idx = torch.randint(0, len(val.keys), (batch,), generator=generator)
    ids, mask = table.input_ids[table.first[idx]], table.attention_mask[table.first[idx]]
    vision = model.vision_model(pixel_values=pixels[idx]).last_hidden_state
    pair_vision = torch.cat([vision, vision[torch.roll(torch.arange(batch), 1)]])
    fused = fused_states(model, ids.repeat(2, 1), mask.repeat(2, 1), pair_vision)[:, 0]
    itm = F.cross_entropy(model.itm_head(fused),
                          torch.cat([torch.ones(batch), torch.zeros(batch)]).long())
    loss = itm
    if mode == "mlm":
        masked_ids, masked = mlm.inputs(ids, mask, generator)
        loss = loss + mlm.loss(fused_states(model, masked_ids, mask, vision), ids, masked)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if (step + 1) % 25 == 0:
        print(mode, step + 1, f"itm {itm.item():.3f}", flush=True)
