"""Config files: nested tables override the enclosing default, and a bad file is a ValueError (exit 2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mcad_cache.config import CacheConfig
from mcad_core.config import load_config_file
from mcad_student.model import STUDENT_PRESETS
from mcad_student.train import DistillConfig
from mcad_world.config import TeachersConfig


def test_a_nested_table_overrides_the_default_student_not_the_class(tmp_path):
    path = tmp_path / "distill.toml"
    path.write_text('steps = 7\n[student]\nembed_dim = 64\n[loss]\nbeta = 0.5\n')
    cfg = load_config_file(path, DistillConfig)
    vit = STUDENT_PRESETS["vit"]
    assert cfg.steps == 7 and cfg.loss.beta == 0.5 and cfg.loss.gamma == DistillConfig().loss.gamma
    assert cfg.student.embed_dim == 64
    # every other student field is the default preset's (vit), not StudentConfig's class default (mobilevit)
    assert cfg.student.image_model == vit.image_model == "vit" and cfg.student.text_width == vit.text_width


def test_a_table_deeper_down_keeps_its_defaults_too(tmp_path):
    path = tmp_path / "teachers.json"
    path.write_text('{"blip": {"schedule": {"lr": 0.001}}}')
    cfg = load_config_file(path, TeachersConfig)
    assert cfg.blip.schedule.lr == 0.001 and cfg.blip.schedule.steps == TeachersConfig().blip.schedule.steps


def test_unknown_keys_and_bad_values_are_value_errors(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[student]\nembd_dim = 64\n')
    with pytest.raises(ValueError, match=r"unknown StudentConfig keys \['embd_dim'\]"):
        load_config_file(path, DistillConfig)
    path.write_text('batch_size = 1\n')
    with pytest.raises(ValueError, match="batch_size must be at least 2"):
        load_config_file(path, DistillConfig)


@pytest.mark.parametrize(("cls", "text", "message"), [
    (DistillConfig, 'steps = "x"', "field `steps` of DistillConfig must be int, got 'x'"),
    (DistillConfig, "steps = 1.5", "field `steps` of DistillConfig must be int, got 1.5"),
    (DistillConfig, "steps = true", "field `steps` of DistillConfig must be int, got True"),
    (DistillConfig, 'lr = "fast"', "field `lr` of DistillConfig must be float, got 'fast'"),
    (DistillConfig, "mode = 3", "field `mode` of DistillConfig must be str, got 3"),
    (DistillConfig, 'amp = "yes"', "field `amp` of DistillConfig must be bool, got 'yes'"),
    (DistillConfig, "store = 3", "field `store` of DistillConfig must be a path (string), got 3"),
    (DistillConfig, "fusion_rule = 3", "field `fusion_rule` of DistillConfig must be str or null, got 3"),
    (DistillConfig, 'student = "vit"', "field `student` of DistillConfig must be a table of StudentConfig"),
    (DistillConfig, '[loss]\nalpha = "a"', ".loss: field `alpha` of LossWeights must be float"),
    (TeachersConfig, '[clip_schedule]\nsteps = "x"', ".clip_schedule: field `steps` of Schedule must be int"),
    (CacheConfig, "view_scale = [0.5]", "field `view_scale` of CacheConfig must be a list of 2 float"),
    (CacheConfig, 'dual = "ViT-B-16:openai"', "field `dual` of CacheConfig must be a list of str"),
    (CacheConfig, 'dual_weights = [1, "x"]', "field `dual_weights` of CacheConfig must be a list of float"),
])
def test_a_value_of_the_wrong_type_names_the_file_the_field_and_the_type(tmp_path, cls, text, message):
    path = tmp_path / "distill.toml"
    path.write_text(text + "\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        load_config_file(path, cls)


def test_values_of_the_right_type_are_taken_as_their_fields_hold_them(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text('{"store": "s.zarr", "teachers_dir": null, "view_scale": [0.5, 1], "dual": ["a", "b"], '
                    '"source_size": null, "fusion_a": 1, "dual_weights": [1, 2]}')
    cfg = load_config_file(path, CacheConfig)
    assert cfg.store == Path("s.zarr") and cfg.teachers_dir is None and cfg.source_size is None
    assert cfg.view_scale == (0.5, 1.0) and cfg.dual == ("a", "b") and cfg.dual_weights == (1.0, 2.0)
    assert isinstance(cfg.fusion_a, float)  # an int is a float
