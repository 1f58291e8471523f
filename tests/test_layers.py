"""The packages depend one way (ARCHITECTURE.md): core <- stage 1 <- stage 2, the world beside stage 1, the CLI on top.

Read from the source's import statements (module level and inside functions alike), so a lazy import
that crosses a layer is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("mcad_core", "mcad_cache", "mcad_student", "mcad_world", "pipeline")
ALLOWED = {
    "mcad_core": {"mcad_core"},
    "mcad_cache": {"mcad_core", "mcad_cache"},
    "mcad_student": {"mcad_core", "mcad_cache", "mcad_student"},
    "mcad_world": {"mcad_core", "mcad_cache", "mcad_world"},
}


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] in OURS}


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below(package):
    crossing = {str(path.relative_to(ROOT)): sorted(name for name in imports_of(path)
                                                    if name.split(".")[0] not in ALLOWED[package])
                for path in modules(package)}
    assert not {k: v for k, v in crossing.items() if v}


def test_stage_2_loads_teachers_only_in_its_online_baseline():
    loading = [str(path.relative_to(ROOT)) for path in modules("mcad_student")
               if any(name.startswith("mcad_cache.teachers") for name in imports_of(path))]
    assert loading == ["mcad_student/online.py"]


def test_the_world_uses_only_stage_1_teacher_adapters():
    used = {name for path in modules("mcad_world") for name in imports_of(path) if name.startswith("mcad_cache")}
    assert used and all(name.startswith("mcad_cache.teachers") for name in used), used


def test_the_checker_sees_a_crossing(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from pipeline.cli import main\n")
    assert imports_of(bad) == {"pipeline.cli"}
