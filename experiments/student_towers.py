"""Which student tower stalls? Plain contrastive training (the teachers' loop) with one tower swapped.

    .venv/bin/python experiments/student_towers.py {student|vit_bert|mvit_clip|timm:NAME} STEPS [LR]

``timm:NAME`` is the student with another timm image tower (e.g. timm:resnet18, timm:test_convnext).
Environment: ``IMAGE_LR_SCALE=S`` trains the image tower at S x LR (``CONV_ONLY=1``: only its conv
kernels); ``BN_BATCH_STATS=1`` also scores the image tower with BatchNorm on batch statistics.

Needs `make data teachers`. Prints the loss ends and validation recalls (docs/experiments.md, stage 2).
"""
import os
import sys
import tempfile
import time

import open_clip
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer
from mcad_world import train as teacher_train
from mcad_world.train import tokenize_captions, normalize_pixels, train_clip
from mcad_world.configs import clip_model_cfg
from mcad_student.model import StudentConfig, build_student
from mcad_world.config import Schedule, TowerShape
from mcad_core.shards import load_split, list_shards
from mcad_core.evaluation import flat_captions
from mcad_core.retrieval import dual_stream_ranks, recall_table
torch.set_num_threads(2)
variant, steps = sys.argv[1], int(sys.argv[2])
lr = float(sys.argv[3]) if len(sys.argv) > 3 else 5e-4
tok = AutoTokenizer.from_pretrained("artifacts/teachers/tokenizer")
train = load_split(list_shards("data/default/train")); val = load_split(list_shards("data/default/val"))
table = tokenize_captions(tok, train.captions, 24); pixels = normalize_pixels(train.images)
torch.manual_seed(0)
image_model = variant.split(":", 1)[1] if variant.startswith("timm:") else "mobilevitv2_050"
student = build_student(StudentConfig(image_model=image_model), "artifacts/teachers/tokenizer",
                        tempfile.mkdtemp(prefix="towers_"))
teacher_cfg = clip_model_cfg(TowerShape(), 64, len(tok), 24, tok.sep_token_id)
vit = open_clip.model.CLIP(**teacher_cfg)
model = student.clip
if variant == "vit_bert":      # teacher ViT image tower + student BERT text tower
    model.visual = vit.visual
    model.visual.output_dim = 128
    model.text.proj = torch.nn.Linear(312, 128, bias=False)
elif variant == "mvit_clip":   # student MobileViTv2 + teacher's pre-LN text transformer
    class TeacherText(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = vit

        def forward(self, x):
            return self.m.encode_text(x)

    model.text = TeacherText()
    model.visual.head.proj = torch.nn.Linear(model.visual.head.proj.in_features, 128, bias=False)
model.output_dict = True
image_scale = float(os.environ.get("IMAGE_LR_SCALE", "1"))
if image_scale != 1:   # the image tower at a multiple of the LR
    teacher_train.schedule_optimizer = lambda m, s: teacher_train.adamw_warmup_cosine(
        m, s.lr, s.weight_decay, s.steps, s.warmup,
        (lambda n, p: image_scale if n.startswith("visual.") and p.ndim == 4 else 1.0)
        if os.environ.get("CONV_ONLY") else {"visual.": image_scale})
t = time.time()
summary = train_clip(model, pixels, table, Schedule(steps=steps, lr=lr), 0, variant)
model.eval()
texts, image_of = flat_captions(val)
ids = tok(texts, padding="max_length", max_length=24, truncation=True, return_tensors="pt")["input_ids"]
with torch.no_grad():
    ie = F.normalize(model.encode_image(normalize_pixels(val.images)), dim=-1)
    te = F.normalize(torch.cat([model.encode_text(ids[i:i+500]) for i in range(0, len(ids), 500)]), dim=-1)
r = recall_table(*dual_stream_ranks(ie, te, image_of))
print(variant, round(time.time() - t), summary, {k: round(v, 1) for k, v in r.items()}, flush=True)
if os.environ.get("BN_BATCH_STATS"):  # same weights, image BatchNorm on batch statistics: is it the running stats?
    model.visual.train()
    with torch.no_grad():
        ie = F.normalize(model.encode_image(normalize_pixels(val.images)), dim=-1)
    r = recall_table(*dual_stream_ranks(ie, te, image_of))
    print("batch-stat BN", {k: round(v, 1) for k, v in r.items()}, flush=True)
