"""Qwen-VL's benchmark suite (projects/eval/qwen_vl_suite.yaml): every benchmark's tiny fixture, in its
released format at the place the suite's project names (under a temporary /data), loads, evaluates on
the demo model (the tiny preset) in one evaluate.py run and lands in the one results table."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, TINY_PRESET
from helpers import FIXTURES, OCRVQA, RELEASED, SCIENCEQA, SEED, TEST2015, TESTDEV, python2_pickle, write_ai2d
from PIL import Image

from lavis.common.config import load_config, load_project
from lavis.common.registry import registry

SUITE = REPO / "projects" / "eval" / "qwen_vl_suite.yaml"
BENCHMARKS = {  # (benchmark, split) the table must hold, each with its metric
    ("Flickr30k", "karpathy-test"): "CIDEr", ("NoCaps", "val"): "CIDEr", ("VQAv2", "val"): "accuracy",
    ("VQAv2", "test-dev"): "answered", ("OK-VQA", "val"): "accuracy", ("GQA", "testdev-balanced"): "accuracy",
    ("VizWiz", "val"): "accuracy", ("ScienceQA-IMG", "test"): "accuracy", ("TextVQA", "val"): "accuracy",
    ("DocVQA", "val"): "anls", ("ChartQA", "test-human"): "relaxed_accuracy", ("AI2D", "test"): "accuracy",
    ("OCR-VQA", "test"): "accuracy", ("MMBench", "dev"): "accuracy", ("SEED-Bench", "image"): "accuracy",
    **{(name, split): "accuracy" for name, splits in (("RefCOCO", ("val", "testA", "testB")), ("RefCOCO+", ("val", "testA", "testB")),
                                                       ("RefCOCOg", ("val", "test"))) for split in splits},
}


def write(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def vqav2_files(questions: Path, annotations: Path, split: str, image_ids: tuple[int, ...]) -> None:
    """VQAv2-layout questions and annotations (VQAv2 val, OK-VQA): one question per image."""
    write(questions, {"data_subtype": f"{split}2014", "questions": [
        {"image_id": i, "question": f"What is in picture {i}?", "question_id": i * 10} for i in image_ids]})
    write(annotations, {"data_subtype": f"{split}2014", "annotations": [
        {"image_id": i, "question_id": i * 10, "answer_type": "other", "multiple_choice_answer": "a square",
         "answers": [{"answer": "a square", "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)]}
        for i in image_ids]})


def refer_files(root: Path, splits: tuple[str, ...]) -> None:
    """refs(unc).p (or refs(umd).p) as released, a Python 2 pickle, and instances.json: one ref per split."""
    refs = [{"ref_id": k, "ann_id": 100 + k, "image_id": 1 + k % 2, "split": split, "category_id": 1,
             "sentences": [{"sent": f"the shape on the {side}", "sent_id": k}]}
            for k, (split, side) in enumerate(zip(splits, ("left", "right", "top", "bottom")))]
    for name in ("refs(unc).p", "refs(umd).p"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(python2_pickle(refs))
    write(root / "instances.json", {
        "images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": 64, "height": 64} for i in (1, 2)],
        "annotations": [{"id": 100 + k, "image_id": 1 + k % 2, "bbox": [4 * k, 8, 20, 24], "category_id": 1} for k in range(4)],
    })


def write_released_files(data: Path) -> None:
    """Every benchmark of the suite in its released format, where the suite's projects read it."""
    write(data / "flickr30k" / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": [
        {"filename": f"{1000 + k}.jpg", "imgid": k, "split": split, "sentids": [2 * k, 2 * k + 1],
         "sentences": [{"raw": "A red square on a white ground.", "sentid": 2 * k, "imgid": k,
                        "tokens": ["a", "red", "square", "on", "a", "white", "ground"]},
                       {"raw": "A small square.", "sentid": 2 * k + 1, "imgid": k, "tokens": ["a", "small", "square"]}]}
        for k, split in enumerate(("train", "test", "test", "val"))]})
    write(data / "nocaps" / "nocaps_val_4500_captions.json", {
        "licenses": [], "info": {"version": "0.1"},
        "images": [{"id": k, "open_images_id": f"00{k}ea", "file_name": f"00{k}ea.jpg", "height": 64, "width": 64,
                    "domain": domain} for k, domain in enumerate(("in-domain", "near-domain"))],
        "annotations": [{"image_id": k, "id": 2 * k + j, "caption": caption} for k in range(2)
                        for j, caption in enumerate(("A shape on a plain ground.", "A coloured square."))]})
    vqav2_files(data / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json",
                data / "vqav2" / "v2_mscoco_val2014_annotations.json", "val", (1, 2, 3))
    write(data / "vqav2" / "v2_OpenEnded_mscoco_test-dev2015_questions.json", TESTDEV)
    write(data / "vqav2" / "v2_OpenEnded_mscoco_test2015_questions.json", TEST2015)
    vqav2_files(data / "okvqa" / "OpenEnded_mscoco_val2014_questions.json", data / "okvqa" / "mscoco_val2014_annotations.json",
                "val", (4, 5))
    for name, path in (("gqa", "gqa/testdev_balanced_questions.json"), ("textvqa", "textvqa/TextVQA_0.5.1_val.json"),
                       ("docvqa", "docvqa/val/val_v1.0.json"), ("chartqa", "chartqa/test/test_human.json")):
        write(data / path, RELEASED[name][1])
    write(data / "vizwiz" / "val.json", [
        {"image": f"VizWiz_val_{k:08d}.jpg", "question": "What is this?", "answer_type": "other", "answerable": 1,
         "answers": [{"answer": "a box", "answer_confidence": "yes"}] * 10} for k in range(2)])
    write(data / "scienceqa" / "problems.json", SCIENCEQA)
    write_ai2d(data / "ai2d")
    write(data / "ocrvqa" / "dataset.json", OCRVQA)
    for name in ("refcoco", "refcoco+"):
        refer_files(data / name, ("val", "testA", "testB", "train"))
    refer_files(data / "refcocog", ("val", "test", "train"))
    (data / "mmbench").mkdir()
    shutil.copy(FIXTURES / "mmbench_dev_tiny.tsv", data / "mmbench" / "mmbench_dev_20230712.tsv")
    write(data / "seed_bench" / "SEED-Bench.json", SEED)


def at(data: Path, value: Any) -> Any:
    """``value`` with every ``/data/...`` path moved under ``data``."""
    if isinstance(value, dict):
        return {k: at(data, v) for k, v in value.items()}
    if isinstance(value, str) and value.startswith("/data/"):
        return str(data / value.removeprefix("/data/"))
    return value


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The suite's evaluations over the fixtures, run by evaluate.py on the tiny preset; every image the
    records name is a small picture."""
    root = tmp_path_factory.mktemp("suite")
    write_released_files(root / "data")
    evaluation = at(root / "data", load_project(SUITE)["evaluation"])
    project = root / "suite.yaml"
    write(project, {"base": [str(TINY_PRESET)], "evaluation": evaluation,
                    "run": {"output_dir": str(root / "out"), "device": "cpu", "eval_batch_size": 8}})
    cfg = load_config(project)
    for entry in cfg.evaluation.values():
        dataset = registry.get("builder", entry.builder)(**entry.builder_params).build()
        for record in dataset.records:
            image = Path(dataset.image_root) / record["image"]
            if not image.exists():
                image.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (64, 64), (200, 40, 40)).save(image, format="PNG")
    proc = subprocess.run([sys.executable, "evaluate.py", "--cfg-path", str(project)], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    return root, proc


def test_the_suite_lists_every_benchmark_qwen_vl_reports():
    cfg = load_config(SUITE)
    assert {(e.benchmark, e.benchmark_split) for e in cfg.evaluation.values()} == set(BENCHMARKS)
    assert cfg.model.llm.params["pretrained"] == "/models/qwen_vl_chat_lavis"


@pytest.mark.integration
def test_every_benchmark_loads_evaluates_on_the_demo_model_and_lands_in_one_table(suite_run):
    root, proc = suite_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((root / "out" / "eval" / "results.json").read_text())["results"]
    landed = {(r["benchmark"], r["split"]): r for r in rows if r["metric"] == BENCHMARKS.get((r["benchmark"], r["split"]))}
    assert set(landed) == set(BENCHMARKS)
    for key, row in landed.items():
        assert row["samples"] > 0 and row["skipped"] == 0, (key, row)
    assert landed[("MMBench", "dev")]["samples"] == 5  # questions under circular evaluation (17 rows)
    markdown = (root / "out" / "eval" / "results.md").read_text()
    printed = proc.stdout
    for benchmark, split in BENCHMARKS:
        assert f"| {benchmark} | {split} | {BENCHMARKS[benchmark, split]} |" in markdown
        assert any(line.split()[:2] == [benchmark, split] for line in printed.splitlines())
    submission = json.loads((root / "out" / "eval" / "vqav2_testdev_submission.json").read_text())
    assert [a["question_id"] for a in submission] == [q["question_id"] for q in TEST2015["questions"]]


def test_a_suite_entry_set_to_null_is_left_out():
    cfg = load_config(SUITE, ["evaluation.vqav2_testdev=null", "evaluation.mmbench_dev=null"])
    assert "vqav2_testdev" not in cfg.evaluation and "mmbench_dev" not in cfg.evaluation
    assert "vqav2_val" in cfg.evaluation and len(cfg.evaluation) == len(BENCHMARKS) - 2
