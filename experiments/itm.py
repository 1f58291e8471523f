"""Does the ITM head re-rank better with more negatives or a listwise loss? Trains one BLIP variant.

    .venv/bin/python experiments/itm.py NAME STEPS NEGATIVES LISTWISE [INIT]

Trains the default world's BLIP (image tower trainable, from scratch, or from the directory INIT) for STEPS steps with
``blip_losses(negatives=NEGATIVES, listwise=LISTWISE)``, logs the loss terms every 25 steps, then prints
ITC and ITM-rerank recalls on the first 500 validation images. Writes nothing but the log.
Environment: LR, WARMUP, ITM_ONLY=1 (drop the ITC term), ITM_WEIGHT (scales the ITM terms).
"""
import os
import sys
import time

import torch
from transformers import AutoTokenizer, BlipForImageTextRetrieval

from mcad_cache.evaluate import evaluate_single_stream
from mcad_cache.teachers import blip as single
from mcad_world.configs import IMAGE_MEAN, IMAGE_STD
from mcad_world.train import schedule_batches, schedule_optimizer, blip_losses, build_blip, normalize_pixels, tokenize_captions
from mcad_world.config import Schedule, TeachersConfig
from mcad_core.shards import SplitData, list_shards, load_split

name, steps, negatives, listwise = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
init = sys.argv[5] if len(sys.argv) > 5 else None
torch.set_num_threads(2)
torch.manual_seed(2)
cfg = TeachersConfig()
tokenizer = AutoTokenizer.from_pretrained("artifacts/teachers/tokenizer")
train = load_split(list_shards("data/default/train"))
pixels = normalize_pixels(train.images)
table = tokenize_captions(tokenizer, train.captions, cfg.context_length)
model = BlipForImageTextRetrieval.from_pretrained(init) if init else build_blip(cfg, tokenizer, 64)
schedule = Schedule(steps=steps, lr=float(os.environ.get("LR", "5e-4")), warmup=int(os.environ.get("WARMUP", "50")))
optimizer, scheduler = schedule_optimizer(model, schedule)
generator = torch.Generator().manual_seed(2)
model.train()
start, log = time.perf_counter(), []
for step, images in enumerate(schedule_batches(len(pixels), schedule, generator)):
    rows = table.sample(images, generator)
    vision = model.vision_model(pixel_values=pixels[images]).last_hidden_state  # the tower trains here
    terms = blip_losses(model, vision, table.input_ids[rows], table.attention_mask[rows],
                        images[:, None] == images[None, :], generator, negatives, listwise)
    optimizer.zero_grad(set_to_none=True)
    itm_weight = float(os.environ.get("ITM_WEIGHT", "1"))
    itm = terms["itm"] + terms.get("itm_list", 0.0)
    loss = itm_weight * itm + (0.0 if os.environ.get("ITM_ONLY") else terms["itc"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    log.append({k: v.item() for k, v in terms.items()})
    if (step + 1) % 25 == 0:
        mean = {k: sum(r[k] for r in log[-25:]) / 25 for k in log[-1]}
        print(step + 1, f"{time.perf_counter() - start:.0f}s", {k: round(v, 3) for k, v in mean.items()}, flush=True)
model.eval()
val = load_split(list_shards("data/default/val"))
val = SplitData(val.keys[:500], val.images[:500], val.captions[:500], val.shard_of[:500])
processor = single.BlipProcessor.from_pretrained("artifacts/teachers/blip")
teacher = single.BlipItmTeacher(model, processor, single.SingleTeacherSpec(name))
out = evaluate_single_stream(teacher, val)
for kind, table_ in out.items():
    print(name, kind, {k: round(v, 1) for k, v in table_.items()}, flush=True)
if len(sys.argv) > 6:
    single.save_local(model, "artifacts/teachers/tokenizer", 64, IMAGE_MEAN, IMAGE_STD, sys.argv[6])
