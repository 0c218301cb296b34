"""Wheels for a GPU machine that has PyTorch but no network (``make gpu-wheels``; README, "GPU checks").

    python scripts/gpu_wheels.py [--dest .whl] [--python-version 3.12] [--max-mib 60]

Downloads, for Linux x86-64 and the given Python, the exact versions this environment runs of what training
needs beside PyTorch (transformers, peft, timm, tokenizers, omegaconf, webdataset, ... and what they need),
found by walking the installed packages' requirements. Left out: torch and its CUDA libraries (the GPU machine's
own build), and ``BASE``, which any Python image with PyTorch has. ``scripts/gpu_check.sh`` installs the wheels
into ``/tmp/site`` ahead of the machine's packages. Refuses to leave more than ``--max-mib`` (what a device run
carries is limited).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# What the GPU checks import (train, evaluate, the benchmarks): the roots of the walk.
ROOTS = ("transformers", "peft", "timm", "tokenizers", "tiktoken", "omegaconf", "webdataset", "safetensors")
# Present wherever PyTorch is, or binary builds a machine's other packages were compiled against: keep the machine's.
BASE = {"torch", "torchvision", "triton", "numpy", "pillow", "pyyaml", "packaging", "typing-extensions", "filelock",
        "fsspec", "jinja2", "markupsafe", "sympy", "mpmath", "networkx", "setuptools", "psutil", "tqdm", "regex",
        "accelerate", "certifi", "idna", "urllib3", "requests", "charset-normalizer"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: tuple[str, ...]) -> dict[str, str]:
    """``{name: installed version}`` of ``roots`` and everything they require here (no extras), ``BASE`` and
    CUDA's libraries left out."""
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = canonical(todo.pop())
        if name in found or name in BASE or name.startswith(("nvidia-", "cuda-")):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement for another platform or Python
        found[name] = dist.version
        for requirement in dist.requires or []:
            if "extra ==" in requirement:
                continue
            todo.append(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=Path(".whl"))
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default %(default)s)")
    parser.add_argument("--max-mib", type=float, default=60.0)
    args = parser.parse_args(argv)
    wanted = closure(ROOTS)
    if args.dest.exists():
        shutil.rmtree(args.dest)
    args.dest.mkdir(parents=True)
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 27, 28, 31, 34)] + ["--platform=manylinux2014_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--implementation=cp",
           f"--python-version={args.python_version}", *platforms, "-d", str(args.dest),
           *(f"{name}=={version}" for name, version in sorted(wanted.items()))]
    subprocess.run(cmd, check=True)
    wheels = sorted(args.dest.glob("*.whl"))
    mib = sum(w.stat().st_size for w in wheels) / 2**20
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"{len(wheels)} wheels, {mib:.1f} MiB in {args.dest}")
    if mib > args.max_mib:
        print(f"error: over --max-mib {args.max_mib}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
