"""Video entries in conversation data, in the forms Qwen2-VL's and LLaVA-Video's data use: LLaVA's JSON with a
``video`` key (LLaVA-Video-178K writes ``<image>`` in a video record, Qwen2.5-VL's ``qwen-vl-finetune`` writes
``<video>``), the message form of Qwen2-VL's model card (qwen-vl-utils; ms-swift's placeholder form too), a video
file, a directory of frames or a list of frame files. Each form becomes the expected ChatML text; through the
sample processor a video gives its grid's pad tokens and patches; frames equal the file they came from; bad input
is a named skip or an AnnotationError naming the record.

The example records are written out after the released ones (paths shortened); the videos are tiny (64 x 48,
a moving square) and written with PyAV in ``tmp_path``."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import moving_squares, write_video
from PIL import Image

from lavis.common.config.merging import CONFIG_ROOT
from lavis.common.config.validation import constructor_args
from lavis.common.registry import registry
from lavis.datasets.builders.base import AnnotationError
from lavis.datasets.builders.conversation import LLaVAConversationBuilder, Qwen2VLMessagesBuilder
from lavis.processors.conversation import ConversationEncoder
from lavis.processors.errors import SkipSample
from lavis.processors.native_image import Qwen2VLImageProcessor
from lavis.processors.native_video import Qwen2VLVideoProcessor, frame_files
from lavis.processors.sample import SampleProcessor
from lavis.processors.tokenizer import HFTokenizer

av = pytest.importorskip("av")

SMALL = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 24)  # 64 x 48 frames -> 56 x 56: 4 x 4 patches a frame
SYSTEM = "You are a helpful assistant."


def write_json(path: Path, data) -> str:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return str(path)


def llava(tmp_path: Path, *records: dict, image_format: str = "qwen_vl", root: str = "") -> list[dict]:
    dataset = LLaVAConversationBuilder(write_json(tmp_path / "llava.json", list(records)), root,
                                       image_format=image_format).build()
    return [dataset[i] for i in range(len(dataset))]


def messages(tmp_path: Path, *records: dict, root: str = "") -> list[dict]:
    dataset = Qwen2VLMessagesBuilder(write_jsonl(tmp_path / "messages.jsonl", records), root).build()
    return [dataset[i] for i in range(len(dataset))]


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": who, "value": value} for who, value in pairs]


# --------------------------------------------------------------------------- LLaVA's JSON with videos

# LLaVA-Video-178K (0_30_s_academic_v0_1_cap_processed.json): a video record whose placeholder is <image>.
LLAVA_VIDEO = {
    "id": "v_nw8MpBwL508",
    "conversations": turns(("human", "<image>\nDescribe what's happening in the video."),
                           ("gpt", "A man stands in a gym and lifts a barbell.")),
    "data_source": "0_30_s_academic_v0_1",
    "video": "academic_source/activitynet/v_nw8MpBwL508.mp4",
}
# Qwen2.5-VL's qwen-vl-finetune (its README's video example): <video> in the human turn.
QWEN_VL_FINETUNE = {
    "video": "v_7bUu05RIksU.mp4",
    "conversations": turns(("human", "<video>\nWhat can be seen in the video?"), ("gpt", "People ride horses.")),
}


@pytest.mark.parametrize("image_format, first", [
    ("qwen_vl", "Video 1: <video>academic_source/activitynet/v_nw8MpBwL508.mp4</video>\nDescribe"),
    ("inline", "<video>academic_source/activitynet/v_nw8MpBwL508.mp4</video>\nDescribe"),
])
def test_llava_video_record_takes_its_image_placeholder_as_the_video(tmp_path, image_format, first):
    record = llava(tmp_path, LLAVA_VIDEO, image_format=image_format, root="/data/llava_video")[0]
    assert record["id"] == "v_nw8MpBwL508" and record["image_root"] == "/data/llava_video"
    assert record["messages"] == [
        {"role": "user", "content": f"{first} what's happening in the video."},
        {"role": "assistant", "content": "A man stands in a gym and lifts a barbell."},
    ]
    assert "videos" not in record  # a file needs no frame list


@pytest.mark.parametrize("image_format, content", [
    ("qwen_vl", "Video 1: <video>v_7bUu05RIksU.mp4</video>\nWhat can be seen in the video?"),
    ("inline", "<video>v_7bUu05RIksU.mp4</video>\nWhat can be seen in the video?"),
])
def test_qwen_vl_finetune_video_placeholder(tmp_path, image_format, content):
    assert llava(tmp_path, QWEN_VL_FINETUNE, image_format=image_format)[0]["messages"][0] == {"role": "user", "content": content}


def test_llava_frame_list_is_one_video_with_its_frames_in_the_record(tmp_path):
    frames = [f"frames/v_abc/{i:05d}.jpg" for i in range(1, 9)]
    record = llava(tmp_path, {"id": "f", "video": frames, "conversations": turns(("human", "<image>\nWhat moves?"),
                                                                                 ("gpt", "A square."))})[0]
    assert record["messages"][0]["content"] == "Video 1: <video>frames/v_abc#1</video>\nWhat moves?"
    assert record["videos"] == {"frames/v_abc#1": {"frames": frames}}


def test_llava_images_and_videos_together(tmp_path):
    both = {
        "id": "mixed", "image": ["a.jpg", "b.jpg"], "video": ["c.mp4", ["d/1.png", "d/2.png"]],
        "conversations": turns(("human", "<image>\n<video>\nIs <image> in <video>?"), ("gpt", "Yes.")),
    }
    unplaced = {"id": "first", "image": "a.jpg", "video": "clips/c.mp4",
                "conversations": turns(("system", "Be brief."), ("human", "Same?"), ("gpt", "No."))}
    mixed, first = llava(tmp_path, both, unplaced)
    # Pictures and videos are numbered apart, as Qwen2-VL's chat template numbers them (add_vision_id)
    assert mixed["messages"][0]["content"] == (
        "Picture 1: <img>a.jpg</img>\nVideo 1: <video>c.mp4</video>\n"
        "Is Picture 2: <img>b.jpg</img>\n in Video 2: <video>d#2</video>\n?")
    assert mixed["videos"] == {"d#2": {"frames": ["d/1.png", "d/2.png"]}}
    # no placeholder: before the first user turn, pictures then videos
    assert first["messages"][:2] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Picture 1: <img>a.jpg</img>\nVideo 1: <video>clips/c.mp4</video>\nSame?"}]
    inline = llava(tmp_path, both, unplaced, image_format="inline")
    assert inline[0]["messages"][0]["content"] == (
        "<img>a.jpg</img>\n<video>c.mp4</video>\nIs <img>b.jpg</img> in <video>d#2</video>?")
    assert inline[1]["messages"][1]["content"] == "<img>a.jpg</img><video>clips/c.mp4</video>Same?"


@pytest.mark.parametrize("keys, value, counts", [
    ({"video": "v.mp4"}, "<video>\n<video>\nTwo?", "2 <video> placeholders for 1 videos"),
    ({"video": "v.mp4"}, "<image>\n<image>\nTwo?", "2 <image> placeholders for 1 videos"),  # LLaVA-Video's form
    ({"video": ["a.mp4", "b.mp4"]}, "<video>\nTwo?", "1 <video> placeholders for 2 videos"),
    ({"image": "a.jpg", "video": "v.mp4"}, "<image>\n<image>\n<video>", "2 <image> placeholders for 1 images"),
    ({"image": "a.jpg", "video": ["v.mp4", "w.mp4"]}, "<image>\n<video>", "1 <video> placeholders for 2 videos"),
])
def test_placeholder_count_mismatch_names_the_record(tmp_path, keys, value, counts):
    bad = {"id": "bad", **keys, "conversations": turns(("human", value), ("gpt", "x"))}
    ann = write_json(tmp_path / "llava.json", [QWEN_VL_FINETUNE, bad])
    with pytest.raises(AnnotationError) as info:
        LLaVAConversationBuilder(ann).build()
    assert str(info.value) == f"{ann}: record 1 (id 'bad'): {counts}"


def test_bad_video_keys_name_the_record(tmp_path):
    for video, message in ((["a.mp4", "f/1.jpg"], "'video' must be a path, a list of frame images or a list of videos"),
                           ({"path": "a.mp4"}, "'video' must be a path"),
                           ("a<b>.mp4", "the video path 'a<b>.mp4' is empty or contains '<', '>' or a newline")):
        ann = write_json(tmp_path / "llava.json", [{"id": 7, "video": video, "conversations": turns(("human", "Hi"), ("gpt", "Hi."))}])
        with pytest.raises(AnnotationError, match=re.escape(f"{ann}: record 0 (id 7): {message}")):
            LLaVAConversationBuilder(ann).build()


# --------------------------------------------------------------------------- the message form

# Qwen2-VL's model card: a video file with qwen-vl-utils' per-video keys, and a list of frames (file:// paths).
MODEL_CARD_FILE = {"messages": [
    {"role": "user", "content": [
        {"type": "video", "video": "file:///path/to/video1.mp4", "max_pixels": 360 * 420, "fps": 1.0},
        {"type": "text", "text": "Describe this video."}]},
    {"role": "assistant", "content": "A red square crosses the screen."}]}
MODEL_CARD_FRAMES = {"messages": [
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
    {"role": "user", "content": [
        {"type": "video", "video": [f"file:///path/to/frame{i}.jpg" for i in range(1, 5)]},
        {"type": "text", "text": "Describe this video."}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A square."}]}]}
# An image beside a video, and transformers' chat-template keys ("path").
MIXED = {"id": "mixed", "messages": [
    {"role": "user", "content": [{"type": "image", "image": "pics/a.jpg"}, {"type": "text", "text": "Is this in "},
                                 {"type": "video", "path": "clips/b.mp4"}, {"type": "text", "text": "?"}]},
    {"role": "assistant", "content": "Yes."}]}
# ms-swift's form: placeholders in string contents, the record's images / videos lists.
MS_SWIFT = {"messages": [{"role": "user", "content": "<video>What happens in the video?"},
                         {"role": "assistant", "content": "A square moves right."}], "videos": ["/xxx/x.mp4"]}


def test_messages_forms_become_inline_spans(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        card_file, card_frames, mixed, swift = messages(tmp_path, MODEL_CARD_FILE, MODEL_CARD_FRAMES, MIXED, MS_SWIFT)
    assert card_file["id"] == "0" and card_file["messages"] == [
        {"role": "user", "content": "<video>/path/to/video1.mp4</video>Describe this video."},
        {"role": "assistant", "content": "A red square crosses the screen."}]
    assert card_file["videos"] == {"/path/to/video1.mp4": {"fps": 1.0}}  # the file sampled at 1 fps
    assert card_frames["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<video>/path/to#1</video>Describe this video."},
        {"role": "assistant", "content": "A square."}]
    assert card_frames["videos"] == {"/path/to#1": {"frames": [f"/path/to/frame{i}.jpg" for i in range(1, 5)]}}
    assert mixed["id"] == "mixed" and mixed["messages"][0]["content"] == (
        "<img>pics/a.jpg</img>Is this in <video>clips/b.mp4</video>?")
    assert "videos" not in mixed
    assert swift["messages"][0]["content"] == "<video>/xxx/x.mp4</video>What happens in the video?"
    # qwen-vl-utils' per-item pixel keys are not read: said once
    assert [r.getMessage() for r in caplog.records if "not read" in r.getMessage()] == [
        "qwen2_vl_messages: per-item keys max_pixels are not read; the model's image_processor / video_processor "
        "settings apply"]


def test_messages_fps_of_a_frame_list_is_its_frames_rate(tmp_path):
    record = {"messages": [{"role": "user", "content": [{"type": "video", "video": ["a/1.png", "a/2.png"], "fps": 4}]},
                           {"role": "assistant", "content": "x"}]}
    assert messages(tmp_path, record)[0]["videos"] == {"a#1": {"frames": ["a/1.png", "a/2.png"], "fps": 4.0, "frames_fps": 4.0}}


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}, {"role": "assistant", "content": "x"}]},
     "record 0, message 0: a content part is {'type': 'text', 'text'}, {'type': 'image', 'image'} or {'type': 'video', 'video'}"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "record 0, message 0: expected {'role': system|user|assistant"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": "v.mp4", "fps": 0}]},
                   {"role": "assistant", "content": "x"}]}, "record 0, message 0: a video's fps must be a positive number, got 0"),
    ({"id": "q", "messages": [{"role": "user", "content": "<video>\n<video>"}, {"role": "assistant", "content": "x"}],
      "videos": ["v.mp4"]}, "record 0 (id 'q'): 2 <video> placeholders for 1 videos"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "record 0: no assistant turn to learn from"),
    ({"conversations": []}, "record 0: expected an object with a 'messages' list"),
])
def test_bad_messages_name_the_record(tmp_path, record, message):
    ann = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(AnnotationError, match=re.escape(f"{ann}: {message}")):
        Qwen2VLMessagesBuilder(ann).build()


def test_messages_builder_registered_with_a_default_yaml_of_exactly_its_arguments():
    path = CONFIG_ROOT / "datasets" / "qwen2_vl_messages.yaml"
    text = path.read_text()
    cfg = yaml.safe_load(text)
    assert cfg.pop("builder") == "qwen2_vl_messages"
    assert registry.get("builder", "qwen2_vl_messages") is Qwen2VLMessagesBuilder
    assert list(cfg) == list(constructor_args(Qwen2VLMessagesBuilder, "builder"))
    for key in cfg:
        assert re.search(rf"^{key}:.*#", text, re.M), key


# --------------------------------------------------------------------------- through the sample processor


def save_frames(directory: Path, frames: np.ndarray, name: str = "{i:04d}.png") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / name.format(i=i) for i in range(len(frames))]
    for path, frame in zip(paths, frames):
        Image.fromarray(frame).save(path)
    return paths


def decode_all(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def sample_processor(**video) -> SampleProcessor:
    """Qwen2-VL-sized spans (t·h·w / 4 pads) with the embedded tokenizer: no model needed."""
    image = Qwen2VLImageProcessor(**SMALL)
    encoder = ConversationEncoder(HFTokenizer(), image.num_image_tokens, SYSTEM, max_len=4096)
    return SampleProcessor(encoder, image, truncate=False, video_processor=Qwen2VLVideoProcessor(**SMALL, **video))


def pads_per_span(processor: SampleProcessor, ids: torch.Tensor) -> list[int]:
    tok = processor.encoder.tok
    starts = (ids == tok.img_start_id).nonzero().flatten().tolist()
    ends = (ids == tok.img_end_id).nonzero().flatten().tolist()
    return [end - start - 1 for start, end in zip(starts, ends)]


def test_each_form_through_the_sample_processor(tmp_path):
    """A video file (10 frames at 4 fps: 4 kept at 2 fps, 2 temporal patches of 4 x 4 patches), its frames as a
    list and as a directory, and an image: each span holds its grid's t·h·w / 4 pads, the patches are its rows."""
    (tmp_path / "clips").mkdir()
    write_video(tmp_path / "clips" / "v1.mp4", moving_squares(10), rate=4)
    frames = save_frames(tmp_path / "frames" / "v1", moving_squares(6))
    Image.fromarray(moving_squares(1, 90, 60)[0]).save(tmp_path / "pic.png")
    rel = [str(p.relative_to(tmp_path)) for p in frames]
    data = llava(tmp_path, {
        "id": "all", "image": "pic.png", "video": ["clips/v1.mp4", rel, "frames/v1"],
        "conversations": turns(("human", "<image>\n<video>\n<video>\n<video>\nWhere does it go?"), ("gpt", "Right.")),
    }, root=str(tmp_path))
    processor = sample_processor()
    sample = processor(data[0])
    pixels = sample["pixel_values"]
    # the image, then the file (2 fps of 4 fps: 4 of 10 frames), the list and the directory (6 frames at fps: all)
    assert pixels.grid_thw.tolist() == [[1, 4, 6], [2, 4, 4], [3, 4, 4], [3, 4, 4]]  # 90 x 60 -> 84 x 56
    assert pads_per_span(processor, sample["input_ids"]) == [6, 8, 12, 12]
    assert pixels.patches.shape == (24 + 32 + 48 + 48, 3 * 2 * 14 * 14)
    assert pixels.second_per_grid.tolist() == [0.0, 1.25, 1.0, 1.0]  # 4 frames of 2.5 s: 1.6 fps, 2 frames a patch
    list_rows, dir_rows = pixels.patches[56:104], pixels.patches[104:]
    assert torch.equal(list_rows, dir_rows)  # a directory is its frames in order
    assert torch.equal(list_rows, processor.video_processor(torch.from_numpy(moving_squares(6))).patches)


def test_frames_equal_the_file_they_came_from(tmp_path):
    """The file's decoded frames as a directory (at the file's rate: ``frames_fps``) and, in the message form,
    the frames the file's sampling keeps with qwen-vl-utils' ``fps`` (their rate): the file's patches exactly."""
    clip = write_video(tmp_path / "clip.mp4", moving_squares(24), rate=12)
    decoded = decode_all(clip)
    paths = save_frames(tmp_path / "all", decoded, "frame_{i}.png")  # unpadded: natural order, not 1, 10, 11, ...
    assert frame_files(tmp_path / "all") == paths
    at_file_rate = Qwen2VLVideoProcessor(**SMALL, frames_fps=12)
    from_file = at_file_rate(clip)
    assert from_file.grid == (2, 4, 4) and from_file.second_per_grid == 1.0
    from_dir = at_file_rate(tmp_path / "all")
    assert torch.equal(from_dir.patches, from_file.patches) and from_dir.second_per_grid == 1.0

    kept = Qwen2VLVideoProcessor(**SMALL).sample_indices(24, 12)  # 4 frames at 2 fps
    record = {"messages": [
        {"role": "user", "content": [{"type": "video", "video": [f"all/frame_{i}.png" for i in kept], "fps": 2},
                                     {"type": "text", "text": "Where does it go?"}]},
        {"role": "assistant", "content": "Right."}]}
    file_record = {"messages": [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"},
                                                             {"type": "text", "text": "Where does it go?"}]},
                                {"role": "assistant", "content": "Right."}]}
    from_list, whole = (sample_processor()(r) for r in messages(tmp_path, record, file_record, root=str(tmp_path)))
    assert torch.equal(from_list["input_ids"], whole["input_ids"])
    assert torch.equal(from_list["pixel_values"].patches, whole["pixel_values"].patches)
    assert from_list["pixel_values"].grid_thw.tolist() == whole["pixel_values"].grid_thw.tolist() == [[2, 4, 4]]
    assert from_list["pixel_values"].second_per_grid.tolist() == whole["pixel_values"].second_per_grid.tolist() == [1.0]


def skip_reason(processor: SampleProcessor, record: dict) -> tuple[str, str]:
    with pytest.raises(SkipSample) as info:
        processor(record)
    return info.value.reason, str(info.value)


def test_bad_video_entries_are_named_skips(tmp_path):
    save_frames(tmp_path / "v", moving_squares(12))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no frames here")
    frames = [f"v/{i:04d}.png" for i in range(12)]
    gone = [*frames[:5], "v/missing.png", *frames[6:]]
    records = llava(tmp_path, *({"id": n, "video": v, "conversations": turns(("human", "<video>\nWhat?"), ("gpt", "x"))}
                                for n, v in enumerate([gone, "v", "nowhere", "empty", "nowhere.mp4"])),
                    image_format="inline", root=str(tmp_path))
    # frames at 12 fps sampled at 2: frame 5 is not among those kept, and the list is still refused
    processor = sample_processor(frames_fps=12)
    assert Qwen2VLVideoProcessor(**SMALL).sample_indices(12, 12) == [0, 3, 6, 9]
    reason, message = skip_reason(processor, records[0])
    assert reason == "missing_video" and f"video frame 5 of 12 not found: {tmp_path / 'v/missing.png'}" in message
    assert processor(records[1])["pixel_values"].grid_thw.tolist() == [[2, 4, 4]]  # the directory itself is fine
    assert skip_reason(processor, records[2])[0] == "missing_video"  # neither a file nor a directory
    reason, message = skip_reason(processor, records[3])
    assert reason == "empty_video" and "no frame images (.jpg, .jpeg, .png" in message and "empty" in message
    assert skip_reason(processor, records[4])[0] == "missing_video"
    # an empty frame list in the message form reaches the processor: a named skip, not a build error
    empty = {"messages": [{"role": "user", "content": [{"type": "video", "video": []}]}, {"role": "assistant", "content": "x"}]}
    assert skip_reason(processor, messages(tmp_path, empty, root=str(tmp_path))[0])[0] == "empty_video"
