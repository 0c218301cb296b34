"""The resolution ablation (README, "Resolution ablation"): train the rows of ``projects/ablations/``, evaluate
each on the small-objects test split and print one table: VQA accuracy (overall and per question type) and the
image tokens per sample (mean over the test pictures, as the row's own image processor and adapter give them).

    python scripts/ablation.py                       # train the three rows (one after the other), evaluate, print
    python scripts/ablation.py --skip-train          # evaluate the runs already in outputs/ablations/, print
    python scripts/ablation.py --options run.max_steps=4 run.warmup_steps=0    # a quick trial of the chain

``make ablation`` runs the first. Run from the repository root (the projects' data and output paths are relative
to it); ``--options`` go to every training, as ``make demo``'s ``DEMO_OPTIONS`` do.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from lavis.cli.chain import evaluate_run, train_project

ROWS: dict[str, str] = {
    "resampler_fixed": "resampler, fixed 64x64",
    "merger_fixed": "patch merger, fixed 64x64",
    "merger_native": "patch merger, native resolution",
}
PROJECTS = Path("projects") / "ablations"
EVAL_PROJECT = PROJECTS / "eval.yaml"
WORLD = Path("data") / "small_objects"  # as in projects/ablations/*.yaml
QTYPES = ("end", "shape", "count_kind", "count")


def image_tokens(row: str) -> float:
    """Mean image tokens per test picture of a trained row: its model's count (fixed size), or its grid's (native)."""
    from PIL import Image

    from lavis import load_model

    model, processors = load_model(Path("outputs") / "ablations" / row, device="cpu")
    per_image = model.image_tokens
    with open(WORLD / "scenes_test.json", encoding="utf-8") as f:
        images = [scene["image"] for scene in json.load(f)]
    if not callable(per_image):
        return float(per_image)
    counts = [per_image(processors.image(Image.open(WORLD / image).convert("RGB")).grid) for image in images]
    return sum(counts) / len(counts)


def accuracies(vqa_json: Path) -> dict[str, float]:
    """VQA accuracy overall (the evaluation's) and per question type (the annotations' ``question_type``)."""
    from lavis.tasks.metrics import vqa_accuracy_by

    with open(vqa_json, encoding="utf-8") as f:
        results = json.load(f)
    with open(WORLD / "vqa_annotations_test.json", encoding="utf-8") as f:
        qtype = {str(a["question_id"]): a["question_type"] for a in json.load(f)["annotations"]}
    return vqa_accuracy_by(results, qtype)


def blind_prior() -> dict[str, float]:
    """VQA accuracy of answering without the picture: the most frequent training answer of each question type."""
    from collections import Counter

    from lavis.tasks.metrics import vqa_accuracy

    with open(WORLD / "sft_train.json", encoding="utf-8") as f:
        counts: dict[str, Counter] = defaultdict(Counter)
        for record in json.load(f):
            for turn in record["meta"]["turns"]:
                counts[turn["qtype"]][turn["answer"]] += 1
    with open(WORLD / "vqa_annotations_test.json", encoding="utf-8") as f:
        annotations = json.load(f)["annotations"]
    scores: dict[str, list[float]] = defaultdict(list)
    for a in annotations:
        guess = counts[a["question_type"]].most_common(1)[0][0]
        scores[a["question_type"]].append(vqa_accuracy(guess, [x["answer"] for x in a["answers"]]))
    table = {q: sum(s) / len(s) for q, s in scores.items()}
    table["all"] = sum(sum(s) for s in scores.values()) / sum(len(s) for s in scores.values())
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-train", action="store_true", help="evaluate the runs already in outputs/ablations/")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="which rows (default: all)")
    parser.add_argument("--options", nargs="*", default=[], help="--options for every training (e.g. a quick trial)")
    args = parser.parse_args(argv)
    times = {row: None if args.skip_train else train_project(PROJECTS / f"{row}.yaml", args.options) for row in args.rows}
    lines = [
        "| row | image tokens / sample | VQA accuracy | end colour | shape | count of a kind | count | train time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in args.rows:
        results = evaluate_run(EVAL_PROJECT, Path("outputs") / "ablations" / row, show_log=False)
        acc, tokens = accuracies(results / "vqa.json"), image_tokens(row)
        per_type = " | ".join(f"{acc[q]:.3f}" if q in acc else "-" for q in QTYPES)
        took = "-" if times[row] is None else f"{times[row]:.0f} s"
        lines.append(f"| {ROWS[row]} (`{row}`) | {tokens:.1f} | {acc['all']:.3f} | {per_type} | {took} |")
    prior = blind_prior()
    per_type = " | ".join(f"{prior[q]:.3f}" for q in QTYPES)
    lines.append(f"| blind prior (each type's most frequent training answer, no picture) | 0 | {prior['all']:.3f} | {per_type} | - |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
