"""The student is an ordinary open_clip model: built, saved and reloaded through open_clip's own API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from mcad_student.model import (
    HEADS_WEIGHTS,
    OPEN_CLIP_CONFIG,
    STUDENT_CONFIG,
    StudentConfig,
    build_student,
    load_student,
    relocate_student,
    save_student,
)
from mcad_world.tokenizer import train_wordpiece

CAPTIONS = [
    "a red circle left of a blue square",
    "a blue square above a green triangle",
    "a green triangle right of a red circle",
    "a small yellow square below a large blue circle",
]
TINY = StudentConfig(
    text_layers=1, text_width=32, text_heads=2, text_intermediate=64, embed_dim=16, image_size=64, feature_dims=(8, 12)
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student_tok") / "tokenizer"
    train_wordpiece(CAPTIONS, out, vocab_size=64)
    return out


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer_dir):
    torch.manual_seed(0)
    return build_student(TINY, tokenizer_dir, tmp_path_factory.mktemp("student_work")).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, student, tokenizer_dir) -> str:
    return save_student(student, tokenizer_dir, tmp_path_factory.mktemp("student_out") / "student")


def _pixels(student, n=3):
    images = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return student.pixels_from_uint8(images)


def _ids(tokenizer_dir, texts=CAPTIONS[:3], context_length=TINY.context_length):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return tok(list(texts), padding="max_length", max_length=context_length, truncation=True,
               return_tensors="pt").input_ids


def test_build_gives_an_open_clip_model_with_normalized_embeddings(student, tokenizer_dir):
    assert isinstance(student.clip, open_clip.CustomTextCLIP)
    assert student.clip.text.config.pad_token_id == 0
    assert student.clip.text.config.vocab_size == len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    pixels, ids = _pixels(student), _ids(tokenizer_dir)
    with torch.no_grad():
        image, text = student.encode_image(pixels), student.encode_text(ids)
        out = student(pixels, ids)
    assert image.shape == (3, 16) and text.shape == (3, 16)
    assert torch.allclose(image.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert set(out) == {"image", "text", "image_raw", "text_raw", "logit_scale"}
    assert torch.allclose(out["image"], image) and torch.allclose(out["text"], text)
    assert torch.allclose(torch.nn.functional.normalize(out["image_raw"], dim=-1), image)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-4)
    assert [student.project(out["image_raw"], h).shape for h in range(2)] == [(3, 8), (3, 12)]
    assert student.context_length == TINY.context_length == ids.shape[1]


def test_padding_does_not_change_the_text_embedding(student, tokenizer_dir):
    """Mean pooling over the pad-id mask: a caption's embedding ignores how much padding follows it."""
    with torch.no_grad():
        short = student.encode_text(_ids(tokenizer_dir, CAPTIONS[:1], context_length=16))
        long = student.encode_text(_ids(tokenizer_dir, CAPTIONS[:1], context_length=24))
    assert torch.allclose(short, long, atol=1e-5)


def test_pixels_from_uint8_checks_size(student):
    with pytest.raises(ValueError, match="expects 64x64"):
        student.pixels_from_uint8(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_saved_student_loads_in_plain_open_clip_with_identical_embeddings(student, saved, tokenizer_dir):
    assert saved.startswith("local-dir:")
    model, _, preprocess = open_clip.create_model_and_transforms(saved)
    model.eval()
    pixels, ids = _pixels(student), _ids(tokenizer_dir)
    with torch.no_grad():
        assert torch.equal(model.encode_image(pixels, normalize=True), student.encode_image(pixels))
        assert torch.equal(model.encode_text(ids, normalize=True), student.encode_text(ids))
    assert model.visual.preprocess_cfg["mean"] == student.preprocess_cfg["mean"]
    assert preprocess is not None


def test_load_student_restores_heads_and_config(student, saved, tokenizer_dir):
    loaded = load_student(saved).eval()
    assert loaded.config == TINY
    pixels, ids = _pixels(student), _ids(tokenizer_dir)
    with torch.no_grad():
        expected, got = student(pixels, ids), loaded(pixels, ids)
        for key in expected:
            assert torch.equal(expected[key], got[key]), key
        for head in range(len(TINY.feature_dims)):
            assert torch.equal(student.project(expected["text_raw"], head), loaded.project(got["text_raw"], head))
    assert torch.equal(student.mean, loaded.mean) and torch.equal(student.std, loaded.std)


def test_open_clip_tokenizer_is_the_bundled_one(saved, tokenizer_dir):
    tokenizer = open_clip.get_tokenizer(saved)
    ids = tokenizer(CAPTIONS[:3])
    assert ids.shape == (3, TINY.context_length)
    assert torch.equal(ids, _ids(tokenizer_dir))
    assert tokenizer.tokenizer.pad_token_id == 0 and (ids[0] == 0).any()


def test_saved_directory_is_self_contained_and_relocatable(student, saved, tmp_path, tokenizer_dir):
    """open_clip resolves ``hf_model_name`` from the process's cwd, so the config holds absolute paths:
    load_student copes with a move by itself, plain open_clip after ``relocate_student``."""
    source = Path(saved.removeprefix("local-dir:"))
    config = json.loads((source / OPEN_CLIP_CONFIG).read_text())["model_cfg"]["text_cfg"]
    assert config["hf_model_name"] == str(source / "text")
    assert {HEADS_WEIGHTS, STUDENT_CONFIG, "text"} <= {p.name for p in source.iterdir()}

    moved = tmp_path / "renamed"
    shutil.copytree(source, moved)
    hidden = source.with_name(source.name + ".away")
    source.rename(hidden)  # the original location is gone, as after a real move
    try:
        pixels, ids = _pixels(student), _ids(tokenizer_dir)
        loaded = load_student(moved).eval()
        with torch.no_grad():
            assert torch.equal(loaded.encode_text(ids), student.encode_text(ids))
        with pytest.raises((OSError, ValueError)):
            open_clip.create_model_and_transforms(f"local-dir:{moved}")
        spec = relocate_student(moved)
        assert spec == f"local-dir:{moved.resolve()}"
        model, _, _ = open_clip.create_model_and_transforms(spec)
        with torch.no_grad():
            assert torch.equal(model.eval().encode_image(pixels, normalize=True), student.encode_image(pixels))
        assert torch.equal(open_clip.get_tokenizer(spec)(CAPTIONS[:3]), ids)
    finally:
        hidden.rename(source)


def test_save_replaces_an_existing_directory(student, tokenizer_dir, tmp_path):
    out = tmp_path / "student"
    save_student(student, tokenizer_dir, out)
    (out / "stale.txt").write_text("old")
    save_student(student, tokenizer_dir, out)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no scratch directory left behind


def test_pretrained_text_and_image_weights_from_local_files(tokenizer_dir, tmp_path):
    import timm

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(1)
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=48, max_position_embeddings=32, pad_token_id=0))
    bert.save_pretrained(str(tmp_path / "bert"))
    trunk = timm.create_model("mobilevitv2_050", pretrained=False)
    torch.save(trunk.state_dict(), tmp_path / "trunk.pth")

    cfg = StudentConfig(text_model=str(tmp_path / "bert"), image_pretrained=str(tmp_path / "trunk.pth"),
                        embed_dim=16, image_size=64)
    student = build_student(cfg, tokenizer_dir, tmp_path / "work")
    text = student.clip.text.transformer
    assert text.config.hidden_size == 24  # the pretrained config decides the shape, not text_width
    assert torch.equal(text.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    assert torch.equal(text.encoder.layer[0].output.dense.weight, bert.encoder.layer[0].output.dense.weight)
    expected = trunk.state_dict()
    for key, value in student.clip.visual.trunk.state_dict().items():
        assert torch.equal(value, expected[key]), key


VIT_TINY = StudentConfig(image_model="vit", image_width=32, image_layers=1, image_heads=2, image_patch=16,
                         text_layers=1, text_width=32, text_heads=2, text_intermediate=64, embed_dim=16,
                         image_size=64, feature_dims=(8,))


def test_vit_student_is_open_clips_own_vit_and_loads_in_plain_open_clip(tokenizer_dir, tmp_path):
    torch.manual_seed(0)
    student = build_student(VIT_TINY, tokenizer_dir, tmp_path / "work").eval()
    assert isinstance(student.clip.visual, open_clip.transformer.VisionTransformer)
    assert student.clip.visual.conv1.kernel_size == (16, 16) and len(student.clip.visual.transformer.resblocks) == 1
    saved = save_student(student, tokenizer_dir, tmp_path / "student")
    model, _, _ = open_clip.create_model_and_transforms(saved)
    pixels, ids = _pixels(student), _ids(tokenizer_dir)
    with torch.no_grad():
        assert torch.equal(model.eval().encode_image(pixels, normalize=True), student.encode_image(pixels))
        assert torch.equal(model.encode_text(ids, normalize=True), student.encode_text(ids))
    assert load_student(saved).config == VIT_TINY


@pytest.mark.parametrize("change, message", [
    ({"image_width": 33}, "multiple of image_heads"),
    ({"image_patch": 12}, "image_size (64) of image_patch (12)"),
    ({"image_pretrained": "timm"}, "random init"),
])
def test_vit_student_refuses_shapes_it_cannot_build(change, message):
    from dataclasses import replace

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        replace(VIT_TINY, **change)
