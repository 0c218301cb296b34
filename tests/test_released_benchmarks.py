"""Question-answering benchmarks read as their authors release them (TextVQA, GQA, DocVQA, ChartQA):
tiny files in each released format load into VQA records, evaluate with the benchmark's metric, and a
missing file names where it is published."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from helpers import RELEASED

from lavis.common.registry import registry
from lavis.datasets.builders.base import AnnotationError
from lavis.tasks.vqa import VQATask

METRIC = {"textvqa": ("vqa_accuracy", "accuracy"), "gqa": ("exact_match", "accuracy"), "docvqa": ("anls", "anls"),
          "chartqa": ("relaxed_accuracy", "relaxed_accuracy")}


def write_release(tmp_path: Path, name: str) -> Path:
    file, content, _ = RELEASED[name]
    path = tmp_path / file
    path.write_text(json.dumps(content))
    return path


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_a_released_file_becomes_vqa_records_and_scores_with_its_metric(tmp_path, name):
    path = write_release(tmp_path, name)
    (record,) = registry.get("builder", name)(ann_path=str(path), image_root="images").build().records
    rid, image, question, answer = RELEASED[name][2]
    assert (record["id"], record["image"], record["question"]) == (rid, image, question)
    assert record["prompt"] == f"<img>{image}</img>{question} Answer:" and record["target"] == f" {answer}"
    metric, name_in_results = METRIC[name]
    task = VQATask(metric=metric)
    (sample,) = task.samples([record])
    right = task.metrics([{**sample.reference, "prediction": answer}])
    wrong = task.metrics([{**sample.reference, "prediction": "zebra"}])
    assert task.metric_names == (name_in_results,)
    assert right[name_in_results] == pytest.approx(1.0) and wrong[name_in_results] == 0.0


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_a_missing_or_misshapen_file_names_it_and_where_it_is_published(tmp_path, name):
    builder = registry.get("builder", name)
    with pytest.raises(AnnotationError, match=rf"not found: {tmp_path / 'absent.json'} \({name}: released at http"):
        builder(ann_path=str(tmp_path / "absent.json")).build()
    (tmp_path / "other.json").write_text(json.dumps({"something": "else"} if name != "gqa" else [1]))
    with pytest.raises(AnnotationError, match=rf"{tmp_path / 'other.json'}"):
        builder(ann_path=str(tmp_path / "other.json")).build()


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_each_benchmark_project_validates_with_qwen_vl_s_settings(name):
    from lavis.common.config import load_config

    entry = load_config(REPO / "projects" / "eval" / f"{name}.yaml").evaluation[name]
    assert (entry.task, entry.builder, entry.task_params["metric"]) == ("vqa", name, METRIC[name][0])
    assert entry.task_params["prompt"] == "{question} Answer:" and entry.task_params["min_new_tokens"] == 1
    assert entry.task_params["max_new_tokens"] == (100 if name in ("docvqa", "chartqa") else 10)


@pytest.mark.integration
def test_evaluate_py_names_a_missing_benchmark_file_and_where_it_is_published(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), "--cfg-path", str(REPO / "projects" / "eval" / "docvqa.yaml"), "--options",
         f"evaluation.docvqa.ann_path={tmp_path / 'val_v1.0.json'}", f"evaluation.docvqa.image_root={tmp_path}",
         f"run.output_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"evaluation.docvqa.ann_path: {tmp_path / 'val_v1.0.json'} (released at https://rrc.cvc.uab.es/?ch=17" in proc.stderr
    assert "model.llm.pretrained: /models/qwen_vl_chat_lavis" in proc.stderr  # the project's placeholders too


def test_vizwiz_as_released_loads_through_the_vqa_builder_and_scores_per_answer_type(tmp_path):
    """VizWiz's val.json (answer objects with confidences, an answer_type, "unanswerable" as an answer)."""
    answers = [{"answer": "unanswerable", "answer_confidence": "yes"}] * 7 + [{"answer": "soup", "answer_confidence": "maybe"}] * 3
    path = tmp_path / "val.json"
    path.write_text(json.dumps([
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answers": answers,
         "answer_type": "unanswerable", "answerable": 0},
        {"image": "VizWiz_val_00000001.jpg", "question": "What color is this?",
         "answers": [{"answer": "blue", "answer_confidence": "yes"}] * 10, "answer_type": "other", "answerable": 1},
    ]))
    records = registry.get("builder", "vqa")(ann_path=str(path)).build().records
    assert [r["answer_type"] for r in records] == ["unanswerable", "other"] and records[0]["target"] == " unanswerable"
    task = VQATask()
    results = [{**s.reference, "prediction": p} for s, p in zip(task.samples(records), ["unanswerable", "red"])]
    metrics = task.metrics(results)
    assert metrics["accuracy/unanswerable"] == 1.0 and metrics["accuracy/other"] == 0.0 and metrics["accuracy"] == 0.5


@pytest.mark.parametrize("project, entries", [
    ("okvqa", {"okvqa": ("vqa", "vqa")}), ("vizwiz", {"vizwiz": ("vqa", "vqa")}),
    ("flickr30k", {"flickr30k": ("captioning", "coco_caption")}), ("nocaps", {"nocaps": ("captioning", "coco_caption")}),
    ("refcoco", {f"{name}_{split}": ("grounding", "ref_grounding") for name, splits in
                 (("refcoco", ("val", "testA", "testB")), ("refcoco_plus", ("val", "testA", "testB")), ("refcocog", ("val", "test")))
                 for split in splits}),
])
def test_benchmark_projects_over_existing_builders_validate(project, entries):
    from lavis.common.config import load_config

    cfg = load_config(REPO / "projects" / "eval" / f"{project}.yaml")
    assert {name: (e.task, e.builder) for name, e in cfg.evaluation.items()} == entries
    if project == "refcoco":
        assert {e.builder_params["split"] for e in cfg.evaluation.values()} == {"val", "testA", "testB", "test"}
        assert all(e.task_params["parser"] == "qwen_vl" for e in cfg.evaluation.values())


def test_nocaps_as_released_loads_through_the_coco_caption_builder(tmp_path):
    """nocaps_val_4500_captions.json: COCO-captions JSON with Open Images ids and a domain per image."""
    path = tmp_path / "nocaps_val_4500_captions.json"
    path.write_text(json.dumps({
        "licenses": [], "info": {"version": "0.1"},
        "images": [{"id": 0, "open_images_id": "0013ea2087020901", "file_name": "0013ea2087020901.jpg",
                    "height": 1024, "width": 732, "domain": "in-domain"}],
        "annotations": [{"image_id": 0, "id": 0, "caption": "A baby is standing in front of a house."},
                        {"image_id": 0, "id": 1, "caption": "A little girl in a white jacket and sandals."}],
    }))
    records = registry.get("builder", "coco_caption")(ann_path=str(path)).build().records
    assert [r["image"] for r in records] == ["0013ea2087020901.jpg"] * 2
    from lavis.tasks.captioning import CaptioningTask

    (sample,) = CaptioningTask().samples(records)
    assert sample.reference["references"] == ["A baby is standing in front of a house.", "A little girl in a white jacket and sandals."]
