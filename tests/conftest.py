"""Shared fixtures: tiny generated worlds and tiny random-init teachers saved in hub layouts."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from transformers import BlipForImageTextRetrieval

from mcad_cache.teachers import blip, dual
from mcad_world.configs import IMAGE_MEAN, IMAGE_STD, blip_config, clip_model_cfg, clip_preprocess_cfg
from mcad_world.config import TowerShape
from mcad_world.synth import WorldConfig, generate
from mcad_world.tokenizer import train_wordpiece

TINY = TowerShape(width=32, layers=1, heads=2, embed_dim=16, patch_size=8)
IMAGE_SIZE = 32
CONTEXT = 24


@pytest.fixture(autouse=True, scope="session")
def _private_user_cache(tmp_path_factory):
    """Shard fingerprints (and anything else mcad caches per user) go to a temporary directory, not ~/.cache."""
    import os

    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate(out, WorldConfig(seed=1, image_size=IMAGE_SIZE, n_train=64, n_val=16, n_test=16,
                              samples_per_shard=16), progress=False)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, tiny_world) -> Path:
    from mcad_core.shards import iter_samples, list_shards

    captions = [c for s in iter_samples(list_shards(tiny_world / "train")) for c in s.captions]
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_wordpiece(captions, out, vocab_size=128)
    return out


def _saved_clip(tmp_path_factory, tokenizer_dir, shape: TowerShape, seed: int, name: str):
    """(model, spec): a random-init open_clip CLIP of ``shape`` saved as a local-dir teacher."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    cfg = clip_model_cfg(shape, IMAGE_SIZE, len(tok), CONTEXT, tok.sep_token_id)
    model = open_clip.model.CLIP(**cfg).eval()
    spec = dual.save_local(model, cfg, clip_preprocess_cfg(IMAGE_SIZE), tokenizer_dir,
                           tmp_path_factory.mktemp(name) / name)
    return model, spec


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory, tokenizer_dir):
    """(model, spec): a random-init open_clip CLIP saved as a local-dir teacher."""
    return _saved_clip(tmp_path_factory, tokenizer_dir, TINY, seed=0, name="clip")


@pytest.fixture(scope="session")
def tiny_clip_b(tmp_path_factory, tokenizer_dir):
    """A second random-init CLIP (another width and seed): AMMKD needs two dual-stream teachers."""
    shape = TowerShape(width=24, layers=1, heads=2, embed_dim=12, patch_size=8)
    return _saved_clip(tmp_path_factory, tokenizer_dir, shape, seed=1, name="clip_b")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_world, tokenizer_dir, tiny_clip, tiny_clip_b, tiny_blip) -> Path:
    """A complete stage-1 store over the tiny world's train split: two CLIPs, 2 views, k=5, blocks of 2 shards."""
    from mcad_cache.job import PASSES, run_cache
    from mcad_cache.config import CacheConfig
    from mcad_core.dist import explicit_place

    store = tmp_path_factory.mktemp("cache") / "tiny.zarr"
    cfg = CacheConfig(shards=str(tiny_world / "train"), store=store, teachers_dir=None,
                      dual=(tiny_clip[1].name, tiny_clip_b[1].name), single=tiny_blip[1].name,
                      tokenizer=str(tokenizer_dir), source_size=IMAGE_SIZE, views=2, k=5, block_shards=2,
                      batch_size=16, itm_batch_size=40, integration_dim=8, integration_steps=5)
    run_cache(cfg, PASSES, explicit_place(0, 1), progress=False)
    return store


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory, tokenizer_dir):
    """(model, spec): a random-init BLIP ITM saved with save_pretrained."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    tokens = {"pad": tok.pad_token_id, "cls": tok.cls_token_id, "sep": tok.sep_token_id}
    model = BlipForImageTextRetrieval(blip_config(TINY, IMAGE_SIZE, len(tok), CONTEXT, tokens)).eval()
    spec = blip.save_local(model, tokenizer_dir, IMAGE_SIZE, IMAGE_MEAN, IMAGE_STD,
                             tmp_path_factory.mktemp("blip") / "blip")
    return model, spec
