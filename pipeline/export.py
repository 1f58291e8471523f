"""Export a trained student for serving: open_clip checkpoint, TorchScript and ONNX encoders, tokenizer.

Layout of ``OUT`` (see ``export.json`` for the numbers)::

    open_clip/                       the student: ``open_clip.create_model_and_transforms("local-dir:OUT/open_clip")``
    image_encoder.torchscript.pt     float32 (B, 3, S, S) normalized pixels -> (B, D) L2-normalized embeddings
    text_encoder.torchscript.pt      int64 (B, context_length) token ids -> (B, D) L2-normalized embeddings
    image_encoder.onnx (+ .data)     the same two graphs for onnxruntime, dynamic batch axis; weights in the
    text_encoder.onnx (+ .data)      .data files beside them (onnxruntime maps them instead of copying: less RSS)
    tokenizer/                       the student's tokenizer (tokenizer.json: what ``pipeline.search`` reads)
    export.json                      preprocessing, context length, pad id, measured max diffs, tolerance, versions
    .mcad-output.json                marks OUT as written by ``mcad export``: only such a directory is replaced

Every path ``export.json`` names is relative to ``OUT`` and must stay inside it (``read_manifest`` checks).

Pixels: RGB resized (bicubic) to S x S, ``x / 255``, then ``(x - mean) / std`` per channel. Text: the
tokenizer's ids padded with ``pad_id`` and truncated to exactly ``context_length``; the text graphs mask
positions equal to ``pad_id``, exactly as open_clip's HF text tower does.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import shutil
import warnings
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcad_core.atomic import check_output_dir, replace_output_dir
from pipeline.search import resolve_inside

EXPORT_JSON = "export.json"
OPEN_CLIP_DIR = "open_clip"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_JSON = "tokenizer.json"
IMAGE_TS, TEXT_TS = "image_encoder.torchscript.pt", "text_encoder.torchscript.pt"
IMAGE_ONNX, TEXT_ONNX = "image_encoder.onnx", "text_encoder.onnx"
FILES = {"open_clip": OPEN_CLIP_DIR, "image_torchscript": IMAGE_TS, "text_torchscript": TEXT_TS,
         "image_onnx": IMAGE_ONNX, "text_onnx": TEXT_ONNX, "tokenizer": TOKENIZER_DIR}  # export.json "files"
DEFAULT_ATOL = 1e-4  # max |difference| of L2-normalized embeddings, torch vs TorchScript vs onnxruntime
ONNX_OPSET = 17
ONNX_DATA = ".data"  # suffix of an ONNX file's external weights
FORMAT = 1
# Check captions: one longer than any context (truncated, no padding), one empty, the rest padded.
PROBE_TEXTS = (
    " ".join(["a large red circle left of a small blue square above a green triangle"] * 4),
    "",
    "a red circle left of a blue square",
    "A Small GREEN triangle below a yellow star, next to a purple hexagon!",
    "two blue squares",
    "zebra océan 42 ~~ unknownword",
    "a big yellow circle right of a small red triangle",
    "green",
)
VERSIONED = ("torch", "onnx", "onnxruntime", "open_clip_torch", "timm", "transformers", "tokenizers", "numpy")


class ExportError(RuntimeError):
    """The student cannot be exported (or an export directory is incomplete)."""


class ExportMismatchError(ExportError):
    """An exported encoder disagrees with the torch student by more than the tolerance."""


class ExportPathError(ExportError):
    """A path in an export leads outside the export directory (a corrupt or crafted ``export.json``)."""


class ImageEncoder(nn.Module):
    """Normalized pixels -> L2-normalized image embeddings (``Student.encode_image``)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.visual = clip.visual

    def forward(self, pixels: Tensor) -> Tensor:
        return F.normalize(self.visual(pixels), dim=-1)


class TextEncoder(nn.Module):
    """Token ids -> L2-normalized text embeddings (``Student.encode_text``; the mask is ``ids != pad_id``)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.text = clip.text

    def forward(self, input_ids: Tensor) -> Tensor:
        return F.normalize(self.text(input_ids), dim=-1)


def export_student(student_dir: str | Path, out_dir: str | Path, batch: int = 8,
                   atol: float = DEFAULT_ATOL) -> dict:
    """Write the export of ``student_dir`` to ``out_dir`` and return its manifest.

    Everything is written to a scratch directory and checked there (torch vs TorchScript vs
    onnxruntime on a batch of ``batch`` inputs); ``out_dir`` is replaced only if every max
    abs difference is within ``atol``, else ``ExportMismatchError`` and ``out_dir`` is untouched.
    An existing ``out_dir`` must be empty or an earlier export, and must keep clear of the
    student: else ``OutputDirError`` before any work.
    """
    from mcad_student.model import OPEN_CLIP_CONFIG, load_student, relocate_student

    student_dir = Path(str(student_dir).removeprefix("local-dir:")).resolve()
    out_dir = Path(out_dir).resolve()
    if not (student_dir / OPEN_CLIP_CONFIG).is_file():
        raise ExportError(f"{student_dir} is not a saved student (no {OPEN_CLIP_CONFIG})")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    check_output_dir(out_dir, "export", [student_dir])  # refused before anything slow, transformers' import too
    from transformers import AutoTokenizer

    with replace_output_dir(out_dir, "export", [student_dir]) as tmp:
        shutil.copytree(student_dir, tmp / OPEN_CLIP_DIR)
        student = load_student(tmp / OPEN_CLIP_DIR).eval()
        hf_tok = AutoTokenizer.from_pretrained(str(student_dir))
        hf_tok.save_pretrained(str(tmp / TOKENIZER_DIR))
        manifest = _manifest(student, hf_tok, student_dir)
        if not (tmp / TOKENIZER_DIR / TOKENIZER_JSON).is_file():
            raise ExportError(f"the tokenizer of {student_dir} has no fast {TOKENIZER_JSON}")
        _write_encoders(student, hf_tok, tmp)
        manifest["export_id"] = _export_id(tmp)
        manifest["check"] = check_export(tmp, atol, batch, student=student, manifest=manifest)
        (tmp / EXPORT_JSON).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    relocate_student(out_dir / OPEN_CLIP_DIR)  # absolute paths of the final place, for plain open_clip
    return manifest


def check_export(export_dir: str | Path, atol: float = DEFAULT_ATOL, batch: int = 8, student=None,
                 manifest: dict | None = None) -> dict:
    """Compare the exported files with the torch student (default: the one in ``export_dir/open_clip``).

    Returns ``{"atol", "batch", "max_abs_diff": {backend: {"image", "text"}}, "tokenizer_ids_match"}``;
    raises ``ExportMismatchError`` when a difference exceeds ``atol`` (or is not finite) or when the
    ``tokenizers`` ids differ from the student's Hugging Face tokenizer ids.
    """
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from mcad_student.model import load_student
    from pipeline.search import load_tokenizer

    export_dir = Path(export_dir)
    manifest = manifest or read_manifest(export_dir)
    paths = manifest_paths(export_dir, manifest)
    if student is None:
        student = load_student(paths["open_clip"]).eval()
    size, length = manifest["image"]["size"], manifest["text"]["context_length"]
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    texts = list(itertools.islice(itertools.cycle(PROBE_TEXTS), batch))
    hf_tok = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
    ids = hf_tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")["input_ids"]
    fast_tok = load_tokenizer(paths["tokenizer_json"], manifest)
    fast_ids = [e.ids for e in fast_tok.encode_batch(texts)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        ref = {"image": student.encode_image(pixels), "text": student.encode_text(ids)}
        image_ts = torch.jit.load(str(paths["image_torchscript"]))
        text_ts = torch.jit.load(str(paths["text_torchscript"]))
        got = {"torchscript": {"image": image_ts(pixels), "text": text_ts(ids)}}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = {name: ort.InferenceSession(str(paths[f"{name}_onnx"]), options, providers=["CPUExecutionProvider"])
                for name in ("image", "text")}
    got["onnxruntime"] = {
        "image": torch.from_numpy(sessions["image"].run(None, {"pixels": pixels.numpy()})[0]),
        "text": torch.from_numpy(sessions["text"].run(None, {"input_ids": ids.numpy()})[0]),
    }
    diffs = {backend: {k: _max_abs_diff(out[k], ref[k]) for k in ref} for backend, out in got.items()}
    result = {"atol": atol, "batch": batch, "max_abs_diff": diffs, "tokenizer_ids_match": fast_ids == ids.tolist()}
    bad = [f"{b} {k} {d:.3g}" for b, row in diffs.items() for k, d in row.items() if not d <= atol]
    if bad:
        raise ExportMismatchError(f"exported encoders differ from the torch student by more than atol={atol}: "
                                  + ", ".join(bad))
    if not result["tokenizer_ids_match"]:
        raise ExportMismatchError(f"{TOKENIZER_JSON} (tokenizers) gives other ids than the student's tokenizer")
    return result


def read_manifest(export_dir: str | Path) -> dict:
    """``export_dir/export.json``; ``ExportError`` if the directory is not a finished export, and
    ``ExportPathError`` if a path it names leads outside ``export_dir`` (see ``manifest_paths``)."""
    path = resolve_inside(export_dir, EXPORT_JSON, EXPORT_JSON, ExportPathError)
    if not path.is_file():
        raise ExportError(f"{export_dir} is not an export directory (no {EXPORT_JSON}); run `mcad export`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise ExportError(f"{path} is not valid JSON ({err}); export again with `mcad export`") from err
    if not isinstance(manifest, dict):
        raise ExportError(f"{path} is not an export manifest (not a JSON object); export again with `mcad export`")
    manifest_paths(export_dir, manifest)
    return manifest


def manifest_paths(export_dir: str | Path, manifest: dict) -> dict[str, Path]:
    """Every file and directory the manifest names, resolved: ``FILES`` (as ``files`` names them), ``tokenizer_json``.

    They are relative to ``export_dir`` and are opened by whoever loads the export (the searcher
    reads the tokenizer and the ONNX text encoder), so each must stay inside ``export_dir``, or a
    crafted ``export.json`` would make them read any file (``../../etc/passwd``):
    ``ExportPathError`` then. ``..`` inside, absolute paths and symlinks out are all caught,
    since the check is on the resolved path.
    """
    files, text = manifest.get("files", {}), manifest.get("text", {})
    if not isinstance(files, dict) or not isinstance(text, dict):
        raise ExportError(f"{EXPORT_JSON} of {export_dir}: 'files' and 'text' must be JSON objects; "
                          "export again with `mcad export`")
    named = {**FILES, **files, "tokenizer_json": text.get("tokenizer", f"{TOKENIZER_DIR}/{TOKENIZER_JSON}")}
    return {key: resolve_inside(export_dir, value, f"{EXPORT_JSON} entry {key!r}", ExportPathError)
            for key, value in named.items()}


def _manifest(student, hf_tok, student_dir: Path) -> dict:
    pad_id = student.clip.text.config.pad_token_id
    if hf_tok.pad_token_id is None or hf_tok.pad_token_id != pad_id:
        raise ExportError(f"the tokenizer pads with {hf_tok.pad_token_id}, the text tower masks id {pad_id}")
    cfg = student.preprocess_cfg
    return {
        "format": FORMAT,
        "source": str(student_dir),
        "embed_dim": student.embed_dim,
        "image": {
            "input": "pixels",
            "layout": "float32 (B, 3, size, size), RGB; x / 255 then (x - mean) / std per channel",
            "size": student.image_size,
            "mean": list(cfg["mean"]),
            "std": list(cfg["std"]),
            "interpolation": cfg.get("interpolation", "bicubic"),
        },
        "text": {
            "input": "input_ids",
            "layout": "int64 (B, context_length): tokenizer ids padded with pad_id and truncated to context_length",
            "context_length": student.context_length,
            "pad_id": int(pad_id),
            "padding_side": hf_tok.padding_side,
            "truncation_side": hf_tok.truncation_side,
            "tokenizer": f"{TOKENIZER_DIR}/{TOKENIZER_JSON}",
        },
        "output": "embedding: float32 (B, embed_dim), L2-normalized",
        "files": dict(FILES),
        "onnx_opset": ONNX_OPSET,
        "versions": {name: _version(name) for name in VERSIONED},
    }


@contextlib.contextmanager
def _mha_fastpath(enabled: bool):
    """nn.MultiheadAttention's inference fast path (``aten::_native_multi_head_attention``, taken in eval mode
    without grad) has no ONNX export; open_clip's ViT uses that module, so the export traces the plain path."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _write_encoders(student, hf_tok, out: Path) -> None:
    """Trace and export both towers. The trace batch has a padded and a full-length caption, so
    the traced graph keeps the attention mask (a batch without padding may let it be dropped)."""
    size, length = student.image_size, student.context_length
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    ids = hf_tok(["a photo", PROBE_TEXTS[0]], padding="max_length", truncation=True, max_length=length,
                 return_tensors="pt")["input_ids"]
    if not bool((ids == student.clip.text.config.pad_token_id).any()):
        raise ExportError(f"context_length {length} leaves no padding in the trace batch")
    encoders = {"image": (ImageEncoder(student.clip).eval(), pixels, "pixels", IMAGE_TS, IMAGE_ONNX),
                "text": (TextEncoder(student.clip).eval(), ids, "input_ids", TEXT_TS, TEXT_ONNX)}
    with warnings.catch_warnings(), torch.no_grad(), _mha_fastpath(False):
        warnings.simplefilter("ignore")  # tracer/exporter deprecation chatter; check_export judges the result
        for module, example, name, ts_file, onnx_file in encoders.values():
            buffer = io.BytesIO()
            torch.jit.save(torch.jit.trace(module, example), buffer)
            (out / ts_file).write_bytes(buffer.getvalue())
            torch.onnx.export(module, (example,), str(out / onnx_file), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=[name], output_names=["embedding"],
                              dynamic_axes={name: {0: "batch"}, "embedding": {0: "batch"}})
    import onnx

    for _, _, _, _, onnx_file in encoders.values():
        model = onnx.load(str(out / onnx_file))
        onnx.save(model, str(out / onnx_file), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=onnx_file + ONNX_DATA, size_threshold=1024)
        onnx.checker.check_model(str(out / onnx_file))


def _export_id(out: Path) -> str:
    digest = hashlib.sha256()
    for name in (IMAGE_ONNX, TEXT_ONNX):
        digest.update((out / name).read_bytes())
        digest.update((out / (name + ONNX_DATA)).read_bytes())
    return digest.hexdigest()[:16]


def _max_abs_diff(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max())


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
