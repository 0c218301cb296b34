"""Where the files the package ships are found: the default YAMLs (``configs/``) and the runnable
projects (``projects/``). Imports nothing of lavis."""

from __future__ import annotations

from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
CHECKOUT_ROOT = PACKAGE_ROOT.parent
CONFIG_ROOT = CHECKOUT_ROOT / "configs"
PROJECTS_ROOT = CHECKOUT_ROOT / "projects"
