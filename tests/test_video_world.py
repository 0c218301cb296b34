"""The synthetic video data set (lavis/datasets/synthetic/videos.py) and its project (projects/video/): deterministic
clips in a real container that the project's video processor decodes, answers that follow the clips' tracks,
answers balanced so that the blind prior is all a model gets without the video, files the existing builders
read, and a short training of the project."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from lavis.common.config import load_config
from lavis.common.registry import registry
from lavis.datasets.synthetic import videos, world
from lavis.datasets.synthetic.videos import ensure_videos

SIZES = {"train": 16, "val": 2, "test": 10}
PROJECT = REPO / "projects" / "video"


@pytest.fixture(scope="module")
def clips_root(tmp_path_factory) -> Path:
    return ensure_videos(tmp_path_factory.mktemp("videos") / "videos", seed=5, sizes=SIZES)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _project(root: Path, out: Path, *extra: str):
    return load_config(PROJECT / "train.yaml", [
        f"datasets.videos.ann_path={root / 'qwen2vl_train.json'}", f"datasets.videos.image_root={root}",
        f"datasets.videos.synthetic_root={root}", f"run.output_dir={out}", *extra])


# --------------------------------------------------------------------------- the data set


def test_generation_is_deterministic(clips_root, tmp_path):
    again = ensure_videos(tmp_path / "again", seed=5, sizes=SIZES)
    assert _files(again) == _files(clips_root)  # every byte, the MP4 files included
    assert [c.to_dict() for c in videos.generate_clips(6, 8)] != [c.to_dict() for c in videos.generate_clips(5, 8)]
    assert registry.get("synthetic_world", "videos") is ensure_videos
    assert json.loads((clips_root / "WORLD.json").read_text()) == {"world": "videos", "version": videos.VERSION, "seed": 5,
                                                                   "sizes": SIZES}


def test_clips_decode_with_the_projects_video_processor(clips_root, tmp_path):
    """Each MP4 holds 4 frames at 2 fps; the project's processor keeps all of them (2 temporal patches, 32 tokens),
    and the decoded pixels show each shape in its colour where the metadata puts it."""
    import av

    from lavis.models import build_model

    _, processors = build_model(_project(clips_root, tmp_path / "o").model, meta=True)
    for clip in videos.load_clips(clips_root, "test")[:4]:
        processed = processors.video(clips_root / clip.video)
        assert tuple(processed.grid) == (2, 8, 8) and processors.video.num_video_tokens(processed.grid) == 32
        with av.open(str(clips_root / clip.video)) as container:
            stream = container.streams.video[0]
            assert (stream.frames, float(stream.average_rate), stream.codec_context.name) == (4, 2.0, "h264")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert len(frames) == clip.frames == videos.FRAMES
        for f, frame in enumerate(frames):
            assert np.abs(frame.astype(int) - clip.pixels()[f]).mean() < 6  # H.264 at crf 18: close to the drawing
            for obj in clip.objects:
                if obj.visible(f):
                    x1, y1, x2, y2 = obj.box(f)
                    centre = frame[(y1 + y2) // 2 + 2, (x1 + x2) // 2].astype(int)  # a little below: inside a triangle too
                    assert np.abs(centre - world.COLOURS[obj.colour_at(f)]).max() < 30, (clip.video, f, obj)


def test_shapes_stay_inside_and_apart(clips_root):
    for clip in videos.generate_clips(5, 300):
        assert videos.MIN_OBJECTS <= len(clip.objects) <= videos.MAX_OBJECTS
        assert len({o.shape for o in clip.objects}) == len({o.colour for o in clip.objects}) == len(clip.objects)
        assert sorted(o.appear for o in clip.objects)[0] == 0 and len({o.appear for o in clip.objects}) == len(clip.objects)
        assert sum(o.turns is not None for o in clip.objects) <= 1
        assert sum(o.direction is not None for o in clip.objects) == 1 and videos.moving(clip).appear <= 1
        for f in range(clip.frames):
            seen = [o.box(f) for o in clip.objects if o.visible(f)]
            assert all(0 <= b[0] and b[2] <= clip.width and 0 <= b[1] and b[3] <= clip.height for b in seen)
            assert not any(videos._overlap(a, b) for i, a in enumerate(seen) for b in seen[i + 1:])
            colours = [o.colour_at(f) for o in clip.objects if o.visible(f)]
            assert len(set(colours)) == len(colours)


def _derived(clip: dict, qtype: str, question: str) -> str:
    """The answer read off the clip's per-frame boxes and colours alone (``Clip.to_dict``)."""
    objects = clip["objects"]
    if qtype == "direction":
        obj = next(o for o in objects if f"the {o['shape']} that changes colour " in question
                   or f"the {o['colours'][-1]} {o['shape']} " in question)
        seen = [b for b in obj["boxes"] if b is not None]
        dx, dy = seen[-1][0] - seen[0][0], seen[-1][1] - seen[0][1]
        return ("right" if dx > 0 else "left") if dx else ("down" if dy > 0 else "up")
    if qtype == "colour":
        obj = next(o for o in objects if f"the {o['shape']} " in question)
        assert obj["colours"][obj["appear"]] != obj["colours"][-1]
        return obj["colours"][-1]
    if qtype == "order":
        first_seen = sorted(objects, key=lambda o: next(f for f, b in enumerate(o["boxes"]) if b is not None))
        obj = first_seen[0] if "first" in question else first_seen[-1]
        assert len({c for c in obj["colours"] if c is not None}) == 1  # it keeps its colour
        return obj["colours"][-1]
    return str(sum(o["boxes"][-1] is not None for o in objects))


def test_answers_follow_the_tracks(clips_root):
    """Every VQA and training answer is what the clip's tracks say; each question names the frames it needs."""
    clips = [c.to_dict() for c in videos.load_clips(clips_root, "test")]
    records = json.loads((clips_root / "vqa_test.json").read_text())
    annotations = json.loads((clips_root / "vqa_annotations_test.json").read_text())["annotations"]
    questions = json.loads((clips_root / "vqa_questions_test.json").read_text())["questions"]
    expected = sum(len(videos.applicable(c)) for c in videos.load_clips(clips_root, "test"))
    assert len(records) == len(annotations) == len(questions) == expected
    for record, ann, q in zip(records, annotations, questions):
        clip = clips[q["image_id"]]
        assert record["video"] == clip["video"] == q["video"] and record["question"] == q["question"]
        assert record["answers"] == [ann["multiple_choice_answer"]] * videos.VQA_ANSWERS
        assert record["question_type"] == ann["question_type"] and record["frames"] == q["frames"]
        assert ann["multiple_choice_answer"] in videos.ANSWER_VOCAB[ann["question_type"]]
        assert _derived(clip, ann["question_type"], q["question"]) == ann["multiple_choice_answer"], q
        assert all(0 <= f < videos.FRAMES for f in record["frames"])
    train = [c.to_dict() for c in videos.load_clips(clips_root, "train")]
    for record in json.loads((clips_root / "sft_train.json").read_text()):
        clip = train[record["meta"]["clips"][0]]
        qtypes = [t["qtype"] for t in record["meta"]["turns"]]
        assert qtypes.count("describe") == 1 and len(set(qtypes)) == len(qtypes) and len(qtypes) >= 3
        for k, turn in enumerate(record["meta"]["turns"]):
            question, answer = (record["conversations"][2 * k + j]["value"] for j in (0, 1))
            if turn["qtype"] == "describe":
                assert answer.count(", then ") == len(clip["objects"]) - 1
            else:
                assert _derived(clip, turn["qtype"], question) == answer


def test_answers_are_balanced_and_the_question_text_tells_nothing():
    """Every answer of a question type is about as frequent as any other, and a blind model that knows each exact
    question's most frequent training answer scores no better on other clips than the prior."""
    def questions(split: str, n: int) -> list[tuple[str, str, str]]:
        rng = random.Random(split)
        return [(t, *videos.make_question(rng, c, t)[:2]) for c in videos.generate_clips(0, n, split) for t in videos.applicable(c)]

    train, test = questions("train", 3000), questions("test", 1000)
    by_type: dict[str, Counter] = defaultdict(Counter)
    by_text: dict[str, Counter] = defaultdict(Counter)
    for qtype, question, answer in train:
        by_type[qtype][answer] += 1
        by_text[question][answer] += 1
    for qtype, counts in by_type.items():
        vocab = videos.ANSWER_VOCAB[qtype]
        assert set(counts) == set(vocab)
        assert max(counts.values()) / sum(counts.values()) < 1 / len(vocab) + 0.03, (qtype, counts)
    hits: dict[str, list[bool]] = defaultdict(list)
    for qtype, question, answer in test:
        hits[qtype].append(by_text[question].most_common(1)[0][0] == answer)
    for qtype, h in hits.items():
        assert sum(h) / len(h) < 1 / len(videos.ANSWER_VOCAB[qtype]) + 0.05, qtype


def test_files_parse_with_the_existing_builders(clips_root):
    """The two conversation forms give the same messages; the VQA file is the vqa builder's simple layout."""
    llava = registry.get("builder", "llava_conversation")(ann_path=str(clips_root / "qwen2vl_train.json"),
                                                         image_root=str(clips_root)).build()
    qwen = registry.get("builder", "qwen_vl_conversation")(ann_path=str(clips_root / "sft_train.json"),
                                                          image_root=str(clips_root)).build()
    assert len(llava) == len(qwen) == SIZES["train"]
    assert [r["messages"] for r in llava] == [r["messages"] for r in qwen]
    assert llava[0]["messages"][0]["content"].startswith("Video 1: <video>videos/train/000000.mp4</video>\n")
    vqa = registry.get("builder", "vqa")(ann_path=str(clips_root / "vqa_test.json"), image_root=str(clips_root)).build()
    assert len(vqa) == len(json.loads((clips_root / "vqa_test.json").read_text()))
    assert vqa[0]["video"] == "videos/test/000000.mp4" and (clips_root / vqa[0]["video"]).is_file()


# --------------------------------------------------------------------------- the project


def test_project_trains_and_evaluates(clips_root, tmp_path):
    """Two optimiser steps of projects/video/train.yaml on the small clips, then eval.yaml on four test questions."""
    from lavis.cli.evaluate import main as evaluate
    from lavis.runners.iter_runner import build_runner

    out = tmp_path / "run"
    cfg = _project(clips_root, out, "run.max_steps=2", "run.warmup_steps=0", "run.batch_size=4", "run.num_workers=0",
                   "run.save_every=2", "run.log_every=1")
    assert cfg.model.llm.type == "qwen2_vl_lm" and cfg.model.video_processor.type == "qwen2_vl_video"
    assert cfg.datasets["videos"].synthetic_world == "videos"
    build_runner(cfg).train()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    assert evaluate(["--cfg-path", str(PROJECT / "eval.yaml"), "--options", f"model.load_from={out}",
                          f"evaluation.vqa.ann_path={clips_root / 'vqa_test.json'}", f"evaluation.vqa.image_root={clips_root}",
                          f"evaluation.vqa.synthetic_root={clips_root}", "evaluation.vqa.max_samples=4",
                          "evaluation.vqa.max_new_tokens=2"]) == 0
    results = json.loads((out / "eval" / "step_00000002" / "eval" / "vqa.json").read_text())
    assert len(results["predictions"]) == 4 and results["predictions"][0]["video"] == "videos/test/000000.mp4"


def test_blind_prior_of_the_demo_script():
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from video_demo import blind_prior

    train = [{"question_type": "count", "answers": [a]} for a in "1122232"]
    test = [{"question_type": "count", "answers": [a]} for a in "123"]
    assert blind_prior(test, train) == {"count": 1 / 3, "all": 1 / 3}
