"""After ``from-hf``, our model computes what transformers' own ``Qwen2VLForConditionalGeneration`` /
``Qwen2_5_VLForConditionalGeneration`` computes on the same checkpoint, each side fed by its own
processor: transformers' ``AutoProcessor`` with the chat template (its ``mm_token_type_ids`` included,
without which transformers falls back to 1-D positions) and ours (``qwen2_vl_image`` + the chat
encoding of :func:`lavis.models.chat.encode_chat`).

Checked: the same token ids, patches and grids; the same 3-D position ids; fp32 logits within 1e-4 on
one image at two sizes (one not square), two images of different sizes in one prompt, and text only;
the same 12 greedy tokens; and from-hf then to-hf loads in transformers with the source's logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_qwen2_vl import tiny_checkpoint
from PIL import Image

import lavis
from lavis.interop.convert.hf_qwen2_vl import from_hf, to_hf
from lavis.models.chat import encode_chat
from lavis.models.generation import left_pad
from lavis.processors.conversation import image_reference

PROMPTS = {  # case -> (image sizes (width, height), question)
    "one image, not square": ([(90, 60)], "Describe the picture."),
    "the same image larger": ([(180, 120)], "Describe the picture."),
    "two images of different sizes": ([(60, 60), (70, 130)], "Which one is taller?"),
    "text only": ([], "Say something about pictures."),
}


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def models(request, tmp_path_factory):
    """(transformers' model and processor on a tiny random checkpoint, our model loaded from its from-hf output)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    # std 0.2 (not transformers' 0.02): the logits then depend visibly on the positions and the images
    src = tiny_checkpoint(root / "hf", kind, "released", scale=0.2)
    cls = Qwen2VLForConditionalGeneration if kind == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    reference = cls.from_pretrained(src, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None  # 12 tokens whatever they are
    processor = AutoProcessor.from_pretrained(src)
    ours, _ = lavis.load_model(from_hf(src, root / "ours"), device="cpu")
    ours.source = src  # for the round trip below
    return reference, processor, ours


def both_inputs(processor, model, case: str):
    sizes, question = PROMPTS[case]
    images = {f"picture{k}.png": picture(size, k) for k, size in enumerate(sizes)}
    content = [{"type": "image", "image": image} for image in images.values()] + [{"type": "text", "text": question}]
    theirs = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=True, add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")
    text = "".join(image_reference(name) for name in images) + question
    ids, pixels = encode_chat(model, [{"role": "user", "content": text}], images=images, read_files=False)
    return theirs, ids, pixels


@pytest.mark.parametrize("case", list(PROMPTS))
def test_logits_positions_and_inputs_equal_transformers(models, case):
    reference, processor, ours = models
    theirs, ids, pixels = both_inputs(processor, ours, case)
    assert ids == theirs["input_ids"][0].tolist()
    input_ids = torch.tensor([ids])
    mask = torch.ones_like(input_ids)
    if "pixel_values" in theirs:
        assert torch.equal(pixels.grid_thw, theirs["image_grid_thw"])
        assert (pixels.patches - theirs["pixel_values"]).abs().max() < 1e-5
    else:
        assert pixels.num_images == 0
    positions = ours.llm_position_ids(input_ids, mask, None, pixels)
    expected = reference.model.get_rope_index(theirs["input_ids"], theirs["mm_token_type_ids"],
                                              image_grid_thw=theirs.get("image_grid_thw"), attention_mask=theirs["attention_mask"])[0]
    assert torch.equal(positions, expected)
    with torch.no_grad():
        want = reference(**theirs).logits
        got = ours(input_ids=input_ids, attention_mask=mask, pixel_values=pixels).logits
        flat = ours(input_ids=input_ids, attention_mask=mask, pixel_values=pixels,
                    position_ids=torch.arange(len(ids))[None].expand(3, 1, -1)).logits
    assert (got - want).abs().max() < 1e-4
    if pixels.num_images:  # the test can fail: 1-D positions give other logits
        assert (flat - want).abs().max() > 1e-3


def test_the_same_12_greedy_tokens(models):
    reference, processor, ours = models
    for case in PROMPTS:
        theirs, ids, pixels = both_inputs(processor, ours, case)
        with torch.no_grad():
            want = reference.generate(**theirs, max_new_tokens=12, do_sample=False)[0, len(ids):]
        pad = ours.processors.tokenizer.pad_id
        input_ids, mask = left_pad([ids], pad)
        got = ours.generate(input_ids, mask, pixels, max_new_tokens=12, stop_ids=(), pad_id=pad)[0]
        assert got.tolist() == want.tolist(), case


def test_a_to_hf_directory_loads_in_transformers_with_the_same_logits(models, tmp_path):
    """from-hf then to-hf: transformers loads the result and computes the source's logits, bit for bit."""
    reference, processor, ours = models
    back = to_hf(Path(ours.source).parent / "ours", tmp_path / "back")
    again = type(reference).from_pretrained(back, dtype=torch.float32).eval()
    theirs, _, _ = both_inputs(processor, ours, "two images of different sizes")
    with torch.no_grad():
        assert torch.equal(again(**theirs).logits, reference(**theirs).logits)


def test_a_video_prompt_equals_transformers(models):
    """A video given as decoded frames (so the decoder is not part of the comparison): the same ids, patches,
    grid and 3-D positions (Qwen2.5-VL's time-aligned ones), logits within 1e-4, the same 12 greedy tokens."""
    reference, processor, ours = models
    frames = torch.randint(0, 256, (4, 56, 84, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    theirs = processor(text=[text], videos=[frames], return_tensors="pt", do_sample_frames=False)
    ours.processors.video.frames_fps = 24.0  # transformers' rate for frames given without metadata
    try:
        ids, pixels = encode_chat(ours, [{"role": "user", "content": "<video>clip</video>What moves?"}], images={"clip": frames},
                                  read_files=False)
    finally:
        ours.processors.video.frames_fps = None
    assert ids == theirs["input_ids"][0].tolist()
    assert torch.equal(pixels.grid_thw, theirs["video_grid_thw"])
    assert (pixels.patches - theirs["pixel_values_videos"]).abs().max() < 1e-5
    input_ids = torch.tensor([ids])
    mask = torch.ones_like(input_ids)
    expected = reference.model.get_rope_index(theirs["input_ids"], theirs["mm_token_type_ids"], video_grid_thw=theirs["video_grid_thw"],
                                              second_per_grid_ts=theirs.get("second_per_grid_ts"),
                                              attention_mask=theirs["attention_mask"])[0]
    assert torch.equal(ours.llm_position_ids(input_ids, mask, None, pixels), expected)
    with torch.no_grad():
        assert (ours(input_ids=input_ids, attention_mask=mask, pixel_values=pixels).logits - reference(**theirs).logits).abs().max() < 1e-4
        want = reference.generate(**theirs, max_new_tokens=12, do_sample=False)[0, len(ids):]
    pad = ours.processors.tokenizer.pad_id
    got = ours.generate(*left_pad([ids], pad), pixels, max_new_tokens=12, stop_ids=(), pad_id=pad)[0]
    assert got.tolist() == want.tolist()


def test_the_serving_engine_batches_native_resolution_requests(models, tmp_path):
    """lavis.serve / lavis.web's engine on a converted Qwen2-VL-family model: requests with pictures of
    different sizes, a video and none, batched together, answer as each does alone."""
    from lavis.serving.engine import ChatEngine, SamplingOptions

    _, _, ours = models
    for k, size in enumerate([(90, 60), (60, 130)]):
        picture(size, k).save(tmp_path / f"p{k}.png")
    from helpers import moving_squares, write_video

    write_video(tmp_path / "clip.mp4", moving_squares(8), rate=4)
    conversations = [[{"role": "user", "content": text}] for text in (
        f"<img>{tmp_path / 'p0.png'}</img>What is it?", f"<img>{tmp_path / 'p1.png'}</img><img>{tmp_path / 'p0.png'}</img>Compare.",
        "No picture here.", f"<video>{tmp_path / 'clip.mp4'}</video>What moves?")]
    options = SamplingOptions(max_new_tokens=6)
    answers = {}
    for batch_size in (1, 4):
        engine = ChatEngine(ours, max_batch_size=batch_size, batch_window_s=0.2)
        try:
            answers[batch_size] = [c.result(timeout=120) for c in [engine.submit(conv, options) for conv in conversations]]
            assert max(engine.batch_sizes) == batch_size
        finally:
            engine.close()
    assert answers[4] == answers[1]
