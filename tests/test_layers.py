"""Imports point down only (issue 19): the layer contract in ``.importlinter``, checked by import-linter.

``lint-imports`` must keep every contract on the library as it is, and break on a deliberate upward
import (a lazy one inside a function) in a copy of it; the layers are listed in the agreed order;
the tokenizer's shared names are defined in one module only.
"""

from __future__ import annotations

import ast
import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT / ".importlinter"
LAYERS = [  # top to bottom: a layer may import the ones below it, never those above
    "lavis.serve | lavis.web | lavis.chat | lavis.convert | lavis.export | lavis.plot",
    "lavis.cli | lavis.serving | lavis.interop",
    "lavis.runners",
    "lavis.tasks",
    "lavis.models | lavis.datasets",
    "lavis.tracking",
    "lavis.processors",
    "lavis.common",
]


def _lint_imports() -> str:
    """The ``lint-imports`` command: next to this Python (a venv not on PATH) or on PATH."""
    local = Path(sys.executable).with_name("lint-imports")
    found = str(local) if local.is_file() else shutil.which("lint-imports")
    if found is None:
        pytest.skip("lint-imports is not installed (pip install import-linter, a dev extra)")
    return found


def _run(cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(cwd))  # the lavis under cwd, not an installed one
    return subprocess.run(
        [_lint_imports(), "--no-cache", "--config", str(cwd / ".importlinter")],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def test_contract_lists_the_layers_top_to_bottom():
    config = configparser.ConfigParser()
    config.read(CONTRACT)
    assert config["importlinter"]["root_package"] == "lavis"
    layers = [line.strip() for line in config["importlinter:contract:layers"]["layers"].strip().splitlines()]
    assert layers == LAYERS
    assert config["importlinter:contract:layers"]["type"] == "layers"
    assert "ignore_imports" not in config["importlinter:contract:layers"]


def test_lint_imports_keeps_every_contract():
    result = _run(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    _lint_imports()
    shutil.copytree(ROOT / "lavis", tmp_path / "lavis", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy(CONTRACT, tmp_path / ".importlinter")
    assert _run(tmp_path).returncode == 0  # the copy as it is keeps the contracts
    with open(tmp_path / "lavis" / "tracking" / "tables.py", "a") as fh:  # tracking sits below tasks
        fh.write("\n\ndef _upward():\n    from lavis.tasks import evaluation\n\n    return evaluation\n")
    result = _run(tmp_path)
    assert result.returncode != 0
    assert "lavis.tracking is not allowed to import lavis.tasks" in result.stdout, result.stdout + result.stderr
    assert "lavis.tracking.tables -> lavis.tasks.evaluation" in result.stdout


@pytest.mark.parametrize("name", ["SPECIAL_TOKENS", "QWEN_PATTERN", "EMBEDDED_TOKENIZER_PATH"])
def test_the_tokenizer_names_are_defined_once(name):
    homes = []
    for path in sorted((ROOT / "lavis").rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                homes.append(path.relative_to(ROOT).as_posix())
    assert homes == ["lavis/processors/tokenizer.py"]
