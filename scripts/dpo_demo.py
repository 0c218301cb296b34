"""The demo's optional fourth stage (README, "DPO on the embedded default"): train ``projects/dpo.yaml`` from the
SFT stage's run, evaluate it with ``projects/eval/demo.yaml`` on the held-out test split, and print the SFT model
against the DPO model, one row each: VQA accuracy by question type, a CHAIR-style hallucination rate of the
captions (``CHAIR_i``: objects named that the scene does not hold / objects named; ``CHAIR_s``: captions naming
one), the objects named, CIDEr and grounding accuracy.

    python scripts/dpo_demo.py                    # after `make demo`: train outputs/dpo, evaluate, print
    python scripts/dpo_demo.py --skip-train       # evaluate the run already in outputs/dpo, print
    python scripts/dpo_demo.py --run outputs/dpo_seed1 --options run.seed=1     # another seed, in its own run
    python scripts/dpo_demo.py --compare outputs/sft/eval/step_00000600/demo outputs/dpo/eval/step_00000250/demo
                                                  # the table of evaluations already written (any number of rows)

``make dpo-demo`` runs the first. The SFT row is the evaluation ``make demo`` wrote of the SFT run's last
checkpoint (evaluated here when it is missing). Run from the repository root; ``--options`` go to the training,
``--eval-options`` to the evaluations. The scenes are the shapes world's test split (``--world``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lavis.cli.chain import evaluate_run, train_project

DPO_PROJECT = Path("projects") / "dpo.yaml"
EVAL_PROJECT = Path("projects") / "eval" / "demo.yaml"
SFT_RUN, DPO_RUN = Path("outputs") / "sft", Path("outputs") / "dpo"  # as in projects/{sft,dpo}.yaml

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


def table(eval_dirs: list[Path], world: Path) -> str:
    """The Markdown table: one row per evaluation directory."""
    columns = ["all", *QTYPES, "CHAIR_i", "CHAIR_s", "mentioned", "CIDEr", "grounding"]
    lines = ["| run | VQA | " + " | ".join(columns[1:]) + " |", "|---" * (len(columns) + 1) + "|"]
    for eval_dir in eval_dirs:
        figures = row(eval_dir, world)
        cells = [f"{figures[c]:.3f}" if isinstance(figures.get(c), float) else str(figures.get(c, "-")) for c in columns]
        lines.append(f"| `{eval_dir}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sft_evaluation(options: list[str]) -> Path:
    """The SFT run's evaluation by the demo's project, of its last checkpoint: the one ``make demo`` wrote, or
    a new one when it is missing or ``options`` change the evaluation."""
    from lavis.common.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(SFT_RUN)
    if not checkpoints:
        raise SystemExit(f"error: {SFT_RUN} holds no checkpoint; the DPO stage starts from the SFT stage's run: "
                         "run `make demo` first")
    written = SFT_RUN / "eval" / checkpoints[-1].name / EVAL_PROJECT.stem
    if not options and all((written / f"{name}.json").exists() for name in ("vqa", "caption", "grounding")):
        return written
    return evaluate_run(EVAL_PROJECT, SFT_RUN, options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-train", action="store_true", help="evaluate the run already in --run")
    parser.add_argument("--run", type=Path, default=DPO_RUN, help="the DPO run's output_dir (default: %(default)s), "
                        "e.g. outputs/dpo_seed1 with --options run.seed=1")
    parser.add_argument("--compare", nargs="+", type=Path, metavar="EVAL_DIR",
                        help="only print the table of these evaluation directories, one row each")
    parser.add_argument("--options", nargs="*", default=[], help="--options for the training (e.g. a quick trial)")
    parser.add_argument("--eval-options", nargs="*", default=[], help="--options for both evaluations "
                        "(e.g. evaluation.vqa.max_samples=40)")
    parser.add_argument("--world", type=Path, default=Path("data") / "synthetic", help="the shapes world (test split)")
    args = parser.parse_args(argv)
    if args.compare:
        print(table(args.compare, args.world))
        return 0
    sft = sft_evaluation(args.eval_options)
    took = None if args.skip_train else train_project(DPO_PROJECT, [f"run.output_dir={args.run}", *args.options])
    dpo = evaluate_run(EVAL_PROJECT, args.run, args.eval_options)
    print(table([sft, dpo], args.world))
    if took is not None:
        print(f"training: {took:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
