"""The single-stream re-ranking scores: ITM alone, and ITM + ITC at the teacher's ITC temperature."""

import copy

import pytest

from mcad_cache.evaluate import evaluate_single_stream
from mcad_cache.teachers import blip
from mcad_world.configs import IMAGE_MEAN, IMAGE_STD
from mcad_cache.teachers.single import load_single
from mcad_core.shards import list_shards, load_split


def test_itc_temperature_is_saved_with_the_teacher_and_hub_models_default_to_raw_cosine(
        tiny_blip, tokenizer_dir, tmp_path):
    model, spec = tiny_blip
    assert load_single(spec).itc_temperature == 1.0  # saved without one, as hub checkpoints are
    saved = blip.save_local(copy.deepcopy(model), tokenizer_dir, 32, IMAGE_MEAN, IMAGE_STD, tmp_path / "blip",
                              itc_temperature=0.05)
    assert load_single(saved).itc_temperature == 0.05


@pytest.mark.parametrize(("temperature", "same_as"), [(1e-6, "itc"), (1e9, "itm_rerank")])
def test_itm_plus_itc_ranks_by_the_dominant_term(tiny_blip, tiny_world, temperature, same_as):
    """A tiny temperature makes ITC dominate the sum, a huge one leaves ITM's order."""
    teacher = load_single(tiny_blip[1])
    teacher.model.config.itc_temperature = temperature
    split = load_split(list_shards(tiny_world / "test"), image_size=teacher.image_size)
    out = evaluate_single_stream(teacher, split, ks=(1, 5), rerank_k=4, batch_size=7)
    assert out["itm_itc_rerank"] == pytest.approx(out[same_as])
    assert set(out) == {"itc", "itm_rerank", "itm_itc_rerank"}
