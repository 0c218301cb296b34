"""ViT step time: the ``qwen2_vl_vit`` wrapper + ``patch_merger`` adapter vs transformers' own vision module.

    python benchmarks/native_vit.py [--family qwen2_vl qwen2_5_vl] [--repeats 20] [--warmup 3]
                                    [--depth 4] [--width 128] [--heads 4] [--sizes 224x224 448x336 ...]
    python benchmarks/native_vit.py --quick     # tiny sizes, seconds: the code path only

For each family (Qwen2-VL, Qwen2.5-VL), one random vision config and two modules of the same weights:

  (a) transformers: ``Qwen2VisionTransformerPretrainedModel`` / ``Qwen2_5_VisionTransformerPretrainedModel``,
      the whole visual module, its merger included (``pooler_output``: one vector per merged token);
  (b) ours: ``Qwen2VLViT`` (``qwen2_vl_vit``: the same transformers module, its merger swapped for a
      stand-in) followed by the ``patch_merger`` adapter (``norm: rmsnorm`` for Qwen2.5-VL), the weights
      copied from (a) (``merger.*`` -> the adapter), as ``VisionLanguageModel.encode_images`` runs them.

Like for like: both map the same patches to the same merged tokens (checked equal before timing) and
train every parameter. The input is one batch of images of different sizes and aspect ratios
(``--sizes``, px; ``patch_size`` 14, ``spatial_merge_size`` 2, i.e. Qwen2-VL's geometry), as flattened
patches with their ``grid_thw``, random values. A step is a forward, a backward of the mean square of
the merged tokens and ``zero_grad`` (no optimiser: it would be the same for both). The two run
interleaved, ``--repeats`` times each after ``--warmup`` untimed steps, alternating which goes first.

Prints, per family, the median step of each and the ratio ours / transformers (target <= 1.05x).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lavis.models.adapters.patch_merger import PatchMerger  # noqa: E402
from lavis.models.vision.qwen2_vl_vit import FAMILIES, Qwen2VLViT  # noqa: E402

from machine import warn_if_busy  # noqa: E402  (benchmarks/machine.py)

PATCH, MERGE = 14, 2
QUICK = {"repeats": 2, "warmup": 1, "depth": 1, "width": 32, "heads": 2, "sizes": ["112x56", "56x168"]}
DEFAULT_SIZES = ["224x224", "448x336", "336x672", "672x448", "1008x280"]


def vision_config(family: str, depth: int, width: int, heads: int, out_width: int) -> dict:
    """The family's vision config fields (``out_width``: the merger's output, the LLM's width)."""
    shared = {"depth": depth, "num_heads": heads, "patch_size": PATCH, "temporal_patch_size": 2, "spatial_merge_size": MERGE}
    if family == "qwen2_vl":
        return {**shared, "embed_dim": width, "hidden_size": out_width, "mlp_ratio": 4}
    # Qwen2.5-VL: windowed attention (112 px windows) but in the last block of every two
    full = list(range(1, depth, 2)) or [depth - 1]
    return {**shared, "hidden_size": width, "out_hidden_size": out_width, "intermediate_size": 4 * width,
            "window_size": 112, "fullatt_block_indexes": full, "hidden_act": "silu"}


def build_pair(family: str, fields: dict, seed: int) -> tuple[nn.Module, nn.Module, PatchMerger]:
    """(transformers' visual module with its merger, our qwen2_vl_vit, our patch_merger), the same weights."""
    config_class, model_class, _ = FAMILIES[family]
    torch.manual_seed(seed)
    reference = model_class._from_config(config_class(**fields), attn_implementation="sdpa", dtype=torch.float32)
    vit = Qwen2VLViT(config={"model_type": family, **fields})
    state = reference.state_dict()
    vit.model.load_state_dict({k: v for k, v in state.items() if not k.startswith("merger.")}, strict=True)
    out_width = fields["hidden_size"] if family == "qwen2_vl" else fields["out_hidden_size"]
    adapter = PatchMerger(vit.width, out_width, MERGE, norm="layernorm" if family == "qwen2_vl" else "rmsnorm")
    adapter.load_state_dict({k.removeprefix("merger."): v for k, v in state.items() if k.startswith("merger.")}, strict=True)
    return reference, vit, adapter


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` (px, multiples of patch x merge size) -> the grid (h, w) in patches."""
    width, height = (int(x) for x in text.lower().split("x"))
    if width % (PATCH * MERGE) or height % (PATCH * MERGE):
        raise SystemExit(f"--sizes {text}: both sides must be multiples of {PATCH * MERGE} px")
    return height // PATCH, width // PATCH


def compare(family: str, args: argparse.Namespace, grids: torch.Tensor) -> None:
    """Check that ours and transformers' give the same merged tokens, time both interleaved, print the ratio."""
    num_patches = int(grids.prod(-1).sum())
    fields = vision_config(family, args.depth, args.width, args.heads, out_width=2 * args.width)
    reference, vit, adapter = build_pair(family, fields, args.seed)
    generator = torch.Generator().manual_seed(args.seed + 1)
    patches = torch.randn(num_patches, vit.in_features, generator=generator)

    def transformers_step() -> torch.Tensor:
        out = reference(patches, grid_thw=grids).pooler_output
        out.square().mean().backward()
        reference.zero_grad(set_to_none=True)
        return out.detach()

    def ours_step() -> torch.Tensor:
        feats, grid = vit(patches, grids)
        out = adapter(feats, grid)
        out.square().mean().backward()
        vit.zero_grad(set_to_none=True)
        adapter.zero_grad(set_to_none=True)
        return out.detach()

    steps = {"transformers (visual, merger included)": transformers_step, "ours (qwen2_vl_vit + patch_merger)": ours_step}
    ref_out, our_out = transformers_step(), ours_step()
    if not torch.allclose(ref_out, our_out, rtol=1e-4, atol=1e-5):
        raise SystemExit(f"{family}: our output differs from transformers' (max {(ref_out - our_out).abs().max():.2e})")
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.repeats):
        for name in list(steps)[:: 1 if r % 2 == 0 else -1]:  # alternate which goes first
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)

    print(f"{family}: outputs equal ({tuple(our_out.shape)}); {sum(p.numel() for p in reference.parameters()) / 1e6:.2f}M parameters")
    for name, ts in times.items():
        print(f"  {name:<40} median {statistics.median(ts) * 1e3:8.1f} ms/step   total {sum(ts):7.2f} s")
    ours, theirs = (times[name] for name in ("ours (qwen2_vl_vit + patch_merger)", "transformers (visual, merger included)"))
    print(f"  ratio ours / transformers ({family}): median {statistics.median(ours) / statistics.median(theirs):.3f}x, "
          f"total {sum(ours) / sum(theirs):.3f}x   (target <= 1.05x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--repeats", type=int, default=20, help="timed steps of each, interleaved")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each first")
    parser.add_argument("--depth", type=int, default=4, help="ViT blocks")
    parser.add_argument("--width", type=int, default=128, help="ViT width (embed_dim / hidden_size)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="the batch's images, WxH px")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help=f"seconds: {', '.join(f'{k}={v}' for k, v in QUICK.items())} (numbers mean nothing)")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    else:
        warn_if_busy()

    grids = torch.tensor([(1, *parse_size(s)) for s in args.sizes], dtype=torch.long)
    num_patches = int(grids.prod(-1).sum())
    print(f"batch: {len(grids)} images ({', '.join(args.sizes)} px), {num_patches} patches, {num_patches // MERGE**2} merged "
          f"tokens; ViT depth {args.depth}, width {args.width}, heads {args.heads}; torch threads {torch.get_num_threads()}; "
          f"{args.repeats} interleaved repeats after {args.warmup} warm-up")
    for family in args.family:
        compare(family, args, grids)


if __name__ == "__main__":
    main()
