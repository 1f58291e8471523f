"""Text-to-image search over an image index, with the exported ONNX encoders.

``build_index`` embeds every image of a shard set with the export's ONNX image encoder.
``Searcher`` answers text queries without torch or transformers: ``tokenizers`` for the ids,
onnxruntime (one thread) for the text encoder, faiss (or numpy / onnxruntime) for the scores.
Index layout::

    index.json        count, embed_dim, the export it was built with (dir and export_id), shards
    embeddings.npy    float16 (N, embed_dim), L2-normalized rows
    keys.npy          the N sample keys in row order, UTF-8 bytes (fixed width; memory-mapped, not parsed)
    score.onnx        Cast(float16 -> float32) + MatMul: the optional onnxruntime scorer (any number of queries;
                      older indexes' graphs take one query per run, which ``Searcher`` handles)
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
SCORERS = ("faiss", "onnxruntime", "numpy")
DEFAULT_SCORER = "faiss"
FAISS_READ_BYTES = 1 << 24  # embeddings.npy is read into the faiss index in pieces of this size
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
    """ONNX: gallery float16 (N, dim), queries float32 (dim, Q) -> scores float32 (N, Q)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["gallery"], ["gallery32"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["gallery32", "query"], ["scores"])],
        "score",
        [helper.make_tensor_value_info("gallery", TensorProto.FLOAT16, ["rows", dim]),
         helper.make_tensor_value_info("query", TensorProto.FLOAT, [dim, "queries"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["rows", "queries"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


# ------------------------------------------------------------------ searching


class Searcher:
    """Top-k text-to-image search over an index; build once, then call ``query`` repeatedly.

    ``export_dir`` overrides the export named in ``index.json``. ``scorer``:

    - ``"faiss"`` (the default): a ``faiss.IndexScalarQuantizer`` of type ``QT_fp16`` (inner product)
      holding the gallery. A ``QT_fp16`` code is the row's components as IEEE halves, i.e. exactly the
      bytes of ``embeddings.npy``, so the index is built at load by reading that file into the index's
      code buffer (``_faiss_fp16_index``): no float32 copy, no training, and no second file for
      ``mcad index`` to write and keep in step with the embeddings (a faiss index file would store the
      gallery twice on disk, and tie the index format to faiss's serialization). Load costs about one
      read of the file (``load_seconds``; a few tens of ms for 100k x 128). faiss scores each row as
      the float32 dot product of its stored float16 values with the query, as the other scorers do, so
      the top-k is the exact one (ties and float32 summation order aside). It is the fastest exact
      scorer in ``bench/search_latency.py`` (several times fewer ms per query than onnxruntime over
      100k x 128 rows, one thread), at a price in memory: the gallery is resident (N x D x 2 bytes,
      25.6 MB for 100k x 128) and faiss's libraries add about 14 MB.
    - ``"onnxruntime"``: the index's ``score.onnx`` (Cast + MatMul) over chunks of the memory-mapped
      gallery (the default before faiss; a flat peak RSS).
    - ``"numpy"``: the same in numpy (``half_to_float32`` + matmul).

    For the two chunked scorers ``release_pages`` drops each scored chunk of the mapped gallery from
    the resident set (the page cache keeps it), so their peak RSS does not grow with the gallery.
    ``threads`` sets onnxruntime's intra-op threads and, for faiss, OpenMP's (process-wide).
    """

    def __init__(self, index_dir: str | Path, export_dir: str | Path | None = None, scorer: str = DEFAULT_SCORER,
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
        self._ort_batched = False  # score.onnx takes several queries per run (older indexes': one)
        self.faiss_index = None
        self.load_seconds = 0.0  # building the scorer's own copy of the gallery (faiss) at load
        if scorer == "onnxruntime":
            self.score_session = ort_session(resolve_inside(index_dir, SCORE_ONNX, SCORE_ONNX), threads, arena=True)
            shapes = {i.name: i.shape for i in self.score_session.get_inputs()}
            self._ort_batched = shapes.get("query", [None, 1])[1] != 1
        elif scorer == "faiss":
            tick = time.perf_counter()
            self.faiss_index = _faiss_fp16_index(self._file, self._offset, self.gallery.shape, threads)
            self.load_seconds = time.perf_counter() - tick
        self.chunk_rows = max(1, int(chunk_rows))
        self.release_pages = release_pages and hasattr(mmap, "MADV_DONTNEED")
        self._work = np.empty((self.chunk_rows, self.dim), np.int32)
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

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (len(texts), D) L2-normalized text embeddings, one encoder run."""
        if not len(texts):
            return np.zeros((0, self.dim), np.float32)
        return self.text_session.run(None, {self.text_input: self.token_ids(list(texts))})[0]

    def search(self, query: np.ndarray, k: int = 10) -> list[Hit]:
        """The ``k`` best rows for an embedding, best first (``search_batch`` for one query)."""
        return self.search_batch(np.asarray(query, np.float32).reshape(1, self.dim), k)[0]

    def search_batch(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """The ``k`` best rows for each embedding of ``queries`` (B, D), all from one pass over the gallery.

        Best first, equal scores by row. Which of several rows tied at the k-th score make the cut is
        the scorer's choice (a partition, or faiss's heap); a stable full sort per chunk to settle it
        would cost about 3x the selection (0.07 against 0.02 ms per 2,048-row chunk).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if not len(queries):
            return []
        if self.faiss_index is not None:
            return self._faiss_search(queries, k)
        k = min(k, len(self.gallery))
        if k == 0:
            return [[] for _ in queries]
        columns = np.ascontiguousarray(queries.T)
        best_scores = np.empty((0, len(queries)), np.float32)
        best_rows = np.empty((0, len(queries)), np.int64)
        self._released = 0
        for start in range(0, len(self.gallery), self.chunk_rows):
            chunk = self.gallery[start:start + self.chunk_rows]
            scores = np.concatenate([best_scores, self._chunk_scores(chunk, columns)])  # (rows, B)
            rows = np.concatenate([best_rows, np.broadcast_to(
                np.arange(start, start + len(chunk))[:, None], (len(chunk), len(queries)))])
            if len(scores) > k:
                keep = np.argpartition(-scores, k - 1, axis=0)[:k]
                scores, rows = np.take_along_axis(scores, keep, 0), np.take_along_axis(rows, keep, 0)
            best_scores, best_rows = scores, rows
            if self.release_pages:
                self._release(start + len(chunk))
        return [self._hits(best_scores[:, q], best_rows[:, q]) for q in range(len(queries))]

    def query(self, text: str, k: int = 10) -> list[Hit]:
        """The ``k`` images that best match ``text``, best first."""
        return self.search(self.encode(text), k)

    def query_batch(self, texts: Sequence[str], k: int = 10) -> list[list[Hit]]:
        """``query`` for several texts: one text-encoder run and one pass over the gallery."""
        return self.search_batch(self.encode_batch(texts), k)

    def close(self) -> None:
        """Close the gallery file (the mapping goes with the last reference to ``gallery``) and drop faiss's copy."""
        self.faiss_index = None
        self._file.close()

    def _chunk_scores(self, chunk: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """float32 (rows, B) scores of a float16 gallery chunk against query columns (D, B)."""
        if self.score_session is None:
            return half_to_float32(chunk, self._work[:len(chunk)]) @ columns
        if self._ort_batched:
            return self.score_session.run(None, {"gallery": chunk, "query": columns})[0]
        return np.concatenate([self.score_session.run(None, {"gallery": chunk, "query": columns[:, [q]]})[0]
                               for q in range(columns.shape[1])], axis=1)

    def _faiss_search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        k = min(k, int(self.faiss_index.ntotal))
        if k == 0:
            return [[] for _ in queries]
        scores, rows = self.faiss_index.search(queries, k)
        return [self._hits(s[r >= 0], r[r >= 0]) for s, r in zip(scores, rows)]

    def _hits(self, scores: np.ndarray, rows: np.ndarray) -> list[Hit]:
        """Hits for candidate rows, best first (ties: lower row first)."""
        order = np.lexsort((rows, -scores))
        return [Hit(self.key(int(rows[i])), float(scores[i]), int(rows[i])) for i in order]

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


def _faiss_fp16_index(handle, offset: int, shape: tuple[int, int], threads: int):
    """A faiss ``QT_fp16`` inner-product index of the C-order float16 matrix at byte ``offset`` of ``handle``.

    faiss's fp16 code of a row is its components as IEEE halves in order, little-endian: the bytes of
    the ``.npy`` data. They are read straight into the index's code buffer (no float32 copy, and no
    mapped pages left resident). faiss then encodes the first row itself and the result must equal
    what was read, so a faiss whose code layout differed fails here instead of scoring garbage.
    """
    try:
        import faiss
    except ImportError as err:
        raise SearchIndexError("the faiss scorer needs faiss-cpu (pip install faiss-cpu); or use the "
                               "onnxruntime scorer") from err
    if threads > 0:
        faiss.omp_set_num_threads(threads)
    rows, dim = shape
    index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    if rows == 0:
        return index
    nbytes = rows * dim * 2
    index.codes.resize(nbytes)
    codes = faiss.rev_swig_ptr(index.codes.data(), nbytes)
    handle.seek(offset)
    done = 0
    while done < nbytes:
        got = handle.readinto(codes[done:done + FAISS_READ_BYTES])
        if not got:
            raise IndexMismatchError(f"{handle.name} ends after {done} of its {nbytes} bytes of embeddings")
        done += got
    index.ntotal = rows
    first = np.array(codes[:dim * 2])
    if not np.array_equal(index.sa_encode(first.view(np.float16).astype(np.float32)[None]).ravel(), first):
        raise SearchIndexError(f"faiss {faiss.__version__} does not store QT_fp16 codes as IEEE halves; "
                               "use the onnxruntime scorer")
    return index


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
