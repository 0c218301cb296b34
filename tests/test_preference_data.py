"""Preference data (issue 22): the builders of TRL's vision preference format, RLAIF-V's release and the
Qwen-VL-conversation variant, on records written as those data sets hold them; their counted skips and
named errors; the shapes world's preference pairs against their scenes; the captions' hallucination rate.

The expected records are written out by hand.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
import sys
import types
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from PIL import Image

from lavis.common.config import constructor_args
from lavis.common.registry import registry
from lavis.datasets.builders.base import AnnotationError
from lavis.datasets.synthetic import world
from lavis.datasets.synthetic.preference import build_preference_records
from lavis.processors.image import load_image
from lavis.tasks.metrics import caption_hallucination, hallucination_rate, object_mentions

BUILDERS = ("trl_preference", "rlaif_v_preference", "qwen_vl_preference")


def write(path: Path, records: list) -> str:
    """JSON list, or JSONL when the name ends with .jsonl."""
    text = "".join(json.dumps(r) + "\n" for r in records) if path.suffix == ".jsonl" else json.dumps(records)
    path.write_text(text)
    return str(path)


def build(name: str, **params):
    return registry.get("builder", name)(**params).build()


def png_bytes(colour=(220, 40, 40), size=(12, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name", BUILDERS)
def test_registered_with_a_default_yaml_of_exactly_its_arguments(name):
    cls = registry.get("builder", name)
    text = (REPO / "configs" / "datasets" / f"{name}.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg.pop("builder") == name
    assert list(cfg) == list(constructor_args(cls, "builder"))
    for key in cfg:  # every key is commented
        assert re.search(rf"^{key}:.*#", text, re.M), key


# --------------------------------------------------------------------------- TRL

# As trl-lib/rlaif-v holds a record (its images as paths on disk): conversational, an image part.
TRL_CONVERSATIONAL = {
    "images": ["coco/000000391895.jpg"],
    "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the man riding?"}]}],
    "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "He is riding a motorcycle."}]}],
    "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "He is riding a horse."}]}],
}


def test_trl_conversational_with_image_parts(tmp_path):
    ann = write(tmp_path / "trl.jsonl", [TRL_CONVERSATIONAL])
    ds = build("trl_preference", ann_path=ann, image_root="/data/coco")
    assert len(ds) == 1 and ds.skipped == []
    assert ds[0] == {
        "id": "0",
        "messages": [{"role": "user", "content": "Picture 1: <img>coco/000000391895.jpg</img>\nWhat is the man riding?"}],
        "chosen": "He is riding a motorcycle.",
        "rejected": "He is riding a horse.",
        "image_root": "/data/coco",
    }
    inline = build("trl_preference", ann_path=ann, image_format="inline")[0]
    assert inline["messages"][0]["content"] == "<img>coco/000000391895.jpg</img>What is the man riding?"


def test_trl_standard_and_implicit_prompt_and_system_turn(tmp_path):
    records = [
        # standard: the prompt a string, its <image> placeholder filled
        {"images": ["a.jpg"], "prompt": "<image>\nWhat colour is the car?", "chosen": "Red.", "rejected": "Blue."},
        # standard without a placeholder: the picture before the prompt
        {"id": "s2", "images": ["b.jpg"], "prompt": "Describe it.", "chosen": "A cat.", "rejected": "A dog."},
        # implicit prompt: whole conversations sharing their turns before the last; a system turn; two pictures
        {"images": ["c.jpg", "d.jpg"], "chosen": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
            {"role": "assistant", "content": "No."}],
         "rejected": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
            {"role": "assistant", "content": "Yes."}]},
        # text only
        {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"},
    ]
    ds = build("trl_preference", ann_path=write(tmp_path / "trl.json", records))
    assert [(r["id"], r["messages"], r["chosen"], r["rejected"]) for r in (ds[i] for i in range(len(ds)))] == [
        ("0", [{"role": "user", "content": "Picture 1: <img>a.jpg</img>\nWhat colour is the car?"}], "Red.", "Blue."),
        ("s2", [{"role": "user", "content": "Picture 1: <img>b.jpg</img>\nDescribe it."}], "A cat.", "A dog."),
        ("2", [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "Picture 1: <img>c.jpg</img>\nPicture 2: <img>d.jpg</img>\nSame?"}],
         "No.", "Yes."),
        ("3", [{"role": "user", "content": "2+2?"}], "4", "5"),
    ]


def test_trl_images_as_bytes_are_kept_in_memory(tmp_path):
    data = png_bytes()
    record = {**TRL_CONVERSATIONAL, "id": "b1", "images": [{"bytes": base64.b64encode(data).decode(), "path": None}]}
    rec = build("trl_preference", ann_path=write(tmp_path / "trl.json", [record]))[0]
    assert rec["messages"][0]["content"] == "Picture 1: <img>b1-1.jpg</img>\nWhat is the man riding?"
    assert rec["image_bytes"] == {"b1-1.jpg": data}
    assert load_image(Path("/nowhere") / "b1-1.jpg", rec["image_bytes"]["b1-1.jpg"]).size == (12, 8)


# --------------------------------------------------------------------------- RLAIF-V

# A record of openbmb/RLAIF-V-Dataset as its JSON export holds it: the image a datasets Image cell, its
# bytes in base64 (a small PNG here).
def rlaif_v_record(data: bytes) -> dict:
    return {
        "ds_name": "RLAIF-V",
        "image": {"bytes": base64.b64encode(data).decode(), "path": None},
        "question": "Who is more likely to use these tools a leather crafter or a paper crafter?",
        "chosen": "A leather crafter is more likely to use these tools.",
        "rejected": "A paper crafter is more likely to use these tools. The image shows scissors.",
        "origin_dataset": "OK-VQA",
        "origin_split": '{"model": "OmniLMM-12B", "feedback_model": "OmniLMM-12B", "type": "question_answering"}',
        "idx": "OK-VQA-train-1223",
        "image_path": "OK-VQA/train/COCO_train2014_000000436127.jpg",
    }


def test_rlaif_v_with_image_bytes(tmp_path):
    data = png_bytes()
    ds = build("rlaif_v_preference", ann_path=write(tmp_path / "rlaif_v.jsonl", [rlaif_v_record(data)]))
    name = "OK-VQA/train/COCO_train2014_000000436127.jpg"
    assert ds[0] == {
        "id": "OK-VQA-train-1223",
        "messages": [{"role": "user", "content": f"Picture 1: <img>{name}</img>\n"
                      "Who is more likely to use these tools a leather crafter or a paper crafter?"}],
        "chosen": "A leather crafter is more likely to use these tools.",
        "rejected": "A paper crafter is more likely to use these tools. The image shows scissors.",
        "image_bytes": {name: data},
        "image_root": "",
    }
    # a picture on disk (no bytes): read from image_root/<image_path>
    on_disk = {**rlaif_v_record(data), "image": None}
    rec = build("rlaif_v_preference", ann_path=write(tmp_path / "disk.json", [on_disk]), image_root="/rlaif",
                image_format="inline")[0]
    assert rec["messages"][0]["content"].startswith(f"<img>{name}</img>Who is")
    assert "image_bytes" not in rec and rec["image_root"] == "/rlaif"


def test_rlaif_v_parquet_with_pyarrow_and_without(tmp_path, monkeypatch):
    """The released parquet files: read through pyarrow (here a stand-in returning what ``to_pylist`` gives,
    raw bytes in the image cell); without pyarrow, an error naming the file and the way out."""
    data = png_bytes()
    path = tmp_path / "RLAIF-V-Dataset_000.parquet"
    path.write_bytes(b"PAR1")
    rows = [{**rlaif_v_record(data), "image": {"bytes": data, "path": "436127.jpg"}}]
    table = types.SimpleNamespace(to_pylist=lambda: rows)
    parquet = types.ModuleType("pyarrow.parquet")
    parquet.read_table = lambda p: table if Path(p) == path else None
    pyarrow = types.ModuleType("pyarrow")
    pyarrow.parquet = parquet
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "pyarrow", pyarrow)
        m.setitem(sys.modules, "pyarrow.parquet", parquet)
        rec = build("rlaif_v_preference", ann_path=str(path))[0]
    assert rec["image_bytes"] == {"436127.jpg": data}
    assert rec["messages"][0]["content"].startswith("Picture 1: <img>436127.jpg</img>\nWho is")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(AnnotationError, match=r"RLAIF-V-Dataset_000\.parquet: a parquet file, and pyarrow is not installed"):
        build("rlaif_v_preference", ann_path=str(path))


# --------------------------------------------------------------------------- Qwen-VL conversations

QWEN_VL_PREFERENCE = {
    "id": "identity_7",
    "conversations": [
        {"from": "user", "value": "Picture 1: <img>assets/demo.jpeg</img>\nWhat is in the picture?"},
        {"from": "assistant", "value": "A woman and her dog on a beach."},
        {"from": "user", "value": "Is the dog wearing a collar?"},
        {"from": "assistant", "chosen": "Yes, a blue one.", "rejected": "No, it is not."},
    ],
}


def test_qwen_vl_preference_multi_turn(tmp_path):
    ds = build("qwen_vl_preference", ann_path=write(tmp_path / "pref.json", [QWEN_VL_PREFERENCE]), image_root="/img")
    assert ds[0] == {
        "id": "identity_7",
        "messages": [
            {"role": "user", "content": "Picture 1: <img>assets/demo.jpeg</img>\nWhat is in the picture?"},
            {"role": "assistant", "content": "A woman and her dog on a beach."},
            {"role": "user", "content": "Is the dog wearing a collar?"},
        ],
        "chosen": "Yes, a blue one.",
        "rejected": "No, it is not.",
        "image_root": "/img",
    }


def test_reference_logps_are_kept(tmp_path):
    record = {**QWEN_VL_PREFERENCE, "ref_chosen_logp": -3.5, "ref_rejected_logp": -7}
    rec = build("qwen_vl_preference", ann_path=write(tmp_path / "pref.json", [record]))[0]
    assert (rec["ref_chosen_logp"], rec["ref_rejected_logp"]) == (-3.5, -7.0)
    assert isinstance(rec["ref_rejected_logp"], float)


# --------------------------------------------------------------------------- skips and errors


def test_identical_answers_are_skipped_and_counted(tmp_path, caplog):
    same = {**QWEN_VL_PREFERENCE, "id": "same", "conversations": [
        *QWEN_VL_PREFERENCE["conversations"][:-1], {"from": "assistant", "chosen": "No.", "rejected": " No. \n"}]}
    ann = write(tmp_path / "pref.json", [QWEN_VL_PREFERENCE, same, QWEN_VL_PREFERENCE])
    with caplog.at_level(logging.WARNING):
        ds = build("qwen_vl_preference", ann_path=ann)
    assert len(ds) == 2
    assert ds.skipped == [{"id": f"{ann}: record 1 (id 'same')", "reason": "identical_answers",
                           "detail": "chosen and rejected are both 'No.'"}]
    assert "qwen_vl_preference: skipped 1 of 3 annotation records whose chosen and rejected answers are identical" in caplog.text
    trl = {**TRL_CONVERSATIONAL, "rejected": TRL_CONVERSATIONAL["chosen"]}
    assert build("trl_preference", ann_path=write(tmp_path / "trl.json", [trl, TRL_CONVERSATIONAL])).skipped[0]["reason"] \
        == "identical_answers"
    rlaif = {**rlaif_v_record(png_bytes()), "rejected": "A leather crafter is more likely to use these tools."}
    skipped = build("rlaif_v_preference", ann_path=write(tmp_path / "r.json", [rlaif])).skipped
    assert skipped[0]["id"].endswith("r.json: record 0 (idx 'OK-VQA-train-1223')")


def _last(**turn):
    return {"id": "q1", "conversations": [{"from": "user", "value": "Hi?"}, {"from": "assistant", **turn}]}


MALFORMED = [
    ("qwen_vl_preference", _last(chosen="a"), r"record 0 \(id 'q1'\), turn 1: missing key 'rejected'"),
    ("qwen_vl_preference", {"id": "q1", "conversations": [{"from": "user", "value": "Hi?"}]},
     r"record 0 \(id 'q1'\), turn 0: the last turn must be \{'from': 'assistant', 'chosen', 'rejected'\}"),
    ("qwen_vl_preference", _last(chosen="", rejected="b"), r"record 0 \(id 'q1'\): 'chosen' must be a non-empty string"),
    ("qwen_vl_preference", {"id": "q1", "conversations": [{"from": "human", "value": "Hi?"},
                                                          {"from": "assistant", "chosen": "a", "rejected": "b"}]},
     r"record 0 \(id 'q1'\), turn 0: expected \{'from': system\|user\|assistant"),
    ("qwen_vl_preference", {"id": "q1", "conversations": [{"from": "assistant", "chosen": "a", "rejected": "b"}]},
     r"record 0 \(id 'q1'\): the prompt must end with the user turn"),
    ("qwen_vl_preference", {**_last(chosen="a", rejected="b"), "ref_chosen_logp": -1.0},
     r"record 0 \(id 'q1'\): 'ref_chosen_logp' without 'ref_rejected_logp'"),
    ("qwen_vl_preference", {**_last(chosen="a", rejected="b"), "ref_chosen_logp": -1.0, "ref_rejected_logp": "x"},
     r"record 0 \(id 'q1'\): 'ref_rejected_logp' must be a finite number, got 'x'"),
    ("trl_preference", {"chosen": "The sky is blue.", "rejected": "The sky is green."},
     r"record 0: missing key 'prompt' \(TRL's implicit prompt is read for conversational records"),
    ("trl_preference", {**TRL_CONVERSATIONAL, "chosen": TRL_CONVERSATIONAL["chosen"] * 2},
     r"record 0: 'chosen' must be a string or one assistant message"),
    ("trl_preference", {**TRL_CONVERSATIONAL, "images": []},
     r"record 0: an image placeholder or part but no 'images' to fill it"),
    ("trl_preference", {**TRL_CONVERSATIONAL, "images": ["a.jpg", "b.jpg"]}, r"record 0: 1 <image> placeholders for 2 images"),
    ("trl_preference", {**TRL_CONVERSATIONAL, "prompt": [{"role": "user", "content": [{"type": "video"}]}]},
     r"record 0, 'prompt' message 0: a content part is"),
    ("trl_preference", {**TRL_CONVERSATIONAL, "images": [{"bytes": "not base64!", "path": None}]},
     r"record 0, image 1: the image's 'bytes' is text but not base64"),
    ("trl_preference", {**TRL_CONVERSATIONAL, "prompt": [{"role": "user", "content": "Q"},
                                                        {"role": "assistant", "content": "A"}]},
     r"record 0: the prompt must end with the user turn the answers reply to \(it ends with assistant\)"),
    ("rlaif_v_preference", {"idx": "r9", "question": "Q?", "chosen": "a", "rejected": "b"},
     r"record 0 \(idx 'r9'\): missing key 'image' \(bytes or a path\) or 'image_path'"),
    ("rlaif_v_preference", {"idx": "r9", "image_path": "x.jpg", "chosen": "a", "rejected": "b"},
     r"record 0 \(idx 'r9'\): missing key 'question'"),
]


@pytest.mark.parametrize(("builder", "record", "message"), MALFORMED)
def test_malformed_records_name_the_file_record_and_key(tmp_path, builder, record, message):
    ann = write(tmp_path / "bad.json", [record])
    with pytest.raises(AnnotationError, match=re.escape(ann) + ": " + message):
        build(builder, ann_path=ann)


# --------------------------------------------------------------------------- the shapes world's pairs


@pytest.fixture(scope="module")
def pairs():
    scenes = world.generate_scenes(1, 600, "train")
    return scenes, build_preference_records(scenes, 1, "train")


def test_synthetic_pairs_are_right_about_their_scenes(pairs):
    scenes, records = pairs
    kinds = {"exists": 0, "caption": 0}
    for rec in records:
        meta = rec["meta"]
        scene = scenes[meta["scenes"][0]]
        kinds[meta["kind"]] += 1
        user, answer = rec["conversations"]
        assert user["value"].startswith(f"Picture 1: <img>{scene.image}</img>\n")
        present = {(o.colour, o.shape) for o in scene.objects}
        colour, shape = meta["object"]
        assert meta["present"] == ((colour, shape) in present)
        if meta["kind"] == "exists":
            assert user["value"].endswith(f"Is there {'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}?")
            assert (answer["chosen"], answer["rejected"]) == (("yes", "no") if meta["present"] else ("no", "yes"))
        else:
            assert user["value"].endswith("Describe the image.")
            assert answer["chosen"] == world.describe(scene)
            assert hallucination_rate(answer["chosen"], scene) == 0.0
            # the rejected caption names the absent object, and it is the only one it gets wrong
            assert (colour, shape) in object_mentions(answer["rejected"])
            assert [m for m in object_mentions(answer["rejected"]) if m not in present] == [(colour, shape)]
    assert 0.5 < kinds["exists"] / len(records) < 0.7
    exists = [r["meta"] for r in records if r["meta"]["kind"] == "exists"]
    assert 0.4 < sum(m["present"] for m in exists) / len(exists) < 0.6
    assert {r["meta"]["rejected_kind"] for r in records if r["meta"]["kind"] == "caption"} == {
        "swap_colour", "swap_shape", "add_object"}


def test_synthetic_pairs_are_deterministic(pairs):
    scenes, records = pairs
    assert build_preference_records(scenes, 1, "train") == records
    assert build_preference_records(scenes, 2, "train") != records
    assert build_preference_records(scenes, 1, "val") != records


def test_world_writes_pairs_the_builder_reads_and_leaves_its_other_files_as_they_were(tmp_path):
    sizes = {"train": 60, "val": 10, "test": 12}
    root = world.ensure_world(tmp_path / "w", seed=3, sizes=sizes)
    for split, n in sizes.items():
        ds = build("qwen_vl_preference", ann_path=str(root / f"preference_{split}.json"), image_root=str(root))
        assert len(ds) == n and ds.skipped == []
        for i in range(n):
            path = re.search(r"<img>(.*?)</img>", ds[i]["messages"][0]["content"])[1]
            assert (root / path).is_file() and path == f"images/{split}/{i:06d}.png"
    # Every text file the world wrote before the pairs (version 2) is byte for byte as it was: make demo's
    # captions, VQA and SFT data do not change. (The digest of version 2's files for this seed and these sizes;
    # a deliberate change of them bumps WORLD_VERSION and this digest.)
    digest = hashlib.sha256()
    for path in sorted(root.iterdir()):
        if path.suffix in (".json", ".jsonl") and path.name != world.MARKER and not path.name.startswith("preference_"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    assert digest.hexdigest() == "e3ff2d01701c65eb931f590ed571eb5d2598051673601b14799f13806e656b91"
    assert json.loads((root / world.MARKER).read_text())["version"] == world.WORLD_VERSION == 3


# --------------------------------------------------------------------------- hallucination rate


def test_hallucination_rate_counts_named_objects_not_in_the_scene():
    scene = world.Scene("x.png", 128, 128, [world.Obj("circle", "red", (0, 0, 9, 9), "top left"),
                                           world.Obj("square", "blue", (50, 50, 70, 70), "center")])
    assert object_mentions("A Red circle, two green squares and a red circle.") == [("red", "circle"), ("green", "square")]
    assert hallucination_rate("a red circle at the top left and a blue square in the center", scene) == 0.0
    assert hallucination_rate("a red circle and a green triangle", scene) == 0.5
    assert hallucination_rate("a red circle and a green triangle", scene.to_dict()) == 0.5  # scenes_{split}.json
    assert hallucination_rate("a blue circle", [("red", "circle")]) == 1.0
    assert hallucination_rate("a circle on the left", scene) == 0.0  # names no colour+shape object
    assert caption_hallucination([("a red circle and a green triangle", scene), ("a blue square", scene),
                                  ("nothing", scene)]) == {"CHAIR_i": 1 / 3, "CHAIR_s": 1 / 3, "mentioned": 3, "count": 3}
