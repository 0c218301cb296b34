"""Trained vs untrained: the demo model's scores on the held-out synthetic test split beside baselines.

    make demo                                  # trains outputs/sft (and evaluates it)
    python benchmarks/eval_gap.py [--model outputs/sft] [--options key=value ...]
    python benchmarks/eval_gap.py --quick      # no demo needed: a 1-step model, 4 samples per task, seconds

Rows, for each metric of projects/eval/demo.yaml (captioning, VQA, grounding):

  untrained     the same config, randomly initialised (seed 42): what the scores are without learning;
  blind prior   no image at all: each VQA question answered with the most frequent training answer of
                its question type, every grounding box the mean training box, every caption the most
                frequent training caption; what the data's priors alone give;
  trained       the model of ``--model``.

The gap between "blind prior" and "trained" is what the model learned from the pictures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lavis.common.config import load_config  # noqa: E402
from lavis.models import build_model  # noqa: E402
from lavis.models.loading import build_trained, evaluation_config, explicit_keys  # noqa: E402
from lavis.processors.boxes import box_text  # noqa: E402
from lavis.runners.iter_runner import seed_everything  # noqa: E402
from lavis.tasks.evaluation import Evaluator  # noqa: E402
from lavis.tasks.metrics import caption_scores, grounding_accuracy, vqa_score  # noqa: E402

from machine import quick_model, quick_workdir  # noqa: E402  (benchmarks/machine.py)

WORLD = Path("data") / "synthetic"  # relative, as in projects/eval/demo.yaml: to the repository root (or --quick's world)


def scores(cfg, model_path: str | None) -> dict[str, float]:
    """The evaluations of ``cfg`` on its model: trained (the weights of ``model_path``) or as initialised."""
    seed_everything(cfg.run.seed)
    if model_path:
        model, processors = build_trained(cfg.model, model_path)
    else:
        model, processors = build_model(dataclasses.replace(cfg.model, load_from=None))
    evaluator = Evaluator(cfg, model, processors)
    results = evaluator.evaluate()
    return {f"{name}/{m}": r.metrics[m] for name, r in results.items() for m in evaluator.tasks[name].metric_names}


def blind_prior() -> dict[str, float]:
    """Scores from the training data's answer priors alone (no image)."""
    def load(name):
        return json.loads((WORLD / name).read_text())

    # VQA: most frequent training answer per question type.
    by_type: dict[str, Counter] = defaultdict(Counter)
    for ann in load("vqa_annotations_train.json")["annotations"]:
        by_type[ann["question_type"]][ann["multiple_choice_answer"]] += 1
    test = load("vqa_annotations_test.json")["annotations"]
    vqa = vqa_score([by_type[a["question_type"]].most_common(1)[0][0] for a in test],
                    [[x["answer"] for x in a["answers"]] for a in test])["accuracy"]
    # Grounding: the mean training box, in Qwen-VL's [0, 1000) text.
    def corners(record):
        x, y, bw, bh = record["bbox"]
        return (x, y, x + bw, y + bh)

    train_refs, test_refs = load("refs_train.json"), load("refs_test.json")
    mean = [sum(corners(r)[k] for r in train_refs) / len(train_refs) for k in range(4)]
    box = box_text(mean, train_refs[0]["width"], train_refs[0]["height"])
    gt = [corners(r) for r in test_refs]
    grounding = grounding_accuracy([box] * len(gt), gt, [(r["width"], r["height"]) for r in test_refs])["accuracy"]
    # Captioning: the most frequent training caption for every image.
    common = Counter(a["caption"] for a in load("captions_train.json")["annotations"]).most_common(1)[0][0]
    refs: dict[int, list[str]] = defaultdict(list)
    for a in load("captions_test.json")["annotations"]:
        refs[a["image_id"]].append(a["caption"])
    captions = caption_scores({k: common for k in refs}, refs)
    return {"caption/CIDEr": captions["CIDEr"], "caption/BLEU-4": captions["BLEU-4"],
            "vqa/accuracy": vqa, "grounding/accuracy": grounding}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/sft", help="the trained model: a run's output_dir or a checkpoint")
    parser.add_argument("--options", nargs="+", default=[], help="overrides for projects/eval/demo.yaml")
    parser.add_argument("--quick", action="store_true", help="seconds, without make demo: a small world, the model "
                        "after one SFT step as --model, 4 samples per task (numbers mean nothing)")
    args = parser.parse_args()
    if args.quick:
        work = quick_workdir("eval_gap")
        os.chdir(work)  # a small world at data/synthetic, the projects' relative paths
        args.model = str(quick_model(work))
        args.options = [*(f"evaluation.{name}.max_samples=4" for name in ("caption", "vqa", "grounding")), *args.options]
    else:
        os.chdir(REPO)  # the projects' data paths are relative to the repository root
    torch.set_grad_enabled(False)
    project, options = REPO / "projects" / "eval" / "demo.yaml", [f"model.load_from={args.model}", *args.options]
    # The model as trained (its run's config.yaml), untrained and trained alike: the same architecture.
    cfg, _ = evaluation_config(load_config(project, options), explicit_keys(project, options))
    rows = {"untrained": scores(cfg, None), "blind prior": blind_prior(), "trained": scores(cfg, args.model)}
    metrics = list(rows["trained"])
    print(f"{'':12}" + "".join(f"{m:>22}" for m in metrics))
    for label, values in rows.items():
        print(f"{label:12}" + "".join(f"{values[m]:>22.4f}" for m in metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
