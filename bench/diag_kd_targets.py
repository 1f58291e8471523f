"""How good are the cached KD targets *in the batches the student sees*? No model is trained.

    .venv/bin/python bench/diag_kd_targets.py [STORE] [BATCHES]

For neighbour and random batching, over the first BATCHES batches: the fraction of rows whose target
argmax is a true pair (top-1 in-batch accuracy of the target, i2t and t2i), the target's mean
probability on the true pairs, and the same at KD temperatures 1, 2 and 4. Targets: the dual-stream
ensemble ("dual") and the ensemble with the fused top-k entries ("fused"). Writes nothing; prints a table.
"""
import sys

import torch

from mcad_student.data import CacheBatches, Position

store = sys.argv[1] if len(sys.argv) > 1 else "artifacts/cache/default.zarr"
n_batches = int(sys.argv[2]) if len(sys.argv) > 2 else 20
print("| batching | targets | T | i2t top-1 | t2i top-1 | i2t p(true) | t2i p(true) |")
print("|---|---|---:|---:|---:|---:|---:|")
for batching in ("neighbor", "random"):
    for fused in (False, True):
        stream = CacheBatches(store, 128, 64, seed=0, fused=fused, batching=batching)
        stats = {t: [] for t in (1.0, 2.0, 4.0)}
        for i, (_, batch) in zip(range(n_batches), stream.iter_from(Position())):
            i2t, t2i = batch["targets"]["ensemble"]
            images = batch["rows"]
            same = images[:, None] == images[None, :]  # a caption of the same image counts as true
            for t in stats:
                p_i2t, p_t2i = (i2t / t).softmax(1), (t2i / t).softmax(1)
                stats[t].append(torch.stack([
                    same.gather(1, i2t.argmax(1, keepdim=True)).float().mean(),
                    same.t().gather(1, t2i.argmax(1, keepdim=True)).float().mean(),
                    (p_i2t * same).sum(1).mean(), (p_t2i * same.t()).sum(1).mean()]))
        for t, rows in stats.items():
            m = torch.stack(rows).mean(0) * 100
            cells = " | ".join(f"{v:.1f}" for v in m)
            print(f"| {batching} | {'fused' if fused else 'dual'} | {t:g} | {cells} |", flush=True)
