"""Where a stage-2 step goes: data, image tower, text tower, losses, backward, optimizer, per student preset.

    .venv/bin/python -m bench.stage2_profile [--store S] [--steps N] [--presets mobilevit,vit]

Every preset trains on the same batches from the real store (`mcad distill`'s loop pieces:
``CacheBatches``, ``batch_terms``, AdamW), interleaved step by step after warmup steps so a
slow minute of the machine hits all presets alike. Forward passes are timed per tower; the
backward pass is timed whole and then split by running each tower's backward alone on a copy
of the step. A ``torch.profiler`` table of the top operators (self CPU time) of one preset's
steps goes beside the JSON. Writes ``bench/results/stage2_profile.{json,md}``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from statistics import median

import torch

from mcad_cache.sources import locate_tokenizer
from mcad_student.data import CacheBatches, Position
from mcad_student.losses import fd_loss, ia_loss, itc_loss, kd_loss, total_loss
from mcad_student.model import STUDENT_PRESETS, build_student
from mcad_student.train import DistillConfig, _optimizer
from mcad_core.atomic import atomic_write_bytes, atomic_write_json

RESULTS = Path("bench/results")


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def step_split(student, optimizer, batch: dict, cfg: DistillConfig) -> dict[str, float]:
    """Seconds of one MCAD step, by part (the same computation as ``batch_terms`` + the optimizer step)."""
    weights = cfg.effective_loss()
    pixels, ids = student.pixels_from_uint8(batch["pixels"]), batch["input_ids"]
    image_raw, t_image = _timed(lambda: student.encode_image_raw(pixels))
    text_raw, t_text = _timed(lambda: student.encode_text_raw(ids))

    def losses():
        image, text = torch.nn.functional.normalize(image_raw, dim=-1), torch.nn.functional.normalize(text_raw, dim=-1)
        scale = student.clip.logit_scale.exp()
        terms = dict(itc_loss(image, text, scale))
        i2t, t2i = batch["targets"]["ensemble"]
        terms.update(kd_loss(scale * image @ text.t(), i2t, t2i, weights.kd_temperature, weights.kd_kind))
        s_image, s_text = student.project(image_raw, 0), student.project(text_raw, 1)
        terms.update(fd_loss(s_image, s_text, batch["integrated_image"], batch["integrated_text"], weights.fd_kind))
        terms.update(ia_loss(s_image, s_text, batch["integrated_image"], batch["integrated_text"], i2t, t2i,
                             weights.ia_temperature, weights.kd_temperature))
        return total_loss({k: v for k, v in terms.items() if "/" not in k}, weights)

    loss, t_loss = _timed(losses)
    optimizer.zero_grad(set_to_none=True)
    _, t_backward = _timed(loss.backward)

    def update():
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()

    _, t_opt = _timed(update)
    return {"image_forward": t_image, "text_forward": t_text, "losses": t_loss, "backward": t_backward,
            "optimizer": t_opt}


def tower_backward(student, batch: dict) -> dict[str, float]:
    """Backward of each tower alone (a sum of its output as the loss), to split the whole backward."""
    out = {}
    pixels, ids = student.pixels_from_uint8(batch["pixels"]), batch["input_ids"]
    for name, forward in (("image_backward", lambda: student.encode_image_raw(pixels)),
                          ("text_backward", lambda: student.encode_text_raw(ids))):
        student.zero_grad(set_to_none=True)
        value = forward().square().mean()
        _, out[name] = _timed(value.backward)
    student.zero_grad(set_to_none=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="artifacts/cache/default.zarr")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per preset (after 3 warmup steps)")
    parser.add_argument("--presets", default="mobilevit,vit")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chosen = {name: STUDENT_PRESETS[name] for name in args.presets.split(",")}
    cfg = DistillConfig(store=Path(args.store))
    stream = CacheBatches(cfg.store, cfg.batch_size, 64, cfg.seed, fused=True)
    tokenizer = locate_tokenizer(stream.manifest, stream.store.path)
    dim = int(stream.manifest["integration"]["dim"])
    models = {}
    for name, student_cfg in chosen.items():
        torch.manual_seed(0)
        student_cfg = replace(student_cfg, feature_dims=(dim, dim),
                              context_length=int(stream.manifest["tokenizer"]["context_length"]))
        student = build_student(student_cfg, tokenizer, Path("/tmp/stage2_profile") / name).train()
        models[name] = (student, _optimizer(student, replace(cfg, student=student_cfg))[0])
    batches = stream.iter_from(Position())
    data_seconds, rows = [], {name: [] for name in models}
    for step in range(3 + args.steps):
        (_, batch), seconds = _timed(lambda: next(batches))
        if step >= 3:
            data_seconds.append(seconds)
        for name, (student, optimizer) in models.items():
            split = step_split(student, optimizer, batch, cfg)
            split.update(tower_backward(student, batch))
            if step >= 3:
                rows[name].append(split)
    report = {"store": str(args.store), "batch_size": cfg.batch_size, "steps": args.steps, "threads": args.threads,
              "data_seconds": median(data_seconds), "presets": {}}
    for name, (student, _) in models.items():
        parts = {key: median(r[key] for r in rows[name]) for key in rows[name][0]}
        step = sum(parts[k] for k in ("image_forward", "text_forward", "losses", "backward", "optimizer"))
        report["presets"][name] = {
            "parameters": sum(p.numel() for p in student.clip.parameters()), "step_seconds": step,
            "samples_per_second": cfg.batch_size / (step + report["data_seconds"]), "parts": parts}
    student, optimizer = next(iter(models.values()))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            _, batch = next(batches)
            step_split(student, optimizer, batch, cfg)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "stage2_profile.json", report)
    lines = ["| preset | parameters | step s | samples/s | image fwd | text fwd | losses | backward (image / text "
             "alone) | optimizer |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in report["presets"].items():
        p = row["parts"]
        lines.append(f"| {name} | {row['parameters'] / 1e6:.2f}M | {row['step_seconds']:.3f} | "
                     f"{row['samples_per_second']:.0f} | {p['image_forward']:.3f} | {p['text_forward']:.3f} | "
                     f"{p['losses']:.3f} | {p['backward']:.3f} ({p['image_backward']:.3f} / {p['text_backward']:.3f})"
                     f" | {p['optimizer']:.3f} |")
    text = "\n".join([f"Stage-2 step split, batch {cfg.batch_size}, {args.threads} threads, median of {args.steps} "
                      f"interleaved steps; data (batch assembly) {report['data_seconds']:.3f} s per batch.", "",
                      *lines, "", f"torch.profiler, preset {next(iter(models))}, 3 steps:", "", "```", table, "```", ""])
    atomic_write_bytes(RESULTS / "stage2_profile.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()
