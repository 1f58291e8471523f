"""How teachers are named: open_clip specs for dual-stream teachers, and teachers.json.

teachers.json is what `mcad teachers` writes and what `mcad cache` / `mcad eval` read
with ``--teachers DIR``: one entry per teacher with its ``spec`` and ``stream``
("dual" or "single"); the single-stream entry also names its ``kind`` (see
mcad_cache/teachers/single.py). The entry's key is the teacher's name in the cache.
"""

from __future__ import annotations

import json
from pathlib import Path

from mcad_cache.teachers.dual import DualTeacherSpec
from mcad_cache.teachers.single import SingleTeacherSpec

REPORT = "teachers.json"


def parse_dual(text: str) -> DualTeacherSpec:
    """'ViT-B-16:openai' -> (name, tag); 'local-dir:/p' and 'hf-hub:org/repo' keep their schema."""
    if text.startswith(("local-dir:", "hf-hub:")):
        return DualTeacherSpec(text)
    name, _, tag = text.partition(":")
    return DualTeacherSpec(name, tag or None)


def load_report(teachers_dir: str | Path) -> dict:
    path = Path(teachers_dir) / REPORT
    if not path.exists():
        raise FileNotFoundError(f"no trained teachers at {teachers_dir} (missing {path.name}); run `mcad teachers` first")
    return json.loads(path.read_text())


def teacher_specs(teachers_dir: str | Path) -> tuple[dict[str, DualTeacherSpec], dict[str, SingleTeacherSpec]]:
    """The dual- and single-stream specs under ``teachers_dir``'s teachers.json, by name, in file order.

    Entries without ``stream`` were written before it existed: a name starting with "blip" is the
    single-stream teacher, every other teacher entry a dual-stream one.
    """
    report = load_report(teachers_dir)
    duals, singles = {}, {}
    for name, entry in report.items():
        if not isinstance(entry, dict) or "spec" not in entry:
            continue  # config, tokenizer, counts
        stream = entry.get("stream") or ("single" if name.startswith("blip") else "dual")
        if stream == "dual":
            duals[name] = DualTeacherSpec(local_spec(entry["spec"], teachers_dir, "local-dir:"))
        elif stream == "single":
            singles[name] = SingleTeacherSpec(local_spec(entry["spec"], teachers_dir), entry.get("kind", "blip"))
        else:
            raise ValueError(f"{teachers_dir}/{REPORT}: teacher {name!r} has unknown stream {stream!r}")
    return duals, singles


def local_spec(spec: str, teachers_dir: str | Path, prefix: str = "") -> str:
    """``spec`` with its local directory found beside teachers.json, so a teachers directory can move.

    ``mcad teachers`` writes each teacher's directory relative to the teachers directory
    (``local-dir:clip_a``, ``blip``). The directory is looked for, in order: relative to
    ``teachers_dir``; as written (an absolute path, or one relative to the working directory,
    as older teachers.json files hold); under ``teachers_dir`` by its last name (a teachers
    directory copied elsewhere with absolute paths inside). A spec that names no existing
    directory (a hub id, ``ViT-B-16:openai``) is returned unchanged.
    """
    if prefix and not spec.startswith(prefix):
        return spec
    path = Path(spec.removeprefix(prefix))
    here = Path(teachers_dir)
    for candidate in (here / path, path, here / path.name):
        if path.name and candidate.is_dir():
            return f"{prefix}{candidate.resolve()}"
    return spec
