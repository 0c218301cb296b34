"""Video on the embedded default (README, "Video on the embedded default"): train ``projects/video/train.yaml``
(a tiny native-resolution model, M-RoPE, from scratch on the synthetic clips), evaluate it on the held-out test
split with ``projects/video/eval.yaml``, and print one table: VQA accuracy per question type beside the blind
prior (each question answered with the most frequent training answer of its type, without the video).

    python scripts/video_demo.py                   # train outputs/video, evaluate, print
    python scripts/video_demo.py --skip-train      # evaluate the run already in outputs/video, print
    python scripts/video_demo.py --options run.max_steps=4 run.warmup_steps=0 \
        --eval-options evaluation.vqa.max_samples=40                  # a quick trial of the chain

``make video-demo`` runs the first. Run from the repository root (the projects' data and output paths are
relative to it); ``--options`` go to the training.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from lavis.cli.chain import evaluate_run, train_project

TRAIN_PROJECT = Path("projects") / "video" / "train.yaml"
EVAL_PROJECT = Path("projects") / "video" / "eval.yaml"
RUN = Path("outputs") / "video"
WORLD = Path("data") / "videos"  # as in projects/video/*.yaml
QTYPES = ("direction", "colour", "order", "count")


def _records(split: str) -> list[dict]:
    with open(WORLD / f"vqa_{split}.json", encoding="utf-8") as f:
        return json.load(f)


def blind_prior(test: list[dict], train: list[dict]) -> dict[str, float]:
    """Accuracy per question type (and overall) of answering each test question with the most frequent training
    answer of its type: what a model that does not watch the videos can score (the answers are balanced)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for record in train:
        counts[record["question_type"]][record["answers"][0]] += 1
    hits: dict[str, list[float]] = defaultdict(list)
    for record in test:
        guess = counts[record["question_type"]].most_common(1)[0][0]
        hits[record["question_type"]].append(float(guess == record["answers"][0]))
    table = {q: sum(h) / len(h) for q, h in hits.items()}
    table["all"] = sum(sum(h) for h in hits.values()) / len(test)
    return table


def accuracies(vqa_json: Path, test: list[dict]) -> dict[str, float]:
    """VQA accuracy overall (the evaluation's) and per question type."""
    from lavis.tasks.metrics import vqa_accuracy_by

    with open(vqa_json, encoding="utf-8") as f:
        results = json.load(f)
    return vqa_accuracy_by(results, {str(r["question_id"]): r["question_type"] for r in test})


def table(rows: dict[str, dict[str, float]], counts: Counter) -> str:
    """The Markdown table: one row per entry of ``rows``, a column per question type (its question count)."""
    header = "| | all | " + " | ".join(f"{q} ({counts[q]})" for q in QTYPES) + " |"
    lines = [header, "|---" * (len(QTYPES) + 2) + "|"]
    for label, acc in rows.items():
        lines.append(f"| {label} | {acc['all']:.3f} | " + " | ".join(f"{acc[q]:.3f}" if q in acc else "-" for q in QTYPES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-train", action="store_true", help=f"evaluate the run already in {RUN}")
    parser.add_argument("--run", default=str(RUN), help="the trained run to evaluate (default: %(default)s)")
    parser.add_argument("--options", nargs="*", default=[], help="--options for the training (e.g. a quick trial)")
    parser.add_argument("--eval-options", nargs="*", default=[], help="--options for the evaluation "
                        "(e.g. evaluation.vqa.max_samples=40)")
    args = parser.parse_args(argv)
    # The trainer computes on one thread while its two data workers decode the clips: on 2 shared CPU cores, two
    # compute threads made each step 2-3 times slower.
    took = None if args.skip_train else train_project(TRAIN_PROJECT, args.options, threads=1)
    vqa_json = evaluate_run(EVAL_PROJECT, args.run, args.eval_options) / "vqa.json"  # generates data/videos first when it is not there
    test = _records("test")
    rows = {"blind prior (most frequent training answer per type, no video)": blind_prior(test, _records("train")),
            f"`{args.run}`": accuracies(vqa_json, test)}
    print(table(rows, Counter(r["question_type"] for r in test)))
    if took is not None:
        print(f"training: {took:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
