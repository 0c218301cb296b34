"""Bad input gets a clear error or a counted skip (DESIGN §12), one test per case.

- a missing / corrupt / remote image: the sample is skipped, counted by reason, the batch stays full,
  and too many skips fail the run;
- a malformed annotation file or record: ``AnnotationError`` at build time naming file and record;
- an unknown config key or registry name: ``train.py`` exits with code 2 and says what would be valid.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lavis.common.registry import registry
from lavis.datasets.builders.base import AnnotationError, read_annotations
from lavis.datasets.builders.conversation import LLaVAConversationBuilder, QwenVLConversationBuilder
from lavis.datasets.collate import PadCollator
from lavis.datasets.stream import BatchStream, Source, StreamConfig
from lavis.processors.conversation import ConversationEncoder
from lavis.processors.errors import SkipSample
from lavis.processors.image import CLIPImageProcessor, load_image
from lavis.processors.sample import SampleProcessor
from lavis.processors.tokenizer import HFTokenizer

REPO = Path(__file__).resolve().parents[1]
SFT_PROJECT = REPO / "projects" / "sft.yaml"
TINY_PRESET = REPO / "configs" / "models" / "presets" / "tiny.yaml"
N = 4  # <imgpad> tokens per image in the processor-level tests
IMAGE_SIZE = 8
URL = "https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen-VL/assets/demo.jpeg"



def batches(records, processor, batch_size: int, max_consecutive_skips: int = 32):
    """The training stream over one dataset, padded batches (as the runner builds it)."""
    cfg = StreamConfig(batch_size=batch_size, max_len=512, pack=False, seed=0, max_consecutive_skips=max_consecutive_skips)
    return iter(BatchStream([Source("d", records)], processor, PadCollator(0), cfg))

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    return HFTokenizer()


@pytest.fixture
def processor(tok) -> SampleProcessor:
    encoder = ConversationEncoder(tok, num_image_tokens=N, system_message="You are a helpful assistant.", max_len=512)
    return SampleProcessor(encoder, CLIPImageProcessor(IMAGE_SIZE))


def png(path: Path, colour=(255, 0, 0), size: int = IMAGE_SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def image_record(rid: str, image: str, answer: str = "red") -> dict:
    return {
        "id": rid,
        "conversations": [
            {"from": "user", "value": f"Picture 1: <img>{image}</img>\nWhat colour is it?"},
            {"from": "assistant", "value": answer},
        ],
    }


def write_json(path: Path, data) -> str:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    return str(path)


def build(tmp_path: Path, records: list[dict]):
    return QwenVLConversationBuilder(write_json(tmp_path / "ann.json", records), str(tmp_path)).build()


def load_train_script():
    spec = importlib.util.spec_from_file_location("train_script", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_main():
    return load_train_script().main


def run_main(train_main, capsys, *options: str, cfg_path: Path = SFT_PROJECT) -> tuple[int, str]:
    """train.py's main in-process (same code as the script; its return value is the exit code)."""
    code = train_main(["--cfg-path", str(cfg_path), "--options", *options] if options else ["--cfg-path", str(cfg_path)])
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------- missing image


def test_missing_image_raises_skip_naming_the_path(tmp_path, processor):
    records = build(tmp_path, [image_record("gone", "images/gone.png")])
    with pytest.raises(SkipSample) as info:
        processor(records[0])
    assert info.value.reason == "missing_image"
    assert str(info.value) == f"image not found: {tmp_path / 'images' / 'gone.png'}"


def test_missing_image_skipped_counted_and_batch_stays_full(tmp_path, processor, tok):
    for i in (0, 2, 3):
        png(tmp_path / f"img{i}.png", colour=(60 * i, 0, 0))
    records = build(tmp_path, [image_record(f"r{i}", f"img{i}.png", answer=f"answer {i}") for i in range(4)])
    # One epoch of this worker: the three usable records fill the batch; the fourth is counted.
    batch = next(batches(records, processor, batch_size=3))
    assert batch["input_ids"].shape[0] == 3 and batch["labels"].shape[0] == 3
    assert batch["pixel_values"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["skipped"] == Counter({"missing_image": 1})
    answers = sorted(tok.decode(row[row != -100].tolist()) for row in batch["labels"])
    assert answers == ["answer 0<|im_end|>", "answer 2<|im_end|>", "answer 3<|im_end|>"]


def test_a_skipped_sample_is_replaced_by_the_same_datasets_next(tmp_path, processor):
    png(tmp_path / "img0.png")
    records = build(tmp_path, [image_record("r0", "img0.png"), image_record("r1", "nope.png")])
    stream = batches(records, processor, batch_size=1)
    seen = [next(stream) for _ in range(4)]  # 4 epochs: the missing image is met once in each
    assert sum(b["skipped"].get("missing_image", 0) for b in seen) >= 3
    assert all(b["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) for b in seen)


def test_all_images_missing_fails_after_consecutive_bound(tmp_path, processor):
    records = build(tmp_path, [image_record(f"r{i}", f"missing{i}.png") for i in range(10)])
    with pytest.raises(RuntimeError) as info:
        next(batches(records, processor, batch_size=2, max_consecutive_skips=5))
    message = str(info.value)
    assert message.startswith("5 consecutive samples of dataset 'd' were unusable (reasons: {'missing_image': 5})")
    assert re.search(rf"last: r\d: image not found: {re.escape(str(tmp_path))}/missing\d\.png$", message)


def write_project(tmp_path: Path, records: list[dict]) -> Path:
    ann = write_json(tmp_path / "ann.json", records)
    project = tmp_path / "project.yaml"
    project.write_text(
        f"base: [{TINY_PRESET}]\n"
        "datasets:\n"
        f"  d: {{builder: qwen_vl_conversation, ann_path: '{ann}', image_root: '{tmp_path}'}}\n"
        "run:\n"
        f"  output_dir: '{tmp_path / 'out'}'\n"
        "  max_steps: 5\n  batch_size: 8\n  max_len: 96\n  num_workers: 0\n  device: cpu\n"
        "  log_every: 1\n  save_every: 100\n  warmup_steps: 1\n",
        encoding="utf-8",
    )
    return project


def mostly_missing_records(tmp_path: Path) -> list[dict]:
    # 50 records, images for every fifth: about 4 skips per sample, far from 32 in a row.
    for i in range(0, 50, 5):
        png(tmp_path / f"img{i}.png")
    return [image_record(f"r{i}", f"img{i}.png") for i in range(50)]


def test_runner_fails_when_most_images_are_missing(tmp_path):
    from lavis.common.config import load_config
    from lavis.runners import build_runner

    project = write_project(tmp_path, mostly_missing_records(tmp_path))
    runner = build_runner(load_config(project, ["run.max_skip_ratio=0.05"]))
    with pytest.raises(RuntimeError, match=r"samples were skipped \({'missing_image': \d+}\), more than "
                                           r"run.max_skip_ratio=0.05: check the data"):
        runner.train()
    total = runner.skipped["missing_image"]
    assert set(runner.skipped) == {"missing_image"}
    assert runner.step < 5  # failed early, not at the end
    assert runner.samples_seen == 8 * runner.step
    assert total > 0.05 * (runner.samples_seen + total)
    assert runner.samples_seen + total >= 64  # the check waits for enough samples to judge


def test_every_skip_is_named_in_skipped_jsonl_and_the_first_of_each_reason_in_the_log(tmp_path, caplog):
    """A skip was only a count: now skipped.jsonl names each (step, rank, dataset, record, reason, detail),
    and the log shows the first three of each reason."""
    from lavis.common.config import load_config
    from lavis.runners import build_runner
    from lavis.tracking.logging import read_metrics

    for i in range(0, 40, 2):
        png(tmp_path / f"img{i}.png")
    records = [image_record(f"r{i}", f"img{i}.png") for i in range(40)]  # every other image is missing
    project = write_project(tmp_path, records)
    with caplog.at_level("WARNING"):
        build_runner(load_config(project, ["run.max_skip_ratio=0.9", "run.max_steps=4", "run.log_every=3"])).train()
    out = tmp_path / "out"
    skipped = read_metrics(out / "skipped.jsonl")
    counted = read_metrics(out / "metrics.jsonl")[-1]["skipped"]
    assert counted > 3 and len(skipped) == counted
    for record in skipped:
        assert record["dataset"] == "d" and record["reason"] == "missing_image" and record["rank"] == 0
        number = int(record["id"][1:])
        assert number % 2 == 1 and record["detail"] == f"image not found: {tmp_path / f'img{number}.png'}"
        assert 1 <= record["step"] <= 4
    shown = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped r")]
    assert shown[0] == f"skipped {skipped[0]['id']} of dataset d (missing_image): {skipped[0]['detail']}"
    assert len(shown) == 3 and shown[2].endswith(f"; further 'missing_image' skips only in {out / 'skipped.jsonl'}")


def test_records_dropped_at_build_are_named_in_skipped_jsonl_at_step_0(tmp_path):
    from lavis.common.config import load_config
    from lavis.runners import build_runner
    from lavis.tracking.logging import read_metrics

    png(tmp_path / "img.png")
    records = [image_record(f"r{i}", "img.png") for i in range(8)]
    records.append(image_record("boxed", "img.png", answer="<ref>it</ref><box>(1200,50),(1300,80)</box>"))
    build_runner(load_config(write_project(tmp_path, records), ["run.max_steps=2"])).train()
    [entry] = read_metrics(tmp_path / "out" / "skipped.jsonl")
    assert entry == {
        "step": 0, "rank": 0, "dataset": "d", "id": f"{tmp_path / 'ann.json'}: record 8 (id 'boxed')", "reason": "bad_box",
        "detail": "'<box>(1200,50),(1300,80)</box>' has a coordinate outside [0, 1000)",
    }


def test_runner_with_all_images_missing_fails_at_the_first_batch(tmp_path):
    from lavis.common.config import load_config
    from lavis.runners import build_runner

    project = write_project(tmp_path, [image_record(f"r{i}", f"missing{i}.png") for i in range(8)])
    runner = build_runner(load_config(project))
    with pytest.raises(RuntimeError, match=r"32 consecutive samples of dataset 'd' were unusable \(reasons: \{'missing_image': 32\}\)"):
        runner.train()
    assert runner.step == 0


# --------------------------------------------------------------------------- corrupt image


def noise_png_bytes(size: int = 64) -> bytes:
    import random

    rng = random.Random(0)
    img = Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "kind",
    ["not_an_image", "empty", "truncated_png"],
)
def test_corrupt_image_is_skipped_and_counted(tmp_path, processor, kind):
    data = {
        "not_an_image": b"this is not an image, just text in a .png file\n",
        "empty": b"",
        "truncated_png": noise_png_bytes()[:2000],  # a valid header, half the pixel data
    }[kind]
    bad = tmp_path / "bad.png"
    bad.write_bytes(data)
    png(tmp_path / "good.png")
    records = build(tmp_path, [image_record("bad", "bad.png"), image_record("good", "good.png")])

    with pytest.raises(SkipSample) as info:
        load_image(bad)
    assert info.value.reason == "corrupt_image"
    assert str(info.value).startswith(f"cannot read image {bad}: ")

    stream = batches(records, processor, batch_size=2)
    seen = [next(stream) for _ in range(2)]  # 4 usable draws over 4 epochs
    assert set().union(*(b["skipped"] for b in seen)) == {"corrupt_image"}
    assert sum(b["skipped"].get("corrupt_image", 0) for b in seen) >= 3
    assert all(b["pixel_values"].shape[0] == 2 for b in seen)


def gray_ramp() -> np.ndarray:
    return np.arange(256, dtype=np.uint8).reshape(16, 16)


@pytest.mark.parametrize(
    "mode, make",
    [
        ("I;16", lambda k: Image.fromarray(k.astype(np.uint16) * 257)),  # 16-bit grayscale PNG
        ("I", lambda k: Image.fromarray(k.astype(np.int32) * 257)),  # 32-bit integer TIFF holding 16-bit data
        ("F", lambda k: Image.fromarray(k.astype(np.float32) / 255)),  # float TIFF in [0, 1]
        ("L", lambda k: Image.fromarray(k)),
        ("LA", lambda k: Image.fromarray(np.stack([k, np.full_like(k, 128)], -1), mode="LA")),
        ("P", lambda k: Image.fromarray(k).convert("P")),
        ("1", None),
        ("CMYK", lambda k: Image.fromarray(k).convert("RGB").convert("CMYK")),
    ],
)
def test_every_image_mode_becomes_8_bit_rgb_with_its_contrast(tmp_path, mode, make):
    """A 16-bit grayscale PNG once trained as a nearly white image: every mode PIL opens now gives the
    8-bit RGB its pixels mean (here a 0..255 ramp, scaled from 16 bits or [0, 1] where stored so)."""
    ramp = gray_ramp()
    if mode == "1":
        image, expected = Image.fromarray(ramp >= 128), np.where(ramp >= 128, 255, 0)
    else:
        image, expected = make(ramp), ramp
    path = tmp_path / ("image.tiff" if mode in ("I", "F", "CMYK") else "image.png")
    image.save(path)
    with Image.open(path) as opened:
        assert opened.mode == mode
    rgb = load_image(path)
    assert rgb.mode == "RGB"
    got = np.asarray(rgb).astype(int)
    assert all(np.abs(got[..., c] - expected).max() <= 1 for c in range(3)), (mode, got[..., 0][:2])


def test_truncated_png_really_is_a_png(tmp_path):
    # The truncated file of the test above opens (header intact) but cannot be decoded.
    path = tmp_path / "t.png"
    path.write_bytes(noise_png_bytes()[:2000])
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (64, 64)


def test_skip_reasons_are_counted_separately(tmp_path, processor):
    png(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    records = build(tmp_path, [
        image_record("a", "missing.png"), image_record("b", "bad.png"), image_record("c", URL),
        image_record("d", "good.png"),
    ])
    batch = next(batches(records, processor, batch_size=4))  # 4 epochs, one usable record each
    assert set(batch["skipped"]) == {"missing_image", "corrupt_image", "remote_image"}
    assert 9 <= sum(batch["skipped"].values()) <= 12
    assert batch["input_ids"].shape[0] == 4


# --------------------------------------------------------------------------- remote image


def test_image_url_is_skipped_never_fetched(tmp_path, processor, monkeypatch):
    # Qwen-VL's README example with its https image, as published.
    records = build(tmp_path, [{
        "id": "identity_1",
        "conversations": [
            {"from": "user", "value": f"Picture 1: <img>{URL}</img>\n图中的狗是什么品种?"},
            {"from": "assistant", "value": "图中是一只拉布拉多犬。"},
        ],
    }, {
        "id": "identity_0",
        "conversations": [{"from": "user", "value": "你好"}, {"from": "assistant", "value": "我是Qwen-VL。"}],
    }])

    def no_network(*args, **kwargs):
        raise AssertionError("the image URL was fetched")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr("lavis.processors.sample.load_image", no_network)

    with pytest.raises(SkipSample) as info:
        processor(records[0])
    assert info.value.reason == "remote_image"
    assert str(info.value) == f"image URLs are not fetched: {URL} (download it and use a local path)"

    batch = next(batches(records, processor, batch_size=2))
    assert batch["skipped"].get("remote_image", 0) >= 1
    assert batch["pixel_values"].shape[0] == 0  # only the text-only record is usable


# --------------------------------------------------------------------------- malformed annotations


def test_unknown_role_fails_at_build_naming_file_record_and_roles(tmp_path):
    records = [
        image_record("ok", "a.png"),
        {"id": "robot-talk", "conversations": [
            {"from": "user", "value": "Hi"}, {"from": "robot", "value": "Beep."}]},
    ]
    ann = write_json(tmp_path / "ann.json", records)
    with pytest.raises(AnnotationError) as info:
        QwenVLConversationBuilder(ann, str(tmp_path)).build()
    assert str(info.value) == (
        f"{ann}: record 1 (id 'robot-talk'), turn 1: unknown role 'robot'; expected one of system, user, assistant"
    )
    # LLaVA's roles are human/gpt (and system).
    with pytest.raises(AnnotationError) as info:
        LLaVAConversationBuilder(ann).build()
    assert str(info.value) == f"{ann}: record 0 (id 'ok'), turn 0: unknown role 'user'; expected one of human, gpt, system"


def test_record_without_id_is_named_by_index(tmp_path):
    ann = write_json(tmp_path / "ann.json", [image_record("a", "a.png"), image_record("b", "b.png"),
                                             {"conversations": [{"from": "robot", "value": "x"}]}])
    with pytest.raises(AnnotationError) as info:
        QwenVLConversationBuilder(ann).build()
    assert str(info.value) == f"{ann}: record 2, turn 0: unknown role 'robot'; expected one of system, user, assistant"


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"id": "x", "conversations": "hello"}, "expected an object with a 'conversations' list"),
        ({"id": "x"}, "expected an object with a 'conversations' list"),
        ({"id": "x", "conversations": [{"from": "user", "value": 3}]}, "turn 0: expected {'from': ..., 'value': str}"),
        ({"id": "x", "conversations": [{"value": "hi"}]}, "turn 0: expected {'from': ..., 'value': str}"),
        ({"id": "x", "conversations": [{"from": "user", "value": "hi"}]}, "no assistant turn to learn from"),
    ],
)
def test_malformed_record_names_file_and_record(tmp_path, record, problem):
    ann = write_json(tmp_path / "ann.json", [image_record("a", "a.png"), record])
    with pytest.raises(AnnotationError) as info:
        QwenVLConversationBuilder(ann).build()
    sep = ", " if problem.startswith("turn") else ": "
    assert str(info.value) == f"{ann}: record 1 (id 'x'){sep}{problem}"


@pytest.mark.parametrize("record", ["just a string", [1, 2]])
def test_non_object_record_is_an_annotation_error(tmp_path, record):
    ann = write_json(tmp_path / "ann.json", [image_record("a", "a.png"), record])
    with pytest.raises(AnnotationError) as info:
        QwenVLConversationBuilder(ann).build()
    assert str(info.value) == f"{ann}: record 1: expected an object with a 'conversations' list"


def test_llava_image_without_user_turn_is_an_annotation_error(tmp_path):
    ann = write_json(tmp_path / "llava.json", [{"id": "x", "image": "a.jpg", "conversations": [
        {"from": "gpt", "value": "A cat."}]}])
    with pytest.raises(AnnotationError, match=r"record 0 \(id 'x'\)"):
        LLaVAConversationBuilder(ann).build()


def test_llava_records_as_llava_reads_them(tmp_path, caplog):
    """A text-only record with a literal ``<image>`` no longer fails the whole build (it stays text, as in
    LLaVA); a ShareGPT record opening with a gpt turn loses that turn (as in LLaVA), counted in a warning."""
    ann = write_json(tmp_path / "llava.json", [
        {"id": "text", "conversations": [
            {"from": "human", "value": "What does the <image> tag mean in LLaVA's data?"},
            {"from": "gpt", "value": "It marks where the picture goes."}]},
        {"id": "sharegpt", "conversations": [
            {"from": "gpt", "value": "Hello! How can I help?"},
            {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Red."}]},
    ])
    with caplog.at_level("WARNING"):
        data = LLaVAConversationBuilder(ann).build()
    text, sharegpt = data.records
    assert text["messages"][0]["content"] == "What does the <image> tag mean in LLaVA's data?"
    assert [m["role"] for m in sharegpt["messages"]] == ["user", "assistant"]
    assert sharegpt["messages"][0]["content"] == "Name a colour."
    assert f"dropped the opening gpt turn of 1 records, as LLaVA does (first: {ann}: record 1 (id 'sharegpt'))" in caplog.text


def test_a_builder_typo_suggests_the_builder_it_is_part_of():
    from lavis.common.registry import RegistryError

    with pytest.raises(RegistryError, match=r"unknown builder 'llava' \(did you mean 'llava_conversation'\?\)"):
        registry.get("builder", "llava")


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b",, }\n]\n', encoding="utf-8")
    with pytest.raises(AnnotationError) as info:
        QwenVLConversationBuilder(str(path)).build()
    assert str(info.value) == (
        f"{path}: malformed JSON at line 3, column 14: Expecting property name enclosed in double quotes"
    )


def test_malformed_jsonl_names_the_line(tmp_path):
    good = json.dumps(image_record("a", "a.png"))
    path = tmp_path / "ann.jsonl"
    # Line 3 is blank (allowed), line 5 is cut short.
    path.write_text("\n".join([good, good, "", good, good[:30], good]) + "\n", encoding="utf-8")
    with pytest.raises(AnnotationError) as info:
        QwenVLConversationBuilder(str(path)).build()
    assert str(info.value).startswith(f"{path}:5: malformed JSON line: ")
    # Without the bad line the same file reads as 4 records.
    path.write_text("\n".join([good, good, "", good, good]) + "\n", encoding="utf-8")
    assert len(read_annotations(path)) == 4


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"id": "a", "conversations": []}', "expected a JSON list of records, got dict"),
        ("", "malformed JSON at line 1, column 1: Expecting value"),
    ],
)
def test_json_that_is_not_a_list(tmp_path, content, message):
    path = tmp_path / "ann.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(AnnotationError) as info:
        read_annotations(path)
    assert str(info.value) == f"{path}: {message}"


def test_missing_annotation_file(tmp_path):
    with pytest.raises(AnnotationError) as info:
        QwenVLConversationBuilder(str(tmp_path / "nope.json")).build()
    assert str(info.value) == f"annotation file not found: {tmp_path / 'nope.json'}"


def test_a_conversation_box_outside_0_1000_or_inverted_is_never_trained(tmp_path, caplog):
    """``<box>(1200,50),(1300,80)</box>`` was trained as written: such records are now skipped and counted
    (one warning naming the first), or with ``bad_boxes: error`` fail the build naming the record."""
    def turns(answer: str) -> list[dict]:
        return [{"from": "user", "value": "Where is the cat?"}, {"from": "assistant", "value": answer}]

    records = [
        {"id": "good", "conversations": turns("<ref>the cat</ref><box>(100,50),(300,80)</box>")},
        {"id": "outside", "conversations": turns("<ref>the cat</ref><box>(1200,50),(1300,80)</box>")},
        {"id": "inverted", "conversations": turns("<ref>the cat</ref><box>(300,80),(100,50)</box>")},
        {"id": "malformed", "conversations": turns("<ref>the cat</ref><box>(100,50)</box>")},
        {"id": "quad", "conversations": turns("<ref>EXIT</ref><quad>(1,2),(30,2),(30,9),(1,9)</quad>")},
    ]
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(records))
    with caplog.at_level("WARNING"):
        data = QwenVLConversationBuilder(str(path)).build()
    assert [r["id"] for r in data.records] == ["good", "quad"]
    assert (f"qwen_vl_conversation: skipped 3 of 5 annotation records with a malformed, out-of-range or inverted box "
            f"(first: {path}: record 1 (id 'outside'): '<box>(1200,50),(1300,80)</box>' has a coordinate outside "
            "[0, 1000))") in caplog.text
    with pytest.raises(AnnotationError, match=re.escape(f"{path}: record 1 (id 'outside'): '<box>(1200,50),(1300,80)</box>'")):
        QwenVLConversationBuilder(str(path), bad_boxes="error").build()
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"id": "x", "conversations": [
        {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "<box>(5,5),(2000,9)</box>"}]}]))
    with pytest.raises(AnnotationError, match="outside"):
        LLaVAConversationBuilder(str(llava), bad_boxes="error").build()


@pytest.mark.parametrize("name, content", [("a.json", "[]"), ("a.jsonl", ""), ("b.jsonl", "\n  \n")])
def test_an_empty_annotation_file_is_named(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(AnnotationError, match=re.escape(f"{path}: the file holds no records")):
        QwenVLConversationBuilder(str(path)).build()


@pytest.mark.integration
def test_a_dataset_without_records_fails_at_start_naming_its_files(tmp_path):
    """VQAv2 files with empty lists: train.py fails before any data worker starts, naming the files."""
    questions, answers = tmp_path / "questions.json", tmp_path / "annotations.json"
    questions.write_text(json.dumps({"questions": []}))
    answers.write_text(json.dumps({"annotations": []}))
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--cfg-path", str(SFT_PROJECT), "--options",
         "datasets.synthetic_sft.builder=vqa", f"datasets.synthetic_sft.question_path={questions}",
         f"datasets.synthetic_sft.ann_path={answers}", "datasets.synthetic_sft.synthetic_root=null",
         f"datasets.synthetic_sft.image_root={tmp_path}",
         f"run.output_dir={tmp_path / 'out'}", "run.device=cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"datasets.synthetic_sft (vqa): no records in ann_path={answers}, question_path={questions}" in proc.stderr
    assert "Traceback" not in proc.stderr and "data worker" not in proc.stderr


# --------------------------------------------------------------------------- unknown config keys


@pytest.mark.integration
def test_unknown_run_key_exits_2_with_did_you_mean():
    # The real script in a subprocess: exit code 2, the message on stderr.
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--cfg-path", str(SFT_PROJECT), "--options", "run.lrr=1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "config error: unknown key 'run.lrr' (did you mean 'lr'?); valid keys: " in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "option, expected",
    [
        ("run.lrr=1", "unknown key 'run.lrr' (did you mean 'lr'?); valid keys: "),
        ("run.max_step=3", "unknown key 'run.max_step' (did you mean 'max_steps'?); valid keys: "),
        ("model.adapter.num_queris=3", "unknown key 'model.adapter.num_queris' (did you mean 'num_queries'?); "
                                       "valid keys: "),
        ("model.freeze.visoin=frozen", "unknown key 'model.freeze.visoin' (did you mean 'vision'?); "
                                       "valid keys: adapter, llm, vision"),
        ("datasets.synthetic_sft.image_rot=x", "unknown key 'datasets.synthetic_sft.image_rot' "
                                               "(did you mean 'image_root'?); valid keys: ann_path, bad_boxes, builder, image_root, "
                                               "ratio, synthetic_root"),
        ("rnu.lr=1", "unknown top-level key 'rnu' in options (did you mean 'run'?); valid keys: model, datasets, evaluation, run"),
    ],
)
def test_unknown_key_exits_2_with_did_you_mean(train_main, capsys, option, expected):
    code, err = run_main(train_main, capsys, option)
    assert code == 2
    assert err.startswith("config error: " + expected)


def test_unknown_run_key_lists_the_valid_keys(train_main, capsys):
    code, err = run_main(train_main, capsys, "run.lrr=1")
    assert code == 2
    valid = err.strip().split("valid keys: ", 1)[1].split(", ")
    assert {"lr", "min_lr", "max_steps", "batch_size", "max_skip_ratio", "output_dir"} <= set(valid)
    assert valid == sorted(valid)


def test_top_level_typo_in_project_yaml(tmp_path, train_main, capsys):
    project = tmp_path / "typo.yaml"
    project.write_text(f"base: [{SFT_PROJECT}]\nrnu:\n  lr: 1.0e-4\n", encoding="utf-8")
    code, err = run_main(train_main, capsys, cfg_path=project)
    assert code == 2
    assert err.strip() == (
        "config error: unknown top-level key 'rnu' in project (did you mean 'run'?); valid keys: model, datasets, evaluation, run"
    )


def test_mistyped_value_names_key_and_type(train_main, capsys):
    code, err = run_main(train_main, capsys, "run.batch_size=eight")
    assert code == 2
    assert err.strip() == "config error: run.batch_size: expected an integer, got 'eight'"


# --------------------------------------------------------------------------- unknown registry names


@pytest.mark.parametrize(
    "option, kind, name, close",
    [
        ("model.adapter.type=resampler", "adapter", "resampler", "qwen_resampler"),
        ("datasets.synthetic_sft.builder=qwen_vl_conversaton", "builder", "qwen_vl_conversaton",
         "qwen_vl_conversation"),
        ("run.task=sf", "task", "sf", "sft"),
        ("run.runner=iter_runer", "runner", "iter_runer", "iter_runner"),
    ],
)
def test_unknown_registry_name_lists_names_and_closest(train_main, capsys, option, kind, name, close):
    code, err = run_main(train_main, capsys, option)
    assert code == 2
    names = registry.list(kind)
    assert close in names
    assert err.strip() == (
        f"config error: unknown {kind} '{name}' (did you mean '{close}'?); "
        f"registered {kind} names: {', '.join(names)}"
    )


# --------------------------------------------------------------------------- special-token text in annotations


def test_literal_image_pad_in_text_does_not_break_the_image_count(tmp_path, processor, tok):
    png(tmp_path / "a.png")
    records = build(tmp_path, [{"id": "x", "conversations": [
        {"from": "user", "value": "Picture 1: <img>a.png</img>\nWhat does <imgpad> mean?"},
        {"from": "assistant", "value": "A token."}]}])
    try:
        sample = processor(records[0])
    except SkipSample:
        return  # a counted skip is an acceptable answer too
    assert int((sample["input_ids"] == tok.img_pad_id).sum()) == N * sample["pixel_values"].shape[0]
