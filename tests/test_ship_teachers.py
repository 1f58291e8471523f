"""Teachers directories that move and ship: relative specs, float16 weights read back as float32."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mcad_cache.teachers.dual import DualStreamTeacher
from mcad_cache.teachers.single import load_single
from mcad_cache.teachers.specs import teacher_specs
from mcad_world.ship import ship_teachers


def _teachers_dir(root, tiny_clip, tiny_clip_b, tiny_blip, tokenizer_dir, specs):
    """A teachers directory holding copies of the fixtures' teachers, with teachers.json ``specs``."""
    out = root / "teachers"
    out.mkdir()
    shutil.copytree(tokenizer_dir, out / "tokenizer")
    for name, spec in (("clip_a", tiny_clip[1]), ("clip_b", tiny_clip_b[1])):
        shutil.copytree(spec.name.removeprefix("local-dir:"), out / name)
    shutil.copytree(tiny_blip[1].name, out / "blip")
    report = {"tokenizer": {"path": "tokenizer"},
              "clip_a": {"spec": specs["clip_a"], "stream": "dual"},
              "clip_b": {"spec": specs["clip_b"], "stream": "dual"},
              "blip": {"spec": specs["blip"], "stream": "single", "kind": "blip"}}
    (out / "teachers.json").write_text(json.dumps(report))
    return out


def test_relative_and_stale_absolute_specs_resolve_beside_teachers_json(tmp_path, tiny_clip, tiny_clip_b,
                                                                       tiny_blip, tokenizer_dir):
    specs = {"clip_a": "local-dir:clip_a",  # what `mcad teachers` writes now
             "clip_b": "local-dir:/gone/elsewhere/clip_b",  # a copied directory's old absolute path
             "blip": "blip"}
    out = _teachers_dir(tmp_path, tiny_clip, tiny_clip_b, tiny_blip, tokenizer_dir, specs)
    moved = shutil.move(str(out), str(tmp_path / "moved"))
    duals, singles = teacher_specs(moved)
    assert duals["clip_a"].name == f"local-dir:{(tmp_path / 'moved' / 'clip_a').resolve()}"
    assert duals["clip_b"].name == f"local-dir:{(tmp_path / 'moved' / 'clip_b').resolve()}"
    assert singles["blip"].name == str((tmp_path / "moved" / "blip").resolve())
    # A hub id stays a hub id.
    (tmp_path / "moved" / "teachers.json").write_text(json.dumps(
        {"clip_a": {"spec": "ViT-B-16:openai", "stream": "dual"}}))
    duals, _ = teacher_specs(moved)
    assert duals["clip_a"].name == "ViT-B-16:openai"


def test_shipped_teachers_are_float16_on_disk_and_load_as_float32(tmp_path, tiny_clip, tiny_clip_b, tiny_blip,
                                                                 tokenizer_dir):
    absolute = {"clip_a": tiny_clip[1].name, "clip_b": tiny_clip_b[1].name, "blip": tiny_blip[1].name}
    src = _teachers_dir(tmp_path, tiny_clip, tiny_clip_b, tiny_blip, tokenizer_dir, absolute)
    report = ship_teachers(src, tmp_path / "shipped")
    assert report["clip_a"]["spec"] == "local-dir:clip_a" and report["blip"]["spec"] == "blip"
    weights = load_file(str(tmp_path / "shipped" / "clip_a" / "open_clip_model.safetensors"))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float16}
    assert report["shipped"]["bytes"] < sum(f.stat().st_size for f in src.rglob("*") if f.is_file())

    moved = shutil.move(str(tmp_path / "shipped"), str(tmp_path / "elsewhere"))
    duals, singles = teacher_specs(moved)
    clip = DualStreamTeacher.load(duals["clip_a"])
    original = tiny_clip[0].state_dict()
    for name, value in clip.model.state_dict().items():
        assert value.dtype == original[name].dtype == torch.float32
        torch.testing.assert_close(value, original[name].half().float(), rtol=0, atol=0)
    single = load_single(singles["blip"])
    assert {p.dtype for p in single.model.parameters()} == {torch.float32}
    blip_original = tiny_blip[0].state_dict()
    for name, value in single.model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, blip_original[name].half().float(), rtol=0, atol=0)


def test_ship_refuses_a_destination_that_is_not_a_teachers_directory(tmp_path, tiny_clip, tiny_clip_b, tiny_blip,
                                                                    tokenizer_dir):
    src = _teachers_dir(tmp_path, tiny_clip, tiny_clip_b, tiny_blip, tokenizer_dir,
                        {"clip_a": "local-dir:clip_a", "clip_b": "local-dir:clip_b", "blip": "blip"})
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a teachers directory"):
        ship_teachers(src, tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
