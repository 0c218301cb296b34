"""Do the image tokens carry the picture? Spread of the adapter's output tokens within and across images.

    python benchmarks/adapter_tokens.py [--model outputs/multitask] [--images 32]
    python benchmarks/adapter_tokens.py --quick     # no demo needed: a 1-step model, 4 pictures, seconds

Encodes the first ``--images`` test pictures of the synthetic world with the trained model's vision
encoder and adapter and prints, per hidden dimension averaged:

  across images  std of each token position over the pictures (how much the tokens depend on the picture)
  within image   std over the token positions of one picture (how much the tokens differ from each other)

A resampler whose queries all attend alike gives nearly identical tokens (within << across): the
LLM then sees one summary vector repeated, and positions can reach it only through the attended
patches' content. (The demo's first recipe: 0.007; the current one: about 0.9.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lavis  # noqa: E402
from lavis.processors.image import load_image  # noqa: E402

from machine import quick_model, quick_workdir  # noqa: E402  (benchmarks/machine.py)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/multitask", help="a run's output_dir or a checkpoint")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="seconds, without make demo: a small world, the model "
                        "after one SFT step as --model, 4 pictures (numbers mean nothing)")
    args = parser.parse_args()
    world = REPO / "data" / "synthetic"
    if args.quick:
        work = quick_workdir("adapter_tokens")
        world, args.model, args.images = work / "data" / "synthetic", str(quick_model(work)), 4
    model, processors = lavis.load_model(args.model, device="cpu")
    paths = sorted((world / "images" / "test").glob("*.png"))[: args.images]
    pixels = torch.stack([processors.image(load_image(p)) for p in paths])
    with torch.no_grad():
        patches, grid = model.vision(pixels)
        tokens = model.adapter(patches, grid)
    for name, feats in (("vision patches", patches), ("adapter tokens", tokens)):
        across, within = float(feats.std(0).mean()), float(feats.std(1).mean())
        print(f"{name:15} [{feats.shape[1]} x {feats.shape[2]}]  across images {across:.4f}  "
              f"within image {within:.4f}  within/across {within / across:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
