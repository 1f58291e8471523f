"""Paths as results name them: relative to the working directory inside it, as given outside."""

from __future__ import annotations

from mcad_core.paths import relative_to_cwd


def test_paths_inside_the_working_directory_become_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert relative_to_cwd(tmp_path / "data" / "w" / "val") == "data/w/val"
    assert relative_to_cwd("data/w/val") == "data/w/val"
    outside = tmp_path.parent / "elsewhere"
    assert relative_to_cwd(outside) == str(outside)
    assert relative_to_cwd("../elsewhere") == "../elsewhere"  # outside, so as given
