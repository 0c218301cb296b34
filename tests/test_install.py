"""The package installs: the wheel ``pip wheel .`` builds carries the default YAMLs, the projects and the
embedded tokenizer, and, installed into a fresh venv, runs ``make demo``'s first stage from a directory
outside the checkout through the console scripts.

The wheel is built from a copy of the checkout's sources (setup.py, README.md, lavis/, configs/, projects/),
so that the build's ``build/`` and ``*.egg-info`` land in the temporary directory, not in the checkout.
The fresh venv gets only the wheel; its dependencies (torch, transformers, ...) come from this
interpreter's site-packages through a ``.pth`` line, a plain path: the editable install's finder there is
not run, so ``import lavis`` in the venv is the wheel's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.integration  # builds, installs and trains in subprocesses (about a minute)

SOURCES = ("setup.py", "README.md", "MANIFEST.in", "pyproject.toml", "setup.cfg", "lavis", "configs", "projects")
DEMO_STAGE_1 = ("run.max_steps=2", "run.warmup_steps=0", "run.num_workers=0", "run.batch_size=2", "run.device=cpu")


def run(args: list, cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def build_wheel(tmp: Path, env: dict[str, str]) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        elif path.is_file():
            shutil.copy2(path, src / name)
    wheels = tmp / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", wheels, src],
        cwd=tmp, env=env)
    (wheel,) = wheels.glob("lavis_qwenvl-*.whl")
    return wheel


def fresh_venv(tmp: Path, wheel: Path, env: dict[str, str]) -> Path:
    """A venv holding only the wheel, its dependencies read from this interpreter's site-packages."""
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp, env=env)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], cwd=tmp, env=env)
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       cwd=tmp, env=env).stdout.strip())
    # Written after the install, so that pip saw no lavis-qwenvl already installed.
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (purelib / "project_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    return venv


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    wheel = build_wheel(tmp_path, env)
    venv = fresh_venv(tmp_path, wheel, env)
    bin_dir, python = venv / "bin", venv / "bin" / "python"
    elsewhere = tmp_path / "elsewhere"  # the working directory: outside the checkout
    elsewhere.mkdir()
    assert not elsewhere.resolve().is_relative_to(REPO.resolve())

    where = run([python, "-c", "import lavis, lavis.common.resources as r; print(lavis.__file__); "
                 "print(r.CONFIG_ROOT); print(r.PROJECTS_ROOT)"], cwd=elsewhere, env=env).stdout.split()
    package, configs, projects = map(Path, where)
    assert package.is_relative_to(venv), f"lavis imported from {package}, not the wheel"
    assert configs == package.parent / "shipped" / "configs" and projects == package.parent / "shipped" / "projects"
    for name in ("configs", "projects"):  # every YAML of the checkout ships, at the same relative path
        shipped, checkout = package.parent / "shipped" / name, REPO / name
        files = [{p.relative_to(root) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
                 for root in (shipped, checkout)]
        assert files[0] == files[1], name
    assert (package.parent / "assets" / "tokenizer" / "tokenizer.json").is_file()

    listed = run([bin_dir / "lavis-train", "--list-projects"], cwd=elsewhere, env=env).stdout
    assert f"projects: {projects}" in listed and "  projects/pretrain.yaml" in listed

    # make demo's first stage, tiny; the synthetic world is generated under ./data/synthetic.
    out = tmp_path / "out"
    result = run([bin_dir / "lavis-train", "--cfg-path", "projects/pretrain.yaml",
                  "--options", *DEMO_STAGE_1, f"run.output_dir={out}"], cwd=elsewhere, env=env)
    assert list(out.glob("checkpoints/step_*/model.safetensors")), result.stdout + result.stderr
    assert (elsewhere / "data" / "synthetic").is_dir()

    for command in ([bin_dir / "lavis-evaluate", "--help"], [python, "-m", "lavis.serve", "--help"],
                    [bin_dir / "lavis-serve", "--help"]):
        assert "usage:" in run(command, cwd=elsewhere, env=env, timeout=120).stdout
    for name in ("web", "chat", "convert", "export", "plot"):
        assert (bin_dir / f"lavis-{name}").is_file()
