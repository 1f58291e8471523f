"""`mcad search`'s scorers agree: faiss (the default), onnxruntime and numpy return the exact top-k.

A tiny export made by hand (no torch): a word-level tokenizer and an ONNX text encoder that
averages a random embedding table over the tokens; the gallery is random unit rows in float16.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.search import EMBEDDINGS, SCORE_ONNX, SCORERS, Searcher, write_index

DIM, ROWS, CONTEXT = 16, 300, 8
WORDS = "a red blue green circle square star left right of above below big small".split()
TEXTS = ["a red circle", "a blue square left of a green star", "big small", "", "zebra"]


def _tokenizer(path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    path.parent.mkdir(parents=True)
    tokenizer.save(str(path))


def _text_encoder(vocab: int) -> bytes:
    """input_ids int64 (B, L) -> the L2-normalized mean of a random embedding table's rows, float32 (B, DIM)."""
    table = np.random.default_rng(1).standard_normal((vocab, DIM)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["tokens"]),
         helper.make_node("ReduceMean", ["tokens"], ["mean"], axes=[1], keepdims=0),
         helper.make_node("ReduceL2", ["mean"], ["norm"], axes=[1], keepdims=1),
         helper.make_node("Div", ["mean", "norm"], ["embedding"])],
        "text", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", CONTEXT])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", DIM])],
        [numpy_helper.from_array(table, "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _gallery(rows: int, seed: int = 0) -> np.ndarray:
    gallery = np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)
    return (gallery / np.linalg.norm(gallery, axis=1, keepdims=True)).astype(np.float16)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    path = tmp_path_factory.mktemp("search") / "export"
    _tokenizer(path / "tokenizer" / "tokenizer.json")
    (path / "text.onnx").write_bytes(_text_encoder(len(WORDS) + 2))
    manifest = {"export_id": "5" * 16, "embed_dim": DIM,
                "text": {"input": "input_ids", "context_length": CONTEXT, "pad_id": 0,
                         "tokenizer": "tokenizer/tokenizer.json"},
                "files": {"text_onnx": "text.onnx"}}
    (path / "export.json").write_text(json.dumps(manifest))
    return path, manifest


@pytest.fixture(scope="module")
def index(export, tmp_path_factory):
    path = tmp_path_factory.mktemp("search") / "index"
    write_index(path, _gallery(ROWS), [f"img{i:03d}" for i in range(ROWS)], export[0], export[1])
    return path


def _exact(index, query: np.ndarray, k: int) -> list[int]:
    """The numpy float32 scan: the k best rows, best first, ties by row."""
    scores = np.load(index / EMBEDDINGS).astype(np.float32) @ query.astype(np.float32)
    return np.argsort(-scores, kind="stable")[:k].tolist()


def test_faiss_scorer_returns_the_float32_scan_top_k(index):
    queries = _gallery(20, seed=7).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    searchers = {name: Searcher(index, scorer=name) for name in SCORERS}
    assert searchers["faiss"].faiss_index.ntotal == ROWS
    gallery = np.load(index / EMBEDDINGS).astype(np.float32)
    for query in queries:
        for k in (1, 10, ROWS, ROWS + 5):
            want = _exact(index, query, k)
            for name, searcher in searchers.items():
                hits = searcher.search(query, k)
                assert [h.row for h in hits] == want, (name, k)
                assert [h.key for h in hits] == [f"img{r:03d}" for r in want]
                assert np.allclose([h.score for h in hits], gallery[want] @ query, atol=1e-5)


def test_faiss_holds_the_stored_halves_as_its_codes(index):
    import faiss

    searcher = Searcher(index, scorer="faiss")
    codes = faiss.vector_to_array(searcher.faiss_index.codes)
    assert np.array_equal(codes, np.load(index / EMBEDDINGS).view(np.uint8).ravel())
    assert searcher.load_seconds > 0


@pytest.mark.parametrize("scorer,chunk_rows", [("faiss", 2048), ("numpy", 7), ("onnxruntime", 7), ("numpy", 2048)])
def test_batches_equal_single_queries(index, scorer, chunk_rows):
    searcher = Searcher(index, scorer=scorer, chunk_rows=chunk_rows)
    queries = searcher.encode_batch(TEXTS)
    assert np.allclose(queries, np.stack([searcher.encode(t) for t in TEXTS]), atol=1e-6)
    for k in (1, 10, ROWS + 1):
        batch = searcher.search_batch(queries, k)
        assert [[h.row for h in hits] for hits in batch] == [_exact(index, q, k) for q in queries]
        assert [[h.row for h in hits] for hits in searcher.query_batch(TEXTS, k)] == \
            [[h.row for h in searcher.query(t, k)] for t in TEXTS]
    assert searcher.search_batch(np.zeros((0, DIM), np.float32), 3) == []


@pytest.mark.parametrize("scorer", SCORERS)
def test_ties_across_chunks_keep_the_exact_scores_in_row_order(export, tmp_path, scorer):
    """A gallery of 6 distinct rows repeated 50 times: every top-k is a run of ties spread over chunks.

    The rows are unit axes, so a score is one product and equal rows score bit-equal in any
    summation order. Which tied rows make the k-th place is the scorer's choice, so the scores by
    rank must be the exact scan's, and the hits of one score come in row order.
    """
    path = tmp_path / "ties"
    stored = np.tile(np.eye(6, DIM, dtype=np.float16), (50, 1))
    write_index(path, stored, [f"img{i:03d}" for i in range(ROWS)], export[0], export[1])
    gallery = stored.astype(np.float32)
    searcher = Searcher(path, scorer=scorer, chunk_rows=7)
    queries = searcher.encode_batch(TEXTS[:3])
    for k in (1, 5, 49, 120):
        want = [_exact(path, q, k) for q in queries]
        got = searcher.search_batch(queries, k)
        for hits, rows, query in zip(got, want, queries):
            assert np.allclose([h.score for h in hits], gallery[rows] @ query, atol=1e-5), k
            assert [gallery[h.row] @ query for h in hits] == pytest.approx([h.score for h in hits], abs=1e-5)
            assert all((a.score, b.row) > (b.score, a.row) for a, b in itertools.pairwise(hits)), k
        single = searcher.search(queries[0], k)
        assert [(h.row, h.score) for h in single] == [(h.row, h.score) for h in got[0]], k


def test_onnxruntime_scores_one_query_per_run_with_an_older_index(index, tmp_path):
    """Indexes written before score.onnx took several queries: their graph is run once per query."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(index, old)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["gallery"], ["gallery32"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["gallery32", "query"], ["scores"])], "score",
        [helper.make_tensor_value_info("gallery", TensorProto.FLOAT16, ["rows", DIM]),
         helper.make_tensor_value_info("query", TensorProto.FLOAT, [DIM, 1])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["rows", 1])])
    (old / SCORE_ONNX).write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                   .SerializeToString())
    searcher = Searcher(old, scorer="onnxruntime", chunk_rows=50)
    assert not searcher._ort_batched and Searcher(index, scorer="onnxruntime")._ort_batched
    queries = searcher.encode_batch(TEXTS)
    assert [[h.row for h in hits] for hits in searcher.search_batch(queries, 5)] == \
        [_exact(index, q, 5) for q in queries]


def test_an_empty_gallery_has_no_hits(export, tmp_path):
    write_index(tmp_path / "empty", np.zeros((0, DIM), np.float16), [], export[0], export[1])
    for scorer in SCORERS:
        searcher = Searcher(tmp_path / "empty", scorer=scorer)
        assert searcher.query("a red circle", 5) == [] and searcher.query_batch(["a", "b"], 5) == [[], []]


def test_an_unknown_scorer_is_refused(index):
    with pytest.raises(ValueError, match="scorer must be one of"):
        Searcher(index, scorer="annoy")
