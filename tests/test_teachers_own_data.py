"""`mcad teachers` on data the project did not generate, and resuming after a teacher failed."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from mcad_world import train as teacher_train
from mcad_world.negatives import CaptionEdits, edits_from_world
from pipeline.cli import main

FAST = ["--clip-steps", "2", "--blip-steps", "2"]


def _own_world(tmp_path, tiny_world, world_json: dict | None):
    """A copy of the tiny world's train shards with ``world_json`` (or none) beside them."""
    data = tmp_path / "own"
    shutil.copytree(tiny_world / "train", data / "train")
    if world_json is not None:
        (data / "world.json").write_text(json.dumps(world_json))
    return data


def test_edits_come_from_the_worlds_own_description(tiny_world, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    edits, note = edits_from_world(tiny_world, tokenizer)
    assert isinstance(edits, CaptionEdits) and note.startswith("on: 3 word groups")
    red, blue = tokenizer.get_vocab()["red"], tokenizer.get_vocab()["blue"]
    assert int(edits.group_of[red]) == int(edits.group_of[blue]) >= 0


@pytest.mark.parametrize("world_json, reason", [
    (None, "does not exist"),
    ({"config": {}}, "no caption_edits.groups"),
    ({"caption_edits": {"groups": {"colour": ["crimson", "teal"]}, "flips": {}}}, "'crimson' is not a single token"),
    ({"caption_edits": {"groups": {"colour": ["red"]}, "flips": {}}}, "2 or more distinct words"),
])
def test_edits_are_off_with_a_reason_when_the_data_names_none(tmp_path, tiny_world, tokenizer_dir, world_json,
                                                              reason):
    data = _own_world(tmp_path, tiny_world, world_json)
    edits, note = edits_from_world(data, AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    assert edits is None and note.startswith("off:") and reason in note


@pytest.mark.slow
def test_default_options_train_on_a_world_without_edit_words(tmp_path, tiny_world):
    """Another generator's words: BLIP trains without edited negatives and says why, never a crash."""
    data = _own_world(tmp_path, tiny_world, {"caption_edits": {"groups": {"hue": ["crimson", "teal"]}}})
    out = tmp_path / "teachers"
    result = CliRunner().invoke(main, ["teachers", "--data", str(data), "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "teachers.json").read_text())
    assert report["blip_edit_negatives"].startswith("off: caption-edit word 'crimson'")
    assert {"clip_a", "clip_b", "blip"} <= set(report)


@pytest.mark.slow
def test_finished_teachers_survive_a_failure_and_only_resumes(tmp_path, tiny_world, monkeypatch):
    out = tmp_path / "teachers"

    def fail(*args, **kwargs):
        raise RuntimeError("BLIP ran out of memory")

    with monkeypatch.context() as patch:
        patch.setattr(teacher_train, "train_blip", fail)
        result = CliRunner().invoke(main, ["teachers", "--data", str(tiny_world), "--out", str(out), *FAST])
    assert isinstance(result.exception, RuntimeError)
    kept = json.loads((out / "teachers.json").read_text())
    assert {"tokenizer", "clip_a", "clip_b"} <= set(kept) and "blip" not in kept
    clip_a = (out / "clip_a" / "open_clip_model.safetensors").read_bytes()

    result = CliRunner().invoke(main, ["teachers", "--data", str(tiny_world), "--out", str(out), "--only", "blip",
                                       *FAST])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "teachers.json").read_text())
    assert report["clip_a"] == kept["clip_a"] and report["blip"]["steps"] == 2
    assert (out / "clip_a" / "open_clip_model.safetensors").read_bytes() == clip_a


def test_only_refuses_missing_kept_teachers_before_reading_data(tmp_path, tiny_world, monkeypatch):
    out = tmp_path / "teachers"
    (out / "tokenizer").mkdir(parents=True)
    (out / "teachers.json").write_text(json.dumps({"tokenizer": {"path": str(out / "tokenizer")}}))

    def no_read(*args, **kwargs):
        raise AssertionError("the data was read before the check")

    monkeypatch.setattr(teacher_train, "load_split", no_read)
    result = CliRunner().invoke(main, ["teachers", "--data", str(tiny_world), "--out", str(out), "--only", "blip"])
    assert result.exit_code == 2
    assert "keeps clip_a, clip_b" in result.output


@pytest.mark.slow
def test_mixed_image_sizes_train_at_the_most_common_size(tmp_path, tiny_world):
    """img2dataset with resize_mode=no mixes sizes: the odd image is resized, not a reason to stop."""
    import io

    import webdataset as wds
    from PIL import Image

    data = _own_world(tmp_path, tiny_world, None)
    png = io.BytesIO()
    Image.new("RGB", (48, 40), "red").save(png, format="PNG")
    with wds.TarWriter(str(data / "train" / "00099.tar")) as sink:
        sink.write({"__key__": "odd", "png": png.getvalue(), "txt": b"a red square"})
    shards = sorted(str(p) for p in (data / "train").glob("*.tar"))
    assert teacher_train.common_image_size(shards, "raise") == 32
    out = tmp_path / "teachers"
    result = CliRunner().invoke(main, ["teachers", "--data", str(data), "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "teachers.json").read_text())
    assert report["image_size"] == 32 and report["n_train"] == 65
