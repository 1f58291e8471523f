"""Text-to-image search over an image index, with the exported ONNX encoders.

``build_index`` embeds every image of a shard set with the export's ONNX image encoder.
``Searcher`` answers text queries without torch or transformers: ``tokenizers`` for the ids,
onnxruntime (one thread) for the text encoder, numpy for the scores. Index layout::

    index.json        count, embed_dim, the export it was built with (dir and export_id), shards
    embeddings.npy    float16 (N, embed_dim), L2-normalized rows
    keys.npy          the N sample keys in row order, UTF-8 bytes (fixed width; memory-mapped, not parsed)
    score.onnx        Cast(float16 -> float32) + MatMul: the optional onnxruntime scorer
    .mcad-output.json marks the directory as written by ``mcad index``: only such a directory is replaced

Files are read from inside the index and the export only: a path named in ``export.json`` that leads
out (``..``, absolute, a symlink out) is refused (``UnsafePathError``). The export directory recorded in
``index.json`` is the one exception, since an export lives anywhere; it is followed, as an export.

This module must not import torch at import time (``tests/test_export.py`` checks it).
"""

from __future__ import annotations

import json
import mmap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcad_core.atomic import check_output_dir, replace_output_dir

INDEX_JSON, EMBEDDINGS, KEYS, SCORE_ONNX = "index.json", "embeddings.npy", "keys.npy", "score.onnx"
INDEX_FORMAT = 1
CHUNK_ROWS = 2048  # gallery rows scored per step: bounds the float32 working set to CHUNK_ROWS x D x 4 bytes
SCORERS = ("numpy", "onnxruntime")
_HALF_SCALE = np.float32(2.0**112)  # float16 exponent bias 15 -> float32 bias 127
_HALF_MASK = np.array(0x8FFFFFFF, dtype=np.uint32).view(np.int32)  # sign, exponent low 5 bits, mantissa


class SearchIndexError(RuntimeError):
    """Base of the index errors."""


class IndexNotFoundError(SearchIndexError, FileNotFoundError):
    """No index (or no export) where one was named."""


class IndexMismatchError(SearchIndexError):
    """The index does not belong to the export it is used with (other export, dimension or size)."""


class UnsafePathError(SearchIndexError):
    """A path named in an index or an export leads outside its directory (corrupt or crafted metadata)."""


@dataclass(frozen=True)
class Hit:
    key: str
    score: float
    row: int


def load_tokenizer(path: str | Path, manifest: dict):
    """The export's ``tokenizer.json`` padded/truncated to the context length as the student's HF tokenizer does."""
    from tokenizers import Tokenizer

    text = manifest["text"]
    tokenizer = Tokenizer.from_file(str(path))
    length, pad_id = int(text["context_length"]), int(text["pad_id"])
    tokenizer.enable_truncation(max_length=length, direction=text.get("truncation_side", "right"))
    tokenizer.enable_padding(length=length, pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id),
                             direction=text.get("padding_side", "right"))
    return tokenizer


def ort_session(path: str | Path, threads: int = 1, arena: bool = False):
    """An onnxruntime CPU session with ``threads`` intra-op threads (0: onnxruntime's default).

    ``arena``: onnxruntime's memory arena. Off for the encoders (it only adds RSS there); on for the
    scorer, whose megabyte-sized buffers otherwise fragment the heap and RSS creeps up query by query.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = arena
    # Basic fusions only: the extended level adds prepacked weight copies (~10 MB) for no measured speed-up.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def resolve_inside(root: str | Path, name: object, what: str,
                   error: type[Exception] = UnsafePathError) -> Path:
    """``root / name`` resolved, if it stays inside ``root`` (else ``error``).

    ``name`` comes from a file in ``root`` (``export.json``, ``index.json``) that may be corrupt
    or crafted; following ``../../etc/passwd``, ``/etc/passwd`` or a symlink out would read any file
    the user can. Resolving first catches all three.
    """
    base = Path(root).resolve()
    if not isinstance(name, (str, Path)) or not str(name):
        raise error(f"{what} in {base} is {name!r}, not a relative path; rebuild the directory")
    path = (base / name).resolve()
    if not path.is_relative_to(base):
        raise error(f"{what} {str(name)!r} leads outside {base} (to {path}); the directory is corrupt or "
                    "crafted: rebuild it with mcad, and do not use it meanwhile")
    return path


def read_export_manifest(export_dir: str | Path) -> dict:
    path = resolve_inside(export_dir, "export.json", "export.json")
    return _read_json(path, f"{export_dir} is not an export directory (no export.json); run `mcad export`")


def export_file(export_dir: str | Path, manifest: dict, key: str) -> Path:
    """The export's file ``manifest["files"][key]``: confined to ``export_dir`` and existing."""
    files = manifest.get("files")
    name = files.get(key) if isinstance(files, dict) else None
    path = resolve_inside(export_dir, name, f"export.json files.{key}")
    if not path.is_file():
        raise IndexNotFoundError(f"{export_dir} has no {name} (export.json files.{key}); export again")
    return path


def _read_json(path: Path, missing: str) -> dict:
    """A JSON object from ``path``; ``IndexNotFoundError(missing)`` if absent, ``SearchIndexError`` if not an object."""
    if not path.is_file():
        raise IndexNotFoundError(missing)
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise SearchIndexError(f"{path} is not valid JSON ({err}); rebuild it") from err
    if not isinstance(data, dict):
        raise SearchIndexError(f"{path} is not a JSON object; rebuild it")
    return data


# ------------------------------------------------------------------- building


def build_index(export_dir: str | Path, shards: str | Path, out_dir: str | Path, batch: int = 64,
                threads: int = 0, policy: str = "raise", progress: bool = True) -> dict:
    """Embed every image of ``shards`` with the export's ONNX image encoder; write the index to ``out_dir``.

    ``out_dir`` is checked before any image is read: an existing one must be empty or an earlier
    index, and it must keep clear of the export and the shards (``OutputDirError`` otherwise).
    """
    from PIL import Image
    from tqdm import tqdm

    from mcad_core.shards import ReadStats, iter_samples, list_shards

    export_dir = Path(export_dir).resolve()
    manifest = read_export_manifest(export_dir)
    shard_list = list_shards(shards)
    inputs = [*shard_list, *([shards] if Path(str(shards)).is_dir() else [])]
    check_output_dir(out_dir, "index", [export_dir, *inputs])
    image = manifest["image"]
    size = int(image["size"])
    mean = np.asarray(image["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(image["std"], np.float32).reshape(1, 3, 1, 1)
    session = ort_session(export_file(export_dir, manifest, "image_onnx"), threads)
    stats = ReadStats()
    keys: list[str] = []
    rows: list[np.ndarray] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        pixels = (np.stack(pending).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0) - mean) / std
        rows.append(session.run(None, {image["input"]: pixels})[0].astype(np.float16))
        pending.clear()

    samples = iter_samples(shard_list, policy=policy, stats=stats)
    for sample in tqdm(samples, desc="index", unit="img", disable=not progress):
        picture = sample.image
        if picture.size != (size, size):
            picture = picture.resize((size, size), Image.Resampling.BICUBIC)
        pending.append(np.asarray(picture, dtype=np.uint8))
        keys.append(sample.key)
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    dim = int(manifest["embed_dim"])
    embeddings = np.concatenate(rows) if rows else np.zeros((0, dim), np.float16)
    extra = {"shards": shard_list, "skipped": stats.skipped}
    return write_index(out_dir, embeddings, keys, export_dir, manifest, extra, inputs=inputs)


def write_index(out_dir: str | Path, embeddings: np.ndarray, keys: list[str], export_dir: str | Path,
                manifest: dict, extra: dict | None = None, inputs: Sequence[str | Path] = ()) -> dict:
    """Write an index directory atomically (also used by the latency benchmark for synthetic galleries).

    ``out_dir`` may replace only an earlier index (or an empty directory), and must keep clear of
    ``export_dir`` and ``inputs`` (the shards): else ``OutputDirError``, with nothing written.
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float16)
    dim = int(manifest["embed_dim"])
    if embeddings.ndim != 2 or embeddings.shape[1] != dim or len(embeddings) != len(keys):
        raise IndexMismatchError(f"embeddings {embeddings.shape} and {len(keys)} keys do not fit embed_dim {dim}")
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings are not finite")
    index = {
        "format": INDEX_FORMAT,
        "export_dir": str(Path(export_dir).resolve()),
        "export_id": manifest["export_id"],
        "embed_dim": dim,
        "count": len(keys),
        "dtype": "float16",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": {"embeddings": EMBEDDINGS, "keys": KEYS, "score_onnx": SCORE_ONNX},
        **(extra or {}),
    }
    encoded = [k.encode("utf-8") for k in keys]
    with replace_output_dir(out_dir, "index", [export_dir, *inputs]) as tmp:
        np.save(tmp / EMBEDDINGS, embeddings)
        np.save(tmp / KEYS, np.array(encoded, dtype=f"S{max([1, *map(len, encoded)])}"))
        (tmp / SCORE_ONNX).write_bytes(_score_graph(dim))
        (tmp / INDEX_JSON).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def _score_graph(dim: int) -> bytes:
    """ONNX: gallery float16 (N, dim), query float32 (dim, 1) -> scores float32 (N, 1)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["gallery"], ["gallery32"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["gallery32", "query"], ["scores"])],
        "score",
        [helper.make_tensor_value_info("gallery", TensorProto.FLOAT16, ["rows", dim]),
         helper.make_tensor_value_info("query", TensorProto.FLOAT, [dim, 1])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["rows", 1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


# ------------------------------------------------------------------ searching


class Searcher:
    """Top-k text-to-image search over an index; build once, then call ``query`` repeatedly.

    ``export_dir`` overrides the export named in ``index.json``. ``scorer``: ``"onnxruntime"`` (the
    index's ``score.onnx``; the default, about 2x faster over 100k rows in ``bench/search_latency.py``)
    or ``"numpy"`` (float32 chunks). ``release_pages`` drops each scored
    chunk of the memory-mapped gallery from the resident set (the page cache keeps it), so peak
    RSS does not grow with the gallery.
    """

    def __init__(self, index_dir: str | Path, export_dir: str | Path | None = None, scorer: str = "onnxruntime",
                 threads: int = 1, chunk_rows: int = CHUNK_ROWS, release_pages: bool = True) -> None:
        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
        index_dir = Path(index_dir).resolve()
        self.index = _read_json(resolve_inside(index_dir, INDEX_JSON, INDEX_JSON),
                                f"{index_dir} is not an index directory (no {INDEX_JSON}); run `mcad index`")
        self.export_dir = Path(export_dir).resolve() if export_dir else _recorded_export(index_dir, self.index)
        self.export = read_export_manifest(self.export_dir)
        if self.index["export_id"] != self.export["export_id"]:
            raise IndexMismatchError(f"{index_dir} was built with export {self.index['export_id']}, "
                                     f"{self.export_dir} is export {self.export['export_id']}")
        self.dim = int(self.export["embed_dim"])
        self._file = open(resolve_inside(index_dir, EMBEDDINGS, EMBEDDINGS), "rb")
        self.gallery, self._mmap, self._offset = _map_npy(self._file)
        if self.gallery.shape != (self.index["count"], self.dim) or int(self.index["embed_dim"]) != self.dim:
            raise IndexMismatchError(f"{index_dir}: embeddings {self.gallery.shape}, index says "
                                     f"({self.index['count']}, {self.index['embed_dim']}), export dim {self.dim}")
        self.keys = np.load(resolve_inside(index_dir, KEYS, KEYS), mmap_mode="r")
        if self.keys.shape != (len(self.gallery),):
            raise IndexMismatchError(f"{index_dir}: {len(self.keys)} keys for {len(self.gallery)} rows")
        text = self.export["text"]
        self.context_length = int(text["context_length"])
        tokenizer = resolve_inside(self.export_dir, text.get("tokenizer"), "export.json text.tokenizer")
        if not tokenizer.is_file():
            raise IndexNotFoundError(f"{self.export_dir} has no {text['tokenizer']} (its tokenizer); export again")
        text_onnx = export_file(self.export_dir, self.export, "text_onnx")  # every path checked before loading
        self.tokenizer = load_tokenizer(tokenizer, self.export)
        self.text_session = ort_session(text_onnx, threads)
        self.text_input = text["input"]
        self.scorer = scorer
        self.score_session = None
        if scorer == "onnxruntime":
            self.score_session = ort_session(resolve_inside(index_dir, SCORE_ONNX, SCORE_ONNX), threads, arena=True)
        self.chunk_rows = max(1, int(chunk_rows))
        self.release_pages = release_pages and hasattr(mmap, "MADV_DONTNEED")
        self._work = np.empty((self.chunk_rows, self.dim), np.int32)
        self._scores = np.empty(len(self.gallery), np.float32)
        self._released = 0  # bytes of the mapping already dropped during the current scan

    def __len__(self) -> int:
        return len(self.gallery)

    def key(self, row: int) -> str:
        return bytes(self.keys[row]).decode("utf-8")

    def token_ids(self, texts: list[str]) -> np.ndarray:
        """int64 (len(texts), context_length), as the student's Hugging Face tokenizer pads and truncates."""
        return np.asarray([e.ids for e in self.tokenizer.encode_batch(list(texts))], dtype=np.int64)

    def encode(self, text: str) -> np.ndarray:
        """float32 (D,) L2-normalized text embedding."""
        return self.text_session.run(None, {self.text_input: self.token_ids([text])})[0][0]

    def scores(self, query: np.ndarray) -> np.ndarray:
        """float32 (N,) cosine scores of every gallery row (a buffer reused by the next call)."""
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(self.dim)
        out = self._scores
        self._released = 0
        for start in range(0, len(self.gallery), self.chunk_rows):
            chunk = self.gallery[start:start + self.chunk_rows]
            rows = len(chunk)
            if self.score_session is not None:
                out[start:start + rows] = self.score_session.run(None, {"gallery": chunk,
                                                                        "query": query[:, None]})[0][:, 0]
            else:
                np.matmul(half_to_float32(chunk, self._work[:rows]), query,
                          out=out[start:start + rows])
            if self.release_pages:
                self._release(start + rows)
        return out

    def search(self, query: np.ndarray, k: int = 10) -> list[Hit]:
        """The ``k`` best rows for an embedding, best first (ties: lower row first)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores = self.scores(query)
        k = min(k, len(scores))
        if k == 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.lexsort((top, -scores[top]))]
        return [Hit(self.key(i), float(scores[i]), int(i)) for i in top]

    def query(self, text: str, k: int = 10) -> list[Hit]:
        """The ``k`` images that best match ``text``, best first."""
        return self.search(self.encode(text), k)

    def close(self) -> None:
        """Close the gallery file (the mapping goes with the last reference to ``gallery``)."""
        self._file.close()

    def _release(self, rows_done: int) -> None:
        """Drop the mapped pages of gallery rows [0, rows_done) from the resident set."""
        end = self._offset + rows_done * self.dim * 2
        end -= end % mmap.PAGESIZE
        if end > self._released:
            self._mmap.madvise(mmap.MADV_DONTNEED, self._released, end - self._released)
            self._released = end


def _recorded_export(index_dir: Path, index: dict) -> Path:
    """The export directory ``index.json`` names (where ``mcad index --export`` pointed).

    Unlike every other path read from an index it may lie anywhere, so it is not confined; it is
    safe to follow because it is only used as an export directory: its ``export.json`` is read (a
    directory without one is refused) and each file taken from it is confined to it. It must be
    absolute, as ``write_index`` records it: a relative one would depend on the working directory.
    """
    recorded = index.get("export_dir")
    if not isinstance(recorded, str) or not Path(recorded).is_absolute():
        raise UnsafePathError(f"{index_dir / INDEX_JSON} names the export {recorded!r}, not an absolute "
                              "directory; pass --export, or rebuild the index with `mcad index`")
    return Path(recorded).resolve()


def half_to_float32(half: np.ndarray, work: np.ndarray) -> np.ndarray:
    """float16 -> float32 for finite values, written into the int32 array ``work`` (returned viewed as float32).

    About 5x faster than numpy's own (scalar) cast: three vectorized passes. Sign-extending the
    int16 bits and shifting them left by 13 puts sign, exponent and mantissa in float32 position
    (with three copies of the sign in the top exponent bits, which the mask clears); the float32
    read then is the value times 2**-112 (exponent bias 15 vs 127), subnormals included, so the
    product with 2**112 is exact.
    """
    np.left_shift(half.view(np.int16), 13, out=work, dtype=np.int32)
    np.bitwise_and(work, _HALF_MASK, out=work)
    as_float = work.view(np.float32)
    np.multiply(as_float, _HALF_SCALE, out=as_float)
    return as_float


def _map_npy(handle) -> tuple[np.ndarray, mmap.mmap, int]:
    """(array, mapping, data offset): a read-only view of a C-order float16 ``.npy`` matrix through our
    own mmap (``np.load(mmap_mode="r")`` would hide the mapping, whose pages ``_release`` drops)."""
    fmt = np.lib.format
    major, _ = fmt.read_magic(handle)
    read_header = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
    shape, fortran, dtype = read_header(handle)
    if fortran or dtype != np.float16 or len(shape) != 2:
        raise IndexMismatchError(f"{handle.name}: expected a C-order float16 matrix, got {dtype} {shape}")
    offset = handle.tell()
    mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    count = int(np.prod(shape))
    array = np.frombuffer(mapped, dtype=np.float16, count=count, offset=offset).reshape(shape)
    return array, mapped, offset
