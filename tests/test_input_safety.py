"""Input that used to crash or mislead: compressed annotation files, an unusable output_dir, a VQAv2
split that does not fit the image names, phone photos with an EXIF orientation, and pictures over
Pillow's decompression-bomb limit. Each is read, or named with the way out."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from lavis.common.config import ConfigError
from lavis.common.registry import registry
from lavis.datasets.builders.base import AnnotationError, load_file, read_annotations, read_json
from lavis.processors.errors import SkipSample
from lavis.processors.image import CLIPImageProcessor, load_image

# --------------------------------------------------------------------------- compressed annotation files

RECORDS = [{"image": "images/a.png", "question": "What is it?", "answers": ["a square"]},
           {"image": "images/b.png", "question": "What colour?", "answers": ["red", "red"]}]
COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}


@pytest.mark.parametrize("suffix", COMPRESS)
@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_compressed_annotation_files_read_as_plain(tmp_path, suffix, layout):
    text = json.dumps(RECORDS) if layout == "json" else "\n".join(map(json.dumps, RECORDS)) + "\n"
    path = tmp_path / f"vqa.{layout}{suffix}"
    path.write_bytes(COMPRESS[suffix](text.encode()))
    assert read_annotations(path) == RECORDS and load_file(path) == RECORDS
    # every builder reads through the same function: the VQA builder as an example
    records = registry.get("builder", "vqa")(ann_path=str(path)).build().records
    assert [r["answers"] for r in records] == [["a square"], ["red", "red"]]


def test_gzip_is_recognised_by_content_whatever_the_name(tmp_path):
    path = tmp_path / "questions.json"  # gzipped but named .json, as downloads often are
    path.write_bytes(gzip.compress(json.dumps({"questions": []}).encode()))
    assert read_json(path) == {"questions": []}


def test_broken_compressed_or_non_utf8_files_name_the_file(tmp_path):
    truncated = tmp_path / "train.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"a": 1}\n' * 100)[:30])
    with pytest.raises(AnnotationError, match=r"train\.jsonl\.gz: a gzip file that cannot be decompressed"):
        read_annotations(truncated)
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"caption": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(AnnotationError, match=r"latin\.json: not UTF-8 text"):
        read_annotations(latin)
    zipped = tmp_path / "train.json"
    zipped.write_bytes(b"PK\x03\x04" + b"\x00" * 20)
    with pytest.raises(AnnotationError, match=r"train\.json: a zip archive \(unzip it"):
        read_json(zipped)


def test_gzipped_mmbench_tsv_and_refcoco_pickle(tmp_path):
    from lavis.datasets.builders.base import read_pickle
    from lavis.datasets.builders.released_mc import read_tsv

    tsv = tmp_path / "mmbench.tsv.gz"
    tsv.write_bytes(gzip.compress(b"index\tquestion\tA\tB\tanswer\timage\n1\tWhich?\tx\ty\tA\taGk=\n"))
    assert read_tsv(str(tsv), ("index", "question"))[0]["question"] == "Which?"
    refs = tmp_path / "refs(unc).p.gz"
    refs.write_bytes(gzip.compress(__import__("pickle").dumps([{"ref_id": 1}], protocol=2)))
    assert read_pickle(refs) == [{"ref_id": 1}]


# --------------------------------------------------------------------------- run.output_dir


def test_output_dir_that_is_a_file_fails_at_start(load_sft, tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"run\.output_dir .*taken is a file, not a directory.*--options run\.output_dir="):
        load_sft(output_dir=a_file).check_local_paths()
    below = a_file / "run"
    with pytest.raises(ConfigError, match=r"run\.output_dir .*taken/run cannot be created: .*taken is a file"):
        load_sft(output_dir=below).check_local_paths()
    load_sft(output_dir=tmp_path / "new" / "run").check_local_paths()  # a directory to create: fine
    assert not (tmp_path / "new").exists()  # nothing created by the check


def test_unwritable_output_dir_fails_at_start(load_sft, tmp_path, monkeypatch):
    import tempfile

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refused)  # as for a non-root user without write access
    with pytest.raises(ConfigError, match=r"run\.output_dir .* is not writable \(Permission denied\)"):
        load_sft(output_dir=tmp_path).check_local_paths()


@pytest.mark.integration
def test_train_py_names_a_file_output_dir_before_building(small_world, tmp_path):
    from conftest import run_train, sft_options

    a_file = tmp_path / "outputs"
    a_file.write_text("")
    result = run_train(sft_options(small_world, a_file, "run.max_steps=1"), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "run.output_dir" in result.stderr and "is a file, not a directory" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- VQAv2 split


def vqav2(tmp_path: Path, images: list[str]) -> tuple[Path, Path, Path]:
    root = tmp_path / "coco"
    for name in images:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / name)
    questions = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    questions.write_text(json.dumps({"data_subtype": "val2014", "questions": [
        {"image_id": i, "question": f"q{i}?", "question_id": 10 * i} for i in (1, 2, 3)]}))
    annotations = tmp_path / "v2_mscoco_val2014_annotations.json"
    annotations.write_text(json.dumps({"data_subtype": "val2014", "annotations": [
        {"image_id": i, "question_id": 10 * i, "multiple_choice_answer": "yes", "answers": [{"answer": "yes"}]}
        for i in (1, 2, 3)]}))
    return root, questions, annotations


def build_vqa(root, questions, annotations, **params):
    return registry.get("builder", "vqa")(ann_path=str(annotations), question_path=str(questions),
                                          image_root=str(root), **params).build()


def test_vqav2_split_with_the_year_names_the_key_and_the_split_to_use(tmp_path):
    root, questions, annotations = vqav2(tmp_path, [f"COCO_val2014_{i:012d}.jpg" for i in (1, 2, 3)])
    with pytest.raises(ConfigError, match=r"split 'val2014'.*COCO_val20142014_000000000001\.jpg.*"
                                          r"with split 'val' they are .*set split: val"):
        build_vqa(root, questions, annotations, split="val2014")
    with pytest.raises(ConfigError, match=r"split 'train'.*with split 'val' they are"):
        build_vqa(root, questions, annotations, split="train")  # the default, on val questions
    assert build_vqa(root, questions, annotations, split="val")[0]["image"] == "COCO_val2014_000000000001.jpg"


def test_vqav2_split_found_from_the_directories_under_image_root(tmp_path):
    root, questions, annotations = vqav2(tmp_path, [f"images/valid/{i:06d}.png" for i in (1, 2, 3)])
    with pytest.raises(ConfigError, match=r"split 'val'.*with split 'valid' they are \('images/valid/000001\.png'\)"):
        build_vqa(root, questions, annotations, split="val", image_pattern="images/{split}/{image_id:06d}.png")


def test_vqav2_split_with_the_year_fails_even_without_the_images(tmp_path):
    root, questions, annotations = vqav2(tmp_path, [])
    with pytest.raises(ConfigError, match=r"split 'val2014'.*adds the year after \{split\} itself.*split: val\)"):
        build_vqa(root, questions, annotations, split="val2014")
    # images not there under any split: nothing to decide at start (each missing image is a counted skip)
    assert len(build_vqa(root, questions, annotations, split="val")) == 3


# --------------------------------------------------------------------------- EXIF orientation


def photo_with_orientation(orientation: int, fmt: str = "JPEG") -> bytes:
    pixels = np.zeros((24, 40, 3), dtype=np.uint8)
    pixels[:8, :8] = (255, 0, 0)  # a red corner, top left as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, exif=exif.tobytes(), **({"quality": 100} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_by_default(orientation, tmp_path):
    data = photo_with_orientation(orientation, "PNG")
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    as_stored = Image.open(io.BytesIO(data)).convert("RGB")
    image = load_image(tmp_path / "photo.png", data)
    default, qwen = CLIPImageProcessor(32), CLIPImageProcessor(32, exif_transpose=False)
    assert torch.equal(default(image), default(upright))
    assert torch.equal(qwen(image), qwen(as_stored))  # Qwen-VL's behaviour: the pixels as stored
    if orientation in (6, 8):  # a phone held upright: stored on its side
        assert upright.size == (24, 40) and as_stored.size == (40, 24)


def test_exif_transpose_is_a_typed_image_processor_key(load_sft):
    assert load_sft().model.image_processor.params["exif_transpose"] is True
    assert load_sft("model.image_processor.exif_transpose=false").model.image_processor.params["exif_transpose"] is False
    with pytest.raises(ConfigError, match="exif_transpose"):
        load_sft("model.image_processor.exif_transpose=sideways")


def test_a_phone_photo_reaches_the_model_upright(tmp_path):
    from lavis.processors.sample import SampleProcessor

    path = tmp_path / "phone.jpg"
    path.write_bytes(photo_with_orientation(6))

    class Encoder:
        num_image_tokens = 1

        def encode_prompt(self, prompt, target, images=None):
            return type("Enc", (), {"input_ids": [1], "labels": [1], "images": ["phone.jpg"]})()

    upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    sample = SampleProcessor(Encoder(), CLIPImageProcessor(32), truncate=False)({"prompt": "", "target": "",
                                                                                  "image_root": str(tmp_path)})
    assert torch.equal(sample["pixel_values"][0], CLIPImageProcessor(32)(upright))


# --------------------------------------------------------------------------- decompression bombs


def test_image_over_pillows_limit_is_a_named_skip(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for size in ((40, 30), (100, 100)):  # over the limit (Pillow warns), over twice the limit (Pillow refuses)
        path = tmp_path / f"big_{size[0]}.png"
        Image.new("RGB", size).save(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with pytest.raises(SkipSample) as caught:
                load_image(path)
        assert caught.value.reason == "image_too_large"
        assert path.name in str(caught.value) and "MAX_IMAGE_PIXELS" in str(caught.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(SkipSample, match=r"40 x 30 = 1,200 pixels, over 1,000"):
            load_image(tmp_path / "big_40.png")
        with pytest.raises(SkipSample, match=r"image_too_large|Image size \(10000 pixels\)"):
            load_image(tmp_path / "big_100.png", (tmp_path / "big_100.png").read_bytes())  # bytes from a shard
    small = tmp_path / "small.png"
    Image.new("RGB", (20, 20)).save(small)
    assert load_image(small).size == (20, 20)
