"""Multiple-choice benchmarks read as their authors release them (MMBench, ScienceQA-IMG, SEED-Bench,
AI2D): tiny files in each released format give Qwen-VL's prompts, and the scores equal the official
evaluators' (MMBench's circular evaluation: Qwen-VL's mmbench_evaluation.py, run on the same files)."""

from __future__ import annotations

import base64
import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO
from helpers import FIXTURES, SCIENCEQA, SEED, write_ai2d
from PIL import Image

from lavis.common.registry import registry
from lavis.datasets.builders.base import AnnotationError
from lavis.tasks.evaluation import Evaluator
from lavis.tasks.multiple_choice import MultipleChoiceTask

MC_PROMPT = "Context: {hint}\nQuestion: {question}\nOptions: {options}\nAnswer:"
SEED_PROMPT = "\nQuestion: {question}\nOptions: {options}\nAnswer:"


def predict(records, task: MultipleChoiceTask, letters: dict[str, str]) -> list[dict]:
    """The task's results with the given predicted letter per record id."""
    return [{"id": s.id, "prediction": letters[s.id], **s.reference} for s in task.samples(records)]


# --------------------------------------------------------------------------- MMBench


@pytest.fixture
def mmbench_tsv(tmp_path) -> Path:
    path = tmp_path / "mmbench_dev_20230712.tsv"
    shutil.copy(FIXTURES / "mmbench_dev_tiny.tsv", path)
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file, delimiter="\t"))


def test_mmbench_as_released_gives_qwen_vl_s_prompts_and_writes_its_images_once(mmbench_tsv, tmp_path):
    cases = json.loads((FIXTURES / "mmbench_eval_cases.json").read_text())
    dataset = registry.get("builder", "mmbench")(ann_path=str(mmbench_tsv)).build()
    task = MultipleChoiceTask(prompt=MC_PROMPT)
    samples = task.samples(dataset.records)
    assert sorted(s.id for s in samples) == sorted(cases["prompts"])
    for sample in samples:
        expected = cases["prompts"][sample.id]
        assert Evaluator.prompt_text(task, sample) == f"<img>{sample.images[0]}</img>{expected['text']}"
        assert sample.reference["answer"] == "ABCD"[expected["answer"]]
    image_dir = tmp_path / "mmbench_dev_20230712_images"
    assert dataset.image_root == str(image_dir)
    rows = {row["index"]: row for row in read_rows(mmbench_tsv)}
    for record in dataset.records:  # byte for byte the TSV's image, readable
        written = image_dir / record["image"]
        assert written.read_bytes() == base64.b64decode(rows[record["id"]]["image"])
        assert Image.open(written).size == (8, 8)
    assert {p.suffix for p in image_dir.iterdir()} == {".jpg", ".png"}
    before = {p: p.stat().st_mtime_ns for p in image_dir.iterdir()}
    registry.get("builder", "mmbench")(ann_path=str(mmbench_tsv)).build()
    assert {p: p.stat().st_mtime_ns for p in image_dir.iterdir()} == before


def test_mmbench_circular_accuracy_equals_qwen_vl_s_mmbench_evaluation(mmbench_tsv):
    cases = json.loads((FIXTURES / "mmbench_eval_cases.json").read_text())
    records = registry.get("builder", "mmbench")(ann_path=str(mmbench_tsv)).build().records
    letters = {str(p["index"]): "ABCD"[p["prediction"]] for p in cases["predictions"]}
    task = MultipleChoiceTask(prompt=MC_PROMPT)
    results = predict(records, task, letters)
    metrics = task.metrics(results)
    expected = cases["expected"]
    assert (metrics["correct"], metrics["count"]) == (expected["correct"], expected["total"])
    assert metrics["accuracy"] == expected["correct"] / expected["total"]
    rows_right = sum(r["prediction"] == r["answer"] for r in results)
    assert metrics["accuracy/single_pass"] == rows_right / len(results) == 10 / 17
    # per l2-category, over questions: FP-S holds questions 0 (right) and 1 (one pass wrong)
    assert (metrics["accuracy/FP-S"], metrics["accuracy/RR"], metrics["accuracy/CP"]) == (0.5, 1.0, 0.0)


def test_mmbench_without_rotations_in_the_file_makes_them(mmbench_tsv, tmp_path):
    rows = read_rows(mmbench_tsv)
    originals = tmp_path / "MMBench_DEV_EN.tsv"
    with open(originals, "w", newline="") as file:  # the later layout: originals only
        writer = csv.DictWriter(file, list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["index"]) < 1_000_000)
    made = registry.get("builder", "mmbench")(ann_path=str(originals)).build().records
    released = registry.get("builder", "mmbench")(ann_path=str(mmbench_tsv)).build().records
    fields = ("id", "choices", "answer", "circular_group", "question", "hint")
    rows = [sorted(tuple(map(str, (r[f] for f in fields))) for r in records) for records in (made, released)]
    assert rows[0] == rows[1]
    single = registry.get("builder", "mmbench")(ann_path=str(mmbench_tsv), circular=False).build().records
    assert [r["id"] for r in single] == ["0", "1", "2", "3", "4"] and all("circular_group" not in r for r in single)


def test_mmbench_image_cells_naming_another_row_share_its_image_and_bad_cells_are_named(mmbench_tsv, tmp_path):
    rows = read_rows(mmbench_tsv)
    for row in rows:
        if int(row["index"]) >= 1_000_000:
            row["image"] = str(int(row["index"]) % 1_000_000)
    shared = tmp_path / "shared.tsv"
    with open(shared, "w", newline="") as file:
        writer = csv.DictWriter(file, list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    records = registry.get("builder", "mmbench")(ann_path=str(shared)).build().records
    assert {r["image"] for r in records if r["circular_group"] == "3"} == {"3.png"}
    rows[0]["image"] = "not base64!"
    with open(shared, "w", newline="") as file:
        writer = csv.DictWriter(file, list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(AnnotationError, match=r"shared.tsv: line 2 \(index 0\): the image is not base64"):
        registry.get("builder", "mmbench")(ann_path=str(shared)).build()


# --------------------------------------------------------------------------- ScienceQA, SEED-Bench, AI2D


def test_scienceqa_img_keeps_the_test_problems_with_an_image_in_qwen_vl_s_prompt(tmp_path):
    path = tmp_path / "problems.json"
    path.write_text(json.dumps(SCIENCEQA))
    records = registry.get("builder", "scienceqa")(ann_path=str(path), image_root="images").build().records
    assert [r["id"] for r in records] == ["5", "7"]
    task = MultipleChoiceTask(prompt=MC_PROMPT)
    first, second = task.samples(records)
    # Qwen-VL's evaluate_multiple_choice.py: hint or 'N/A', choices "A. duck\nB. crocodile", options " A", " B"
    assert Evaluator.prompt_text(task, first) == (
        "<img>test/5/image.png</img>Context: Ducks live near water.\n"
        "Question: Which animal's feet are also adapted for swimming?\nOptions: A. duck\nB. crocodile\nAnswer:"
    )
    assert first.options == [" A", " B"] and second.options == [" A", " B", " C", " D"]
    assert "Context: N/A\n" in second.text
    metrics = task.metrics(predict(records, task, {"5": "A", "7": "B"}))
    assert (metrics["accuracy"], metrics["accuracy/natural science"], metrics["accuracy/social science"]) == (0.5, 1.0, 0.0)
    everything = registry.get("builder", "scienceqa")(ann_path=str(path), split=None, image_only=False).build()
    assert len(everything) == 4
    with pytest.raises(AnnotationError, match="no records of split minival; splits in the file: test, val"):
        registry.get("builder", "scienceqa")(ann_path=str(path), split="minival").build()


def test_seed_bench_keeps_the_image_questions_in_qwen_vl_s_prompt(tmp_path):
    path = tmp_path / "SEED-Bench.json"
    path.write_text(json.dumps(SEED))
    records = registry.get("builder", "seed_bench")(ann_path=str(path), image_root="SEED-Bench-image").build().records
    assert [r["id"] for r in records] == ["101669", "88231"]
    task = MultipleChoiceTask(prompt=SEED_PROMPT)
    first, _ = task.samples(records)
    # eval_mm/seed_bench/trans.py: '<img>{}</img>\nQuestion: {}\nOptions: {}\nAnswer:' over the four choices
    assert Evaluator.prompt_text(task, first) == (
        "<img>1454426_2591111986</img>\nQuestion: What is the setting of the image?\n"
        "Options: A. A park\nB. A beach\nC. A street\nD. A kitchen\nAnswer:"
    )
    metrics = task.metrics(predict(records, task, {"101669": "A", "88231": "A"}))
    assert (metrics["accuracy"], metrics["accuracy/Scene Understanding"], metrics["accuracy/Text Understanding"]) == (0.5, 1.0, 0.0)


def test_ai2d_reads_the_questions_directory_and_keeps_the_test_diagrams(tmp_path):
    write_ai2d(tmp_path)
    builder = registry.get("builder", "ai2d")
    records = builder(ann_path=str(tmp_path / "questions"), image_root=str(tmp_path / "images"),
                      test_ids_path=str(tmp_path / "ai2d_test_ids.csv")).build().records
    assert [(r["id"], r["image"], r["answer"]) for r in records] == [("9.png-0", "9.png", "A"), ("10.png-0", "10.png", "B"),
                                                                     ("10.png-1", "10.png", "B")]
    assert records[1]["prompt"] == ("<img>10.png</img>Context: N/A\nQuestion: Which stage follows the egg?\n"
                                    "Options: A. adult\nB. larva\nC. pupa\nD. egg\nAnswer:")
    assert len(builder(ann_path=str(tmp_path / "questions")).build()) == 4


@pytest.mark.parametrize("name", ["mmbench", "scienceqa", "seed_bench", "ai2d"])
def test_a_missing_release_names_the_file_and_where_it_is_published(tmp_path, name):
    with pytest.raises(AnnotationError, match=rf"not found: {tmp_path / 'absent'} \({name}: released at http"):
        registry.get("builder", name)(ann_path=str(tmp_path / "absent")).build()


@pytest.mark.parametrize(("project", "entry", "builder"), [
    ("scienceqa", "scienceqa_img", "scienceqa"), ("mmbench", "mmbench_dev", "mmbench"),
    ("seed_bench", "seed_bench_image", "seed_bench"), ("ai2d", "ai2d", "ai2d"),
])
def test_each_multiple_choice_project_validates_with_qwen_vl_s_prompt(project, entry, builder):
    from lavis.common.config import load_config

    config = load_config(REPO / "projects" / "eval" / f"{project}.yaml").evaluation[entry]
    assert (config.task, config.builder) == ("multiple_choice", builder)
    assert config.task_params["prompt"] == (SEED_PROMPT if builder == "seed_bench" else MC_PROMPT)
