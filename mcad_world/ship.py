"""Pack a trained teachers directory for shipping: float16 safetensors, specs relative to the directory.

The default world's strong teachers take longer to train on 2 CPU cores than a quickstart
allows, so they are trained once (`make teachers-train`), packed with this module and
committed under ``teachers/default``; `make teachers` then only checks them. The loaders
read the float16 files into float32 models (open_clip's ``load_state_dict`` casts;
``BlipItmTeacher.load`` asks transformers for float32), so nothing else changes.

    python -m mcad_world.ship artifacts/teachers_strong teachers/default
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mcad_cache.teachers.specs import REPORT, load_report
from mcad_core.atomic import atomic_dir

SHIPPED_DTYPE = torch.float16


def _pack_weights(src: Path, dst: Path) -> None:
    """``src`` (a safetensors file) with its floating tensors in float16, written to ``dst``."""
    tensors = load_file(str(src))
    save_file({k: (v.to(SHIPPED_DTYPE) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()},
              str(dst), metadata={"format": "pt"})


def _copy_teacher(src: Path, dst: Path) -> None:
    dst.mkdir()
    for item in sorted(src.iterdir()):
        if item.suffix == ".safetensors":
            _pack_weights(item, dst / item.name)
        elif item.is_file():
            shutil.copy2(item, dst / item.name)
        else:
            shutil.copytree(item, dst / item.name)


def ship_teachers(src: str | Path, dst: str | Path) -> dict:
    """Write ``dst``: every teacher of ``src``'s teachers.json in float16, its tokenizer, and a teachers.json
    whose specs are relative to ``dst``. Returns the written teachers.json; ``dst`` appears whole or not at all."""
    src, dst = Path(src), Path(dst)
    report = load_report(src)
    names = [name for name, entry in report.items() if isinstance(entry, dict) and "spec" in entry]
    missing = [name for name in names if not (src / name).is_dir()]
    if missing or not (src / "tokenizer").is_dir():
        raise FileNotFoundError(f"{src} lacks {missing or ['tokenizer']}: ship a complete `mcad teachers` output")
    if dst.exists() and not (dst / REPORT).is_file():
        raise FileExistsError(f"{dst} exists and is not a teachers directory: choose another destination")
    with atomic_dir(dst) as tmp:
        shutil.copytree(src / "tokenizer", tmp / "tokenizer")
        for name in names:
            _copy_teacher(src / name, tmp / name)
            report[name]["spec"] = f"local-dir:{name}" if report[name].get("stream", "dual") == "dual" else name
        report["tokenizer"]["path"] = "tokenizer"
        report["shipped"] = {"dtype": str(SHIPPED_DTYPE).removeprefix("torch."),
                             "bytes": sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())}
        (tmp / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python -m mcad_world.ship SRC_TEACHERS_DIR DST_DIR")
    report = ship_teachers(*argv)
    print(f"shipped {argv[0]} -> {argv[1]}: {report['shipped']['bytes'] / 1e6:.1f} MB ({report['shipped']['dtype']})")


if __name__ == "__main__":
    main(sys.argv[1:])
