"""Stage 2 refuses bad inputs before any work: a named error, and no run directory left behind.

Each case once hung (batch size 1 or below: every batch is skipped for lack of in-batch negatives),
divided by zero (batch size 0, checkpoint_every 0), trained nothing (steps 0) or failed only after
training (missing eval shards).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from mcad_student.model import StudentConfig
from mcad_student.train import DistillConfig, DistillConfigError, distill
from pipeline.cli import main
from mcad_core.shards import NoShardsError

TINY_STUDENT = StudentConfig(image_model="mobilevitv2_050", image_size=32, text_layers=1, text_width=32,
                             text_heads=2, text_intermediate=64, embed_dim=16)

BAD_VALUES = [
    ({"batch_size": 1}, "batch_size must be at least 2"),
    ({"batch_size": 0}, "batch_size must be at least 2"),
    ({"batch_size": -1}, "batch_size must be at least 2"),
    ({"checkpoint_every": 0}, "checkpoint_every must be at least 1"),
    ({"steps": 0}, "steps must be at least 1"),
    ({"steps": -3}, "steps must be at least 1"),
    ({"lr": 0.0}, "lr must be positive"),
    ({"warmup": -1}, "warmup must be 0 or more"),
    ({"eval_every": -1}, "eval_every must be 0"),
    ({"online": True, "mode": "dual_kd"}, "online baseline runs mode 'mcad' only"),
]

# The same values as command-line options (the CLI maps a refused config to a usage error, exit 2).
BAD_OPTIONS = [
    (["--batch-size", "1"], "batch_size must be at least 2"),
    (["--batch-size", "0"], "batch_size must be at least 2"),
    (["--batch-size", "-1"], "batch_size must be at least 2"),
    (["--checkpoint-every", "0"], "checkpoint_every must be at least 1"),
    (["--steps", "0"], "steps must be at least 1"),
    (["--lr", "0"], "lr must be positive"),
    (["--warmup", "-1"], "warmup must be 0 or more"),
    (["--eval-every", "-1"], "eval_every must be 0"),
    (["--kd-temperature", "0"], "temperatures must be positive"),
]


def _cfg(store: Path, eval_shards: Path, out: Path, **kw) -> DistillConfig:
    return DistillConfig(store=store, out_dir=out, student=TINY_STUDENT, steps=2, batch_size=16, warmup=1,
                         checkpoint_every=1, eval_shards=str(eval_shards), threads=1, **kw)


@pytest.mark.parametrize(("values", "message"), BAD_VALUES, ids=[json.dumps(v) for v, _ in BAD_VALUES])
def test_config_refuses_values_no_run_can_use(values, message):
    with pytest.raises(DistillConfigError, match=message):
        DistillConfig(**values)
    with pytest.raises(DistillConfigError, match=message):  # replace() (the CLI's overrides) checks too
        replace(DistillConfig(), **values)


def test_config_error_is_a_value_error():
    assert issubclass(DistillConfigError, ValueError)


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_cli_refuses_bad_values_before_creating_the_run_directory(tiny_cache, tiny_world, tmp_path, options,
                                                                  message):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["distill", "--store", str(tiny_cache), "--out", str(out), "--eval-shards",
                                       str(tiny_world / "val"), *options])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_cli_refuses_bad_values_from_a_config_file(tiny_cache, tmp_path):
    config = tmp_path / "distill.json"
    config.write_text(json.dumps({"batch_size": 1, "store": str(tiny_cache), "out_dir": str(tmp_path / "run")}))
    result = CliRunner().invoke(main, ["distill", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "batch_size must be at least 2" in result.output
    assert not (tmp_path / "run").exists()


def test_missing_eval_shards_are_refused_before_training(tiny_cache, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NoShardsError, match="no shard file or directory"):
        distill(_cfg(tiny_cache, tmp_path / "no_val", out), progress=False)
    assert not out.exists()


def test_an_eval_directory_without_shards_is_refused(tiny_cache, tmp_path):
    (tmp_path / "empty_val").mkdir()
    with pytest.raises(NoShardsError, match="no \\*.tar shards"):
        distill(_cfg(tiny_cache, tmp_path / "empty_val", tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_missing_store_is_refused_before_the_run_directory_exists(tiny_world, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="no cache store .*run `mcad cache` first"):
        distill(_cfg(tmp_path / "none.zarr", tiny_world / "val", out), progress=False)
    assert not out.exists()


@pytest.mark.parametrize("missing", ["store", "eval_shards"])
def test_cli_names_a_missing_input_and_creates_nothing(tiny_cache, tiny_world, tmp_path, missing):
    store = tmp_path / "none.zarr" if missing == "store" else tiny_cache
    shards = tmp_path / "no_val" if missing == "eval_shards" else tiny_world / "val"
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["distill", "--store", str(store), "--out", str(out), "--eval-shards",
                                       str(shards)])
    assert result.exit_code == 3, result.output  # a missing input, like `mcad cache` without teachers
    assert ("no cache store" if missing == "store" else "no shard file or directory") in result.output
    assert not out.exists()


def test_resume_check_treats_relative_and_absolute_paths_to_the_same_files_alike(tiny_cache, tiny_world, tmp_path,
                                                                                 monkeypatch):
    """A run whose eval shards were written relative resumes when they are given absolute now (and back)."""
    import dataclasses

    from mcad_student.train import config_differences

    monkeypatch.chdir(tiny_world)
    relative = _cfg(tiny_cache, "val", tmp_path / "run")
    absolute = dataclasses.replace(relative, eval_shards=str(tiny_world / "val"))
    assert "eval_shards" not in config_differences(relative.to_dict(), absolute, "test")
    elsewhere = dataclasses.replace(relative, eval_shards=str(tiny_world / "test"))
    assert "eval_shards" in config_differences(relative.to_dict(), elsewhere, "test")


def test_eval_shards_default_to_the_val_split_beside_the_stores_shards(tiny_cache, tiny_world):
    """No --eval-shards: a student is measured on its own world's val split (tiny_world/val for a store of
    tiny_world/train), never on a path that names the default world."""
    from mcad_student.train import check_inputs

    inputs = check_inputs(DistillConfig(store=tiny_cache))
    assert Path(inputs.eval_shards).resolve() == (tiny_world / "val").resolve()
    assert check_inputs(DistillConfig(store=tiny_cache, eval_shards=str(tiny_world / "test"))).eval_shards == str(
        tiny_world / "test")  # a named split is kept as given


def test_no_val_split_beside_the_shards_is_a_named_error_before_training(tiny_world, tmp_path):
    import shutil

    from mcad_student.train import NoEvalShardsError, default_eval_shards
    from mcad_core.shards import list_shards

    moved = tmp_path / "only_train" / "train"
    shutil.copytree(tiny_world / "train", moved)
    with pytest.raises(NoEvalShardsError, match="no --eval-shards given and no val split beside"):
        default_eval_shards(list_shards(moved))
    assert Path(default_eval_shards(list_shards(tiny_world / "train"))).resolve() == (tiny_world / "val").resolve()
    # Shards spread over two directories have no one sibling val split.
    with pytest.raises(NoEvalShardsError):
        default_eval_shards([*list_shards(moved), *list_shards(tiny_world / "train")])


def test_cli_without_eval_shards_measures_on_the_stores_val_split_and_records_it(tiny_cache, tiny_world, tmp_path):
    out, config = tmp_path / "run", tmp_path / "distill.json"
    config.write_text(json.dumps({"student": {"image_size": 32, "text_layers": 1, "text_width": 32, "text_heads": 2,
                                              "text_intermediate": 64, "embed_dim": 16},
                                  "batch_size": 16, "warmup": 1, "threads": 1}))
    result = CliRunner().invoke(main, ["distill", "--config", str(config), "--store", str(tiny_cache), "--out",
                                       str(out), "--steps", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert Path(summary["eval_shards"]).resolve() == (tiny_world / "val").resolve()
    assert Path(json.loads((out / "config.json").read_text())["eval_shards"]).resolve() == (tiny_world / "val").resolve()
