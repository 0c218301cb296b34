"""The demo model before and after the DPO stage (README, issue 22's comparison), from their evaluations by
``projects/eval/demo.yaml``: VQA accuracy by question type, a CHAIR-style hallucination rate of the captions
(``CHAIR_i``: objects named that the scene does not hold / objects named; ``CHAIR_s``: captions naming one),
the objects named, CIDEr and grounding accuracy, one row per run.

    python evaluate.py --cfg-path projects/eval/demo.yaml --options model.load_from=outputs/dpo
    python scripts/preference_gap.py outputs/sft/eval/step_00000600/demo outputs/dpo/eval/step_00000250/demo

Each argument is an evaluation's output directory (its ``vqa.json``, ``caption.json``, ``grounding.json``);
the scenes are the shapes world's test split (``--world``, default ``data/synthetic``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

QTYPES = ("exists", "shape", "colour", "position", "count")


def _read(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def row(eval_dir: Path, world: Path) -> dict[str, float]:
    """One run's figures from its evaluation directory."""
    from lavis.tasks.metrics import caption_hallucination, vqa_accuracy_by

    scenes = {scene["image"]: scene for scene in _read(world / "scenes_test.json")}
    qtype = {str(a["question_id"]): a["question_type"] for a in _read(world / "vqa_annotations_test.json")["annotations"]}
    captions = _read(eval_dir / "caption.json")
    figures = vqa_accuracy_by(_read(eval_dir / "vqa.json"), qtype)
    chair = caption_hallucination((p["prediction"], scenes[p["image"]]) for p in captions["predictions"])
    figures.update(CHAIR_i=chair["CHAIR_i"], CHAIR_s=chair["CHAIR_s"], mentioned=chair["mentioned"])  # not its "count"
    figures["CIDEr"] = float(captions["metrics"]["CIDEr"])
    figures["grounding"] = float(_read(eval_dir / "grounding.json")["metrics"]["accuracy"])
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_dirs", nargs="+", type=Path, help="evaluation output directories, one row each")
    parser.add_argument("--world", type=Path, default=Path("data") / "synthetic", help="the shapes world (test split)")
    args = parser.parse_args(argv)
    columns = ["all", *QTYPES, "CHAIR_i", "CHAIR_s", "mentioned", "CIDEr", "grounding"]
    lines = ["| run | VQA | " + " | ".join(columns[1:]) + " |", "|---" * (len(columns) + 1) + "|"]
    for eval_dir in args.eval_dirs:
        figures = row(eval_dir, args.world)
        cells = [f"{figures[c]:.3f}" if isinstance(figures.get(c), float) else str(figures.get(c, "-")) for c in columns]
        lines.append(f"| `{eval_dir}` | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
