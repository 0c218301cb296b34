"""OCR-VQA read as released (dataset.json, split codes, exact match) and VQAv2 test-dev: questions without
annotations become unanswered records that the vqa task writes as the evaluation server's results file
(``eval/<name>_submission.json``), filled to all test2015 questions when asked, and that training refuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_PRESET
from helpers import OCRVQA, TEST2015, TESTDEV

from lavis.common.config import ConfigError, load_config
from lavis.common.registry import registry
from lavis.datasets.builders.base import AnnotationError
from lavis.tasks.vqa import VQATask

# --------------------------------------------------------------------------- OCR-VQA


def write_json(path: Path, content) -> Path:
    path.write_text(json.dumps(content))
    return path


def ocrvqa_records(tmp_path: Path, **params) -> list[dict]:
    path = write_json(tmp_path / "dataset.json", OCRVQA)
    return registry.get("builder", "ocrvqa")(ann_path=str(path), image_root="images", **params).build().records


def test_ocrvqa_test_split_becomes_one_vqa_record_per_question_scored_by_exact_match(tmp_path):
    records = ocrvqa_records(tmp_path)  # split: test by default
    assert [r["id"] for r in records] == [f"1930753313-{k}" for k in range(5)]
    first = records[0]
    assert first["image"] == "1930753313.jpg"  # as the download script saves it: images/<book id><extension>
    assert first["prompt"] == "<img>1930753313.jpg</img>Who wrote this book? Answer:" and first["target"] == " Kurt Rogers"
    assert first["answers"] == ["Kurt Rogers"]
    task = VQATask(metric="exact_match", max_new_tokens=100)
    samples = task.samples(records)
    right = task.metrics([{**s.reference, "prediction": r["answers"][0].upper()} for s, r in zip(samples, records)])
    wrong = task.metrics([{**s.reference, "prediction": "Kurt Rogers"} for s in samples])
    assert task.metric_names == ("accuracy",)
    assert right == {"accuracy": 1.0, "count": 5} and wrong["accuracy"] == pytest.approx(1 / 5)


def test_ocrvqa_split_filter_keeps_the_named_splits_and_names_those_present_when_it_keeps_nothing(tmp_path):
    records = ocrvqa_records(tmp_path, split="train,val")
    assert [r["id"] for r in records] == ["0060938455-0", "0399535551-0"]
    assert records[0]["image"] == "0060938455.png"
    assert len(ocrvqa_records(tmp_path, split=None)) == 7
    test_only = write_json(tmp_path / "test_only.json", {"1930753313": OCRVQA["1930753313"]})
    with pytest.raises(AnnotationError, match=rf"{test_only}: no records of split train, val; splits in the file: test"):
        registry.get("builder", "ocrvqa")(ann_path=str(test_only), split="train,val").build()
    with pytest.raises(ConfigError, match="unknown split tset; OCR-VQA's splits: train, val, test"):
        registry.get("builder", "ocrvqa")(ann_path=str(test_only), split="tset")


def test_ocrvqa_missing_or_misshapen_file_is_named(tmp_path):
    builder = registry.get("builder", "ocrvqa")
    with pytest.raises(AnnotationError, match=rf"not found: {tmp_path / 'dataset.json'} \(ocrvqa: released at https://ocr-vqa.github.io/\)"):
        builder(ann_path=str(tmp_path / "dataset.json")).build()
    bad = write_json(tmp_path / "bad.json", {"1": {**OCRVQA["1930753313"], "answers": ["only one"]}})
    with pytest.raises(AnnotationError, match=rf"{bad}: 1: 'questions' and 'answers' must be lists of the same length"):
        builder(ann_path=str(bad)).build()
    listed = write_json(tmp_path / "list.json", [OCRVQA["1930753313"]])
    with pytest.raises(AnnotationError, match=rf"{listed}: not an OCR-VQA dataset.json"):
        builder(ann_path=str(listed)).build()


def test_ocrvqa_project_validates_with_qwen_vl_s_settings():
    entry = load_config(REPO / "projects" / "eval" / "ocrvqa.yaml").evaluation["ocrvqa"]
    assert (entry.task, entry.builder, entry.builder_params["split"]) == ("vqa", "ocrvqa", "test")
    assert (entry.benchmark, entry.benchmark_split) == ("OCR-VQA", "test")
    assert entry.task_params["metric"] == "exact_match" and entry.task_params["max_new_tokens"] == 100
    assert entry.task_params["prompt"] == "{question} Answer:" and entry.task_params["min_new_tokens"] == 1


# --------------------------------------------------------------------------- VQAv2 test-dev

TEST_PATTERN = "COCO_{split}2015_{image_id:012d}.jpg"


def read_testdev(tmp_path: Path) -> list[dict]:
    questions = write_json(tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json", TESTDEV)
    builder = registry.get("builder", "vqa")(ann_path=None, question_path=str(questions), split="test", image_pattern=TEST_PATTERN)
    return builder.build().records


def fake_results(task: VQATask, records: list[dict], outputs: list[str]) -> list[dict]:
    """Results as the Evaluator gathers them, for known generated ``outputs``."""
    return [{"id": s.id, "output": o, "prediction": task.prediction(o), **s.reference} for s, o in zip(task.samples(records), outputs)]


def test_testdev_questions_without_annotations_become_unanswered_records(tmp_path):
    records = read_testdev(tmp_path)
    assert [r["id"] for r in records] == ["10", "11", "20"]
    assert records[0]["image"] == "COCO_test2015_000000000001.jpg" and records[0]["question_id"] == 10
    assert all("target" not in r and "answers" not in r for r in records)  # evaluation only
    with pytest.raises(ConfigError, match="ann_path is null and question_path is not set"):
        registry.get("builder", "vqa")(ann_path=None)


def test_unanswered_records_give_a_submission_of_the_stripped_answers_and_count_them(tmp_path):
    records = read_testdev(tmp_path)
    task = VQATask()
    results = fake_results(task, records, [" yes\n", "2 ", " red"])
    assert task.metric_names == ("answered",)
    assert task.metrics(results) == {"answered": 3, "count": 3}
    assert task.submission(results) == [{"question_id": 10, "answer": "yes"}, {"question_id": 11, "answer": "2"},
                                        {"question_id": 20, "answer": "red"}]
    scored = VQATask()
    answered = [{"id": "1", "image": "a.jpg", "question": "q?", "answers": ["yes"]}]
    assert scored.submission(fake_results(scored, answered, ["yes"])) is None  # scored records: no submission file


def test_submission_questions_fill_every_other_test2015_question_with_an_empty_answer(tmp_path):
    records = read_testdev(tmp_path)
    test2015 = write_json(tmp_path / "v2_OpenEnded_mscoco_test2015_questions.json", TEST2015)
    task = VQATask(submission_questions_path=str(test2015))
    results = fake_results(task, records, ["yes", "2", "red"])
    assert task.submission(results) == [  # test2015's order
        {"question_id": 30, "answer": ""}, {"question_id": 10, "answer": "yes"}, {"question_id": 11, "answer": "2"},
        {"question_id": 20, "answer": "red"}, {"question_id": 40, "answer": ""}]
    assert task.metrics(results)["answered"] == 3
    # A question outside the file, a missing file, answered records: errors before anything is generated.
    partial = write_json(tmp_path / "partial.json", {"questions": TEST2015["questions"][:2]})
    with pytest.raises(AnnotationError, match=rf"record '11': question_id 11 is not in submission_questions_path {partial}"):
        VQATask(submission_questions_path=str(partial)).samples(records)
    with pytest.raises(ConfigError,
                       match=r"submission_questions_path: file not found: .*absent.json \(VQAv2's v2_OpenEnded_mscoco_test2015"):
        VQATask(submission_questions_path=str(tmp_path / "absent.json"))
    with pytest.raises(ConfigError, match="submission_questions_path is set but the records have answers"):
        VQATask(submission_questions_path=str(test2015)).samples([{"id": "1", "image": "a.jpg", "question": "q?", "answers": ["yes"]}])


def test_answered_and_unanswered_records_in_one_evaluation_are_an_error(tmp_path):
    records = [{"id": "7", "image": "a.jpg", "question": "q?", "answers": ["yes"]}, *read_testdev(tmp_path)]
    with pytest.raises(ConfigError, match="record '7' has answers and record '10' has none"):
        VQATask().samples(records)


def test_training_on_unanswered_records_fails_naming_the_dataset(load_sft, tmp_path):
    from lavis.tasks.sft import LanguageModelingTask

    questions = write_json(tmp_path / "testdev.json", TESTDEV)
    cfg = load_sft("datasets.testdev.builder=vqa", f"datasets.testdev.question_path={questions}", "datasets.testdev.ann_path=null")
    with pytest.raises(AnnotationError, match=r"datasets.testdev \(vqa\): record '10' has no answer to train on; .*evaluation only"):
        LanguageModelingTask(cfg).build_sources()


def test_vqav2_project_has_val_scored_and_testdev_submitted():
    cfg = load_config(REPO / "projects" / "eval" / "vqav2.yaml")
    val, testdev = cfg.evaluation["vqav2_val"], cfg.evaluation["vqav2_testdev"]
    assert (val.task, val.builder, val.task_params["metric"]) == ("vqa", "vqa", "vqa_accuracy")
    assert val.builder_params["ann_path"].endswith("v2_mscoco_val2014_annotations.json")
    assert [(e.benchmark, e.benchmark_split) for e in (val, testdev)] == [("VQAv2", "val"), ("VQAv2", "test-dev")]
    assert testdev.builder_params["ann_path"] is None
    assert testdev.builder_params["question_path"].endswith("v2_OpenEnded_mscoco_test-dev2015_questions.json")
    image = testdev.builder_params["image_pattern"].format(split=testdev.builder_params["split"], image_id=1)
    assert image == "COCO_test2015_000000000001.jpg"
    assert testdev.task_params["submission_questions_path"].endswith("v2_OpenEnded_mscoco_test2015_questions.json")
    for entry in (val, testdev):
        assert entry.task_params["prompt"] == "{question} Answer:" and entry.task_params["max_new_tokens"] == 10


@pytest.mark.integration
def test_evaluate_py_writes_the_testdev_submission_file(tmp_path):
    from PIL import Image

    images = tmp_path / "test2015"
    images.mkdir()
    for image_id in (1, 2):
        Image.new("RGB", (32, 32), (40 * image_id, 90, 160)).save(images / TEST_PATTERN.format(split="test", image_id=image_id))
    project = write_json(tmp_path / "eval.yaml", {
        "base": [str(TINY_PRESET)],
        "evaluation": {"vqav2_testdev": {
            "task": "vqa", "builder": "vqa", "ann_path": None, "image_root": str(images), "split": "test", "image_pattern": TEST_PATTERN,
            "question_path": str(write_json(tmp_path / "testdev.json", TESTDEV)),
            "submission_questions_path": str(write_json(tmp_path / "test2015.json", TEST2015)), "max_new_tokens": 4}},
        "run": {"output_dir": str(tmp_path / "out"), "device": "cpu", "eval_batch_size": 2},
    })
    proc = subprocess.run([sys.executable, "evaluate.py", "--cfg-path", str(project)],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "eval" / "results.json").read_text())["results"]
    assert [(r["evaluation"], r["metric"], r["value"]) for r in rows] == [("vqav2_testdev", "answered", 3)]  # the table's row
    submission = json.loads((tmp_path / "out" / "eval" / "vqav2_testdev_submission.json").read_text())
    assert [s["question_id"] for s in submission] == [30, 10, 11, 20, 40]
    assert all(set(s) == {"question_id", "answer"} and isinstance(s["answer"], str) for s in submission)
    assert submission[0]["answer"] == submission[-1]["answer"] == ""
    predictions = json.loads((tmp_path / "out" / "eval" / "vqav2_testdev.json").read_text())["predictions"]
    assert [s["answer"] for s in submission[1:4]] == [p["output"].strip() for p in predictions]


def test_a_missing_submission_questions_file_is_named_before_the_model_is_built():
    from lavis.common.config import load_config

    cfg = load_config(REPO / "projects" / "eval" / "vqav2.yaml")
    with pytest.raises(FileNotFoundError) as err:
        cfg.check_local_paths()
    assert ("evaluation.vqav2_testdev.submission_questions_path: /data/vqav2/v2_OpenEnded_mscoco_test2015_questions.json"
            in str(err.value))
