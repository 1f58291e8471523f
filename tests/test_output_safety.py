"""`mcad export` / `mcad index` never delete what they did not write, and exports and indexes are
only read inside themselves. Fake exports (an export.json and nothing else) keep these tests fast:
every refusal must come before any encoder is loaded, so the missing ONNX files are never reached."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mcad_core.atomic import OUTPUT_MARKER, OutputDirError, check_output_dir, replace_output_dir
from pipeline.cli import main
from pipeline.search import (
    IndexNotFoundError,
    Searcher,
    UnsafePathError,
    build_index,
    write_index,
)

DIM = 4
EXPORT_ID = "e" * 16


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (``root`` itself included if a file) with its bytes (None: a directory)."""
    if root.is_file():
        return {".": root.read_bytes()}
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _manifest(**text) -> dict:
    return {
        "export_id": EXPORT_ID,
        "embed_dim": DIM,
        "image": {"input": "pixels", "size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        "text": {"input": "input_ids", "context_length": 8, "pad_id": 0, "tokenizer": "tokenizer/tokenizer.json",
                 **text},
        "files": {"image_onnx": "image_encoder.onnx", "text_onnx": "text_encoder.onnx"},
    }


def _fake_export(path: Path, manifest: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "export.json").write_text(json.dumps(manifest or _manifest()))
    (path / OUTPUT_MARKER).write_text(json.dumps({"command": "export"}))
    return path


def _fake_index(path: Path, export_dir: Path, manifest: dict | None = None) -> Path:
    rows = np.eye(DIM, dtype=np.float16)[:3]
    write_index(path, rows, ["a", "b", "c"], export_dir, manifest or _manifest())
    return path


def _fake_student(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "open_clip_config.json").write_text("{}")  # all that export checks before the output
    return path


@pytest.fixture
def shards(tiny_world, tmp_path) -> Path:
    """A private copy of a shard split (a bug here must not delete the session's shared world)."""
    return Path(shutil.copytree(tiny_world / "test", tmp_path / "world" / "test"))


# ------------------------------------------------------------ replace_output_dir


def test_output_is_marked_and_replaces_only_its_own_earlier_output(tmp_path):
    out = tmp_path / "out"
    with replace_output_dir(out, "index") as tmp:
        (tmp / "first.txt").write_text("1")
    assert json.loads((out / OUTPUT_MARKER).read_text())["command"] == "index"
    with replace_output_dir(out, "index") as tmp:
        (tmp / "second.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "second.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no scratch or set-aside copy left


def test_empty_directory_may_be_used(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with replace_output_dir(out, "export") as tmp:
        (tmp / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a"


@pytest.mark.parametrize("kind", ["unrelated", "file", "other_command", "garbled_marker"])
def test_anything_else_is_refused_and_left_untouched(tmp_path, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("precious")
    else:
        out.mkdir()
        (out / "thesis.tex").write_text("precious")
        if kind == "other_command":
            (out / OUTPUT_MARKER).write_text(json.dumps({"command": "export"}))
        elif kind == "garbled_marker":
            (out / OUTPUT_MARKER).write_text("{not json")
    before = _tree(tmp_path)
    with pytest.raises(OutputDirError, match="choose another --out|Choose a new or empty --out") as err:
        with replace_output_dir(out, "index"):
            raise AssertionError("the block must not run")
    if kind == "other_command":
        assert "output of `mcad export`" in str(err.value)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("relation", ["is", "contains", "is inside"])
def test_output_overlapping_an_input_is_refused(tmp_path, relation):
    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    (data / "00000.tar").write_bytes(b"shard")
    out = {"is": data, "contains": tmp_path / "data", "is inside": data / "index"}[relation]
    before = _tree(tmp_path)
    with pytest.raises(OutputDirError, match=f"{relation} the input"):
        check_output_dir(out, "index", [data])
    # An earlier output of the same command does not make an overlap acceptable.
    if relation == "contains":
        (out / OUTPUT_MARKER).write_text(json.dumps({"command": "index"}))
        before = _tree(tmp_path)
        with pytest.raises(OutputDirError, match="contains the input"):
            check_output_dir(out, "index", [data / "00000.tar"])
    assert _tree(tmp_path) == before


def test_a_failed_write_keeps_the_earlier_output(tmp_path):
    out = tmp_path / "out"
    with replace_output_dir(out, "index") as tmp:
        (tmp / "old.txt").write_text("old")
    before = _tree(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with replace_output_dir(out, "index") as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert _tree(tmp_path) == before


def test_an_output_that_changed_during_the_work_is_not_replaced(tmp_path):
    """Checked again just before the swap: a user's file that appeared meanwhile is not deleted."""
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OutputDirError):
        with replace_output_dir(out, "index") as tmp:
            (tmp / "new.txt").write_text("new")
            (out / "notes.txt").write_text("written meanwhile")
    assert _tree(tmp_path) == {"out": None, "out/notes.txt": b"written meanwhile"}


# ----------------------------------------------------------------- mcad index


@pytest.mark.parametrize("target", ["shards", "world", "export", "unrelated", "export_output", "file"])
def test_cli_index_refuses_an_out_it_would_destroy(tmp_path, shards, target):
    export = _fake_export(tmp_path / "export")
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "photos.txt").write_text("precious")
    _fake_export(tmp_path / "export_output")
    (tmp_path / "file").write_text("precious")
    out = {"shards": shards, "world": shards.parent, "export": export}.get(target, tmp_path / target)
    before = _tree(tmp_path)
    result = CliRunner().invoke(main, ["index", "--export", str(export), "--shards", str(shards),
                                       "--out", str(out)])
    assert result.exit_code == 3, result.output
    assert "error: output directory" in result.output  # refused before the (missing) encoder was needed
    assert _tree(tmp_path) == before


def test_index_refuses_an_out_that_contains_its_inputs(tmp_path, shards):
    export = _fake_export(tmp_path / "export")
    shard = sorted(shards.glob("*.tar"))[0]
    before = _tree(tmp_path)
    with pytest.raises(OutputDirError, match="contains the input"):  # a shard named as a file
        build_index(export, str(shard), shards.parent, progress=False)
    with pytest.raises(OutputDirError, match="contains the input"):  # the export, through write_index
        write_index(tmp_path, np.zeros((0, DIM), np.float16), [], export, _manifest())
    assert _tree(tmp_path) == before


def test_write_index_replaces_an_earlier_index_only(tmp_path):
    export = _fake_export(tmp_path / "export")
    index = _fake_index(tmp_path / "index", export)
    (index / "stale.txt").write_text("x")
    _fake_index(index, export)
    assert not (index / "stale.txt").exists()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("precious")
    with pytest.raises(OutputDirError, match=f"no {OUTPUT_MARKER}"):
        _fake_index(notes, export)
    assert _tree(notes) == {"a.txt": b"precious"}
    with pytest.raises(OutputDirError, match="output of `mcad index`"):
        check_output_dir(index, "export")


# ---------------------------------------------------------------- mcad export


@pytest.mark.parametrize("target", ["unrelated", "file", "index_output", "student", "around", "inside"])
def test_cli_export_refuses_an_out_it_would_destroy(tmp_path, target):
    student = _fake_student(tmp_path / "run" / "student")
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "photos.txt").write_text("precious")
    (tmp_path / "file").write_text("precious")
    _fake_index(tmp_path / "index_output", _fake_export(tmp_path / "export"))
    out = {"student": student, "around": student.parent, "inside": student / "export"}.get(target, tmp_path / target)
    before = _tree(tmp_path)
    result = CliRunner().invoke(main, ["export", "--student", str(student), "--out", str(out)])
    assert result.exit_code == 3, result.output
    assert "error: output directory" in result.output  # before the (fake) student was loaded
    assert _tree(tmp_path) == before


# ------------------------------------------------- paths read from exports and indexes


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret.json"
    path.write_text('{"version": "1.0", "model": "not yours"}')
    return path


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_tokenizer_path_out_of_the_export_is_refused(tmp_path, secret, how):
    export = tmp_path / "export"
    if how == "symlink":
        _fake_export(export)
        (export / "tokenizer").mkdir()
        (export / "tokenizer" / "tokenizer.json").symlink_to(secret)
    else:
        name = "../" * 8 + str(secret).lstrip("/") if how == "dotdot" else str(secret)
        _fake_export(export, _manifest(tokenizer=name))
    index = _fake_index(tmp_path / "index", export)
    with pytest.raises(UnsafePathError, match="leads outside"):
        Searcher(index)
    result = CliRunner().invoke(main, ["search", "--index", str(index), "--query", "x"])
    assert result.exit_code == 3 and "leads outside" in result.output


def test_onnx_paths_out_of_the_export_are_refused(tmp_path, shards, secret):
    manifest = _manifest()
    manifest["files"] = {"image_onnx": "../secret.json", "text_onnx": str(secret)}
    export = _fake_export(tmp_path / "export", manifest)
    with pytest.raises(UnsafePathError, match="files.image_onnx"):
        build_index(export, shards, tmp_path / "index", progress=False)
    assert not (tmp_path / "index").exists()
    (export / "tokenizer").mkdir()
    (export / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(UnsafePathError, match="files.text_onnx"):
        Searcher(_fake_index(tmp_path / "index", export, manifest))


def test_export_module_refuses_escaping_manifest_paths(tmp_path, secret):
    from pipeline.export import ExportPathError, check_export, read_manifest

    manifest = _manifest(tokenizer="../secret.json")
    export = _fake_export(tmp_path / "export", manifest)
    with pytest.raises(ExportPathError, match="text.tokenizer|tokenizer_json"):
        read_manifest(export)
    manifest = _manifest()
    manifest["files"]["open_clip"] = "/"
    (export / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportPathError, match="'open_clip'"):
        check_export(export)


def test_index_files_out_of_the_index_are_refused(tmp_path, secret):
    export = _fake_export(tmp_path / "export")
    index = _fake_index(tmp_path / "index", export)
    outside = tmp_path / "elsewhere.npy"
    (index / "embeddings.npy").rename(outside)
    (index / "embeddings.npy").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="embeddings.npy"):
        Searcher(index)


def test_the_recorded_export_must_be_an_absolute_export_directory(tmp_path):
    export = _fake_export(tmp_path / "export")
    index = _fake_index(tmp_path / "index", export)
    record = json.loads((index / "index.json").read_text())
    for crafted in ("../export", None, 7):
        (index / "index.json").write_text(json.dumps({**record, "export_dir": crafted}))
        with pytest.raises(UnsafePathError, match="not an absolute directory"):
            Searcher(index)
    # Elsewhere is allowed (an export lives anywhere), but it is read as an export only.
    (index / "index.json").write_text(json.dumps({**record, "export_dir": str(tmp_path / "index")}))
    with pytest.raises(IndexNotFoundError, match="not an export directory"):
        Searcher(index)
