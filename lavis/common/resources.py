"""Where the files the package ships are found: the default YAMLs (``configs/``) and the runnable
projects (``projects/``). Imports nothing of lavis.

In a checkout (``make install``, an editable install, or ``python train.py``) they are the checkout's
top-level ``configs/`` and ``projects/``. An installed wheel carries the same two directories inside the
package, as ``lavis/shipped/configs/`` and ``lavis/shipped/projects/`` (setup.py maps them there; git holds
one copy), side by side as in the checkout, so a project's ``base: [../configs/...]`` resolves the same
way in both.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# The package directory that holds configs/ and projects/ in an installed wheel (see setup.py).
SHIPPED_PACKAGE = "lavis.shipped"


def _checkout_root() -> Path | None:
    """The checkout this package runs from, or None for an installed wheel."""
    root = PACKAGE_ROOT.parent
    if (root / "setup.py").is_file() and (root / "configs" / "default.yaml").is_file():
        return root
    return None


def _installed_root() -> Path:
    """``lavis/shipped`` of an installed wheel (its files are on disk: wheels install unzipped)."""
    shipped = resources.files("lavis").joinpath("shipped")
    return Path(str(shipped))


CHECKOUT_ROOT = _checkout_root()
DATA_ROOT = CHECKOUT_ROOT if CHECKOUT_ROOT is not None else _installed_root()
CONFIG_ROOT = DATA_ROOT / "configs"
PROJECTS_ROOT = DATA_ROOT / "projects"


def find_project(path: str | Path) -> Path:
    """The project YAML ``--cfg-path`` names: the file itself when it exists (relative to the working
    directory, as always), else the shipped project of that name: ``projects/pretrain.yaml``,
    ``pretrain.yaml`` or ``pretrain`` -> ``<PROJECTS_ROOT>/pretrain.yaml`` (``eval/demo`` likewise), so
    that an installed package runs its projects from any directory. A name found nowhere is returned
    as given (loading it reports the missing file)."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    parts = given.parts
    if parts and parts[0] == "projects":
        parts = parts[1:]
    if not parts:
        return given
    name = Path(*parts)
    for candidate in (name, name.with_name(name.name + ".yaml")):
        shipped = PROJECTS_ROOT / candidate
        if shipped.is_file():
            return shipped
    return given


def project_names() -> list[str]:
    """The shipped projects, as ``--cfg-path`` accepts them: ``projects/pretrain.yaml``, ..."""
    return sorted(f"projects/{p.relative_to(PROJECTS_ROOT).as_posix()}" for p in PROJECTS_ROOT.rglob("*.yaml"))


def describe() -> str:
    """Where the shipped configs and projects are, and the projects by name (``--list-projects``)."""
    lines = [f"configs:  {CONFIG_ROOT}", f"projects: {PROJECTS_ROOT}",
             "projects (--cfg-path NAME works from any directory when ./NAME does not exist):"]
    return "\n".join(lines + [f"  {name}" for name in project_names()]) + "\n"
