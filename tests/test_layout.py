"""The code's layout holds: the import contracts catch a wrong import, every stage is under the
"stages import no stage" contract, and modules and functions stay small (README, "How the code is
laid out")."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the library, the stages and their contracts, to break on purpose."""
    if not LINT_IMPORTS.exists():
        pytest.skip("import-linter is not installed (make install installs the dev extra)")
    for name in ("pipeline", "stages"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize(
    ("module", "wrong_import", "contract"),
    [
        ("pipeline/heads/pe.py", "import pipeline.studies.demo", "Layers follow the data flow"),
        ("pipeline/data/episodes.py", "import pipeline.evaluation.results", "Layers follow the data flow"),
        ("stages/compare.py", "import stages.evaluate", "Stages import no stage"),
        ("pipeline/heads/trm.py", "import zarr", "The heads are pure torch"),
        ("pipeline/evaluation/unknown.py", "import rich", "The library never talks"),
    ],
)
def test_a_wrong_import_fails_the_contracts(tree: Path, module: str, wrong_import: str, contract: str):
    clean = _lint_imports(tree)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    path = tree / module
    path.write_text(path.read_text() + f"\n{wrong_import}  # deliberately wrong\n")
    broken = _lint_imports(tree)
    assert broken.returncode != 0
    assert "BROKEN" in broken.stdout and contract in broken.stdout.split("Broken contracts", 1)[-1], broken.stdout


def test_every_stage_is_under_the_no_stage_imports_contract():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (contract,) = [c for c in config if c["name"].startswith("Stages import no stage")]
    stages = {f"stages.{p.stem}" for p in (REPO / "stages").glob("*.py") if p.stem not in {"__init__", "app", "common"}}
    assert set(contract["modules"]) == stages


def _long_functions(path: Path) -> list[str]:
    """Functions over the limit with no comment right above them (or their decorators) saying why."""
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            said = first >= 2 and lines[first - 2].strip().startswith("#")
            if length > MAX_FUNCTION_LINES and not said:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}() is {length} lines")
    return found


def test_modules_and_functions_stay_small():
    paths = sorted(p for root in ("pipeline", "stages") for p in (REPO / root).rglob("*.py"))
    big = [
        f"{p.relative_to(REPO)}: {n} lines" for p in paths if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not big, big
    long = [row for p in paths for row in _long_functions(p)]
    assert not long, long
