"""Export (open_clip, TorchScript, ONNX), index and torch-free search, on a tiny random student."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import open_clip
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from transformers import AutoTokenizer

from mcad_student.model import StudentConfig, build_student, load_student, save_student
from mcad_core.atomic import OUTPUT_MARKER
from pipeline.cli import main
from pipeline.export import (
    EXPORT_JSON,
    IMAGE_ONNX,
    IMAGE_TS,
    TEXT_ONNX,
    TEXT_TS,
    ExportError,
    ExportMismatchError,
    check_export,
    export_student,
)
from pipeline.search import (
    EMBEDDINGS,
    IndexMismatchError,
    IndexNotFoundError,
    Searcher,
    build_index,
    half_to_float32,
    load_tokenizer,
    ort_session,
    write_index,
)
from mcad_core.shards import list_shards, load_split

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
TINY = StudentConfig(image_model="test_convnext", image_size=SIZE, text_layers=1, text_width=32, text_heads=2,
                     text_intermediate=64, embed_dim=16, context_length=16)
TEXTS = ["a red circle left of a blue square", "", "A BIG Green Triangle, above; a star!?",
         " ".join(["a small yellow square below a large blue circle"] * 5), "zebra océan 42 ##x [PAD] [UNK]"]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer_dir) -> Path:
    torch.manual_seed(0)
    student = build_student(TINY, tokenizer_dir, tmp_path_factory.mktemp("work")).eval()
    out = tmp_path_factory.mktemp("student") / "student"
    save_student(student, tokenizer_dir, out)
    return out


@pytest.fixture(scope="module")
def student(student_dir):
    return load_student(student_dir).eval()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, student_dir) -> Path:
    out = tmp_path_factory.mktemp("export") / "export"
    export_student(student_dir, out, batch=5)
    return out


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, export_dir, tiny_world) -> Path:
    out = tmp_path_factory.mktemp("index") / "index"
    build_index(export_dir, tiny_world / "test", out, batch=5, threads=1, progress=False)
    return out


def _hf_ids(student_dir, texts, length=TINY.context_length) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(str(student_dir))
    return tok(list(texts), padding="max_length", truncation=True, max_length=length, return_tensors="pt").input_ids


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_round_trip(student, student_dir, export_dir):
    manifest = json.loads((export_dir / EXPORT_JSON).read_text())
    assert manifest["embed_dim"] == 16 and manifest["text"]["context_length"] == 16
    assert manifest["text"]["pad_id"] == 0 and manifest["image"]["size"] == SIZE
    assert manifest["image"]["mean"] == student.preprocess_cfg["mean"]
    assert manifest["image"]["std"] == student.preprocess_cfg["std"]
    assert manifest["versions"]["onnxruntime"] and manifest["versions"]["torch"]
    check = manifest["check"]
    assert check["atol"] == 1e-4 and check["tokenizer_ids_match"]
    assert all(d <= 1e-4 for row in check["max_abs_diff"].values() for d in row.values())
    assert (export_dir / "tokenizer" / "tokenizer.json").is_file()

    # Fresh inputs (another batch size than the trace and the check): every backend equals torch.
    pixels = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    ids = _hf_ids(student_dir, TEXTS)
    with torch.no_grad():
        ref_image, ref_text = student.encode_image(pixels), student.encode_text(ids)
        clip, _, _ = open_clip.create_model_and_transforms("local-dir:" + str(export_dir / "open_clip"))
        clip.eval()
        assert torch.allclose(clip.encode_image(pixels, normalize=True), ref_image, atol=1e-5)
        assert torch.allclose(clip.encode_text(ids, normalize=True), ref_text, atol=1e-5)
        image_ts, text_ts = torch.jit.load(str(export_dir / IMAGE_TS)), torch.jit.load(str(export_dir / TEXT_TS))
        assert torch.allclose(image_ts(pixels), ref_image, atol=1e-4)
        assert torch.allclose(text_ts(ids), ref_text, atol=1e-4)
    image_ort, text_ort = ort_session(export_dir / IMAGE_ONNX), ort_session(export_dir / TEXT_ONNX)
    assert np.allclose(image_ort.run(None, {"pixels": pixels.numpy()})[0], ref_image.numpy(), atol=1e-4)
    assert np.allclose(text_ort.run(None, {"input_ids": ids.numpy()})[0], ref_text.numpy(), atol=1e-4)


def test_padding_is_masked_in_the_exported_text_graph(export_dir, student_dir):
    """Same caption, one row padded to the context and one fed without pads: the pad mask is in the graph."""
    session = ort_session(export_dir / TEXT_ONNX)
    ids = _hf_ids(student_dir, ["a red circle"]).numpy()
    filler = ids.copy()
    filler[ids == 0] = 5  # non-pad tokens in the padded positions change the embedding ...
    out = session.run(None, {"input_ids": np.concatenate([ids, filler])})[0]
    assert not np.allclose(out[0], out[1], atol=1e-3)  # ... so padding is what the graph ignores


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_impossible_tolerance_raises_and_leaves_out_untouched(student_dir, export_dir, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(export_dir, out)  # an earlier export: the one kind of directory export may replace
    (out / "keep.txt").write_text("old")
    before = _tree(out)
    with pytest.raises(ExportMismatchError, match="atol=-1"):
        export_student(student_dir, out, batch=2, atol=-1.0)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no scratch copy left beside it


def test_export_replaces_an_earlier_export(student_dir, export_dir, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(export_dir, out)
    (out / "stale.txt").write_text("from the earlier export")
    manifest = export_student(student_dir, out, batch=2)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / OUTPUT_MARKER).read_text())["command"] == "export"
    assert json.loads((out / EXPORT_JSON).read_text())["export_id"] == manifest["export_id"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_tampered_onnx_fails_the_check(export_dir, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    model = onnx.load(str(copy / TEXT_ONNX))
    largest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(largest)
    largest.CopyFrom(numpy_helper.from_array((weights * 1.5 + 0.01).astype(weights.dtype), largest.name))
    onnx.save(model, str(copy / TEXT_ONNX))
    with pytest.raises(ExportMismatchError, match="onnxruntime text"):
        check_export(copy)


def test_not_a_student_is_a_named_error(tmp_path):
    with pytest.raises(ExportError, match="not a saved student"):
        export_student(tmp_path, tmp_path / "out")


def test_tokenizers_ids_equal_hf_ids(export_dir, student_dir):
    manifest = json.loads((export_dir / EXPORT_JSON).read_text())
    fast = load_tokenizer(export_dir / "tokenizer" / "tokenizer.json", manifest)
    ids = [e.ids for e in fast.encode_batch(TEXTS)]
    assert ids == _hf_ids(student_dir, TEXTS).tolist()
    assert all(len(row) == 16 for row in ids)


def test_index_rows_are_the_student_image_embeddings(index_dir, student, tiny_world):
    split = load_split(list_shards(tiny_world / "test"), image_size=SIZE)
    index = json.loads((index_dir / "index.json").read_text())
    assert index["count"] == len(split) == 16 and index["embed_dim"] == 16
    searcher = Searcher(index_dir)
    assert [searcher.key(i) for i in range(len(searcher))] == split.keys
    with torch.no_grad():
        ref = student.encode_image(student.pixels_from_uint8(split.images)).numpy()
    gallery = np.load(index_dir / EMBEDDINGS)
    assert gallery.dtype == np.float16
    assert np.abs(gallery.astype(np.float32) - ref).max() < 2e-3  # float16 storage


def test_search_equals_brute_force(index_dir, student, student_dir):
    searcher = Searcher(index_dir)
    gallery = np.load(index_dir / EMBEDDINGS).astype(np.float32)
    for text in TEXTS[:3]:
        query = searcher.encode(text)
        with torch.no_grad():
            ref = student.encode_text(_hf_ids(student_dir, [text]))[0].numpy()
        assert np.allclose(query, ref, atol=1e-4)
        brute = gallery @ query
        hits = searcher.query(text, k=5)
        assert [h.row for h in hits] == list(np.argsort(-brute, kind="stable")[:5])
        assert hits[0].key == searcher.key(int(np.argmax(brute)))
        assert np.allclose([h.score for h in hits], np.sort(brute)[::-1][:5], atol=1e-5)
        other = Searcher(index_dir, scorer="onnxruntime", chunk_rows=3).query(text, k=5)
        assert [h.row for h in other] == [h.row for h in hits]
    assert len(searcher.query("a", k=100)) == 16  # k above the gallery size: everything, ranked


def test_search_finds_the_image_whose_caption_is_queried(index_dir, export_dir, tmp_path):
    """A separable gallery: row i is the embedding of caption i, so caption i must rank row i first."""
    searcher = Searcher(index_dir)
    captions = ["a red circle", "a blue square above a star", "green triangles", "one yellow hexagon left"]
    rows = np.stack([searcher.encode(c) for c in captions])
    manifest = json.loads((export_dir / EXPORT_JSON).read_text())
    write_index(tmp_path / "sep", rows, [f"img{i}" for i in range(4)], export_dir, manifest)
    separable = Searcher(tmp_path / "sep", chunk_rows=3)
    for i, caption in enumerate(captions):
        hits = separable.query(caption, k=4)
        assert hits[0].key == f"img{i}" and hits[0].score == pytest.approx(1.0, abs=2e-3)


def test_half_to_float32_is_exact_for_every_finite_half():
    half = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    half = half[np.isfinite(half)].reshape(1, -1)
    got = half_to_float32(half, np.empty(half.shape, np.int32))
    assert np.array_equal(got.view(np.uint32), half.astype(np.float32).view(np.uint32))


def test_search_imports_neither_torch_nor_transformers(index_dir):
    code = (
        "import sys\n"
        "from pipeline.search import Searcher\n"
        f"hits = Searcher({str(index_dir)!r}).query('a red circle', 3)\n"
        f"hits += Searcher({str(index_dir)!r}, scorer='onnxruntime').query_batch(['a red circle'], 3)[0]\n"
        "from pipeline.cli import main\n"
        f"main(['search', '--index', {str(index_dir)!r}, '--query', 'a square', '--json'], standalone_mode=False)\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'timm', 'open_clip'})\n"
        "print('HEAVY', heavy, len(hits), 'faiss' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY [] 6 True" in out.stdout  # the default scorer is faiss's: it loads no torch either
    assert json.loads(out.stdout.splitlines()[0])["query"] == "a square"


@pytest.mark.parametrize("command,options", [("export", ["--student", "--out", "--batch", "--atol"]),
                                             ("index", ["--export", "--shards", "--out", "--batch"]),
                                             ("search", ["--index", "--query", "-k", "--json"])])
def test_help(command, options):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert all(option in result.output for option in options)


def test_cli_index_and_search(export_dir, tiny_world, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["index", "--export", str(export_dir), "--shards", str(tiny_world / "val"),
                                  "--out", str(tmp_path / "idx"), "--batch", "7"])
    assert result.exit_code == 0, result.output
    assert "indexed 16 images" in result.output
    result = runner.invoke(main, ["search", "--index", str(tmp_path / "idx"), "--query", "a red circle", "-k", "4",
                                  "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["results"]) == 4
    assert json.loads((tmp_path / "idx" / OUTPUT_MARKER).read_text())["command"] == "index"
    # An earlier index is replaced by the same command.
    result = runner.invoke(main, ["index", "--export", str(export_dir), "--shards", str(tiny_world / "test"),
                                  "--out", str(tmp_path / "idx")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["shards"] == list_shards(tiny_world / "test")


def test_cli_export_mismatch_exits_3(student_dir, tmp_path):
    result = CliRunner().invoke(main, ["export", "--student", str(student_dir), "--out", str(tmp_path / "e"),
                                       "--batch", "2", "--atol", "-1"])
    assert result.exit_code == 3
    assert "error:" in result.output and "atol=-1" in result.output
    assert not (tmp_path / "e").exists()


def test_bad_inputs_are_named_errors(export_dir, index_dir, tiny_world, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["index", "--export", str(tmp_path / "missing"), "--shards",
                                  str(tiny_world / "test"), "--out", str(tmp_path / "idx")])
    assert result.exit_code == 3 and "not an export directory" in result.output
    with pytest.raises(IndexNotFoundError):
        Searcher(tmp_path / "nothing")
    result = runner.invoke(main, ["search", "--index", str(tmp_path / "nothing"), "--query", "x"])
    assert result.exit_code == 3 and "not an index directory" in result.output

    # An index used with another export.
    other = tmp_path / "other_export"
    shutil.copytree(export_dir, other)
    manifest = json.loads((other / EXPORT_JSON).read_text())
    manifest["export_id"] = "0" * 16
    (other / EXPORT_JSON).write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match="built with export"):
        Searcher(index_dir, export_dir=other)

    # Embeddings of another width than the export's.
    wide = tmp_path / "wide"
    shutil.copytree(index_dir, wide)
    np.save(wide / EMBEDDINGS, np.zeros((16, 17), np.float16))
    with pytest.raises(IndexMismatchError, match="embeddings"):
        Searcher(wide)
    with pytest.raises(IndexMismatchError):
        write_index(tmp_path / "w", np.zeros((2, 17), np.float16), ["a", "b"], export_dir, manifest)
