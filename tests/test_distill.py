"""Stage 2 on a tiny cache: targets from the cache, neighbour batching, resume, refusals, the CLI."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from mcad_cache.store import CacheMismatchError
from mcad_student.data import CacheBatches, Position, read_block
from mcad_student.model import StudentConfig
from mcad_student.train import DistillConfig, ResumeMismatchError, distill

TINY_STUDENT = StudentConfig(image_model="mobilevitv2_050", image_size=32, text_layers=1, text_width=32,
                             text_heads=2, text_intermediate=64, embed_dim=16)


def _cfg(tiny_cache, tiny_world, tmp_path, **kw) -> DistillConfig:
    # mode mcad: every loss term (itc, kd, fd, ia) is logged, so the crash tests compare every column
    base = DistillConfig(store=tiny_cache, out_dir=tmp_path / "run", student=TINY_STUDENT, steps=6, batch_size=16,
                         warmup=2, checkpoint_every=3, eval_shards=str(tiny_world / "val"), threads=1, mode="mcad")
    return replace(base, **kw)


def test_cached_targets_equal_the_teachers_own_logits(tiny_cache, tiny_clip, tiny_clip_b):
    from mcad_cache.teachers.dual import DualStreamTeacher
    from mcad_core.views import render_views

    stream = CacheBatches(tiny_cache, batch_size=8, image_size=32, seed=0, fused=False)
    _, batch = next(stream.iter_from(Position()))
    manifest = stream.manifest
    ensemble = 0
    for name, (_, spec) in zip(manifest["dual_teachers"], (tiny_clip, tiny_clip_b), strict=True):
        teacher = DualStreamTeacher.load(spec)
        pixels = teacher.pixels_from_uint8(render_views(batch["source_images"], batch["boxes"], teacher.image_size))
        logits = teacher.logit_scale * teacher.encode_images(pixels) @ teacher.encode_texts(batch["captions"]).t()
        cached_i2t, cached_t2i = batch["targets"][name]
        torch.testing.assert_close(cached_i2t, logits, atol=0.02 * teacher.logit_scale, rtol=0)
        torch.testing.assert_close(cached_t2i, logits.t(), atol=0.02 * teacher.logit_scale, rtol=0)
        weight = manifest["search"]["dual_weights"][manifest["dual_teachers"].index(name)]
        ensemble = ensemble + weight * cached_i2t
    torch.testing.assert_close(batch["targets"]["ensemble"][0], ensemble)


def test_fused_entries_land_on_the_cached_candidates(tiny_cache):
    plain = CacheBatches(tiny_cache, batch_size=16, image_size=32, seed=0, fused=False)
    fused = CacheBatches(tiny_cache, batch_size=16, image_size=32, seed=0, fused=True)
    _, a = next(plain.iter_from(Position()))
    _, b = next(fused.iter_from(Position()))
    assert torch.equal(a["rows"], b["rows"]) and torch.equal(a["texts"], b["texts"])
    block = fused._cache[1]  # the block the first batch came from
    changed = a["targets"]["ensemble"][0] != b["targets"]["ensemble"][0]
    lists = block.lists["i2t/ids"][b["rows"]]  # (B, k) text rows
    expected = (lists[:, :, None] == b["texts"][None, None, :]).any(1)
    assert expected.any(), "neighbour batching should put some candidates in the batch"
    assert not (changed & ~expected).any()
    rows, cols = expected.nonzero(as_tuple=True)
    for r, c in zip(rows.tolist()[:5], cols.tolist()[:5], strict=True):
        slot = (lists[r] == b["texts"][c]).nonzero()[0, 0]
        assert b["targets"]["ensemble"][0][r, c] == block.lists["i2t/fused"][b["rows"][r], slot]


def test_neighbour_batches_keep_candidates_in_batch(tiny_cache):
    stream = CacheBatches(tiny_cache, batch_size=16, image_size=32, seed=0, fused=True)
    batches = [b for _, (_, b) in zip(range(stream.batches_per_epoch()), stream.iter_from(Position()), strict=False)]
    covered = torch.cat([b["rows"] for b in batches if b["block"] == "b00000"])
    assert sorted(covered.tolist()) == list(range(len(read_block(stream.store, 0))))
    assert sum(b["candidates_in_batch"] for b in batches) / len(batches) > 0.2


@pytest.mark.parametrize("mode", ["contrastive", "dual_kd", "fused_kd", "mcad", "ammkd"])
def test_every_mode_trains_and_reports(tiny_cache, tiny_world, tmp_path, mode):
    summary = distill(_cfg(tiny_cache, tiny_world, tmp_path, mode=mode, steps=3), progress=False)
    assert summary["steps"] == 3 and 0 <= summary["recalls"]["mean_recall"] <= 100
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4
    header = rows[0].split(",")
    assert ("kd" in header) == (mode != "contrastive")
    assert ("fd" in header) == (mode == "mcad")
    assert ("w/0" in header) == (mode == "ammkd")


def test_online_baseline_runs_the_cache_teachers(tiny_cache, tiny_world, tmp_path):
    summary = distill(_cfg(tiny_cache, tiny_world, tmp_path, mode="mcad", online=True, steps=2), progress=False)
    assert summary["steps"] == 2
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"kd", "fd", "ia"} <= set(header)


def test_online_targets_are_the_cached_ensemble_off_the_in_batch_top_k(tiny_cache):
    from mcad_student.online import OnlineTeachers

    stream = CacheBatches(tiny_cache, batch_size=12, image_size=32, seed=0, fused=False)
    _, batch = next(stream.iter_from(Position()))
    online = OnlineTeachers.from_store(stream.store).targets(batch["source_images"], batch["boxes"], batch["captions"])
    cached_i2t, _ = batch["targets"]["ensemble"]
    online_i2t, _ = online["ensemble"]
    scale = max(stream.spec.scales)
    differs = (online_i2t - cached_i2t).abs() > 0.05 * scale
    assert int(differs.sum(1).max()) <= stream.manifest["search"]["k"]  # only each anchor's fused top-k moved
    assert online["integrated_image"].shape == (12, stream.manifest["integration"]["dim"])


def test_resume_after_a_stop_matches_an_uninterrupted_run(tiny_cache, tiny_world, tmp_path):
    straight = distill(_cfg(tiny_cache, tiny_world, tmp_path / "a"), progress=False)
    stopped = _cfg(tiny_cache, tiny_world, tmp_path / "b")
    assert distill(stopped, progress=False, stop_after=3) == {"step": 3, "finished": False}
    resumed = distill(stopped, progress=False)
    assert resumed["steps"] == straight["steps"]
    a = (tmp_path / "a" / "run" / "metrics.csv").read_text().splitlines()
    b = (tmp_path / "b" / "run" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[:4] for r in a] == [r.split(",")[:4] for r in b]
    sa = torch.load(tmp_path / "a" / "run" / "checkpoint.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=True)["model"]
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], msg=key)


class SimulatedKill(BaseException):
    """A kill -9 at a chosen instant: nothing after it runs (BaseException, so no handler catches it)."""


def _dead_pid() -> int:
    """The pid of a process that has exited (pids are handed out in turn, so it is not reused at once)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _metrics(run) -> list[dict]:
    import csv

    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def uninterrupted(tiny_cache, tiny_world, tmp_path_factory):
    """metrics.csv rows of a 6-step run checkpointed every 2 steps, never stopped."""
    tmp = tmp_path_factory.mktemp("straight")
    distill(_cfg(tiny_cache, tiny_world, tmp, checkpoint_every=2), progress=False)
    return _metrics(tmp / "run")


def _assert_same_rows(run, expected: list[dict]) -> None:
    """One row per step 1..6, equal to the uninterrupted run's, and the same rows as the checkpoint holds."""
    rows = _metrics(run)
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert {k for k in rows[0] if not k.startswith("val/")} == expected[0].keys()
    for got, want in zip(rows, expected, strict=True):
        for key in ("lr", "itc", "kd", "fd", "ia", "loss"):
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5, abs=1e-7), (got["step"], key)
    held = torch.load(run / "checkpoint.pt", weights_only=True)["metrics"]
    assert [r["step"] for r in held] == list(range(1, 7))
    assert [str(r["loss"]) for r in held] == [r["loss"] for r in rows]


@pytest.mark.parametrize("eval_every", [0, 2])
def test_a_kill_right_after_the_checkpoint_rename_loses_no_metrics_row(tiny_cache, tiny_world, tmp_path,
                                                                       monkeypatch, uninterrupted, eval_every):
    """The tracker's case: killed once checkpoint.pt (step 4) is replaced, before metrics.csv is written.

    With eval_every 2 the periodic recalls of steps 2 and 4 (checkpoint steps too) must survive as well.
    """
    import mcad_student.train as train

    real_save = train.save_checkpoint
    calls = []

    def save_then_die(path, *args, **kwargs):
        real_save(path, *args, **kwargs)
        calls.append(path)
        if len(calls) == 2:  # the checkpoint of step 4 is on disk
            raise SimulatedKill

    cfg = _cfg(tiny_cache, tiny_world, tmp_path, checkpoint_every=2, eval_every=eval_every)
    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(SimulatedKill):
        distill(cfg, progress=False)
    monkeypatch.undo()
    run = tmp_path / "run"
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 4
    assert [int(r["step"]) for r in _metrics(run)] == [1, 2]  # the csv lags the checkpoint until the next start
    distill(cfg, progress=False)
    _assert_same_rows(run, uninterrupted)
    if eval_every:
        recalls = [r.get("val/mean_recall", "") for r in _metrics(run)]
        assert [bool(v) for v in recalls] == [False, True, False, True, False, False]


def test_a_kill_while_the_checkpoint_is_written_resumes_and_removes_the_scratch_file(
        tiny_cache, tiny_world, tmp_path, monkeypatch, uninterrupted):
    """Killed inside the atomic write of the step-4 checkpoint: half a scratch file, the old checkpoint."""
    import mcad_student.train as train

    dead = _dead_pid()
    real_write = train.atomic_write_bytes

    def write_half_then_die(path, data):
        if path.name == "checkpoint.pt" and torch.load(io.BytesIO(data), weights_only=True)["step"] == 4:
            path.with_name(f".{path.name}.tmp-{dead}").write_bytes(data[: len(data) // 2])
            raise SimulatedKill
        real_write(path, data)

    cfg = _cfg(tiny_cache, tiny_world, tmp_path, checkpoint_every=2)
    monkeypatch.setattr(train, "atomic_write_bytes", write_half_then_die)
    with pytest.raises(SimulatedKill):
        distill(cfg, progress=False)
    monkeypatch.undo()
    run = tmp_path / "run"
    scratch = run / f".checkpoint.pt.tmp-{dead}"
    assert scratch.exists() and torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    distill(cfg, progress=False)
    assert not scratch.exists()
    _assert_same_rows(run, uninterrupted)


def test_a_start_removes_only_scratch_files_of_dead_writers(tiny_cache, tiny_world, tmp_path):
    import os

    run = tmp_path / "run"
    run.mkdir()
    stale = run / f".checkpoint.pt.tmp-{_dead_pid()}"
    stale.write_bytes(b"half a checkpoint")
    stale_dir = run / f".student.tmp-{_dead_pid()}"
    stale_dir.mkdir()
    (stale_dir / "weights").write_bytes(b"x")
    live = run / f".summary.json.tmp-{os.getppid()}"  # a live process's: maybe being written right now
    live.write_bytes(b"{")
    unrelated = run / "notes.tmp-1"
    unrelated.write_bytes(b"mine")
    distill(_cfg(tiny_cache, tiny_world, tmp_path), progress=False, stop_after=1)
    assert not stale.exists() and not stale_dir.exists()
    assert live.exists() and unrelated.exists()


def test_a_checkpoint_without_rows_resumes_from_metrics_csv(tiny_cache, tiny_world, tmp_path, uninterrupted):
    """Checkpoints written before they carried their metrics rows resume with the csv's rows up to their step."""
    from mcad_core.atomic import atomic_write_bytes

    cfg = _cfg(tiny_cache, tiny_world, tmp_path, checkpoint_every=2)
    distill(cfg, progress=False, stop_after=4)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    payload = torch.load(checkpoint, weights_only=True)
    del payload["metrics"]
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(checkpoint, buffer.getvalue())
    distill(cfg, progress=False)
    _assert_same_rows(tmp_path / "run", uninterrupted)


def test_a_checkpoint_from_before_a_new_setting_resumes(tiny_cache, tiny_world, tmp_path):
    """A setting added later (loss.kd_direction) is absent from older checkpoints and reads as the value those
    runs used ("both"), whatever the default is when they resume (it was "i2t" for a while)."""
    from mcad_core.atomic import atomic_write_bytes
    from mcad_student.losses import LossWeights

    cfg = _cfg(tiny_cache, tiny_world, tmp_path, checkpoint_every=2, loss=LossWeights(kd_direction="both"))
    distill(cfg, progress=False, stop_after=4)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    payload = torch.load(checkpoint, weights_only=True)
    del payload["config"]["loss"]["kd_direction"]
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(checkpoint, buffer.getvalue())
    with pytest.raises(ResumeMismatchError, match="loss"):  # i2t is not what that run used
        distill(replace(cfg, loss=LossWeights(kd_direction="i2t")), progress=False)
    assert distill(cfg, progress=False)["steps"] == 6


def test_resume_with_another_config_is_refused(tiny_cache, tiny_world, tmp_path):
    cfg = _cfg(tiny_cache, tiny_world, tmp_path)
    distill(cfg, progress=False, stop_after=3)
    with pytest.raises(ResumeMismatchError, match="lr"):
        distill(replace(cfg, lr=1.0), progress=False)


def test_a_store_for_other_teachers_or_k_is_refused(tiny_cache):
    manifest = CacheBatches(tiny_cache, 8, 32, 0, True).manifest
    with pytest.raises(CacheMismatchError, match="candidate search"):
        CacheBatches(tiny_cache, 8, 32, 0, True, expected_manifest={**manifest, "search": {"k": 99}})


def test_distill_cli_end_to_end(tiny_cache, tiny_world, tmp_path):
    from pipeline.cli import main

    config = tmp_path / "distill.json"
    config.write_text(json.dumps({"student": {"image_size": 32, "text_layers": 1, "text_width": 32, "text_heads": 2,
                                              "text_intermediate": 64, "embed_dim": 16},
                                  "batch_size": 16, "warmup": 1, "threads": 1}))
    from mcad_core.shards import list_shards

    metrics = {m: 50.0 for m in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_recall")}
    table = tmp_path / "teachers.json"
    table.write_text(json.dumps({"shards": list_shards(tiny_world / "val"), "results": {"clip_x": metrics}}))
    result = CliRunner().invoke(main, ["distill", "--config", str(config), "--store", str(tiny_cache), "--out",
                                       str(tmp_path / "cli"), "--steps", "2", "--eval-shards",
                                       str(tiny_world / "val"), "--teacher-table", str(table),
                                       "--results-json", str(tmp_path / "distill_results.json")])
    assert result.exit_code == 0, result.output
    assert "| student (mcad) |" in result.output  # the default mode
    written = json.loads((tmp_path / "distill_results.json").read_text())
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert written["student"]["steps"] == 2 and written["student"]["params"] == summary["parameters"] > 0
    assert written["teachers"] == {"clip_x": {"mean_recall": 50.0, "params": None}}
    assert written["of_best_teacher"] == round(summary["recalls"]["mean_recall"] / 50.0, 4)
    assert "| clip_x | 50.0 |" in result.output  # the teachers' rows on the same shards, beside the student
    assert (tmp_path / "cli" / "student" / "open_clip_config.json").exists()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_with_the_global_batch(tiny_cache, tiny_world, tmp_path):
    """torchrun with 2 CPU ranks (each encodes half of every batch) trains the same weights as 1 process.

    The student here has a LayerNorm image tower (timm's test_convnext): BatchNorm statistics of a
    half batch differ from the full batch's, which no data-parallel scheme can hide without SyncBatchNorm.
    """
    import os
    import subprocess
    import sys

    student = {"image_model": "test_convnext", "image_size": 32, "text_layers": 1, "text_width": 32,
               "text_heads": 2, "text_intermediate": 64, "embed_dim": 16}
    # image_lr_scale 1: Adam turns float-rounding-sized gradient differences (a split batch sums in another
    # order) into +-lr steps where a gradient is ~0; at a 10x image LR this once exceeded atol.
    settings = {"student": student, "batch_size": 16, "warmup": 1, "threads": 1, "steps": 4, "image_lr_scale": 1.0,
                "checkpoint_every": 2, "store": str(tiny_cache), "eval_shards": str(tiny_world / "val")}
    runs = {}
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node=2"])):
        config = tmp_path / f"{name}.json"
        config.write_text(json.dumps({**settings, "out_dir": str(tmp_path / name)}))
        command = [sys.executable, *(launcher or []), "-m", "pipeline.cli", "distill", "--config", str(config)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
    assert runs["one"]["step"] == runs["two"]["step"] == 4
    for key, value in runs["one"]["model"].items():
        torch.testing.assert_close(runs["two"]["model"][key], value, atol=2e-5, rtol=1e-4, msg=key)


def test_random_batching_covers_each_image_once_and_bad_names_are_refused(tiny_cache):
    stream = CacheBatches(tiny_cache, batch_size=16, image_size=32, seed=0, fused=True, batching="random")
    batches = [b for _, (_, b) in zip(range(stream.batches_per_epoch()), stream.iter_from(Position()), strict=False)]
    for name in ("b00000", "b00001"):
        rows = torch.cat([b["rows"] for b in batches if b["block"] == name])
        assert sorted(rows.tolist()) == list(range(32))
    with pytest.raises(ValueError, match="batching"):
        CacheBatches(tiny_cache, 16, 32, 0, True, batching="sorted")


def test_config_refuses_kd_over_negatives_for_ammkd():
    from mcad_student.losses import LossWeights

    DistillConfig(mode="mcad", loss=LossWeights(kd_kind="negatives"))  # supported
    with pytest.raises(ValueError, match="ammkd"):
        DistillConfig(mode="ammkd", loss=LossWeights(kd_kind="negatives"))
    with pytest.raises(ValueError, match="kd_kind"):
        LossWeights(kd_kind="diagonal")
    DistillConfig(mode="ammkd", loss=LossWeights(kd_direction="both"))  # every direction is supported


def test_stage2_fusion_override_rederives_the_fused_lists(tiny_cache):
    """A rule given to stage 2 is applied to the cached dual and ITM logits of the same candidates."""
    import zarr

    group = zarr.open_group(str(tiny_cache), mode="r")["blocks/b00000"]
    dual, itm = (torch.from_numpy(group[f"i2t/{kind}"][...]) for kind in ("dual", "itm"))
    cached = CacheBatches(tiny_cache, 8, 32, 0, True).block(0)
    assert torch.equal(cached.lists["i2t/fused"], torch.from_numpy(group["i2t/fused"][...]))
    added = CacheBatches(tiny_cache, 8, 32, 0, True, fusion=("itm_topk", 2.0)).block(0)
    torch.testing.assert_close(added.lists["i2t/fused"], dual + 2.0 * itm)
    with pytest.raises(ValueError, match="unknown fusion rule 'avg'"):
        CacheBatches(tiny_cache, 8, 32, 0, True, fusion=("avg", 1.0))
