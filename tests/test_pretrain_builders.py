"""Builders of the pretraining / multi-task data (DESIGN §7, §8): captions, VQA, referring grounding,
grounded captions, OCR and text, on hand-written fixtures in both accepted layouts; their errors
(file and record named) and counted skips; and the synthetic world written in these formats.

The expected strings are written out by hand: Qwen-VL's stage-2 prompts and normalised boxes
(``int(v * 1000 / size)`` clamped to 999).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from helpers import python2_pickle
from PIL import Image

from lavis.common.config import ConfigError, constructor_args
from lavis.common.registry import registry
from lavis.datasets.builders.base import AnnotationError
from lavis.datasets.synthetic import world
from lavis.datasets.synthetic.formats import OCR_WORDS, write_formats
from lavis.processors.boxes import parse_boxes
from lavis.processors.quads import parse_quads, quad_text

BUILDERS = ("coco_caption", "vqa", "ref_grounding", "grounded_caption", "ocr", "text", "textvqa", "gqa", "docvqa", "chartqa")


def write(path: Path, data) -> str:
    """JSON, or JSONL when the name ends with .jsonl (``data`` a list)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
    else:
        path.write_text(json.dumps(data))
    return str(path)


def build(name: str, **params):
    return registry.get("builder", name)(**params).build()


def triples(dataset) -> list[tuple[str, str, str]]:
    return [(r["id"], r["prompt"], r["target"]) for r in (dataset[i] for i in range(len(dataset)))]


# --------------------------------------------------------------------------- registration and YAMLs


@pytest.mark.parametrize("name", BUILDERS)
def test_registered_with_a_default_yaml_of_exactly_its_arguments(name):
    cls = registry.get("builder", name)
    path = REPO / "configs" / "datasets" / f"{name}.yaml"
    text = path.read_text()
    cfg = yaml.safe_load(text)
    assert cfg.pop("builder") == name
    assert list(cfg) == list(constructor_args(cls, "builder"))
    for key in cfg:  # every key is commented
        assert re.search(rf"^{key}:.*#", text, re.M), key


# --------------------------------------------------------------------------- captions

CAP = "Generate the caption in English:"


def test_coco_captions_json(tmp_path):
    ann = write(
        tmp_path / "captions_val2014.json",
        {
            "images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"}, {"id": 7, "file_name": "b.jpg"}],
            "annotations": [
                {"id": 1, "image_id": 42, "caption": "  A dog runs.\n"},
                {"id": 2, "image_id": 7, "caption": "Two cats."},
                {"id": 3, "image_id": 42, "caption": "A brown dog"},
            ],
        },
    )
    ds = build("coco_caption", ann_path=ann, image_root="/coco/val2014")
    assert ds.image_root == "/coco/val2014"
    assert triples(ds) == [
        ("1", f"<img>COCO_val2014_000000000042.jpg</img>{CAP}", " A dog runs."),
        ("2", f"<img>b.jpg</img>{CAP}", " Two cats."),
        ("3", f"<img>COCO_val2014_000000000042.jpg</img>{CAP}", " A brown dog"),
    ]
    # The evaluation fields: the image path and the caption alone.
    assert ds[0] == {
        "id": "1", "prompt": f"<img>COCO_val2014_000000000042.jpg</img>{CAP}", "target": " A dog runs.",
        "image": "COCO_val2014_000000000042.jpg", "caption": "A dog runs.", "image_root": "/coco/val2014",
    }


def karpathy(tmp_path) -> str:
    def image(cocoid, split, *raws):
        sentences = [{"raw": r, "sentid": cocoid * 10 + k} for k, r in enumerate(raws)]
        return {
            "filepath": "val2014",
            "filename": f"{cocoid}.jpg",
            "cocoid": cocoid,
            "split": split,
            "sentences": sentences,
        }

    return write(
        tmp_path / "dataset_coco.json",
        {
            "dataset": "coco",
            "images": [
                image(1, "train", "a cat ", "a small cat"),
                image(2, "restval", "a dog"),
                image(3, "test", "a bird"),
                image(4, "val", "a fish"),
            ],
        },
    )


@pytest.mark.parametrize(
    "split, ids",
    [
        ("train", ["10", "11"]),
        ("train,restval", ["10", "11", "20"]),
        ("restval+test", ["20", "30"]),
        ("test", ["30"]),
        (None, ["10", "11", "20", "30", "40"]),
    ],
)
def test_karpathy_split_filter(tmp_path, split, ids):
    ds = build("coco_caption", ann_path=karpathy(tmp_path), image_root="coco", split=split)
    assert [r[0] for r in triples(ds)] == ids
    if split == "train":
        assert triples(ds)[0] == ("10", f"<img>val2014/1.jpg</img>{CAP}", " a cat")


def test_karpathy_unknown_split_fails_listing_the_splits(tmp_path):
    path = karpathy(tmp_path)
    with pytest.raises(
        AnnotationError,
        match=re.escape(f"{path}: no records of split trian; splits in the file: restval, test, train, val"),
    ):
        build("coco_caption", ann_path=path, split="trian")


def test_plain_caption_list_and_jsonl(tmp_path):
    data = [{"image": "x/1.jpg", "caption": ["one", " two "]}, {"id": "q", "image": "2.jpg", "caption": "three"}]
    for name in ("caps.json", "caps.jsonl"):
        ds = build("coco_caption", ann_path=write(tmp_path / name, data))
        assert triples(ds) == [
            ("0_0", f"<img>x/1.jpg</img>{CAP}", " one"),
            ("0_1", f"<img>x/1.jpg</img>{CAP}", " two"),
            ("q", f"<img>2.jpg</img>{CAP}", " three"),
        ]


@pytest.mark.parametrize(
    "data, split, message",
    [
        (
            {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 5, "image_id": 2, "caption": "x"}]},
            None,
            r"annotations: record 0 \(id 5\): image_id 2 is not in 'images'",
        ),
        (
            {
                "images": [{"id": 1, "file_name": "a.jpg"}],
                "annotations": [{"image_id": 1, "caption": "x"}, {"id": 9, "image_id": 1, "caption": "  "}],
            },
            None,
            r"annotations: record 1 \(id 9\): 'caption' must be a non-empty string",
        ),
        (
            {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []},
            "train",
            r"COCO captions JSON has no splits",
        ),
        (
            {"images": [{"filename": "a.jpg", "cocoid": 3, "sentences": []}]},
            None,
            r"images: record 0 \(cocoid 3\): 'sentences' must be a non-empty list",
        ),
        ([{"image": "a.jpg"}], None, r"record 0: missing key 'caption'"),
        ({"foo": 1}, None, r"not a caption file"),
    ],
)
def test_caption_annotation_errors_name_file_and_record(tmp_path, data, split, message):
    path = write(tmp_path / "bad.json", data)
    with pytest.raises(AnnotationError, match=re.escape(path) + ".*" + message):
        build("coco_caption", ann_path=path, split=split)


# --------------------------------------------------------------------------- VQA


def vqav2(tmp_path, annotations=None):
    questions = write(
        tmp_path / "q.json",
        {
            "questions": [
                {"question_id": 9001, "image_id": 9, "question": "What is it?"},
                {"question_id": 9002, "image_id": 9, "question": " How many? "},
                {"question_id": 12000, "image_id": 12, "question": "Is it red?"},
            ]
        },
    )
    annotations = (
        annotations
        if annotations is not None
        else [
            {
                "question_id": 9001,
                "image_id": 9,
                "multiple_choice_answer": "dog",
                "answers": [{"answer": "cat"}, {"answer": "cat"}, {"answer": "dog"}],
            },
            {
                "question_id": 12000,
                "image_id": 12,
                "answers": [{"answer": "no"}, {"answer": "yes"}, {"answer": "yes"}, {"answer": "no"}],
            },
            {"question_id": 9002, "image_id": 9, "answers": [{"answer": "2"}, {"answer": "3"}, {"answer": "3"}]},
        ]
    )
    return questions, write(tmp_path / "a.json", {"annotations": annotations})


def test_vqav2_pair(tmp_path):
    questions, annotations = vqav2(tmp_path)
    ds = build("vqa", ann_path=annotations, question_path=questions, image_root="coco/val2014", split="val")
    assert triples(ds) == [
        ("9001", "<img>COCO_val2014_000000000009.jpg</img>What is it? Answer:", " dog"),  # multiple_choice_answer
        ("9002", "<img>COCO_val2014_000000000009.jpg</img>How many? Answer:", " 3"),  # most frequent
        ("12000", "<img>COCO_val2014_000000000012.jpg</img>Is it red? Answer:", " no"),  # tie: the first
    ]
    ds = build("vqa", ann_path=[annotations], question_path=[questions], image_pattern="{split}/{image_id}.png")
    assert ds[0]["prompt"] == "<img>train/9.png</img>What is it? Answer:"


def test_vqa_simple_jsonl(tmp_path):
    ann = write(
        tmp_path / "vqa.jsonl",
        [
            {"image": "a.png", "question": "What colour?", "answers": ["red", "blue", "blue"]},
            {"id": "x", "image": "b.png", "question": "Shape?", "answers": ["circle"]},
            {"question_id": 5, "image": "c.png", "question": "Count?", "answer": "2"},
        ],
    )
    assert triples(build("vqa", ann_path=ann)) == [
        ("0", "<img>a.png</img>What colour? Answer:", " blue"),
        ("x", "<img>b.png</img>Shape? Answer:", " circle"),
        ("5", "<img>c.png</img>Count? Answer:", " 2"),
    ]


def test_vqa_record_without_answers_fails(tmp_path):
    ann = write(
        tmp_path / "vqa.jsonl",
        [
            {"image": "a.png", "question": "Q?", "answers": ["a"]},
            {"id": "nope", "image": "b.png", "question": "Q?", "answers": []},
        ],
    )
    with pytest.raises(AnnotationError, match=re.escape(f"{ann}: record 1 (id 'nope'): no answers")):
        build("vqa", ann_path=ann)
    ann = write(tmp_path / "vqa2.jsonl", [{"image": "b.png", "question": "Q?"}])
    with pytest.raises(AnnotationError, match=re.escape(f"{ann}: record 0: no answers")):
        build("vqa", ann_path=ann)
    questions, annotations = vqav2(
        tmp_path,
        [
            {"question_id": 9001, "image_id": 9, "answers": [{"answer": "a"}]},
            {"question_id": 9002, "image_id": 9, "answers": []},
            {"question_id": 12000, "image_id": 12, "answers": [{"answer": "a"}]},
        ],
    )
    with pytest.raises(AnnotationError, match=re.escape(f"{annotations}: annotations[1]: no answers")) as info:
        build("vqa", ann_path=annotations, question_path=questions)
    assert f"{questions}: questions: record 1 (question_id 9002)" in str(info.value)


def test_vqav2_question_without_annotation_fails(tmp_path):
    questions, annotations = vqav2(tmp_path, [{"question_id": 9001, "image_id": 9, "answers": [{"answer": "a"}]}])
    with pytest.raises(
        AnnotationError,
        match=re.escape(
            f"{questions}: questions: record 1 (question_id 9002): no answers: question_id 9002 has no annotation in {annotations}"
        ),
    ):
        build("vqa", ann_path=annotations, question_path=questions)


def test_vqa_layout_mistakes(tmp_path):
    questions, annotations = vqav2(tmp_path)
    with pytest.raises(AnnotationError, match="looks like VQAv2 annotations: set question_path"):
        build("vqa", ann_path=annotations)
    with pytest.raises(ConfigError, match="image_pattern"):
        build("vqa", ann_path=annotations, question_path=questions, image_pattern="{image}.jpg")
    with pytest.raises(ConfigError, match="pair up"):
        build("vqa", ann_path=[annotations, annotations], question_path=questions)
    questions, annotations = vqav2(
        tmp_path,
        [
            {"question_id": 9001, "image_id": 9, "answers": ["a"]},
            {"question_id": 9002, "image_id": 12, "answers": ["a"]},
        ],
    )
    with pytest.raises(
        AnnotationError,
        match=re.escape(
            f"{questions}: questions: record 1 (question_id 9002) / {annotations}: annotations[1]: image_id 12 differs"
        ),
    ):
        build("vqa", ann_path=annotations, question_path=questions)


# --------------------------------------------------------------------------- referring grounding


def test_ref_grounding_boxes(tmp_path):
    ann = write(
        tmp_path / "refs.json",
        [
            {
                "id": "r1",
                "image": "img/a.jpg",
                "width": 200,
                "height": 100,
                "bbox": [10, 20, 50, 30],
                "sentences": ["the man on the left", {"sent": "left man"}],
            },
            {"image": "img/b.jpg", "width": 640, "height": 480, "bbox": [0, 0, 640, 480], "sentences": ["everything"]},
        ],
    )
    assert triples(build("ref_grounding", ann_path=ann, image_root="root")) == [
        ("r1_0", "<img>img/a.jpg</img><ref>the man on the left</ref>", "<box>(50,200),(300,500)</box>"),
        ("r1_1", "<img>img/a.jpg</img><ref>left man</ref>", "<box>(50,200),(300,500)</box>"),
        ("1_0", "<img>img/b.jpg</img><ref>everything</ref>", "<box>(0,0),(999,999)</box>"),  # 1000 -> 999
    ]


def test_box_outside_the_image_is_skipped_counted_and_warned_once(tmp_path, caplog):
    def ref(rid, bbox):
        return {"id": rid, "image": "a.jpg", "width": 200, "height": 100, "bbox": bbox, "sentences": ["it"]}

    ann = write(
        tmp_path / "refs.jsonl",
        [
            ref("ok", [10, 10, 20, 20]),
            ref("wide", [150, 10, 52, 20]),  # x2 = 202 > 200 + 1
            ref("clamped", [-0.9, 0, 200.8, 100.5]),  # at most 1 px past each edge
            ref("flat", [10, 10, 0, 5]),  # zero area
            ref("negative", [-5, 10, 20, 20]),
        ],
    )
    builder = registry.get("builder", "ref_grounding")(ann_path=ann)
    with caplog.at_level(logging.WARNING):
        ds = builder.build()
    assert triples(ds) == [
        ("ok_0", "<img>a.jpg</img><ref>it</ref>", "<box>(50,100),(150,300)</box>"),
        ("clamped_0", "<img>a.jpg</img><ref>it</ref>", "<box>(0,0),(999,999)</box>"),
    ]
    assert builder.skipped == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "ref_grounding: skipped 3 of 5 annotation records" in warnings[0].getMessage()
    assert f"first: {ann}: record 1 (id 'wide'): box [150, 10, 52, 20]" in warnings[0].getMessage()


def test_no_warning_without_skips(tmp_path, caplog):
    ann = write(
        tmp_path / "refs.json", [{"image": "a", "width": 2, "height": 2, "bbox": [0, 0, 1, 1], "sentences": ["x"]}]
    )
    with caplog.at_level(logging.WARNING):
        build("ref_grounding", ann_path=ann)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def refcoco(tmp_path) -> tuple[str, str]:
    refs = write(
        tmp_path / "refs_unc.json",
        [
            {
                "ref_id": 0,
                "ann_id": 100,
                "image_id": 1,
                "split": "train",
                "sentences": [{"sent": "man left", "sent_id": 0}],
            },
            {
                "ref_id": 1,
                "ann_id": 101,
                "image_id": 1,
                "split": "testA",
                "sentences": [{"sent": "woman", "sent_id": 1}, {"sent": "lady in red", "sent_id": 2}],
            },
            {"ref_id": 2, "ann_id": 102, "image_id": 2, "split": "testB", "sentences": [{"sent": "car", "sent_id": 3}]},
        ],
    )
    instances = write(
        tmp_path / "instances.json",
        {
            "images": [
                {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 500, "height": 250},
                {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 100, "height": 100},
            ],
            "annotations": [
                {"id": 100, "image_id": 1, "bbox": [0, 0, 100, 50]},
                {"id": 101, "image_id": 1, "bbox": [250, 125, 250, 125]},
                {"id": 102, "image_id": 2, "bbox": [1, 2, 3, 4]},
            ],
        },
    )
    return refs, instances


def test_refcoco_layout_with_split(tmp_path):
    refs, instances = refcoco(tmp_path)
    ds = build("ref_grounding", refs_path=refs, instances_path=instances, image_root="coco/train2014", split="testA")
    assert triples(ds) == [
        ("1_0", "<img>COCO_train2014_000000000001.jpg</img><ref>woman</ref>", "<box>(500,500),(999,999)</box>"),
        ("1_1", "<img>COCO_train2014_000000000001.jpg</img><ref>lady in red</ref>", "<box>(500,500),(999,999)</box>"),
    ]
    ds = build("ref_grounding", refs_path=refs, instances_path=instances, split="train,testB")
    assert triples(ds) == [
        ("0_0", "<img>COCO_train2014_000000000001.jpg</img><ref>man left</ref>", "<box>(0,0),(200,200)</box>"),
        ("2_0", "<img>COCO_train2014_000000000002.jpg</img><ref>car</ref>", "<box>(10,20),(40,60)</box>"),
    ]
    assert len(build("ref_grounding", refs_path=refs, instances_path=instances)) == 4


def test_refcoco_refs_pickle_as_released(tmp_path):
    """``refs(unc).p`` as released (a Python 2 pickle with non-ASCII sentences) reads directly, the same
    as its JSON copy; a pickle that asks for any function or class is refused and runs nothing."""
    refs_json, instances = refcoco(tmp_path)
    refs = json.loads(Path(refs_json).read_text())
    refs[2]["sentences"][0]["sent"] = "café sign"
    Path(refs_json).write_text(json.dumps(refs))
    released = tmp_path / "refs(unc).p"
    released.write_bytes(python2_pickle(refs))
    with pytest.raises(UnicodeDecodeError):  # what Python 3's pickle.load does with it by default
        pickle.loads(released.read_bytes())
    from_pickle = build("ref_grounding", refs_path=str(released), instances_path=instances)
    assert triples(from_pickle) == triples(build("ref_grounding", refs_path=refs_json, instances_path=instances))
    assert "café sign" in triples(from_pickle)[-1][1]

    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    hostile = tmp_path / "hostile.p"
    hostile.write_bytes(pickle.dumps([{"ref_id": 0, "x": Payload()}]))
    with pytest.raises(AnnotationError, match=r"hostile.p: refused: it asks for (builtins|io)\.open; only plain data"):
        build("ref_grounding", refs_path=str(hostile), instances_path=instances)
    assert not marker.exists()


def test_refcoco_errors(tmp_path):
    refs, instances = refcoco(tmp_path)
    data = json.loads(Path(refs).read_text())
    data[2]["ann_id"] = 999
    write(Path(refs), data)
    with pytest.raises(
        AnnotationError, match=re.escape(f"{refs}: record 2 (ref_id 2): ann_id 999 is not in {instances}")
    ):
        build("ref_grounding", refs_path=refs, instances_path=instances)
    with pytest.raises(ConfigError, match="either ann_path, or refs_path and instances_path"):
        registry.get("builder", "ref_grounding")(ann_path="x.json", refs_path=refs, instances_path=instances)
    with pytest.raises(ConfigError):
        registry.get("builder", "ref_grounding")()
    with pytest.raises(ConfigError, match="needs both"):
        registry.get("builder", "ref_grounding")(refs_path=refs)


@pytest.mark.parametrize(
    "record, message",
    [
        (
            {"image": "a", "width": 10, "height": 10, "bbox": [1, 2, 3], "sentences": ["x"]},
            r"'bbox' \[x, y, w, h\] must be 4 numbers",
        ),
        (
            {"image": "a", "width": 10, "height": 10, "bbox": [1, 2, 3, 4], "sentences": []},
            r"'sentences' must be a non-empty list",
        ),
        (
            {"image": "a", "width": 0, "height": 10, "bbox": [1, 2, 3, 4], "sentences": ["x"]},
            r"'width' must be a positive number",
        ),
        ({"image": "a", "height": 10, "bbox": [1, 2, 3, 4], "sentences": ["x"]}, r"missing key 'width'"),
        (
            {"image": "a</img>", "width": 10, "height": 10, "bbox": [1, 2, 3, 4], "sentences": ["x"]},
            r"contains '<', '>'",
        ),
    ],
)
def test_ref_grounding_malformed_records_fail(tmp_path, record, message):
    ann = write(
        tmp_path / "refs.json",
        [{"image": "ok", "width": 9, "height": 9, "bbox": [0, 0, 1, 1], "sentences": ["y"]}, {"id": "bad", **record}],
    )
    with pytest.raises(AnnotationError, match=re.escape(f"{ann}: record 1 (id 'bad')") + ".*" + message):
        build("ref_grounding", ann_path=ann)


# --------------------------------------------------------------------------- grounded captions

GCAP = "Generate the caption in English with grounding:"


def test_grounded_caption(tmp_path):
    ann = write(
        tmp_path / "gc.jsonl",
        [
            {
                "id": "g",
                "image": "a.jpg",
                "width": 100,
                "height": 200,
                "caption": "a dog chases a cat near the dog house",
                "regions": [
                    {"phrase": "a cat", "bbox": [50, 100, 50, 100]},
                    {"phrase": "a dog", "bbox": [0, 0, 10, 20]},
                ],
            },
            {
                "image": "b.jpg",
                "width": 100,
                "height": 100,
                "caption": "two men and a dog",
                "regions": [
                    {"phrase": "two men", "bbox": [0, 0, 10, 10]},
                    {"phrase": "two men", "bbox": [20, 20, 10, 10]},
                    {"span": [14, 17], "bbox": [50, 50, 50, 50]},
                ],
            },
            {"image": "c.jpg", "width": 100, "height": 100, "caption": "an empty room", "regions": []},
        ],
    )
    assert triples(build("grounded_caption", ann_path=ann)) == [
        (
            "g",
            f"<img>a.jpg</img>{GCAP}",
            " <ref>a dog</ref><box>(0,0),(100,100)</box> chases <ref>a cat</ref><box>(500,500),(999,999)</box> near the dog house",
        ),
        (
            "1",
            f"<img>b.jpg</img>{GCAP}",
            " <ref>two men</ref><box>(0,0),(100,100)</box><box>(200,200),(300,300)</box> and a "
            "<ref>dog</ref><box>(500,500),(999,999)</box>",
        ),
        ("2", f"<img>c.jpg</img>{GCAP}", " an empty room"),
    ]


def gc(caption: str, *phrases: str, span=None) -> dict:
    regions = [{"phrase": p, "bbox": [0, 0, 5, 5]} for p in phrases]
    if span is not None:
        regions.append({"span": span, "bbox": [5, 5, 5, 5]})
    return {"id": 4, "image": "a.jpg", "width": 10, "height": 10, "caption": caption, "regions": regions}


def test_grounded_caption_phrases_match_whole_words_not_yet_claimed(tmp_path):
    ann = write(tmp_path / "gc.json", [gc("a bobcat and a cat", "cat"), gc("a dog and dog food", "a dog", "dog")])
    box = "<box>(0,0),(500,500)</box>"
    assert [r["target"] for r in build("grounded_caption", ann_path=ann).records] == [
        f" a bobcat and a <ref>cat</ref>{box}",
        f" <ref>a dog</ref>{box} and <ref>dog</ref>{box} food",
    ]


@pytest.mark.parametrize(
    "record, message",
    [
        (gc("a concatenation", "cat"), "region 0: phrase 'cat' does not occur"),
        (gc("a dog", "a dog", "dog"), "region 1: phrase 'dog' does not occur (unclaimed)"),
        (gc("a dog", span=[2, 9]), "region 0: span [2, 9] is not inside the caption"),
        (gc("a dog", "a dog", span=[2, 5]), "region 1: span [2, 5] overlaps another region"),
        (
            gc("a dog", "x", span=None) | {"regions": [{"phrase": "dog", "span": [0, 1], "bbox": [0, 0, 1, 1]}]},
            "region 0: span [0, 1] is 'a', not the phrase 'dog'",
        ),
        (gc("a dog") | {"regions": [{"bbox": [0, 0, 1, 1]}]}, "region 0: a region needs a 'phrase'"),
    ],
)
def test_grounded_caption_bad_regions_fail(tmp_path, record, message):
    ann = write(tmp_path / "gc.json", [record])
    with pytest.raises(AnnotationError, match=re.escape(f"{ann}: record 0 (id 4), {message}")):
        build("grounded_caption", ann_path=ann)


def test_grounded_caption_region_outside_skips_the_record(tmp_path, caplog):
    ann = write(
        tmp_path / "gc.json",
        [
            {
                "image": "a.jpg",
                "width": 10,
                "height": 10,
                "caption": "a b",
                "regions": [{"phrase": "a", "bbox": [0, 0, 5, 5]}],
            },
            {
                "id": "far",
                "image": "b.jpg",
                "width": 10,
                "height": 10,
                "caption": "a b",
                "regions": [{"phrase": "a", "bbox": [0, 0, 5, 5]}, {"phrase": "b", "bbox": [8, 8, 5, 5]}],
            },
        ],
    )
    builder = registry.get("builder", "grounded_caption")(ann_path=ann)
    with caplog.at_level(logging.WARNING):
        ds = builder.build()
    assert [r["id"] for r in ds.records] == ["0"] and builder.skipped == 1
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "grounded_caption: skipped 1 of 2" in warning and f"{ann}: record 1 (id 'far'): region 1" in warning


# --------------------------------------------------------------------------- OCR


def test_quad_text():
    assert quad_text(((0, 0), (50, 0), (50, 25), (0, 25)), 100, 50) == "(0,0),(500,0),(500,500),(0,500)"
    assert parse_quads("x<quad>(1,2),(3,4),(5,6),(7,8)</quad>") == [((1, 2), (3, 4), (5, 6), (7, 8))]


def test_ocr_quads_and_boxes(tmp_path):
    ann = write(
        tmp_path / "ocr.jsonl",
        [
            {
                "id": "p",
                "image": "docs/p.png",
                "width": 200,
                "height": 100,
                "ocr": [
                    {"text": "STOP", "quad": [[10, 10], [110, 20], [100, 60], [0, 50]]},
                    {"text": " 42 ", "bbox": [150, 50, 50, 50]},
                    {"text": "flat", "quad": [0, 0, 20, 0, 20, 10, 0, 10]},
                ],
            },
        ],
    )
    assert triples(build("ocr", ann_path=ann, image_root="r")) == [
        (
            "p",
            "<img>docs/p.png</img>OCR with grounding:",
            " <ref>STOP</ref><quad>(50,100),(550,200),(500,600),(0,500)</quad>"
            "<ref>42</ref><quad>(750,500),(999,500),(999,999),(750,999)</quad>"
            "<ref>flat</ref><quad>(0,0),(100,0),(100,100),(0,100)</quad>",
        )
    ]


def test_ocr_outside_skipped_and_malformed_fails(tmp_path, caplog):
    good = {"image": "a.png", "width": 10, "height": 10, "ocr": [{"text": "a", "bbox": [0, 0, 5, 5]}]}
    ann = write(
        tmp_path / "ocr.json",
        [
            good,
            {**good, "id": "out", "ocr": [{"text": "b", "quad": [[0, 0], [13, 0], [13, 5], [0, 5]]}]},
            {**good, "id": "line", "ocr": [{"text": "c", "quad": [[0, 0], [5, 0], [5, 0], [0, 0]]}]},  # no area
        ],
    )
    builder = registry.get("builder", "ocr")(ann_path=ann)
    with caplog.at_level(logging.WARNING):
        assert len(builder.build()) == 1
    assert builder.skipped == 2
    assert "ocr: skipped 2 of 3 annotation records" in caplog.text and "record 1 (id 'out')" in caplog.text
    for region, message in [
        ({"text": "a"}, "a text region needs a 'quad' or a 'bbox'"),
        ({"text": "", "bbox": [0, 0, 1, 1]}, "'text' must be a non-empty string"),
        ({"text": "a", "quad": [[0, 0], [1, 0], [1]]}, "'quad'"),
    ]:
        ann = write(tmp_path / "bad.json", [{**good, "id": 3, "ocr": [region]}])
        with pytest.raises(AnnotationError, match=re.escape(f"{ann}: record 0 (id 3), region 0: {message}")):
            build("ocr", ann_path=ann)
    ann = write(tmp_path / "empty.json", [{**good, "ocr": []}])
    with pytest.raises(AnnotationError, match=re.escape(f"{ann}: record 0: 'ocr' must be a non-empty list")):
        build("ocr", ann_path=ann)


# --------------------------------------------------------------------------- text


def test_text_jsonl(tmp_path):
    ann = write(
        tmp_path / "t.jsonl", [{"text": "red and yellow make orange."}, {"id": "b", "text": " keep  spacing\n"}]
    )
    ds = build("text", ann_path=ann)
    assert triples(ds) == [("0", "", "red and yellow make orange."), ("b", "", " keep  spacing\n")]
    assert ds.image_root == ""
    ann = write(tmp_path / "c.jsonl", [{"content": "hello"}])
    assert triples(build("text", ann_path=ann, text_key="content")) == [("0", "", "hello")]
    with pytest.raises(
        AnnotationError, match=re.escape(f"{ann}: record 0: expected an object with a non-empty string under 'text'")
    ):
        build("text", ann_path=ann)


# --------------------------------------------------------------------------- the synthetic world in these formats

SIZES = {"train": 12, "val": 4, "test": 4}
FILES = (
    "captions_{}.json",
    "vqa_questions_{}.json",
    "vqa_annotations_{}.json",
    "vqa_{}.jsonl",
    "refs_{}.json",
    "grounded_captions_{}.json",
    "ocr_{}.json",
)


@pytest.fixture(scope="module")
def formats_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("formats_world")
    world.write_world(root, 3, SIZES)
    write_formats(root, 3, SIZES)
    return root


def synthetic_datasets(root: Path, split: str) -> dict:
    r = str(root)
    return {
        "coco_caption": build("coco_caption", ann_path=f"{r}/captions_{split}.json", image_root=r),
        "vqa": build(
            "vqa",
            ann_path=f"{r}/vqa_annotations_{split}.json",
            question_path=f"{r}/vqa_questions_{split}.json",
            image_root=r,
            split=split,
            image_pattern="images/{split}/{image_id:06d}.png",
        ),
        "vqa_jsonl": build("vqa", ann_path=f"{r}/vqa_{split}.jsonl", image_root=r),
        "ref_grounding": build("ref_grounding", ann_path=f"{r}/refs_{split}.json", image_root=r, split=split),
        "grounded_caption": build("grounded_caption", ann_path=f"{r}/grounded_captions_{split}.json", image_root=r),
        "ocr": build("ocr", ann_path=f"{r}/ocr_{split}.json", image_root=r),
    }


def test_synthetic_formats_load_and_point_at_real_images(formats_world):
    assert (formats_world / "text.jsonl").is_file()
    text = build("text", ann_path=str(formats_world / "text.jsonl"))
    assert len(text) >= 50 and "red and yellow make orange." in [r["target"] for r in text.records]
    for split, n in SIZES.items():
        for pattern in FILES:
            assert (formats_world / pattern.format(split)).is_file()
        scenes = world.load_scenes(formats_world, split)
        datasets = synthetic_datasets(formats_world, split)
        assert len(datasets["coco_caption"]) in range(n + 1, 2 * n)  # 1-2 captions per image
        assert len(datasets["vqa"]) == 2 * n and len(datasets["grounded_caption"]) == n and len(datasets["ocr"]) == n
        assert len(datasets["ref_grounding"]) >= sum(len(s.objects) for s in scenes)
        assert triples(datasets["vqa"]) == triples(datasets["vqa_jsonl"])  # one set of questions, two layouts
        for name, ds in datasets.items():
            for record in ds.records:
                paths = re.findall(r"<img>(.*?)</img>", record["prompt"])
                assert len(paths) == 1 and (formats_world / paths[0]).is_file(), (name, record)
                for box in parse_boxes(record["target"]):
                    assert all(0 <= v <= 999 for v in box) and box[0] < box[2] and box[1] < box[3], (name, record)
                for quad in parse_quads(record["target"]):
                    assert all(0 <= v <= 999 for point in quad for v in point), (name, record)
        answers = {a for vocab in world.ANSWER_VOCAB.values() for a in vocab}
        assert {r["target"][1:] for r in datasets["vqa"].records} <= answers
        prompts = {r["prompt"] for r in datasets["ocr"].records}
        assert len(prompts) == n


def test_synthetic_boxes_match_the_world(formats_world):
    scenes = world.load_scenes(formats_world, "train")
    datasets = synthetic_datasets(formats_world, "train")
    refs = {(r["prompt"], r["target"]) for r in datasets["ref_grounding"].records}
    for scene in scenes:
        for obj in scene.objects:
            box = world.box_text(obj.bbox, scene.width, scene.height)
            assert (f"<img>{scene.image}</img><ref>{world.ref_phrase(obj)}</ref>", f"<box>{box}</box>") in refs
    for scene, record in zip(scenes, datasets["grounded_caption"].records):
        plain = re.sub(r"</?ref>|<box>[^<]*</box>", "", record["target"])
        assert plain == " " + world.describe(scene)
        assert len(parse_boxes(record["target"])) == len(scene.objects)
    captions = {r["target"] for r in datasets["coco_caption"].records}
    assert {" " + world.describe(s) for s in scenes} <= captions


def test_synthetic_ocr_text_is_drawn_inside_its_quads(formats_world):
    for split in SIZES:
        records = json.loads((formats_world / f"ocr_{split}.json").read_text())
        assert {len(r["ocr"]) for r in records} <= {1, 2}
        for record in records:
            img = Image.open(formats_world / record["image"]).convert("L")
            assert img.size == (record["width"], record["height"]) == (128, 128)
            dark = img.point(lambda v: 255 if v < 100 else 0)
            outside = dark.copy()
            for region in record["ocr"]:
                assert region["text"] in OCR_WORDS
                (x1, y1), _, (x2, y2), _ = region["quad"]
                inside = dark.crop((x1, y1, x2, y2))
                assert inside.getbbox() == (0, 0, x2 - x1, y2 - y1), record  # ink reaches every edge: a tight quad
                outside.paste(0, (x1, y1, x2, y2))
            assert outside.getbbox() is None, record  # no dark pixel outside the quads


def test_synthetic_formats_are_deterministic(formats_world, tmp_path):
    before = {p.name: p.read_bytes() for p in formats_world.glob("*_train.json*")}
    ocr_before = (formats_world / "images_ocr" / "train" / "000003.png").read_bytes()
    write_formats(formats_world, 3, SIZES)
    assert before == {p.name: p.read_bytes() for p in formats_world.glob("*_train.json*")}
    assert ocr_before == (formats_world / "images_ocr" / "train" / "000003.png").read_bytes()
    with pytest.raises(ValueError, match="expected 99"):
        write_formats(formats_world, 3, {"train": 99})


SPLIT_RECORDS = {  # one record per split, in each builder's plain format
    "coco_caption": lambda split: {"image": f"{split}.png", "caption": "a cat"},
    "ref_grounding": lambda split: {"image": f"{split}.png", "width": 10, "height": 10, "bbox": [1, 1, 5, 5],
                                    "sentences": ["the cat"]},
    "multiple_choice": lambda split: {"image": f"{split}.png", "question": "?", "choices": ["a", "b"], "answer": 0},
}


@pytest.mark.parametrize("name", sorted(SPLIT_RECORDS))
def test_every_split_filter_keeps_the_named_splits_and_names_the_file_that_has_none(tmp_path, name):
    """One SplitFilter serves every builder with a ``split`` key: the splits named (comma or plus) are
    kept, and a file of which nothing is kept is an error naming it and the splits it holds."""
    path = write(tmp_path / "ann.json", [{**SPLIT_RECORDS[name](s), "split": s} for s in ("train", "val", "test")])
    kept = build(name, ann_path=path, split="train+test")
    assert sorted(r["image"] for r in kept.records) == ["test.png", "train.png"]
    assert len(build(name, ann_path=path)) == 3
    other = write(tmp_path / "other.json", [{**SPLIT_RECORDS[name]("val"), "split": "val"}])
    with pytest.raises(AnnotationError, match=re.escape(f"{other}: no records of split train, test; splits in the file: val")):
        build(name, ann_path=[path, other], split="train,test")


def test_refcoco_split_filter_names_the_refs_file(tmp_path):
    refs, instances = refcoco(tmp_path)
    with pytest.raises(AnnotationError, match=re.escape(f"{refs}: no records of split tset; splits in the file: testA, testB, train")):
        build("ref_grounding", refs_path=refs, instances_path=instances, split="tset")
