"""bench/gpu_check.py: the device check's CPU path (tiny shapes) runs both stages and writes its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.gpu_check import TINY, GpuPoll, markdown, preflight, run_check

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_poll_reads_nvidia_smi_lines_and_skips_non_numbers():
    poll = GpuPoll()
    poll.samples = [(50.0, 1000.0), (100.0, 3000.0)]
    assert poll.figures() == {"gpu_util_mean_pct": 75.0, "gpu_memory_peak_mib": 3000.0, "gpu_samples": 2}
    assert GpuPoll().figures()["gpu_util_mean_pct"] is None  # no nvidia-smi, no samples: None, not 0


def test_gpu_poll_runs_nvidia_smi_with_its_documented_loop_flag_and_stops_it(tmp_path, monkeypatch):
    """A stand-in nvidia-smi on PATH: called with ``--loop-ms=N`` (the form its help documents), read line by line
    ("[N/A]" skipped) while it runs, and stopped on exit."""
    bin_dir, args = tmp_path / "bin", tmp_path / "args"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text(f'#!/bin/sh\necho "$@" > {args}\necho "50, 1000"\necho "[N/A], [N/A]"\necho "100, 3000"\n'
                    "exec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    start = time.perf_counter()
    with GpuPoll(interval_ms=100) as poll:
        while len(poll.samples) < 2 and time.perf_counter() - start < 20:
            time.sleep(0.05)
    assert time.perf_counter() - start < 20  # stopped at once, not after its sleep
    assert poll.figures() == {"gpu_util_mean_pct": 75.0, "gpu_memory_peak_mib": 3000.0, "gpu_samples": 2}
    assert args.read_text().split() == ["--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                                        "--loop-ms=100"]


def test_preflight_names_a_missing_module_or_a_device_torch_cannot_use(monkeypatch):
    preflight("cpu")
    monkeypatch.setattr(gpu_check, "STAGE_MODULES", ("json", "no_such_module_mcad"))
    with pytest.raises(SystemExit, match="cannot import no_such_module_mcad"):
        preflight("cpu")
    monkeypatch.setattr(gpu_check, "STAGE_MODULES", ())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="device cuda: .* sees no GPU"):
        preflight("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit, match="device cuda:1: torch sees 1 GPU"):
        preflight("cuda:1")
    preflight("cuda:0")


def test_stage_one_figures_are_written_before_stage_two_runs(tmp_path, monkeypatch):
    """A stage 2 that fails (or is killed by the time limit) leaves stage 1's figures in gpu.json."""
    monkeypatch.setattr(gpu_check, "build_inputs", lambda work, shapes, samples: (work / "data" / "train", work))

    def timed(cmd: list[str], log: Path) -> float:
        if "cache" in cmd:
            (tmp_path / "cache_run.json").write_text(json.dumps({"summary": {"seconds": {"embed": 1.0}}}))
            return 2.0
        raise SystemExit("stage 2 failed")

    monkeypatch.setattr(gpu_check, "timed", timed)
    with pytest.raises(SystemExit, match="stage 2 failed"):
        run_check(tmp_path, TINY, 64, 3, "cpu", 0, out=tmp_path / "results")
    written = json.loads((tmp_path / "results" / "gpu.json").read_text())
    assert written["stage1"]["samples_per_s"] == 32.0 and "stage2" not in written


def test_the_cpu_path_runs_both_stages_through_the_cli(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench.gpu_check", "--tiny", "--device", "cpu", "--samples", "64",
           "--steps", "3", "--workers", "0", "--work", str(tmp_path / "work"), "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=600, capture_output=True)
    result = json.loads((out / "gpu.json").read_text())
    assert result["device"] == "cpu" and result["samples"] == 64
    assert result["stage1"]["samples_per_s"] > 0 and result["stage2"]["samples_per_s"] > 0
    assert result["stage2"]["steps"] == 3
    assert set(result["stage1"]["passes"]) >= {"embed"}
    assert "| stage1 |" in markdown(result) and (out / "gpu.md").read_text() == markdown(result)
