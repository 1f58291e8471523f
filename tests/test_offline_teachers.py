"""Teachers this machine cannot load are named at once, before a shard is read or a store made.

A hub teacher on an offline machine (``HF_HUB_OFFLINE``, or the hub not answering) that is not
in the local Hugging Face cache is a ``TeacherUnavailableError`` (exit 3) naming it and the fix,
in well under 10 s instead of a minute of retries and a traceback; a missing local directory is
named too; a teacher whose files are cached loads offline without a single hub request.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
from click.testing import CliRunner

from mcad_cache import job as cache_job
from mcad_cache.teachers import available
from mcad_cache.teachers.available import TeacherUnavailableError, check_teachers
from mcad_cache.teachers.dual import DualStreamTeacher, DualTeacherSpec
from mcad_cache.teachers.single import SingleTeacherSpec, load_single
from pipeline import jobs
from pipeline.cli import main

HUB_DUAL = "ViT-B-16:openai"
HUB_SINGLE = "Salesforce/blip-itm-base-coco"


def _no_probe(endpoint, seconds):
    raise AssertionError("the network was probed although the answer was already known")


@pytest.fixture
def empty_caches(tmp_path, monkeypatch) -> Path:
    """HF_HOME and HOME (open_clip's ~/.cache/clip) point at empty directories; no probe answer is remembered."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read from the environment at import
    available.forget_probes()
    yield tmp_path
    available.forget_probes()


def _never(*args, **kwargs):
    raise AssertionError("work started before the teachers were checked")


def _cache_args(shards: Path, store: Path, tokenizer: Path, *teachers: str) -> list[str]:
    return ["cache", *teachers, "--tokenizer", str(tokenizer), "--shards", str(shards), "--store", str(store)]


def test_cache_offline_hub_teachers_fail_fast_and_name_the_fix(empty_caches, tiny_world, tokenizer_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(available, "_probe", _no_probe)  # HF_HUB_OFFLINE answers the question
    monkeypatch.setattr(cache_job, "read_shard", _never)
    store = empty_caches / "X.zarr"
    start = time.perf_counter()
    result = CliRunner().invoke(main, _cache_args(tiny_world / "train", store, tokenizer_dir,
                                                  "--dual", HUB_DUAL, "--single", HUB_SINGLE))
    seconds = time.perf_counter() - start
    assert result.exit_code == 3, result.output
    assert isinstance(result.exception, SystemExit)  # a message, not a traceback
    assert seconds < 10, seconds
    out = result.output
    assert f"dual-stream teacher {HUB_DUAL}" in out and f"single-stream teacher {HUB_SINGLE}" in out
    assert "neither a local directory nor in the local Hugging Face cache" in out
    assert "HF_HUB_OFFLINE is set" in out
    assert "hf download timm/vit_base_patch16_clip_224.openai" in out and f"hf download {HUB_SINGLE}" in out
    assert "huggingface-cli download" in out and "local-dir:PATH" in out and "--single DIR" in out
    assert not store.exists() and not list(empty_caches.glob(".X.zarr*"))


def test_eval_offline_hub_teacher_fails_before_reading_shards(empty_caches, tiny_world, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(available, "_probe", _no_probe)
    monkeypatch.setattr(jobs, "list_shards", _never)
    monkeypatch.setattr(jobs, "load_split", _never)
    out_json = empty_caches / "eval.json"
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["eval", "--dual", HUB_DUAL, "--shards", str(tiny_world / "test"),
                                       "--out", str(out_json)])
    assert result.exit_code == 3, result.output
    assert time.perf_counter() - start < 10
    assert f"dual-stream teacher {HUB_DUAL}" in result.output and "HF_HUB_OFFLINE is set" in result.output
    assert not out_json.exists()


def test_the_probe_decides_offline_when_the_variable_is_not_set(empty_caches, monkeypatch):
    calls = []

    def unreachable(endpoint, seconds):
        calls.append(endpoint)
        return f"{endpoint} did not answer within {seconds:g} s"

    monkeypatch.setattr(available, "_probe", unreachable)
    with pytest.raises(TeacherUnavailableError, match=r"offline \(https://huggingface.co did not answer") as err:
        check_teachers(duals=[DualTeacherSpec("hf-hub:org/not-cached")], singles=[SingleTeacherSpec(HUB_SINGLE)])
    assert [m.name for m in err.value.missing] == ["hf-hub:org/not-cached", HUB_SINGLE]
    with pytest.raises(TeacherUnavailableError):
        check_teachers(singles=[SingleTeacherSpec(HUB_SINGLE)])
    assert len(calls) == 1  # one probe per process, not one per teacher

    available.forget_probes()
    monkeypatch.setattr(available, "_probe", lambda endpoint, seconds: None)  # online: the loader downloads
    assert check_teachers(singles=[SingleTeacherSpec(HUB_SINGLE)]) is False


def test_missing_local_teachers_are_named_without_asking_the_network(empty_caches, tiny_world, tokenizer_dir,
                                                                      tiny_clip, tiny_blip, monkeypatch):
    monkeypatch.setattr(available, "_probe", _no_probe)  # every model is local: the network is not asked
    monkeypatch.setattr(cache_job, "read_shard", _never)
    store = empty_caches / "X.zarr"
    missing = empty_caches / "no_such_clip"
    result = CliRunner().invoke(main, _cache_args(tiny_world / "train", store, tokenizer_dir,
                                                  "--dual", tiny_clip[1].name, "--dual", f"local-dir:{missing}",
                                                  "--single", str(empty_caches / "no_such_blip")))
    assert result.exit_code == 3, result.output
    assert f"dual-stream teacher local-dir:{missing}: no directory at {missing}" in result.output
    assert f"single-stream teacher {empty_caches / 'no_such_blip'}: no directory at" in result.output
    assert tiny_clip[1].name not in result.output and "offline" not in result.output
    assert not store.exists()

    not_clip = empty_caches / "not_clip"
    not_clip.mkdir()
    with pytest.raises(TeacherUnavailableError, match="has no open_clip_config.json"):
        DualStreamTeacher.load(DualTeacherSpec(f"local-dir:{not_clip}"))
    with pytest.raises(TeacherUnavailableError, match="neither a pretrained tag of ViT-B-16"):
        check_teachers(duals=[DualTeacherSpec("ViT-B-16", "nope")])


def _fake_hub_repo(cache: Path, repo: str, files: Path, edit=None) -> None:
    """``files``' contents as the cached snapshot of ``repo`` (the layout huggingface_hub writes)."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(files, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    if edit:
        edit(root / "snapshots" / commit)


def test_cached_hub_teachers_load_offline_without_requests(empty_caches, tiny_clip, tiny_blip, tokenizer_dir,
                                                          monkeypatch):
    """Offline by the probe (no HF_HUB_OFFLINE): cached teachers load in offline mode, so nothing is retried."""
    cache = empty_caches / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # what the loaders read

    def own_tokenizer(snapshot: Path) -> None:  # open_clip reads an hf-hub model's tokenizer from the hub too
        config = json.loads((snapshot / "open_clip_config.json").read_text())
        config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "mcad-test/tiny-clip"
        (snapshot / "open_clip_config.json").write_text(json.dumps(config))
        # The repo has no config.json: an online download records that (AutoTokenizer looks for one).
        no_exist = snapshot.parent.parent / ".no_exist" / snapshot.name
        no_exist.mkdir(parents=True)
        (no_exist / "config.json").touch()

    _fake_hub_repo(cache, "mcad-test/tiny-clip", Path(tiny_clip[1].name.removeprefix("local-dir:")), own_tokenizer)
    _fake_hub_repo(cache, "mcad-test/tiny-blip", Path(tiny_blip[1].name))
    _fake_hub_repo(cache, "mcad-test/tokenizer", tokenizer_dir)
    monkeypatch.setattr(available, "_probe", lambda endpoint, seconds: "no network (test)")
    dual_spec, single_spec = DualTeacherSpec("hf-hub:mcad-test/tiny-clip"), SingleTeacherSpec("mcad-test/tiny-blip")
    assert check_teachers([dual_spec], [single_spec], "mcad-test/tokenizer") is True

    start = time.perf_counter()
    dual = DualStreamTeacher.load(dual_spec)
    single = load_single(single_spec)
    assert time.perf_counter() - start < 30  # no request, so no retry back-off
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # offline mode was for the load only
    assert dual.embed_dim == tiny_clip[0].visual.output_dim and single.image_size == 32
    with pytest.raises(TeacherUnavailableError, match="mcad-test/other"):
        check_teachers(singles=[SingleTeacherSpec("mcad-test/other")])


def test_the_probe_asks_the_endpoint_and_reports_why_not():
    """A server that answers a HEAD (any status) is online; a closed port is not, with the reason."""
    import http.server
    import socket
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert available._probe(f"http://127.0.0.1:{server.server_address[1]}", 3.0) is None
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    reason = available._probe(f"http://127.0.0.1:{port}", 3.0)
    assert reason is not None and reason.startswith(f"http://127.0.0.1:{port} cannot be reached")
