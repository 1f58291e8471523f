"""Both stages on one device at real shapes: samples/s per stage, GPU utilisation, peak memory.

Builds everything it needs in a work directory, offline: a generated world at ``--image-size`` px, a WordPiece
tokenizer, two random-init open_clip CLIPs of ViT-B/16's shape and a random-init BLIP ITM of BLIP-base's
config, saved in the hub layouts `mcad cache` loads. Then it runs the two commands a user runs, through the
CLI, timing each and polling ``nvidia-smi`` while they run:

- stage 1: ``mcad cache --device D --precision amp-bf16 --workers W`` over the train shards;
- stage 2: ``mcad distill --device D --precision amp-bf16`` (the MobileViTv2 student) for ``--steps`` steps.

and writes ``gpu.json`` + ``gpu.md`` into ``--out``. Random weights train and score as fast as trained ones,
so the figures are throughput, not quality. ``--tiny`` shrinks every shape (32 px, one-layer towers) so the
same path runs on a CPU in a minute; that is what the tests run.

    python -m bench.gpu_check [--device cuda] [--samples 4000] [--out bench/results]   # bench/gpu_check.sh
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mcad_core.atomic import atomic_write_bytes, atomic_write_json

NAME = "gpu"
CONTEXT = 32


@dataclass(frozen=True)
class Shapes:
    """Teacher towers and input size: ViT-B/16 and BLIP-base at 224 px, or tiny ones for a CPU check."""

    image_size: int
    clip: tuple[int, int, int, int, int]  # width, layers, heads, embed_dim, patch_size
    blip: tuple[int, int, int, int, int]
    views: int
    batch_size: int
    integration_steps: int  # the cache's integration module (a few hundred steps at real sizes)


REAL = Shapes(image_size=224, clip=(768, 12, 12, 512, 16), blip=(768, 12, 12, 256, 16), views=2, batch_size=256,
              integration_steps=300)
TINY = Shapes(image_size=32, clip=(32, 1, 2, 16, 8), blip=(32, 1, 2, 16, 8), views=2, batch_size=32,
              integration_steps=5)


class GpuPoll:
    """``nvidia-smi`` sampled every ``interval_ms`` in the background: utilisation and memory per sample.

    On a machine without ``nvidia-smi`` it records nothing, and the figures it reports are None.
    """

    def __init__(self, interval_ms: int = 500):
        self.interval_ms = interval_ms
        self.samples: list[tuple[float, float]] = []  # (utilisation %, memory used MiB)
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuPoll:
        if shutil.which("nvidia-smi") is None:
            return self
        self._proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
             f"--loop-ms={self.interval_ms}"], stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 2:
                try:
                    self.samples.append((float(parts[0]), float(parts[1])))
                except ValueError:
                    continue  # "[N/A]" and other non-numbers are not samples

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def figures(self) -> dict:
        if not self.samples:
            return {"gpu_util_mean_pct": None, "gpu_memory_peak_mib": None, "gpu_samples": 0}
        util = [u for u, _ in self.samples]
        return {"gpu_util_mean_pct": round(sum(util) / len(util), 1),
                "gpu_memory_peak_mib": max(m for _, m in self.samples), "gpu_samples": len(self.samples)}


# What the two stages import. On a GPU machine's own python3 (the .venv does not travel) some are missing: named
# here in seconds, instead of in a stage's log after the inputs are built.
STAGE_MODULES = ("torch", "open_clip", "transformers", "timm", "webdataset", "zarr", "numcodecs", "safetensors",
                 "torch.utils.tensorboard", "matplotlib", "click")


def preflight(device: str) -> None:
    """Stop before any work when this Python lacks a module the stages import, or torch cannot use ``device``."""
    import importlib

    missing = []
    for name in STAGE_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as err:
            missing.append(f"{name} ({err})")
    if missing:
        raise SystemExit(f"{sys.executable} cannot import {'; '.join(missing)}: install them (pyproject.toml) or "
                         "point PYTHON at an environment that has them")
    import torch

    place = torch.device(device)
    if place.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"device {device}: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
    if place.type == "cuda" and place.index is not None and place.index >= torch.cuda.device_count():
        raise SystemExit(f"device {device}: torch sees {torch.cuda.device_count()} GPU(s)")


def build_inputs(work: Path, shapes: Shapes, samples: int) -> tuple[Path, Path]:
    """(train shards, teachers dir): a generated world and random-init teachers in the hub layouts."""
    import open_clip
    import torch
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    from mcad_cache.teachers import blip, dual
    from mcad_core.shards import iter_samples, list_shards
    from mcad_world.config import TowerShape
    from mcad_world.configs import IMAGE_MEAN, IMAGE_STD, blip_config, clip_model_cfg, clip_preprocess_cfg
    from mcad_world.synth import WorldConfig, generate
    from mcad_world.tokenizer import train_wordpiece

    data, teachers = work / "data", work / "teachers"
    per_shard = max(samples // 8, 1)
    generate(data, WorldConfig(seed=0, image_size=shapes.image_size, n_train=samples, n_val=1, n_test=per_shard,
                               samples_per_shard=per_shard), progress=False)
    captions = [c for s in iter_samples(list_shards(data / "train")) for c in s.captions]
    train_wordpiece(captions, teachers / "tokenizer", vocab_size=512)
    tok = AutoTokenizer.from_pretrained(str(teachers / "tokenizer"))
    report: dict = {"tokenizer": {"path": "tokenizer"}}
    for seed, name in enumerate(("clip_a", "clip_b")):
        torch.manual_seed(seed)
        cfg = clip_model_cfg(TowerShape(*shapes.clip), shapes.image_size, len(tok), CONTEXT, tok.sep_token_id)
        dual.save_local(open_clip.model.CLIP(**cfg).eval(), cfg, clip_preprocess_cfg(shapes.image_size),
                        teachers / "tokenizer", teachers / name)
        report[name] = {"spec": f"local-dir:{name}", "stream": "dual"}
    torch.manual_seed(2)
    tokens = {"pad": tok.pad_token_id, "cls": tok.cls_token_id, "sep": tok.sep_token_id}
    model = BlipForImageTextRetrieval(blip_config(TowerShape(*shapes.blip), shapes.image_size, len(tok), CONTEXT,
                                                  tokens)).eval()
    blip.save_local(model, teachers / "tokenizer", shapes.image_size, IMAGE_MEAN, IMAGE_STD, teachers / "blip")
    report["blip"] = {"spec": "blip", "stream": "single", "kind": "blip"}
    atomic_write_json(teachers / "teachers.json", report)
    return data / "train", teachers


def timed(cmd: list[str], log: Path) -> float:
    """Wall seconds of ``cmd`` (its output into ``log``); a failure stops the check with the log's tail."""
    start = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(cmd)} exited {rc}:\n{tail}")
    return seconds


def run_check(work: Path, shapes: Shapes, samples: int, steps: int, device: str, workers: int,
              out: Path | None = None) -> dict:
    """Both stages' figures; with ``out``, stage 1's are written to ``out/gpu.json`` as soon as it ends, so that a
    stage 2 that fails or outlasts the check's time limit (which kills it unannounced) leaves them behind."""
    shards, teachers = build_inputs(work, shapes, samples)
    store, run = work / "cache.zarr", work / "run"
    mcad = [sys.executable, "-m", "pipeline.cli"]
    precision = "amp-bf16"
    config = work / "cache_config.json"
    atomic_write_json(config, {"batch_size": shapes.batch_size, "integration_steps": shapes.integration_steps})
    stage1 = mcad + ["cache", "--config", str(config), "--teachers", str(teachers), "--shards", str(shards),
                     "--store", str(store),
                     "--device", device, "--precision", precision, "--workers", str(workers),
                     "--views", str(shapes.views),
                     "--summary-json", str(work / "cache_run.json")]
    stage2 = mcad + ["distill", "--store", str(store), "--out", str(run), "--device", device,
                     "--precision", precision, "--steps", str(steps), "--batch-size", str(shapes.batch_size),
                     "--student", "mobilevit", "--image-lr-scale", "5", "--checkpoint-every", str(steps),
                     "--eval-shards", str(shards.parent / "test"), "--teacher-table", str(work / "none.json")]
    result: dict = {"device": device, "precision": precision, "image_size": shapes.image_size,
                    "teachers": {"clip": shapes.clip, "blip": shapes.blip}, "samples": samples,
                    "views": shapes.views, "batch_size": shapes.batch_size, "workers": workers}
    with GpuPoll() as poll:
        seconds = timed(stage1, work / "stage1.log")
    result["stage1"] = {"seconds": round(seconds, 2), "samples_per_s": round(samples / seconds, 1),
                        "passes": json.loads((work / "cache_run.json").read_text())["summary"]["seconds"],
                        **poll.figures()}
    if out is not None:
        atomic_write_json(out / f"{NAME}.json", result)
    with GpuPoll() as poll:
        seconds = timed(stage2, work / "stage2.log")
    summary = json.loads((run / "summary.json").read_text())
    trained = summary["seconds"]  # the training loop alone (no start-up, no final evaluation)
    result["stage2"] = {"seconds": round(seconds, 2), "train_seconds": trained, "steps": summary["steps"],
                        "samples_per_s": round(summary["steps"] * shapes.batch_size / max(trained, 1e-9), 1),
                        **poll.figures()}
    return result


def markdown(result: dict) -> str:
    lines = [f"device {result['device']}, {result['precision']}, {result['image_size']} px, "
             f"{result['samples']} samples, {result['views']} views, batch {result['batch_size']}", "",
             "| stage | wall s | samples/s | GPU util % | GPU memory peak MiB |", "|---|---:|---:|---:|---:|"]
    for stage in ("stage1", "stage2"):
        row = result[stage]
        lines.append(f"| {stage} | {row['seconds']} | {row['samples_per_s']} | {row['gpu_util_mean_pct']} | "
                     f"{row['gpu_memory_peak_mib']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--samples", type=int, default=4000, help="generated train samples stage 1 caches")
    parser.add_argument("--steps", type=int, default=200, help="stage-2 steps")
    parser.add_argument("--workers", type=int, default=8, help="stage-1 reader processes")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU check of the same path)")
    parser.add_argument("--work", type=Path, default=Path("artifacts/gpu_check"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    preflight(args.device)
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    result = run_check(args.work, TINY if args.tiny else REAL, args.samples, args.steps, args.device, args.workers,
                       args.out)
    atomic_write_json(args.out / f"{NAME}.json", result)
    atomic_write_bytes(args.out / f"{NAME}.md", markdown(result).encode())
    print(markdown(result))


if __name__ == "__main__":
    main()
