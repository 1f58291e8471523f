"""What a run leaves to read afterwards: log.txt (appended across resumes), eval scalars in TensorBoard,
curves.png, the store's log; and stage 2 reading the source shards with the store's pixel limit."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace

import pytest

from mcad_cache.job import _store_log, store_log_path
from mcad_cache.store import CacheStore
from mcad_core.dist import explicit_place
from mcad_core.runlog import RunLog
from mcad_core.shards import DEFAULT_MAX_IMAGE_PIXELS
from mcad_student import data as stage2_data
from mcad_student.data import CacheBatches, CacheJoinError, source_pixel_limit
from mcad_student.model import StudentConfig
from mcad_student.train import DistillConfig, distill

TINY_STUDENT = StudentConfig(image_model="mobilevitv2_050", image_size=32, text_layers=1, text_width=32,
                             text_heads=2, text_intermediate=64, embed_dim=16)  # tests/test_distill.py's
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _cfg(tiny_cache, tiny_world, tmp_path, **kw) -> DistillConfig:
    base = DistillConfig(store=tiny_cache, out_dir=tmp_path / "run", student=TINY_STUDENT, steps=4, batch_size=16,
                         warmup=1, checkpoint_every=2, eval_every=2, eval_shards=str(tiny_world / "val"), threads=1,
                         mode="fused_kd")
    return replace(base, **kw)


def test_a_run_logs_its_milestones_and_a_resume_appends(tiny_cache, tiny_world, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tiny_cache, tiny_world, tmp_path)
    out = cfg.out_dir
    assert distill(cfg, progress=False, stop_after=2) == {"step": 2, "finished": False}
    first = (out / "log.txt").read_text()
    assert "distill start in" in first and "mode fused_kd, 4 steps, batch 16" in first
    assert '"eval_every": 2' in first  # the whole config
    assert f"step 2: eval on {cfg.eval_shards}: " in first and "mean_recall" in first
    assert "step 2: checkpoint written" in first
    assert "stopped at step 2 of 4" in first and "resuming" not in first
    assert not (out / "curves.png").exists()  # written when the run finishes

    summary = distill(cfg, progress=False)
    assert summary["steps"] == 4
    log_text = (out / "log.txt").read_text()
    assert log_text.startswith(first)  # appended, not replaced
    later = log_text[len(first):]
    assert "distill start in" in later and "resuming from step 2 of 4" in later
    assert "step 4: checkpoint written" in later and "step 4: eval on" in later
    assert "finished: 4 steps" in later and "curves.png" in later
    assert all(line[:4].isdigit() for line in log_text.splitlines())  # every line timestamped

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"eval/mean_recall", "eval/i2t_R@1", "eval/t2i_R@1", "loss"} <= tags
    recall = events.Scalars("eval/mean_recall")
    assert [e.step for e in recall] == [2, 4]
    assert recall[-1].value == pytest.approx(summary["recalls"]["mean_recall"], abs=1e-4)

    png = (out / "curves.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 5000
    assert not [p for p in out.iterdir() if p.name.startswith(".curves.png.tmp")]


@pytest.mark.parametrize("verbose", [False, True])
def test_the_cli_writes_the_log_and_the_console_shows_info_only_with_v(tiny_cache, tiny_world, tmp_path, verbose):
    import json

    from click.testing import CliRunner

    from pipeline.cli import configure_logging, main

    config = tmp_path / "distill.json"
    config.write_text(json.dumps({"student": {"image_model": "mobilevitv2_050", "image_size": 32, "text_layers": 1,
                                              "text_width": 32, "text_heads": 2, "text_intermediate": 64,
                                              "embed_dim": 16},
                                  "batch_size": 16, "warmup": 1, "threads": 1, "steps": 2}))
    out = tmp_path / "cli"
    try:
        result = CliRunner().invoke(main, [*(["-v"] if verbose else []), "distill", "--config", str(config),
                                           "--store", str(tiny_cache), "--out", str(out),
                                           "--eval-shards", str(tiny_world / "val"),
                                           "--teacher-table", str(tmp_path / "none.json")])
    finally:
        configure_logging(False)
    assert result.exit_code == 0, result.output
    assert "finished: 2 steps" in (out / "log.txt").read_text() and (out / "curves.png").exists()
    assert ("INFO mcad_student.train: distill start" in result.stderr) == verbose


def test_write_curves_without_evals_plots_the_loss_terms(tmp_path):
    from mcad_student.train import write_curves

    csv = tmp_path / "metrics.csv"
    csv.write_text("step,lr,candidates_in_batch,itc,kd,loss,w/0\n"
                   + "".join(f"{s},0.001,0.1,{3 - s / 10},{1 - s / 20},{4 - s / 8},0.5\n" for s in range(1, 11)))
    write_curves(csv, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.fixture
def quiet_console():
    """mcad's loggers as `mcad` without -v leaves them (NOTSET under a WARNING root), a list of what the console
    (a root handler) receives; everything restored afterwards."""
    root = logging.getLogger()
    seen: list[logging.LogRecord] = []
    console = logging.Handler()
    console.emit = seen.append
    saved = root.level, logging.getLogger("mcad_cache").level
    root.setLevel(logging.WARNING)
    logging.getLogger("mcad_cache").setLevel(logging.NOTSET)
    root.addHandler(console)
    yield seen
    root.removeHandler(console)
    root.setLevel(saved[0])
    logging.getLogger("mcad_cache").setLevel(saved[1])


def test_the_log_file_gets_info_the_console_keeps_its_level(tmp_path, quiet_console):
    logger = logging.getLogger("mcad_cache.job")
    path = tmp_path / "run.log"
    with RunLog(path) as run_log:
        logger.info("held until the file opens")
        assert not path.exists()
        run_log.open()
        logger.info("an info line")
        logger.warning("a warning line")
    text = path.read_text()
    assert "INFO mcad_cache.job: held until the file opens" in text.splitlines()[0]
    assert "INFO mcad_cache.job: an info line" in text and "WARNING mcad_cache.job: a warning line" in text
    assert [r.getMessage() for r in quiet_console] == ["a warning line"]  # the console saw what it saw before
    parent = logging.getLogger("mcad_cache")
    assert parent.level == logging.NOTSET and parent.propagate and not parent.handlers  # all restored
    logger.info("after the run")
    assert "after the run" not in path.read_text()


def test_a_logger_set_to_info_keeps_reaching_the_console(tmp_path, quiet_console):
    chatty = logging.getLogger("mcad_cache.store")
    chatty.setLevel(logging.INFO)  # as a library user may set one of them
    try:
        with RunLog(tmp_path / "run.log") as run_log:
            run_log.open()
            chatty.info("store info")
            logging.getLogger("mcad_cache.job").info("job info")
    finally:
        chatty.setLevel(logging.NOTSET)
    assert [r.getMessage() for r in quiet_console] == ["store info"]
    assert "store info" in (tmp_path / "run.log").read_text() and "job info" in (tmp_path / "run.log").read_text()


def test_a_run_that_never_opens_its_log_writes_none_and_a_failure_is_named(tmp_path):
    path = tmp_path / "run.log"
    with pytest.raises(RuntimeError), RunLog(path):
        logging.getLogger("mcad_student.train").info("refused before its output existed")
        raise RuntimeError("bad input")
    assert not path.exists()
    with pytest.raises(RuntimeError), RunLog(path) as run_log:
        run_log.open()
        raise RuntimeError("disk gone")
    assert "ERROR mcad_core.runlog: stopped by RuntimeError: disk gone" in path.read_text()


def test_the_cache_logs_its_milestones_beside_the_store(tiny_cache):
    path = store_log_path(tiny_cache)
    assert path == tiny_cache.parent / "tiny.zarr.log"
    text = path.read_text()
    for milestone in ("cache start on", "passes embed,search,rescore,fuse,integrate, task 0 of 1", "config: {",
                      "created the store", "shard 00000 embedded: 16 samples", "pass embed done in",
                      "pass integrate done in", "cache done in", "4 shards embedded (0 already done, 0 failed)"):
        assert milestone in text, milestone
    assert store_log_path(tiny_cache, rank=2).name == "tiny.zarr.rank2.log"


def test_a_cache_run_that_leaves_no_store_leaves_no_log(tmp_path):
    store = tmp_path / "c.zarr"
    with pytest.raises(RuntimeError), _store_log(store, explicit_place(0, 1)) as run_log:
        store.mkdir()  # made, then removed again, as the embed pass does when it stored no shard
        run_log.open()
        logging.getLogger("mcad_cache.job").info("started")
        shutil.rmtree(store)
        raise RuntimeError("no shard stored")
    assert list(tmp_path.iterdir()) == []
    with _store_log(store, explicit_place(0, 1)) as run_log:
        store.mkdir()
        run_log.open()
    assert store_log_path(store).exists()


# ------------------------------------------------------------------ the pixel limit in stage 2


def _store_with_limit(tiny_cache, tmp_path, limit: int | None):
    """A copy of the tiny store whose manifest says stage 1 read its shards with ``limit``."""
    copy = tmp_path / "limited.zarr"
    shutil.copytree(tiny_cache, copy)
    root = CacheStore.open(copy).root
    manifest = dict(root.attrs["manifest"])
    manifest["preprocessing"] = {**manifest["preprocessing"], "max_image_pixels": limit}
    root.attrs["manifest"] = manifest
    return copy


def _spy_limits(monkeypatch) -> list:
    limits = []
    real = stage2_data.encoded_samples

    def spy(*args, **kwargs):
        limits.append(kwargs.get("max_image_pixels", "not given"))
        return real(*args, **kwargs)

    monkeypatch.setattr(stage2_data, "encoded_samples", spy)
    return limits


@pytest.mark.parametrize("limit", [4096, None])
def test_stage2_reads_the_shards_with_the_stores_pixel_limit(tiny_cache, tmp_path, monkeypatch, limit):
    limits = _spy_limits(monkeypatch)
    store = _store_with_limit(tiny_cache, tmp_path, limit)
    assert source_pixel_limit(CacheStore.open(store).manifest) == limit
    block = CacheBatches(store, batch_size=16, image_size=32, seed=0, fused=False).block(0)
    assert len(block) == 32 and limits == [limit]  # the tiny world's 32x32 images are under 4096 pixels


def test_a_store_without_a_recorded_limit_reads_with_the_default(tiny_cache, monkeypatch):
    limits = _spy_limits(monkeypatch)
    assert "max_image_pixels" not in CacheStore.open(tiny_cache).manifest["preprocessing"]
    CacheBatches(tiny_cache, batch_size=16, image_size=32, seed=0, fused=False).block(0)
    assert limits == [DEFAULT_MAX_IMAGE_PIXELS]


def test_images_over_the_stores_limit_are_not_decoded_in_stage2(tiny_cache, tmp_path):
    store = _store_with_limit(tiny_cache, tmp_path, 100)  # every 32x32 image is over it
    with pytest.raises(CacheJoinError, match="missing from shards"):
        CacheBatches(store, batch_size=16, image_size=32, seed=0, fused=False).block(0)
