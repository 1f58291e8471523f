import json

import pytest
from click.testing import CliRunner

from pipeline.cli import main

COMMANDS = ["data", "teachers", "eval", "cache", "cache-info", "distill"]


@pytest.mark.parametrize("command", [[], *[[c] for c in COMMANDS]])
def test_help_explains_every_command(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    if command:
        # the first docstring line of each command says what it does
        assert len(result.output.split("\n\n")[1].strip()) > 20


def test_cache_without_teachers_names_what_is_missing(tmp_path, tiny_world):
    result = CliRunner().invoke(main, ["cache", "--shards", str(tiny_world / "train"), "--store",
                                       str(tmp_path / "c.zarr"), "--teachers", str(tmp_path / "none")])
    assert result.exit_code == 3
    assert "run `mcad teachers` first" in result.output


def test_cache_rejects_half_explicit_teachers(tmp_path, tiny_world):
    result = CliRunner().invoke(main, ["cache", "--shards", str(tiny_world / "train"), "--single", "x"])
    assert result.exit_code == 2
    assert "explicit teachers need all of dual" in result.output


def test_distill_without_a_store_says_so(tmp_path):
    result = CliRunner().invoke(main, ["distill", "--store", str(tmp_path / "none.zarr"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 3
    assert "no cache store" in result.output


def test_data_rejects_bad_config(tmp_path):
    result = CliRunner().invoke(main, ["data", "--out", str(tmp_path / "w"), "--captions-per-image", "9"])
    assert result.exit_code != 0
    assert "captions_per_image" in result.output


def test_eval_needs_a_model(tiny_world):
    result = CliRunner().invoke(main, ["eval", "--shards", str(tiny_world / "test")])
    assert result.exit_code == 1
    assert "nothing to evaluate" in result.output


def test_eval_reports_missing_teachers(tmp_path, tiny_world):
    result = CliRunner().invoke(main, ["eval", "--shards", str(tiny_world / "test"), "--teachers", str(tmp_path)])
    assert result.exit_code == 1
    assert "run `mcad teachers` first" in result.output


@pytest.mark.slow
def test_teachers_then_eval_end_to_end(tmp_path, tiny_world):
    """The default job's path on a tiny world: train -> saved hub layouts -> eval table + JSON."""
    out = tmp_path / "teachers"
    runner = CliRunner()
    result = runner.invoke(main, ["teachers", "--data", str(tiny_world), "--out", str(out),
                                  "--clip-steps", "2", "--blip-steps", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "teachers.json").read_text())
    assert report["clip_a"]["spec"] == "local-dir:clip_a"  # relative to the teachers directory
    assert (out / "blip" / "model.safetensors").exists()
    assert (out / "clip_a" / "open_clip_model.safetensors").exists()

    out_json = tmp_path / "eval.json"
    result = runner.invoke(main, ["eval", "--teachers", str(out), "--shards", str(tiny_world / "test"),
                                  "--rerank-k", "4", "--out", str(out_json)])
    assert result.exit_code == 0, result.output
    written = json.loads(out_json.read_text())
    assert written["n_images"] == 16
    assert set(written["results"]) == {"clip_a", "clip_b", "blip (itc)", "blip (itm rerank top-4)",
                                         "blip (itm+itc rerank top-4)"}
    for metrics in written["results"].values():
        assert 0.0 <= metrics["i2t_R@1"] <= metrics["i2t_R@5"] <= metrics["i2t_R@10"] <= 100.0
    assert "| clip_a |" in result.output

    clip_a = (out / "clip_a" / "open_clip_model.safetensors").read_bytes()
    result = runner.invoke(main, ["teachers", "--data", str(tiny_world), "--out", str(out), "--only", "blip",
                                  "--blip-steps", "3"])
    assert result.exit_code == 0, result.output
    again = json.loads((out / "teachers.json").read_text())
    assert again["blip"]["steps"] == 3 and again["clip_a"] == report["clip_a"]
    assert (out / "clip_a" / "open_clip_model.safetensors").read_bytes() == clip_a


def test_eval_on_error_policy(tmp_path, tiny_world, tiny_clip):
    """A corrupt image stops eval under raise (naming shard and key) and is skipped and counted under warn."""
    import shutil

    import webdataset as wds

    shards = tmp_path / "test"
    shutil.copytree(tiny_world / "test", shards)
    with wds.TarWriter(str(shards / "00099.tar")) as sink:
        sink.write({"__key__": "999999999", "jpg": b"not a jpeg", "txt": b"a red circle"})
    spec = tiny_clip[1].name
    runner = CliRunner()
    result = runner.invoke(main, ["eval", "--shards", str(shards), "--dual", spec])
    assert result.exit_code == 1
    assert "00099.tar" in result.output and "999999999" in result.output

    out_json = tmp_path / "eval.json"
    result = runner.invoke(main, ["eval", "--shards", str(shards), "--dual", spec, "--on-error", "warn",
                                  "--out", str(out_json)])
    assert result.exit_code == 0, result.output
    written = json.loads(out_json.read_text())
    assert written["skipped"] == {"corrupt_image": 1}
    assert written["n_images"] == 16


def test_the_teacher_table_is_matched_by_the_shard_files_not_how_their_paths_are_written(tmp_path, monkeypatch):
    import json

    from pipeline.cli import _teacher_rows

    (tmp_path / "test").mkdir()
    for name in ("00000.tar", "00001.tar"):
        (tmp_path / "test" / name).write_bytes(b"")
    table = tmp_path / "teachers.json"
    table.write_text(json.dumps({"shards": ["test/00000.tar", "test/00001.tar"], "results": {"clip": {"x": 1}}}))
    monkeypatch.chdir(tmp_path)
    assert _teacher_rows(table, str(tmp_path / "test")) == {"clip": {"x": 1}}  # absolute against relative
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "00000.tar").write_bytes(b"")
    assert _teacher_rows(table, "other") == {}
