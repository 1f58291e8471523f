"""A new single-stream teacher kind through the protocol alone: one class, one register call, one spec.

The toy cross-encoder below is not BLIP: its "vision tokens" are a 4x4 average-pooled image, its text
side a bag of token embeddings, its ITM logit a bilinear form of the two. Stage 1 must run on it
unchanged (`mcad cache --single toy:NAME`) and store exactly the ITM logits it computes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from mcad_cache.job import run_cache
from mcad_cache.store import CacheStore
from mcad_cache.teachers.identity import TeacherIdentity, state_dict_sha256
from mcad_cache.teachers.single import (ItmOutput, SingleStreamTeacher, SingleTeacherSpec, TextBatch,
                                        UnknownTeacherKindError, load_single, parse_single, register_single_kind)
from mcad_core.dist import explicit_place

SINGLE = explicit_place(0, 1)
PASSES = ["embed", "search", "rescore", "fuse", "integrate"]


class ToyCrossEncoder(torch.nn.Module):
    image_size = 32

    def __init__(self, spec: SingleTeacherSpec, tokenizer_dir: str, dim: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.pixel_proj = torch.nn.Linear(3, dim)
        self.words = torch.nn.Embedding(len(self.tokenizer), dim)
        self.bilinear = torch.nn.Parameter(torch.randn(dim, dim))

    embed_dim = property(lambda self: self.words.embedding_dim)
    fused_dim = property(lambda self: self.words.embedding_dim)
    itc_temperature = property(lambda self: 1.0)

    def identity(self) -> TeacherIdentity:
        return TeacherIdentity("single", self.spec.name, None, state_dict_sha256(self))

    def pixels_from_uint8(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() / 255.0

    def tokenize(self, texts) -> TextBatch:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=12, return_tensors="pt")
        return TextBatch(enc["input_ids"], enc["attention_mask"])

    def vision_tokens(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 16, dim)
        pooled = F.adaptive_avg_pool2d(pixels, 4).flatten(2).transpose(1, 2)
        return self.pixel_proj(pooled)

    def itc_images(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(tokens.mean(1), dim=-1)

    def _text(self, text: TextBatch) -> torch.Tensor:
        mask = text.attention_mask.unsqueeze(-1).float()
        return (self.words(text.input_ids) * mask).sum(1) / mask.sum(1)

    def itc_texts(self, text: TextBatch) -> torch.Tensor:
        return F.normalize(self._text(text), dim=-1)

    def itm(self, image_tokens, text, image_rows=None) -> ItmOutput:
        image = image_tokens.mean(1) if image_rows is None else image_tokens.mean(1)[image_rows]
        words = self._text(text)
        fused = image * words
        return ItmOutput(logits=((image @ self.bilinear) * words).sum(-1), fused=fused)


@pytest.fixture(scope="module")
def toy_kind(tokenizer_dir):  # registered once: a kind is registered once per process
    loaded: list[ToyCrossEncoder] = []

    def load(spec: SingleTeacherSpec, device="cpu") -> ToyCrossEncoder:
        loaded.append(ToyCrossEncoder(spec, str(tokenizer_dir)))
        return loaded[-1]

    register_single_kind("toy", load)
    return loaded


def test_spec_parsing_picks_the_kind(toy_kind):
    assert parse_single("toy:anything") == SingleTeacherSpec("anything", "toy")
    assert parse_single("Salesforce/blip-itm-base-coco") == SingleTeacherSpec("Salesforce/blip-itm-base-coco", "blip")
    assert parse_single("/data/c:/x") == SingleTeacherSpec("/data/c:/x", "blip")  # an unknown prefix is a name
    assert str(SingleTeacherSpec("anything", "toy")) == "toy:anything"
    with pytest.raises(UnknownTeacherKindError, match="known: .*toy"):
        load_single(SingleTeacherSpec("x", "nope"))
    assert isinstance(load_single(parse_single("toy:x")), SingleStreamTeacher)


def _not_a_teacher(spec: SingleTeacherSpec, device="cpu") -> object:
    return object()


def test_a_loader_must_return_a_teacher():
    register_single_kind("broken", _not_a_teacher)  # the same loader again is fine; another one is refused
    with pytest.raises(ValueError, match="already registered"):
        register_single_kind("broken", lambda spec, device="cpu": object())
    with pytest.raises(TypeError, match="not a SingleStreamTeacher"):
        load_single(SingleTeacherSpec("x", "broken"))


def test_cache_runs_on_a_toy_single_stream_teacher(toy_kind, tiny_world, tokenizer_dir, tiny_clip, tmp_path):
    from mcad_cache.config import CacheConfig

    cfg = CacheConfig(shards=str(tiny_world / "train"), store=tmp_path / "toy.zarr", teachers_dir=None,
                      dual=(tiny_clip[1].name,), single="toy:tiny-cross-encoder", tokenizer=str(tokenizer_dir),
                      source_size=32, views=1, k=5, block_shards=2, batch_size=16, itm_batch_size=40,
                      integration_dim=8, integration_steps=5)
    run_cache(cfg, PASSES, SINGLE, progress=False)
    store = CacheStore.open(cfg.store)
    manifest = store.manifest
    name = manifest["single_teacher"]
    assert manifest["teachers"][name]["spec"] == "toy:tiny-cross-encoder"
    assert manifest["teachers"][name]["fused_dim"] == 6
    toy = toy_kind[-1]

    # The stored ITM logits of block 0's i2t lists are the toy's own scores of those pairs.
    from mcad_cache.store import block_name
    from mcad_core.shards import list_shards, load_split

    block = manifest["search"]["blocks"][0]
    data = load_split([s for s in list_shards(cfg.shards) if any(s.endswith(f"{b}.tar") for b in block)],
                      image_size=32)
    texts = [t for captions in data.captions for t in captions]
    group = store.block_group(block_name(0))
    i2t_ids, i2t_itm = group["i2t/ids"][...], group["i2t/itm"][...]
    with torch.no_grad():
        tokens = toy.vision_tokens(toy.pixels_from_uint8(data.images[:4]))
        pairs = toy.tokenize([texts[j] for j in i2t_ids[:4].reshape(-1)])
        expected = toy.itm(tokens, pairs, torch.arange(4).repeat_interleave(i2t_ids.shape[1])).logits
    assert np.allclose(i2t_itm[:4].reshape(-1), expected.numpy(), atol=1e-3)

    # A reload through the manifest's spec finds the same kind (what the online baseline does).
    again = load_single(parse_single(manifest["teachers"][name]["spec"]))
    assert isinstance(again, ToyCrossEncoder)
