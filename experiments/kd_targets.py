"""How good are the cached KD targets *in the batches the student sees*? No model is trained.

    .venv/bin/python -m experiments.kd_targets [STORE] [BATCHES]

Over the first BATCHES neighbour batches (every batch of that many is drawn from the first blocks
the epoch visits), for each target: the fraction of rows whose target argmax is a true pair (top-1
in-batch accuracy, i2t and t2i) and the target's mean probability on the true pairs (kd temperature
1). Targets: the dual-stream ensemble ("dual_only") and the ensemble with the top-k entries fused by
each rule, re-derived in stage 2 from the cached dual and ITM logits (``CacheBatches(fusion=...)``).
Also prints the scale of the cached dual and ITM logits of the candidates, which a fusion rule must
bring together. Writes nothing; prints tables.
"""
import sys

import numpy as np
import torch
import zarr

from mcad_student.data import CacheBatches, Position

store = sys.argv[1] if len(sys.argv) > 1 else "artifacts/cache/default.zarr"
n_batches = int(sys.argv[2]) if len(sys.argv) > 2 else 20

group = zarr.open_group(store, mode="r")["blocks/b00000"]
print("| list | dual logit mean (sd within a row) | ITM logit mean (sd within a row) |")
print("|---|---:|---:|")
for side in ("i2t", "t2i"):
    dual, itm = group[f"{side}/dual"][...], group[f"{side}/itm"][...]
    print(f"| {side} | {dual.mean():.2f} ({np.std(dual, 1).mean():.2f}) | {itm.mean():.2f} ({np.std(itm, 1).mean():.2f}) |")
print()
RULES = [("dual_only", 0.0), ("reconstruction", 0.5), ("itm_topk", 0.5), ("itm_topk", 1.0), ("itm_topk", 2.0)]
print("| targets | i2t top-1 | t2i top-1 | i2t p(true) | t2i p(true) |")
print("|---|---:|---:|---:|---:|")
for rule, a in RULES:
    stream = CacheBatches(store, 128, 64, seed=0, fused=True, fusion=(rule, a))
    rows = []
    for _, (_, batch) in zip(range(n_batches), stream.iter_from(Position())):
        i2t, t2i = batch["targets"]["ensemble"]
        same = batch["rows"][:, None] == batch["rows"][None, :]  # a caption of the same image counts as true
        rows.append(torch.stack([
            same.gather(1, i2t.argmax(1, keepdim=True)).float().mean(),
            same.t().gather(1, t2i.argmax(1, keepdim=True)).float().mean(),
            (i2t.softmax(1) * same).sum(1).mean(), (t2i.softmax(1) * same.t()).sum(1).mean()]))
    cells = " | ".join(f"{v:.1f}" for v in torch.stack(rows).mean(0) * 100)
    print(f"| {rule} a={a:g} | {cells} |", flush=True)
