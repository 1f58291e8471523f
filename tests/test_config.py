"""Config files: nested tables override the enclosing default, and a bad file is a ValueError (exit 2)."""

from __future__ import annotations

import pytest

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
