"""`mcad data --world`: both generated worlds from the command line, and disjoint streams by seed."""

from __future__ import annotations

import tarfile

from click.testing import CliRunner

from pipeline.cli import main


def _members(tar_path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return tar.getnames()


def test_quadrant_world_from_the_cli(tmp_path):
    runner = CliRunner()
    args = ["data", "--world", "quadrants", "--n-train", "30", "--n-val", "5", "--n-test", "5",
            "--samples-per-shard", "20"]
    result = runner.invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "a" / "train").iterdir()) == ["part-0000.tar", "part-0001.tar"]
    assert not (tmp_path / "a" / "world.json").exists()
    names = _members(tmp_path / "a" / "train" / "part-0000.tar")
    assert "tr00000000.png" in names and "tr00000000.json" in names and len(names) == 3 * 20

    again = runner.invoke(main, [*args, "--out", str(tmp_path / "b")])
    other_seed = runner.invoke(main, [*args, "--out", str(tmp_path / "c"), "--seed", "1"])
    assert again.exit_code == other_seed.exit_code == 0
    first = (tmp_path / "a" / "train" / "part-0000.tar").read_bytes()
    assert (tmp_path / "b" / "train" / "part-0000.tar").read_bytes() == first  # deterministic
    assert (tmp_path / "c" / "train" / "part-0000.tar").read_bytes() != first  # another stream


def test_default_world_only_options_are_refused_for_the_quadrant_world(tmp_path):
    result = CliRunner().invoke(main, ["data", "--world", "quadrants", "--image-size", "64",
                                       "--out", str(tmp_path / "q")])
    assert result.exit_code == 2
    assert "--world default only" in result.output
    assert not (tmp_path / "q").exists()
