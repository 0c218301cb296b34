"""Helpers and released-format fixtures shared by several test modules (tests import them from here,
never from each other)."""

from __future__ import annotations

import contextlib
import json
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REFERENCE, REPO

FIXTURES = REPO / "tests" / "fixtures"


# ---------------------------------------- the tiny Qwen-VL release (test_convert, test_readme)

FIXTURE = FIXTURES / "qwen_vl_tiny"
QWEN_TIKTOKEN = REFERENCE / "qwen-vl-chat" / "qwen.tiktoken"


def regenerate() -> dict:
    """``regenerate.py``'s functions (``random_original_state``, ``checksum``)."""
    return runpy.run_path(str(FIXTURE / "regenerate.py"))


def tokenizer_file() -> Path:
    if not QWEN_TIKTOKEN.is_file():
        pytest.skip(f"{QWEN_TIKTOKEN} not found (the shared reference is absent)")
    return QWEN_TIKTOKEN


def write_release(path: Path, config: dict, state: dict[str, torch.Tensor], tokenizer: Path) -> Path:
    """A Qwen-VL release directory as published: config.json, sharded safetensors + index, qwen.tiktoken."""
    from huggingface_hub import save_torch_state_dict

    from lavis.interop.convert.release import TOKENIZER_FILE

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    save_torch_state_dict(state, path, max_shard_size="100MB")
    shutil.copyfile(tokenizer, path / TOKENIZER_FILE)
    return path


# ---------------------------------------- RefCOCO's pickle (test_pretrain_builders)

def python2_pickle(value) -> bytes:
    """``value`` pickled as Python 2 did it (protocol 2; ``str`` as byte strings, UTF-8 here): the form
    of RefCOCO's released ``refs(unc).p``."""
    def emit(v) -> bytes:
        if isinstance(v, dict):
            return b"}(" + b"".join(emit(k) + emit(x) for k, x in v.items()) + b"u"
        if isinstance(v, list):
            return b"](" + b"".join(emit(x) for x in v) + b"e"
        if isinstance(v, int):
            return b"J" + v.to_bytes(4, "little", signed=True)
        data = v.encode("utf-8")
        return b"U" + bytes([len(data)]) + data
    return b"\x80\x02" + emit(value) + b"."


# ---------------------------------------- OCR-VQA, VQAv2 test-dev (test_ocrvqa_vqav2_submission)

OCRVQA = {  # dataset.json as released: one entry per book, five questions each, split 1 train / 2 val / 3 test
    "1930753313": {
        "imageURL": "http://ecx.images-amazon.com/images/I/51DfyvzJXsL.jpg", "title": "Wild Edibles", "authorName": "Kurt Rogers",
        "genre": "Cookbooks, Food & Wine", "genreID": 6, "split": 3,
        "questions": ["Who wrote this book?", "What is the title of this book?", "What is the genre of this book?",
                      "Is this a recipe book?", "Is this a sociopolitical book?"],
        "answers": ["Kurt Rogers", "Wild Edibles", "Cookbooks, Food & Wine", "Yes", "No"],
    },
    "0060938455": {
        "imageURL": "http://ecx.images-amazon.com/images/I/41bN3L1tUOL.png", "title": "Fast Food Nation", "authorName": "Eric Schlosser",
        "genre": "Health, Fitness & Dieting", "genreID": 10, "split": 1,
        "questions": ["Who is the author of this book?"], "answers": ["Eric Schlosser"],
    },
    "0399535551": {
        "imageURL": "http://ecx.images-amazon.com/images/I/61aa.jpg", "title": "Bats", "authorName": "Ann Author",
        "genre": "Science & Math", "genreID": 24, "split": 2,
        "questions": ["Is this a kids book?"], "answers": ["No"],
    },
}

TESTDEV = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "test-dev2015", "license": {},
           "questions": [{"image_id": 1, "question": "Is the sky blue?", "question_id": 10},
                         {"image_id": 1, "question": "How many cats are there?", "question_id": 11},
                         {"image_id": 2, "question": "What color is the bus?", "question_id": 20}]}
TEST2015 = {**TESTDEV, "data_subtype": "test2015",
            "questions": [{"image_id": 3, "question": "What is this?", "question_id": 30}, *TESTDEV["questions"],
                          {"image_id": 4, "question": "Where is it?", "question_id": 40}]}


# ---------------------------------------- TextVQA, GQA, DocVQA, ChartQA (test_released_benchmarks)

RELEASED = {  # builder: (file name, content in the released format, expected (id, image, question, answers))
    "textvqa": ("TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what is the brand of this camera?",
         "answers": ["nous les gosses", "dakota", "clos culombu", "dakota digital", "dakota", "dakota", "dakota digital",
                     "dakota digital", "dakota", "dakota"], "set_name": "val"}]},
        ("34602", "003a8ae2ef43b901.jpg", "what is the brand of this camera?", "dakota")),
    "gqa": ("testdev_balanced_questions.json", {"20968379": {
        "imageId": "n288870", "question": "Is the tray on the right or on the left?", "answer": "right",
        "fullAnswer": "The tray is on the right of the image.", "isBalanced": True}},
        ("20968379", "n288870.jpg", "Is the tray on the right or on the left?", "right")),
    "docvqa": ("val_v1.0.json", {"dataset_name": "docvqa", "dataset_split": "val", "data": [
        {"questionId": 49153, "question": "What is the ‘actual’ value per 1000, during the year 1975?",
         "image": "documents/pybv0228_81.png", "docId": 14465, "answers": ["0.28"], "data_split": "val"}]},
        ("49153", "documents/pybv0228_81.png", "What is the ‘actual’ value per 1000, during the year 1975?", "0.28")),
    "chartqa": ("test_human.json", [{"imgname": "41699051005347.png", "query": "How many food item is shown in the bar graph?",
                                     "label": "14"}],
                ("test_human-0", "41699051005347.png", "How many food item is shown in the bar graph?", "14")),
}


# ---------------------------------------- ScienceQA, SEED-Bench, AI2D (test_released_mc)

SCIENCEQA = {
    "5": {"question": "Which animal's feet are also adapted for swimming?", "choices": ["duck", "crocodile"], "answer": 0,
          "hint": "Ducks live near water.", "image": "image.png", "task": "closed choice", "grade": "grade3",
          "subject": "natural science", "topic": "biology", "category": "Adaptations", "split": "test"},
    "6": {"question": "Which word is a noun?", "choices": ["run", "cat", "blue"], "answer": 1, "hint": "", "image": None,
          "subject": "language science", "split": "test"},
    "7": {"question": "What is the capital of Ohio?", "choices": ["Columbus", "Dayton", "Akron", "Toledo"], "answer": 0,
          "hint": "", "image": "image.png", "subject": "social science", "split": "test"},
    "8": {"question": "Which is a solid?", "choices": ["milk", "rock"], "answer": 1, "hint": "", "image": "image.png",
          "subject": "natural science", "split": "val"},
}

SEED = {
    "question_type": {"Scene Understanding": 1, "Text Understanding": 9, "Action Recognition": 10},
    "questions": [
        {"answer": "A", "choice_a": "A park", "choice_b": "A beach", "choice_c": "A street", "choice_d": "A kitchen",
         "data_id": "1454426_2591111986", "data_type": "image", "question": "What is the setting of the image?",
         "question_id": "101669", "question_type_id": 1},
        {"answer": "C", "choice_a": "STOP", "choice_b": "EXIT", "choice_c": "OPEN", "choice_d": "SALE",
         "data_id": "2217_1000.jpg", "data_type": "image", "question": "What does the sign say?",
         "question_id": "88231", "question_type_id": 9},
        {"answer": "B", "choice_a": "jumping", "choice_b": "running", "choice_c": "sitting", "choice_d": "eating",
         "data_id": "v0.webm", "data_type": "video", "question": "What is the person doing?",
         "question_id": "v0", "question_type_id": 10},
    ],
}


def write_ai2d(root: Path) -> None:
    (root / "questions").mkdir(parents=True)
    for image, questions in {
        "0.png": {"What is A in the diagram?": {"abcLabel": True, "answerTexts": ["ears", "nose", "mouth", "face"],
                                                "correctAnswer": 3, "questionId": "0.png-0"}},
        "10.png": {"Which stage follows the egg?": {"abcLabel": False, "answerTexts": ["adult", "larva", "pupa", "egg"],
                                                    "correctAnswer": 1, "questionId": "10.png-0"},
                   "How many legs does the adult have?": {"abcLabel": False, "answerTexts": ["4", "6", "8", "10"],
                                                          "correctAnswer": 1, "questionId": "10.png-1"}},
        "9.png": {"What does the arrow show?": {"abcLabel": False, "answerTexts": ["rain", "wind"], "correctAnswer": 0,
                                                "questionId": "9.png-0"}},
    }.items():
        (root / "questions" / f"{image}.json").write_text(json.dumps({"imageName": image, "questions": questions}))
    (root / "ai2d_test_ids.csv").write_text("10\n9\n")


# ---------------------------------------- tiny videos (test_video_processor, test_native_resolution)

def moving_squares(n: int, width: int = 64, height: int = 48) -> np.ndarray:
    """``n`` frames ``[n, H, W, 3]`` uint8 of a red square moving over a grey background."""
    frames = np.full((n, height, width, 3), 40, np.uint8)
    for i in range(n):
        x = (i * 3) % (width - 16)
        frames[i, 10:26, x:x + 16] = (250, 30, 30)
        frames[i, 30:40, :, 2] = (i * 7) % 256  # a band whose blue changes each frame
    return frames


def write_video(path: Path, frames: np.ndarray, rate: int, codec: str = "libx264", options: dict | None = None) -> Path:
    """``frames`` as a video file at ``rate`` frames a second (yuv420p)."""
    import av

    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ---------------------------------------- kill -9 and resume (test_training, test_balanced_batches)

def finish(proc, log: Path, timeout: float = 180.0) -> int:
    """``proc``'s exit status; fail (with its log) if it runs past ``timeout``."""
    import subprocess

    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"train.py did not finish in {timeout}s:\n{log.read_text()[-3000:]}")


def stop_all(procs: dict) -> None:
    """Kill and reap whichever of ``procs`` (subprocesses, by key) still run: a test's cleanup."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def sigkill_at_first_checkpoint(procs: dict, outs: dict[int, Path], logs: dict[int, Path], timeout: float = 180.0) -> dict[int, int]:
    """SIGKILL each of ``procs`` (train.py subprocesses, by key) once a checkpoint exists in its ``outs``
    directory; the step of the last checkpoint each left, by key."""
    import signal
    import time

    from lavis.common import checkpoint as ckpt

    pending = set(procs)
    deadline = time.monotonic() + timeout
    while pending:
        if time.monotonic() > deadline:
            pytest.fail(f"no checkpoint in {timeout:.0f} s:\n{logs[min(pending)].read_text()[-3000:]}")
        for key in sorted(pending):
            if ckpt.list_checkpoints(outs[key]):
                procs[key].send_signal(signal.SIGKILL)
                assert procs[key].wait(timeout=30) == -signal.SIGKILL, f"{key}: not killed"
                pending.discard(key)
            elif procs[key].poll() is not None:
                pytest.fail(f"{key}: exited with {procs[key].returncode}:\n{logs[key].read_text()[-3000:]}")
        time.sleep(0.02)
    return {key: int(ckpt.list_checkpoints(outs[key])[-1].name.split("_")[1]) for key in procs}


def assert_same_end(straight: Path, resumed: Path, steps: int, what: str = "") -> tuple[dict, dict]:
    """The runs in ``straight`` and ``resumed`` end at ``steps`` with the same weights, optimiser state (by
    parameter name), data state, random state and per-step losses (every step logged once), bit for bit;
    their final training states, for further checks."""
    from safetensors.torch import load_file

    from lavis.common import checkpoint as ckpt
    from lavis.tracking.logging import read_metrics

    final = [d / "checkpoints" / f"step_{steps:08d}" for d in (straight, resumed)]
    wa, wb = (load_file(str(d / ckpt.WEIGHTS_NAME)) for d in final)
    assert wa.keys() == wb.keys() and len(wa) > 20, what
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{what}: {len(different)} tensors differ after resume, e.g. {different[:3]}"

    opt_a, opt_b = (torch.load(d / ckpt.OPTIMIZER_NAME, weights_only=True)["state"] for d in final)
    assert opt_a.keys() == opt_b.keys() == wa.keys(), what  # keyed by parameter name
    for name in opt_a:
        assert torch.equal(opt_a[name]["exp_avg"], opt_b[name]["exp_avg"]), (what, name)
        assert torch.equal(opt_a[name]["exp_avg_sq"], opt_b[name]["exp_avg_sq"]), (what, name)

    sa, sb = (torch.load(d / ckpt.STATE_NAME, weights_only=True) for d in final)
    assert sa["step"] == sb["step"] == steps, what
    assert sa["data"] == sb["data"], what
    for rank_a, rank_b in zip(sa["ranks"], sb["ranks"], strict=True):
        assert rank_a["data_states"] == rank_b["data_states"] and rank_a["skipped"] == rank_b["skipped"], what
        assert torch.equal(rank_a["rng"]["torch"], rank_b["rng"]["torch"]), what
        assert rank_a["rng"]["python"] == rank_b["rng"]["python"] and rank_a["rng"]["numpy"] == rank_b["rng"]["numpy"], what

    logged = [[(r["step"], r["loss"]) for r in read_metrics(d / "metrics.jsonl") if "loss" in r] for d in (straight, resumed)]
    assert [s for s, _ in logged[1]] == list(range(1, steps + 1)), what  # no step logged twice
    assert logged[0] == logged[1], what  # floats read back from JSON: equal only if equal to the last bit
    return sa, sb


def _varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, cu_seq_lens_q=None,
                      **kwargs):
    """What flash-attention's varlen kernel computes, in plain SDPA: causal attention within each
    [cu[i], cu[i+1]) slice of the flattened batch."""
    b, h, length, d = query.shape
    groups = h // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    flat = [x.transpose(0, 1).reshape(1, h, b * length, d) for x in (query, key, value)]
    cu = cu_seq_lens_q.tolist()
    outs = [
        torch.nn.functional.scaled_dot_product_attention(*(x[:, :, s:e] for x in flat), is_causal=True, scale=scaling)
        for s, e in zip(cu[:-1], cu[1:])
    ]
    return torch.cat(outs, 2).reshape(h, b, length, d).permute(1, 2, 0, 3), None


@contextlib.contextmanager
def reference_varlen_attention(model):
    """``model``'s LLM attends through a CPU stand-in for flash-attention's varlen kernel (no mask, the batch's
    ``cu_seq_lens_q/k``), to check what the flash-attention path gives the model without a GPU."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register("test_varlen_reference", _varlen_attention)
    AttentionMaskInterface.register("test_varlen_reference", lambda *args, **kwargs: None)
    config = model.llm.config
    before = config._attn_implementation
    config._attn_implementation = "test_varlen_reference"
    try:
        yield model
    finally:
        config._attn_implementation = before
