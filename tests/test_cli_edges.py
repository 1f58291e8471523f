"""The edges a user hits on the command line: each a named error with the README's exit code, nothing written,
and help pages that say the defaults and the registered names. No model is built here."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def _fake_store(path: Path, blocks: list[list[int]]) -> Path:
    """A finished-looking cache store that holds only what the batch-size check reads: the manifest's blocks
    and each shard's done marker with its sample count."""
    from mcad_cache.schema import SCHEMA_VERSION
    from mcad_cache.store import CacheStore

    names = [[f"{b:02d}{i:03d}" for i in range(len(block))] for b, block in enumerate(blocks)]
    store = CacheStore.create_or_open(path, {"schema_version": SCHEMA_VERSION, "search": {"blocks": names}})
    for block_names, counts in zip(names, blocks, strict=True):
        for name, samples in zip(block_names, counts, strict=True):
            store.root["shards"].require_group(name)
            store.mark_shard(name, {"samples": samples})
    return path


def _in_a_fresh_process(args: list, tmp_path: Path) -> tuple[int, str, bool]:
    """(exit code, output, whether torch was imported) of `mcad ARGS` in a new interpreter."""
    script = ("import sys\nfrom click.testing import CliRunner\nfrom pipeline.cli import main\n"
              "result = CliRunner().invoke(main, sys.argv[1:])\n"
              "print(result.exit_code, 'torch' in sys.modules)\nprint(result.output)\n")
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          timeout=120)
    assert done.returncode == 0, done.stderr
    first, _, output = done.stdout.partition("\n")
    code, torch_imported = first.split()
    return int(code), output, torch_imported == "True"


# ------------------------------------------------------------------ 1. mcad distill


def test_distill_refuses_an_out_that_is_a_file(tmp_path):
    out = tmp_path / "run"
    out.write_text("keep me")
    before = _files(tmp_path)
    result = CliRunner().invoke(main, ["distill", "--store", str(tmp_path / "none.zarr"), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert f"--out {out} is an existing file, not a run directory" in result.output
    assert out.read_text() == "keep me" and _files(tmp_path) == before


def test_distill_refuses_an_out_below_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(main, ["distill", "--out", str(tmp_path / "file" / "run")])
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'file'} is a file, not a directory" in result.output


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--alpha", "-1", "-1.0 is not in the range x>=0"),
    ("--beta", "-0.5", "-0.5 is not in the range x>=0"),
    ("--gamma", "-2", "-2.0 is not in the range x>=0"),
    ("--kd-temperature", "0", "temperatures must be positive"),
    ("--kd-temperature", "-1", "temperatures must be positive"),
])
def test_distill_refuses_negative_loss_weights_and_temperatures(tmp_path, option, value, message):
    result = CliRunner().invoke(main, ["distill", "--out", str(tmp_path / "run"), option, value])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("weight", ["alpha", "beta", "gamma"])
def test_distill_refuses_negative_loss_weights_from_a_config_file(tmp_path, weight):
    config = tmp_path / "distill.json"
    config.write_text(json.dumps({"out_dir": str(tmp_path / "run"), "loss": {weight: -1}}))
    result = CliRunner().invoke(main, ["distill", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert f"{weight} (the weight of" in result.output and "must be 0 or more, got -1.0" in result.output
    assert not (tmp_path / "run").exists()


def test_distill_refuses_a_batch_larger_than_the_store_can_give(tiny_cache, tiny_world, tmp_path):
    before = _files(tiny_cache)
    result = CliRunner().invoke(main, ["distill", "--store", str(tiny_cache), "--out", str(tmp_path / "run"),
                                       "--eval-shards", str(tiny_world / "val"), "--batch-size", "100000"])
    assert result.exit_code == 2, result.output
    assert (f"batch_size 100000 is more than the store {tiny_cache} can give: it holds 64 images (at most 32 in "
            "one of its 2 blocks, and a batch is drawn from one block); use --batch-size 32 or less") in result.output
    assert not (tmp_path / "run").exists() and _files(tiny_cache) == before


def test_a_missing_input_is_named_before_the_batch_size(tiny_cache, tmp_path):
    result = CliRunner().invoke(main, ["distill", "--store", str(tiny_cache), "--out", str(tmp_path / "run"),
                                       "--eval-shards", str(tmp_path / "no_val"), "--batch-size", "100000"])
    assert result.exit_code == 3, result.output
    assert "no shard file or directory" in result.output
    assert not (tmp_path / "run").exists()


def test_the_batch_check_passes_batches_the_store_can_give_and_leaves_missing_stores_to_the_input_checks(tmp_path):
    from pipeline.cli import batch_size_problem

    store = _fake_store(tmp_path / "cache.zarr", [[60, 60], [80]])
    assert batch_size_problem(store, 120) is None
    assert "at most 120" in batch_size_problem(store, 121)
    assert batch_size_problem(tmp_path / "none.zarr", 100000) is None  # `mcad distill` names it: exit 3
    one_block = _fake_store(tmp_path / "one.zarr", [[120, 80]])
    assert "it holds 200 images (all in one block); use --batch-size 200 or less" in batch_size_problem(one_block, 201)


@pytest.mark.parametrize(("options", "message"), [
    (["--fusion", "reconstruction", "--fusion-a", "3"], "reconstruction needs 0 <= a <= 1, got a=3.0"),
    (["--fusion", "reconstruction", "--fusion-a", "-0.1"], "reconstruction needs 0 <= a <= 1"),
    (["--fusion", "itm_topk", "--fusion-a", "nan"], "the weight a must be a finite number"),
    (["--fusion-a", "0.5"], "--fusion-a is the weight of a --fusion rule: name the rule with --fusion"),
])
def test_distill_checks_the_fusion_weight_before_the_run_directory_exists(tmp_path, options, message):
    result = CliRunner().invoke(main, ["distill", "--store", str(tmp_path / "none.zarr"), "--out",
                                       str(tmp_path / "run"), *options])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ 2. mcad teachers


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_teachers_without_its_data_is_a_missing_input(tmp_path, kind):
    data = tmp_path / "data"
    if kind == "file":
        data.write_text("")
    out = tmp_path / "teachers"
    result = CliRunner().invoke(main, ["teachers", "--data", str(data), "--out", str(out)])
    assert result.exit_code == 3, result.output
    what = "does not exist" if kind == "missing" else "is not a directory"
    assert f"error: data directory {data} (--data, or data_dir in --config) {what}: run `mcad data` first" \
        in result.output
    assert not out.exists()


# ------------------------------------------------------------------ 3. mcad ablation --report-only

METRICS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_recall")


def _finished_run(out: Path, name: str, seed: int, steps: int, recall: float) -> None:
    run = out / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"steps": steps, "batch_size": 16, "lr": 0.001, "eval_shards": "val",
                                                 "seed": seed}))
    (run / "summary.json").write_text(json.dumps({
        "seed": seed, "recalls": {m: recall for m in METRICS}, "seconds": 1.0, "steps_per_second": 7.0,
        "parameters": 1000}))


def test_report_only_with_no_runs_is_a_missing_input_and_imports_no_torch(tmp_path):
    code, output, torch_imported = _in_a_fresh_process(["ablation", "--report-only", "--out", "runs"], tmp_path)
    assert code == 3, output
    assert "error: no ablation runs under runs" in output
    assert not torch_imported
    assert not (tmp_path / "runs").exists()


def test_report_only_reads_the_steps_from_the_runs_and_imports_no_torch(tmp_path):
    out = tmp_path / "abl"
    _finished_run(out, "a_contrastive_s0", 0, steps=7, recall=50.0)
    _finished_run(out, "b_dual_kd_s0", 0, steps=7, recall=53.0)
    (out / "c_fused_kd_s0").mkdir()  # still training: left out
    code, output, torch_imported = _in_a_fresh_process(["ablation", "--report-only", "--out", "abl",
                                                        "--seeds", "0"], tmp_path)
    assert code == 0, output
    assert not torch_imported
    assert "7 steps per row, batch 16, peak lr 0.001" in output and "recalls on val" in output
    report = json.loads((out / "ablation.json").read_text())
    assert [row["row"] for row in report["rows"]] == ["a", "b"]
    assert report["paired"][0]["diffs"] == [3.0]


def test_report_only_refuses_runs_that_cannot_share_one_table(tmp_path):
    out = tmp_path / "abl"
    _finished_run(out, "a_contrastive_s0", 0, steps=7, recall=50.0)
    _finished_run(out, "b_dual_kd_s0", 0, steps=9, recall=53.0)
    result = CliRunner().invoke(main, ["ablation", "--report-only", "--out", str(out), "--seeds", "0"])
    assert result.exit_code == 1, result.output
    assert "steps 9 against 7" in result.output
    assert not (out / "ablation.json").exists()


def test_report_only_checks_steps_given_against_the_runs(tmp_path):
    out = tmp_path / "abl"
    _finished_run(out, "a_contrastive_s0", 0, steps=7, recall=50.0)
    result = CliRunner().invoke(main, ["ablation", "--report-only", "--out", str(out), "--seeds", "0",
                                       "--steps", "9"])
    assert result.exit_code == 2, result.output
    assert "the runs under" in result.output and "trained 7 steps" in result.output
    assert not (out / "ablation.json").exists()


@pytest.mark.parametrize(("options", "message"), [
    (["--rows", "a,z"], "unknown rows ['z']"),
    (["--seeds", "0,x"], "'0,x' is not a comma-separated list of integers"),
])
def test_ablation_refuses_bad_rows_and_seeds(tmp_path, options, message):
    result = CliRunner().invoke(main, ["ablation", "--out", str(tmp_path / "abl"), *options])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "abl").exists()


def test_ablation_help_documents_report_only():
    result = CliRunner().invoke(main, ["ablation", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "no training option needs repeating" in text and "none finished: exit 3" in text


# ------------------------------------------------------------------ 4. config values of the wrong type


def test_a_distill_config_value_of_the_wrong_type_names_the_field(tmp_path):
    config = tmp_path / "distill.json"
    config.write_text(json.dumps({"steps": "x", "out_dir": str(tmp_path / "run")}))
    result = CliRunner().invoke(main, ["distill", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert f"{config}: field `steps` of DistillConfig must be int, got 'x'" in result.output
    assert not (tmp_path / "run").exists()


def test_a_teachers_config_value_of_the_wrong_type_names_the_field(tmp_path):
    config = tmp_path / "teachers.toml"
    config.write_text('[clip_schedule]\nsteps = "x"\n')
    result = CliRunner().invoke(main, ["teachers", "--config", str(config), "--data", str(tmp_path),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert f"{config}.clip_schedule: field `steps` of Schedule must be int, got 'x'" in result.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 5. mcad search


def test_search_refuses_a_query_that_is_not_utf8_on_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "search", "--index", str(tmp_path), "--query",
                           b"red \xff\xfe"], capture_output=True, cwd=ROOT, timeout=120)
    stderr = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2, stderr
    assert "Invalid value for --query: not UTF-8 text: b'red \\xff\\xfe'" in stderr
    assert "Traceback" not in stderr


def test_search_refuses_surrogates_before_opening_the_index(tmp_path):
    result = CliRunner().invoke(main, ["search", "--index", str(tmp_path / "none"), "--query", "a\udcff"])
    assert result.exit_code == 2, result.output
    assert "not UTF-8 text" in result.output


# ------------------------------------------------------------------ 6. help, version, speed


def _help_records(command, names) -> dict[str, str]:
    import click

    ctx = click.Context(command, info_name=command.name)
    return {p.name: p.get_help_record(ctx)[1] for p in command.params if p.name in names}


def test_cache_help_shows_the_cacheconfig_defaults():
    from mcad_cache.config import CacheConfig
    from pipeline.cli import cache

    defaults = CacheConfig()
    fields = {"shards", "store", "teachers_dir", "views", "single_itc_views", "k", "block_shards", "fusion_rule",
              "fusion_a", "on_error", "threads", "device"}
    records = _help_records(cache, fields)
    assert set(records) == fields
    for name, text in records.items():
        assert f"[default: {getattr(defaults, name)}]" in text, name
    result = CliRunner().invoke(main, ["cache", "--help"])
    assert result.exit_code == 0 and "[default: artifacts/cache/default.zarr]" in result.output


def test_distill_help_shows_the_distillconfig_defaults():
    from mcad_student.train import DistillConfig
    from pipeline.cli import distill

    cfg = DistillConfig()
    expected = {"store": cfg.store, "out_dir": cfg.out_dir, "mode": cfg.mode, "steps": cfg.steps,
                "batch_size": cfg.batch_size, "lr": cfg.lr, "warmup": cfg.warmup, "seed": cfg.seed,
                "alpha": cfg.loss.alpha, "beta": cfg.loss.beta, "gamma": cfg.loss.gamma,
                "kd_direction": cfg.loss.kd_direction, "batching": cfg.batching,
                "eval_shards": cfg.eval_shards or "the val split beside the store's source shards",
                "checkpoint_every": cfg.checkpoint_every, "fusion_a": cfg.fusion_a, "amp": "no-amp",
                "student_preset": "vit"}
    records = _help_records(distill, set(expected))
    for name, value in expected.items():
        assert f"[default: {value}]" in records[name], name
    # the options stay None unless given, so a --config file can set them
    params = distill.make_context("distill", []).params
    assert all(params[name] is None for name in expected), params


def test_help_lists_the_registered_names_extensions_included(monkeypatch):
    from mcad_cache import fusion
    from mcad_student import model, train

    monkeypatch.setitem(fusion.FUSION_RULES, "my_rule", fusion.itm_topk)
    monkeypatch.setitem(model.STUDENT_PRESETS, "my_student", model.STUDENT_PRESETS["vit"])
    monkeypatch.setattr(train, "MODES", (*train.MODES, "my_mode"))
    result = CliRunner().invoke(main, ["distill", "--help"])
    assert result.exit_code == 0, result.output
    assert "--fusion [dual_only|itm_topk|my_rule|reconstruction]" in result.output
    assert "my_student" in result.output and "my_mode" in result.output
    result = CliRunner().invoke(main, ["cache", "--help"])
    assert "--fusion [dual_only|itm_topk|my_rule|reconstruction]" in result.output


def test_version():
    from importlib.metadata import version

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"mcad {version('mcad')}"


@pytest.mark.parametrize("args", [
    ["--help"], ["--version"], ["distill", "--steps", "x"], ["distill", "--bogus"], ["cache", "-k", "x"],
    ["search", "--index", "none", "--query", "a\udcff"],
])
def test_help_version_and_bad_options_import_no_torch(tmp_path, args):
    code, output, torch_imported = _in_a_fresh_process(args, tmp_path)
    assert code in (0, 2), output
    assert not torch_imported


# ------------------------------------------------------------------ 7. -v


@pytest.fixture
def restore_logging():
    yield
    from pipeline.cli import configure_logging

    configure_logging(False)


@pytest.mark.parametrize("verbose", [True, False])
def test_verbose_shows_mcads_info_logs(tmp_path, restore_logging, verbose):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "00099.tar").write_bytes(b"")  # a stale shard the data command removes, logging INFO
    result = CliRunner().invoke(main, [*(["-v"] if verbose else []), "data", "--out", str(tmp_path),
                                       "--n-train", "8", "--n-val", "8", "--n-test", "8",
                                       "--samples-per-shard", "8", "--image-size", "32"])
    assert result.exit_code == 0, result.output
    assert ("INFO mcad_world.synth: removing stale shard" in result.stderr) == verbose


def test_verbose_keeps_third_party_loggers_at_warning(restore_logging):
    from pipeline.cli import MCAD_LOGGERS, configure_logging

    configure_logging(True)
    for name in (*MCAD_LOGGERS, "mcad_student.train", "pipeline.ablation"):
        assert logging.getLogger(name).getEffectiveLevel() == logging.INFO, name
    for name in ("transformers", "urllib3", "torch", "PIL.Image"):
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING, name
    configure_logging(True)  # a second call replaces its handler, so nothing prints twice
    assert sum(type(h).__name__ == "_StderrHandler" for h in logging.getLogger().handlers) == 1
