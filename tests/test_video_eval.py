"""Video in the evaluation tasks: video QA (the ``vqa`` builder and task) and video multiple choice (the
``multiple_choice`` builder and task, MVBench's JSON) on a tiny native-resolution model with a video
processor: prompts hold ``<video>`` spans, the model gets the video's patches and pads, metrics, a missing
video is a counted skip, and a model that takes no video is refused at start naming model.video_processor."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SFT_PROJECT, sft_options
from helpers import moving_squares, write_video
from PIL import Image
from test_native_resolution import NATIVE  # a tiny Qwen2-VL-shaped model

from lavis.common.config import ConfigError
from lavis.datasets.builders.base import AnnotationError
from lavis.datasets.builders.multiple_choice import MultipleChoiceBuilder
from lavis.datasets.builders.vqa import VQABuilder
from lavis.models import build_model
from lavis.tasks.evaluation import Evaluator
from lavis.tasks.vqa import VQATask

# clip.mp4: 10 frames at 4 fps (2.5 s) -> 4 frames kept at 2 fps, 2 temporal patches; frames/: 6 stills -> 6 kept, 3
VQA = [
    {"id": "v1", "video": "clip.mp4", "question": "Which way does the red square move?", "answer": "right"},
    {"id": "v2", "video": "frames", "question": "What colour is the square?", "answers": ["red"]},
    {"id": "v3", "video": ["frames/0.png", "frames/1.png", "frames/2.png", "frames/3.png"], "question": "How many squares?",
     "answer": "one"},
]
MC = [  # MVBench's task JSON: candidates, the answer as the right candidate's text
    {"video": "clip.mp4", "question": "Where does the square go?", "candidates": ["left", "right", "nowhere"], "answer": "right"},
    {"video": "frames", "question": "What moves?", "candidates": ["a circle", "a square"], "answer": "a square"},
    {"video": "clip.mp4", "question": "What colour is the band?", "candidates": ["blue", "green"], "answer": "blue"},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def videos(tmp_path) -> Path:
    """tmp_path with clip.mp4, frames/ (0.png .. 5.png), vqa.jsonl and mc.jsonl."""
    write_video(tmp_path / "clip.mp4", moving_squares(10), rate=4)
    (tmp_path / "frames").mkdir()
    for k, frame in enumerate(moving_squares(6, width=56, height=56)):
        Image.fromarray(frame).save(tmp_path / "frames" / f"{k}.png")
    write_jsonl(tmp_path / "vqa.jsonl", VQA)
    write_jsonl(tmp_path / "mc.jsonl", MC)
    return tmp_path


def eval_entries(root: Path, vqa: Path | None = None, mc: Path | None = None, chat: bool = False) -> list[str]:
    return [
        "evaluation.vqa.task=vqa", "evaluation.vqa.builder=vqa", f"evaluation.vqa.ann_path={vqa or root / 'vqa.jsonl'}",
        f"evaluation.vqa.image_root={root}", "evaluation.vqa.metric=normalized_match", "evaluation.vqa.max_new_tokens=3",
        f"evaluation.vqa.chat={str(chat).lower()}",
        "evaluation.mc.task=multiple_choice", "evaluation.mc.builder=multiple_choice",
        f"evaluation.mc.ann_path={mc or root / 'mc.jsonl'}", f"evaluation.mc.image_root={root}", "run.eval_batch_size=2",
    ]


@pytest.fixture
def native(load_sft, videos):
    """``native(*options)`` -> (cfg, model, processors): the tiny native-resolution model with video evaluations."""

    def make(*options: str, **entries):
        cfg = load_sft(*NATIVE, *eval_entries(videos, **entries), *options)
        torch.manual_seed(0)
        model, processors = build_model(cfg.model)
        return cfg, model, processors

    return make


# --------------------------------------------------------------------------- builders


def test_video_records_hold_video_spans(videos):
    vqa = VQABuilder(ann_path=str(videos / "vqa.jsonl"), image_root=str(videos)).build().records
    assert [r["prompt"] for r in vqa] == [
        "<video>clip.mp4</video>Which way does the red square move? Answer:",
        "<video>frames</video>What colour is the square? Answer:",
        "<video>frames#1</video>How many squares? Answer:",  # a frame list: its frames in the record's videos mapping
    ]
    assert [(r["video"], r["answers"], r["target"]) for r in vqa[:2]] == [("clip.mp4", ["right"], " right"), ("frames", ["red"], " red")]
    assert "image" not in vqa[0] and "videos" not in vqa[0]
    assert vqa[2]["videos"] == {"frames#1": {"frames": ["frames/0.png", "frames/1.png", "frames/2.png", "frames/3.png"]}}
    mc = MultipleChoiceBuilder(ann_path=str(videos / "mc.jsonl")).build().records
    assert mc[0]["prompt"] == ("<video>clip.mp4</video>Context: N/A\nQuestion: Where does the square go?\n"
                               "Options: A. left\nB. right\nC. nowhere\nAnswer:")
    assert [(r["video"], r["answer"], r["choices"]) for r in mc[:2]] == [
        ("clip.mp4", "B", ["left", "right", "nowhere"]), ("frames", "B", ["a circle", "a square"])]


def test_video_pattern_names_the_videos_of_msrvtt_qa_records(tmp_path):
    path = tmp_path / "test_qa.json"  # as released: a JSON list
    path.write_text(json.dumps([{"answer": "man", "id": 3, "question": "who is singing?", "video_id": 7010}]))
    (record,) = VQABuilder(ann_path=str(path), video_pattern="video{video_id}.mp4").build().records
    assert (record["id"], record["video"]) == ("3", "video7010.mp4")
    assert record["prompt"] == "<video>video7010.mp4</video>who is singing? Answer:"
    with pytest.raises(AnnotationError, match=r"record 0 \(id 3\): video_pattern '\{clip\}.mp4' cannot be formatted"):
        VQABuilder(ann_path=str(path), video_pattern="{clip}.mp4").build()


@pytest.mark.parametrize(("builder", "record", "message"), [
    ("vqa", {"image": "a.png", "video": "a.mp4", "question": "q", "answer": "x"}, "both 'image' and 'video'"),
    ("vqa", {"question": "q", "answer": "x"}, "missing key 'image' \\(or 'video'"),
    ("vqa", {"video": [], "question": "q", "answer": "x"}, "empty list of frames"),
    ("vqa", {"video": "a<b>.mp4", "question": "q", "answer": "x"}, "contains '<', '>'"),
    ("mc", {"video": "a.mp4", "question": "q", "candidates": ["x", "y"], "answer": "z"}, "or the text of one choice, got 'z'"),
    ("mc", {"video": "a.mp4", "question": "q", "candidates": ["B", "A"], "answer": "A"}, "both the letter of choice A and the text"),
    ("mc", {"video": "a.mp4", "question": "q", "candidates": ["x", "y"], "answer": "x", "start": 1.0, "end": 4.0},
     "'start'/'end' \\(a segment of the video\\) are not supported"),
])
def test_malformed_video_records_name_the_record(tmp_path, builder, record, message):
    path = write_jsonl(tmp_path / "ann.jsonl", [record])
    build = VQABuilder if builder == "vqa" else MultipleChoiceBuilder
    with pytest.raises(AnnotationError, match=rf"{path}: record 0: .*{message}"):
        build(ann_path=str(path)).build()


def test_one_answer_video_qa_scores_by_normalized_match(videos, caplog):
    records = VQABuilder(ann_path=str(videos / "vqa.jsonl")).build().records
    VQATask().samples(records)  # vqa_accuracy: every answer of a one-answer question scores 0
    assert "no answer can score 1 (with one answer, every answer scores 0); set metric: normalized_match" in caplog.text
    caplog.clear()
    task = VQATask(metric="normalized_match")
    samples = task.samples(records)
    assert [s.videos for s in samples] == [["clip.mp4"], ["frames"], ["frames#1"]] and all(not s.images for s in samples)
    scores = task.metrics([{**s.reference, "prediction": p} for s, p in zip(samples, ["Right.", "a red", "1"])])
    assert scores == {"accuracy": 1.0, "count": 3}  # VQAv2's normalisation: case, punctuation, articles, number words
    assert "vqa_accuracy" not in caplog.text


# --------------------------------------------------------------------------- the Evaluator


def test_the_model_gets_each_video_s_patches_and_pads(native, monkeypatch):
    cfg, model, processors = native()
    evaluator = Evaluator(cfg, model, processors)
    tok, video = processors.tokenizer, processors.video
    grids = {"clip.mp4": (2, 4, 4), "frames": (3, 4, 4), "frames#1": (2, 4, 4)}  # 4 of 10 frames kept; 6 stills; 4 listed
    for name in ("vqa", "mc"):
        for sample in evaluator.samples[name]:
            ids, pixels = evaluator._encode(evaluator.tasks[name], sample)
            (span,) = sample.videos
            assert pixels.grid_thw.tolist() == [list(grids[span])]
            assert ids.count(tok.vid_pad_id) == video.num_video_tokens(grids[span]) == model.image_tokens(grids[span])
            assert pixels.second_per_grid is not None and pixels.second_per_grid.item() > 0
    direct = video(evaluator.samples["vqa"][0].image_root + "/clip.mp4")
    _, pixels = evaluator._encode(evaluator.tasks["vqa"], evaluator.samples["vqa"][0])
    assert torch.equal(pixels.patches, direct.patches)

    seen = []
    generate = model.generate

    def spy(input_ids, attention_mask, pixel_values, **options):
        seen.append((int((input_ids == tok.vid_pad_id).sum()), pixel_values.grid_thw.tolist()))
        return generate(input_ids, attention_mask, pixel_values, **options)

    monkeypatch.setattr(model, "generate", spy)
    results = evaluator.evaluate()
    vqa, mc = results["vqa"], results["mc"]
    assert sorted(grid for _, grids_ in seen for grid in grids_) == sorted(map(list, grids.values()))
    assert sum(pads for pads, _ in seen) == sum(model.image_tokens(g) for g in grids.values())
    assert [r["prompt"] for r in vqa.results] == [
        "<video>clip.mp4</video>Which way does the red square move? Answer:",
        "<video>frames</video>What colour is the square? Answer:", "<video>frames#1</video>How many squares? Answer:"]
    assert vqa.metrics["count"] == 3 and 0.0 <= vqa.metrics["accuracy"] <= 1.0 and vqa.skipped == {}
    assert all(r["video"] for r in vqa.results) and all(r["output"] is not None for r in vqa.results)
    assert mc.metrics["count"] == 3 and {r["prediction"] for r in mc.results} <= set("ABC")
    assert mc.metrics["accuracy"] == sum(r["prediction"] == r["answer"] for r in mc.results) / 3


def test_metrics_of_known_answers(native, monkeypatch):
    cfg, model, processors = native()
    answers = {"v1": " Right.", "v2": "blue", "v3": "One"}
    monkeypatch.setattr(Evaluator, "_generate", lambda self, task, batch: [answers[s.id] for s, _, _ in batch])
    result = Evaluator(cfg, model, processors).evaluate()["vqa"]
    assert result.metrics == {"accuracy": pytest.approx(2 / 3), "count": 3, "skipped": 0}
    assert [r["prediction"] for r in result.results] == ["Right.", "blue", "One"]


def test_a_missing_video_is_a_counted_skip(native, videos):
    vqa = write_jsonl(videos / "missing.jsonl", [*VQA[:2], {**VQA[0], "id": "gone", "video": "absent.mp4"},
                                                  {**VQA[1], "id": "empty", "video": "frames/none"}])
    (videos / "frames" / "none").mkdir()
    mc = write_jsonl(videos / "mc_missing.jsonl", [MC[0], {**MC[1], "video": "nowhere/x.mp4"}])
    cfg, model, processors = native(vqa=vqa, mc=mc)
    results = Evaluator(cfg, model, processors).evaluate()
    assert results["vqa"].skipped == {"missing_video": 1, "empty_video": 1}
    assert (results["vqa"].metrics["count"], results["vqa"].metrics["skipped"]) == (2, 2)
    assert [r["id"] for r in results["vqa"].results] == ["v1", "v2"]
    assert results["mc"].skipped == {"missing_video": 1} and results["mc"].metrics["count"] == 1


def test_chat_evaluations_number_the_video(native):
    cfg, model, processors = native(chat=True)
    evaluator = Evaluator(cfg, model, processors)
    sample = evaluator.samples["vqa"][0]
    text = "Video 1: <video>clip.mp4</video>\nWhich way does the red square move? Answer:"  # as the conversation builders write it
    assert evaluator.prompt_text(evaluator.tasks["vqa"], sample) == text
    expected = evaluator.encoder.encode_messages(
        [{"role": "user", "content": text}],
        add_generation_prompt=True, images=lambda path, video: processors.video(Path(sample.image_root) / path),
    )
    assert evaluator._encode(evaluator.tasks["vqa"], sample)[0] == expected.input_ids


def test_a_model_without_a_video_processor_is_refused_at_start(native, load_sft, small_world, videos):
    cfg, model, processors = native()
    with pytest.raises(ConfigError, match=r"evaluation.vqa: its records ask about videos \(record 'v1': <video>clip.mp4</video>\)"
                                          r", and the model has no video processor: set model.video_processor"):
        Evaluator(cfg, model, dataclasses.replace(processors, video=None))
    fixed = load_sft(*eval_entries(videos))  # the tiny Qwen-VL: a fixed-size ViT
    model, processors = build_model(fixed.model)
    with pytest.raises(ConfigError, match=r"takes fixed-size images: a video needs a native-resolution model .*model.video_processor"):
        Evaluator(fixed, model, processors)


def test_evaluate_py_scores_video_evaluations_and_names_the_fixed_size_model(small_world, videos, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    options = sft_options(small_world, tmp_path / "out", *eval_entries(videos))
    assert evaluate.main(["--cfg-path", str(SFT_PROJECT), "--options", *options]) == 2
    assert "error: evaluation.vqa: its records ask about videos" in capsys.readouterr().err
    assert evaluate.main(["--cfg-path", str(SFT_PROJECT), "--options", *options, *NATIVE]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {tuple(line.split()[:3]) for line in out}
    assert {("vqa", "-", "accuracy"), ("mc", "-", "accuracy")} <= rows
    saved = json.loads((tmp_path / "out" / "eval" / "vqa.json").read_text())
    assert saved["metrics"]["count"] == 3 and saved["predictions"][0]["video"] == "clip.mp4"
    assert np.isfinite(saved["metrics"]["accuracy"])
