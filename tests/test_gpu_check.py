"""bench/gpu_check.py: the device check's CPU path (tiny shapes) runs both stages and writes its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.gpu_check import GpuPoll, markdown

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_poll_reads_nvidia_smi_lines_and_skips_non_numbers():
    poll = GpuPoll()
    poll.samples = [(50.0, 1000.0), (100.0, 3000.0)]
    assert poll.figures() == {"gpu_util_mean_pct": 75.0, "gpu_memory_peak_mib": 3000.0, "gpu_samples": 2}
    assert GpuPoll().figures()["gpu_util_mean_pct"] is None  # no nvidia-smi, no samples: None, not 0


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
