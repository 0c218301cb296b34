"""Conversations -> token ids and label masks, in Qwen-VL's byte-compatible ChatML (DESIGN §6).

The data is the fine-tuning example of Qwen-VL's README (``tests/fixtures/qwen_vl_finetune_example.json``:
the reference file with its three image paths, one of them an https URL, replaced by local PNGs that
the tests draw). Each conversation is checked with the embedded tokenizer and, when
``../shared/reference/qwen-vl-chat/qwen.tiktoken`` exists, with Qwen's real vocabulary. Under
``run.label_policy=qwen_vl_finetune`` the same file gives exactly what Qwen-VL's ``finetune.py``
made of it (``tests/fixtures/qwen_vl_finetune_labels.json``; how: ``make_qwen_vl_finetune_labels.py``).

``pytest -s tests/test_conversation.py`` prints the decoded supervised spans.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REFERENCE
from PIL import Image

from lavis.common.config import ConfigError
from lavis.datasets.builders.base import AnnotationError
from lavis.datasets.builders.conversation import LLaVAConversationBuilder, QwenVLConversationBuilder
from lavis.datasets.collate import PadCollator
from lavis.processors.conversation import IGNORE_INDEX, IMAGE_SPAN, ConversationEncoder, EncodedText, image_reference, pictures
from lavis.processors.errors import SkipSample
from lavis.processors.image import CLIP_MEAN, CLIP_STD, CLIPImageProcessor
from lavis.processors.sample import SampleProcessor
from lavis.processors.tokenizer import HFTokenizer, QwenTiktoken

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "qwen_vl_finetune_example.json"
# What Qwen-VL's finetune.py preprocess made of FIXTURE (see make_qwen_vl_finetune_labels.py there).
FINETUNE_PY_OUTPUT = REPO / "tests" / "fixtures" / "qwen_vl_finetune_labels.json"
QWEN_TIKTOKEN = REFERENCE / "qwen-vl-chat" / "qwen.tiktoken"

SYSTEM = "You are a helpful assistant."
N = 4  # <imgpad> tokens per image in these tests
IMAGE_SIZE = 8

# The fixture's image paths -> the reference's, and the colour each test image is drawn in.
IMAGES = {
    "assets/demo.png": ("https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen-VL/assets/demo.jpeg", (255, 0, 0)),
    "assets/mm_tutorial/Chongqing.png": ("assets/mm_tutorial/Chongqing.jpeg", (0, 255, 0)),
    "assets/mm_tutorial/Beijing.png": ("assets/mm_tutorial/Beijing.jpeg", (0, 0, 255)),
}

# What the fixture holds, written out independently of it: (role, content) per turn.
TURNS = {
    "identity_0": [
        ("user", "你好"),
        ("assistant", "我是Qwen-VL,一个支持视觉输入的大模型。"),
    ],
    "identity_1": [
        ("user", "Picture 1: <img>assets/demo.png</img>\n图中的狗是什么品种?"),
        ("assistant", "图中是一只拉布拉多犬。"),
        ("user", "框出图中的格子衬衫"),
        ("assistant", "<ref>格子衬衫</ref><box>(588,499),(725,789)</box>"),
    ],
    "identity_2": [
        (
            "user",
            "Picture 1: <img>assets/mm_tutorial/Chongqing.png</img>\n"
            "Picture 2: <img>assets/mm_tutorial/Beijing.png</img>\n图中都是哪",
        ),
        ("assistant", "第一张图片是重庆的城市天际线,第二张图片是北京的天际线。"),
    ],
}

# The ChatML text of each conversation (DESIGN §6), written out by hand.
CHATML = {
    "identity_0": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n我是Qwen-VL,一个支持视觉输入的大模型。<|im_end|>\n"
    ),
    "identity_1": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <img>assets/demo.png</img>\n图中的狗是什么品种?<|im_end|>\n"
        "<|im_start|>assistant\n图中是一只拉布拉多犬。<|im_end|>\n"
        "<|im_start|>user\n框出图中的格子衬衫<|im_end|>\n"
        "<|im_start|>assistant\n<ref>格子衬衫</ref><box>(588,499),(725,789)</box><|im_end|>\n"
    ),
    "identity_2": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <img>assets/mm_tutorial/Chongqing.png</img>\n"
        "Picture 2: <img>assets/mm_tutorial/Beijing.png</img>\n图中都是哪<|im_end|>\n"
        "<|im_start|>assistant\n第一张图片是重庆的城市天际线,第二张图片是北京的天际线。<|im_end|>\n"
    ),
}

# Decoded supervised spans: each assistant content followed by its <|im_end|>, nothing else.
SUPERVISED = {
    "identity_0": ["我是Qwen-VL,一个支持视觉输入的大模型。<|im_end|>"],
    "identity_1": [
        "图中是一只拉布拉多犬。<|im_end|>",
        "<ref>格子衬衫</ref><box>(588,499),(725,789)</box><|im_end|>",
    ],
    "identity_2": ["第一张图片是重庆的城市天际线,第二张图片是北京的天际线。<|im_end|>"],
}

PATHS = {
    "identity_0": [],
    "identity_1": ["assets/demo.png"],
    "identity_2": ["assets/mm_tutorial/Chongqing.png", "assets/mm_tutorial/Beijing.png"],
}
IDS = list(TURNS)


def expand_images(text: str, n: int = N) -> str:
    """``<img>path</img>`` -> ``<img>`` + n x ``<imgpad>`` + ``</img>``."""
    return re.sub(r"<img>.*?</img>", "<img>" + "<imgpad>" * n + "</img>", text, flags=re.S)


def supervised_runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of labels != IGNORE_INDEX."""
    runs, start = [], None
    for i, label in enumerate(list(labels) + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def decoded_spans(tok, enc: EncodedText) -> list[str]:
    return [tok.decode(enc.input_ids[s:e]) for s, e in supervised_runs(enc.labels)]


def messages(conv_id: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in TURNS[conv_id]]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    return HFTokenizer()


@pytest.fixture(scope="module")
def qwen_tok() -> QwenTiktoken:
    if not QWEN_TIKTOKEN.is_file():
        pytest.skip(f"{QWEN_TIKTOKEN} not found (the shared reference is absent)")
    return QwenTiktoken(str(QWEN_TIKTOKEN))


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """The fixture's three images as 8x8 solid-colour PNGs (red, green, blue)."""
    root = tmp_path_factory.mktemp("images")
    for rel, (_, colour) in IMAGES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), colour).save(root / rel)
    return root


@pytest.fixture(scope="module")
def records(image_root):
    return QwenVLConversationBuilder(str(FIXTURE), str(image_root)).build()


def make_encoder(tokenizer, max_len: int = 4096, n: int = N, label_policy: str = "assistant") -> ConversationEncoder:
    return ConversationEncoder(tokenizer, num_image_tokens=n, system_message=SYSTEM, max_len=max_len, label_policy=label_policy)


# --------------------------------------------------------------------------- the fixture file


def test_fixture_is_the_reference_with_local_images():
    reference = REFERENCE / "qwen_vl_finetune_example.json"
    if not reference.is_file():
        pytest.skip(f"{reference} not found")
    fixture_text = FIXTURE.read_text(encoding="utf-8")
    for local, (original, _) in IMAGES.items():
        fixture_text = fixture_text.replace(local, original)
    assert json.loads(fixture_text) == json.loads(reference.read_text(encoding="utf-8"))


def test_builder_reads_the_finetune_example(records, image_root):
    assert len(records) == 3
    assert records.image_root == str(image_root)
    for index, conv_id in enumerate(IDS):
        item = records[index]
        assert item["id"] == conv_id
        assert item["messages"] == messages(conv_id)
        assert item["image_root"] == str(image_root)


# --------------------------------------------------------------------------- the embedded tokenizer


def test_embedded_tokenizer_special_tokens(tok):
    # Each of Qwen-VL's special tokens is one id of its own, distinct from the others and from text.
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<ref>", "</ref>", "<box>", "</box>",
             "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"]
    ids = [tok.token_id(name) for name in names]
    assert len(set(ids)) == len(names)
    for name, i in zip(names, ids):
        assert tok.encode(name) == [i]
        assert tok.decode([i]) == name
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == tuple(ids[:3])
    assert (tok.img_start_id, tok.img_end_id, tok.img_pad_id) == tuple(ids[9:])
    assert tok.pad_id == tok.eod_id
    assert tok.stop_ids == (tok.im_end_id, tok.eod_id)


@pytest.mark.parametrize("conv_id", IDS)
def test_chatml_layout_and_labels_embedded(tok, conv_id):
    enc = make_encoder(tok).encode_messages(messages(conv_id))
    check_encoding(tok, enc, conv_id)


def check_encoding(tok, enc: EncodedText, conv_id: str) -> list[str]:
    ids, labels = enc.input_ids, enc.labels
    assert len(ids) == len(labels)

    # The whole text: ChatML with each image expanded to <img> + N <imgpad> + </img>.
    assert tok.decode(ids) == expand_images(CHATML[conv_id])

    # Token layout, id by id: every turn is <|im_start|> role \n content <|im_end|> \n.
    nl, roles = tok.encode("\n"), ["system"] + [role for role, _ in TURNS[conv_id]]
    starts = [i for i, t in enumerate(ids) if t == tok.im_start_id]
    ends = [i for i, t in enumerate(ids) if t == tok.im_end_id]
    assert len(starts) == len(ends) == len(roles)
    assert starts[0] == 0
    for k, (start, end, role) in enumerate(zip(starts, ends, roles)):
        head = [tok.im_start_id] + tok.encode(role) + nl
        assert ids[start : start + len(head)] == head
        assert ids[end : end + 1 + len(nl)] == [tok.im_end_id] + nl
        next_start = starts[k + 1] if k + 1 < len(starts) else len(ids)
        assert end + 1 + len(nl) == next_start  # nothing between a turn's "\n" and the next <|im_start|>
    system_content = ids[len([tok.im_start_id] + tok.encode("system") + nl) : ends[0]]
    assert system_content == tok.encode(SYSTEM)

    # Images: in order, each span exactly <img> + N <imgpad> + </img>, pads == N x images.
    assert enc.images == PATHS[conv_id]
    assert ids.count(tok.img_pad_id) == N * len(PATHS[conv_id])
    assert ids.count(tok.img_start_id) == ids.count(tok.img_end_id) == len(PATHS[conv_id])
    assert len(enc.image_spans) == len(PATHS[conv_id])
    for s, e in enc.image_spans:
        assert ids[s:e] == [tok.img_start_id] + [tok.img_pad_id] * N + [tok.img_end_id]

    # Labels: the token itself where supervised, and the supervised runs are exactly the
    # assistant contents, each with its closing <|im_end|>.
    for t, label in zip(ids, labels):
        assert label in (IGNORE_INDEX, t)
    spans = decoded_spans(tok, enc)
    print(f"\n{type(tok).__name__} {conv_id} supervised spans: {spans}")
    assert spans == SUPERVISED[conv_id]
    runs = supervised_runs(labels)
    assistant_turns = [k for k, role in enumerate(roles) if role == "assistant"]
    for (s, e), k in zip(runs, assistant_turns):
        # Each run starts right after "<|im_start|>assistant\n" and ends on that turn's <|im_end|>.
        assert s == starts[k] + 1 + len(tok.encode("assistant")) + len(nl)
        assert e == ends[k] + 1

    # Never supervised: image tokens, <|im_start|>, role names, newlines after <|im_end|>, system/user text.
    supervised = {i for s, e in runs for i in range(s, e)}
    for i, t in enumerate(ids):
        if t in (tok.img_start_id, tok.img_pad_id, tok.img_end_id, tok.im_start_id):
            assert labels[i] == IGNORE_INDEX
    for k, role in enumerate(roles):
        next_start = starts[k + 1] if k + 1 < len(starts) else len(ids)
        turn = set(range(starts[k], next_start))
        if role != "assistant":
            assert not (turn & supervised), f"{role} turn {k} has supervised tokens"
    return spans


def test_system_turn_replaces_default_and_generation_prompt(tok):
    encoder = make_encoder(tok)
    enc = encoder.encode_messages(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], add_generation_prompt=True
    )
    assert tok.decode(enc.input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert set(enc.labels) == {IGNORE_INDEX}


def test_unknown_role_in_encoder(tok):
    with pytest.raises(ValueError, match=r"unknown role 'robot'; expected one of system, user, assistant"):
        make_encoder(tok).encode_turn("robot", "beep")


# --------------------------------------------------------------------------- the real Qwen vocabulary


def test_qwen_tiktoken_ids(qwen_tok):
    q = qwen_tok
    assert len(q) == 151860
    assert q.encode("你好") == [108386]
    specials = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|extra_0|>": 151646,
                "<|extra_204|>": 151850, "<ref>": 151851, "</ref>": 151852, "<box>": 151853, "</box>": 151854,
                "<quad>": 151855, "</quad>": 151856, "<img>": 151857, "</img>": 151858, "<imgpad>": 151859}
    for name, i in specials.items():
        assert q.token_id(name) == i
        assert q.encode(name) == [i]
        assert q.decode([i]) == name
    assert (q.eod_id, q.im_start_id, q.im_end_id) == (151643, 151644, 151645)
    assert (q.img_start_id, q.img_end_id, q.img_pad_id) == (151857, 151858, 151859)
    # Digits are split one per token (Qwen's pattern): '5' 20, '8' 23.
    assert q.encode("588") == [20, 23, 23]
    assert q.encode("(588,499)") == [7, 20, 23, 23, 11, 19, 24, 24, 8]
    # The ChatML head of every Qwen conversation.
    head = q.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert head == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]
    assert q.encode("assistant") == [77091]


@pytest.mark.parametrize("conv_id", IDS)
def test_chatml_layout_and_labels_qwen(qwen_tok, tok, conv_id):
    q = qwen_tok
    enc = make_encoder(q).encode_messages(messages(conv_id))
    spans = check_encoding(q, enc, conv_id)
    # Same spans as with the embedded tokenizer.
    assert spans == decoded_spans(tok, make_encoder(tok).encode_messages(messages(conv_id)))
    # Real ids: the system turn and the first user turn's opening are Qwen-VL-Chat's own.
    assert enc.input_ids[:14] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]
    if conv_id == "identity_0":
        # user "你好", then "<|im_start|>assistant\n" and the supervised answer.
        assert enc.input_ids[14:20] == [108386, 151645, 198, 151644, 77091, 198]
        answer = q.encode("我是Qwen-VL,一个支持视觉输入的大模型。")
        assert enc.labels[20 : 20 + len(answer) + 1] == answer + [151645]
        assert enc.labels[: 20] == [IGNORE_INDEX] * 20
        assert enc.labels[20 + len(answer) + 1 :] == [IGNORE_INDEX]  # the final "\n"
    if conv_id == "identity_1":
        # "Picture 1: " then the image span: <img> 151857, N x 151859, </img> 151858.
        assert enc.input_ids[14:19] == [24669, 220, 16, 25, 220]
        assert enc.input_ids[19 : 21 + N] == [151857] + [151859] * N + [151858]
        box = q.encode("<ref>格子衬衫</ref><box>(588,499),(725,789)</box>")
        assert box[0] == 151851 and box[-1] == 151854
        assert enc.labels[-len(box) - 2 :] == box + [151645, IGNORE_INDEX]


# --------------------------------------------------------------------------- sample processor


def test_sample_processor_loads_images_in_order(tok, records):
    processor = SampleProcessor(make_encoder(tok), CLIPImageProcessor(IMAGE_SIZE))
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    for index, conv_id in enumerate(IDS):
        sample = processor(records[index])
        enc = make_encoder(tok).encode_messages(messages(conv_id))
        assert sample["input_ids"].tolist() == enc.input_ids
        assert sample["labels"].tolist() == enc.labels
        assert sample["input_ids"].dtype == sample["labels"].dtype == torch.long
        pixels = sample["pixel_values"]
        assert pixels.shape == (len(PATHS[conv_id]), 3, IMAGE_SIZE, IMAGE_SIZE)
        for k, path in enumerate(PATHS[conv_id]):
            colour = torch.tensor(IMAGES[path][1], dtype=torch.float32) / 255.0
            expected = ((colour - mean) / std).view(3, 1, 1).expand(3, IMAGE_SIZE, IMAGE_SIZE)
            torch.testing.assert_close(pixels[k], expected)


# --------------------------------------------------------------------------- Qwen-VL's finetune.py labels

QWEN_IMAGE_SPAN = 256  # Qwen-VL's tokenizer: the path's bytes + <imgpad>s, 256 ids between <img> and </img>


@pytest.fixture(scope="module")
def finetune_py_output() -> dict:
    return json.loads(FINETUNE_PY_OUTPUT.read_text(encoding="utf-8"))


def image_spans(tok, ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each <img>…</img> span, found by its two tags."""
    starts = [i for i, t in enumerate(ids) if t == tok.img_start_id]
    ends = [i + 1 for i, t in enumerate(ids) if t == tok.img_end_id]
    return list(zip(starts, ends))


def outside(ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    inside = {i for s, e in spans for i in range(s, e)}
    return [t for i, t in enumerate(ids) if i not in inside]


def test_finetune_py_output_was_made_from_this_example(finetune_py_output):
    made_by = finetune_py_output["made_by"]
    assert made_by["transformers"] == "4.32.0"
    assert made_by[FIXTURE.name] == hashlib.sha256(FIXTURE.read_bytes()).hexdigest()
    if QWEN_TIKTOKEN.is_file():
        assert made_by[QWEN_TIKTOKEN.name] == hashlib.sha256(QWEN_TIKTOKEN.read_bytes()).hexdigest()
    assert [s["id"] for s in finetune_py_output["samples"]] == IDS


def test_qwen_vl_finetune_policy_equals_finetune_py(qwen_tok, records, finetune_py_output):
    """Builder -> sample processor -> collator with ``label_policy=qwen_vl_finetune`` and 256 pads per
    image, against finetune.py's ``preprocess`` with Qwen's own tokenizer on the same file: labels
    equal, ids equal outside image spans, spans at the same places with the same length."""
    q, ref = qwen_tok, finetune_py_output
    encoder = make_encoder(q, max_len=ref["max_len"], n=QWEN_IMAGE_SPAN, label_policy="qwen_vl_finetune")
    batch = PadCollator(q.pad_id)([SampleProcessor(encoder, CLIPImageProcessor(IMAGE_SIZE))(r) for r in records])
    width = batch["input_ids"].shape[1]
    assert (ref["pad_token_id"], ref["ignore_index"]) == (q.pad_id, IGNORE_INDEX)
    assert batch["pixel_values"].shape[0] == sum(len(PATHS[conv_id]) for conv_id in IDS)
    for row, (conv_id, theirs) in enumerate(zip(IDS, ref["samples"])):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        assert labels == theirs["labels"][:width]
        assert batch["attention_mask"][row].tolist() == theirs["attention_mask"][:width]
        # finetune.py pads to max_len, the collator to the batch's longest, with the same values.
        rest = ref["max_len"] - width
        assert theirs["input_ids"][width:] == [q.pad_id] * rest and theirs["labels"][width:] == [IGNORE_INDEX] * rest
        spans = image_spans(q, theirs["input_ids"])
        assert image_spans(q, ids) == spans and len(spans) == len(PATHS[conv_id])
        assert all(e - s == QWEN_IMAGE_SPAN + 2 for s, e in spans)
        assert outside(ids, spans) == outside(theirs["input_ids"][:width], spans)
        for (s, e), path in zip(spans, PATHS[conv_id]):
            # Inside a span Qwen writes the path's bytes, then pads; we write pads only.
            assert theirs["input_ids"][s + 1 : s + 1 + len(path)] == list(path.encode())
            assert ids[s + 1 : e - 1] == [q.img_pad_id] * QWEN_IMAGE_SPAN


@pytest.mark.parametrize("conv_id", IDS)
def test_qwen_vl_finetune_policy_adds_only_the_turn_marks(tok, conv_id):
    """Over the default: every turn's <|im_start|>, <|im_end|> and closing "\n", nothing else."""
    default = make_encoder(tok).encode_messages(messages(conv_id))
    enc = make_encoder(tok, label_policy="qwen_vl_finetune").encode_messages(messages(conv_id))
    assert enc.input_ids == default.input_ids
    added = [i for i, (a, b) in enumerate(zip(default.labels, enc.labels)) if a != b]
    assert all(default.labels[i] == IGNORE_INDEX and enc.labels[i] == enc.input_ids[i] for i in added)
    ends = [i for i, t in enumerate(enc.input_ids) if t == tok.im_end_id]
    starts = [i for i, t in enumerate(enc.input_ids) if t == tok.im_start_id]
    roles = ["system"] + [role for role, _ in TURNS[conv_id]]
    non_assistant_ends = [i for i, role in zip(ends, roles) if role != "assistant"]
    assert added == sorted(starts + non_assistant_ends + [i + 1 for i in ends])


def test_qwen_vl_finetune_policy_on_a_given_system_turn(tok):
    # finetune.py has no system role in its data; a given system turn is labelled as its default one.
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}]
    enc = make_encoder(tok, label_policy="qwen_vl_finetune").encode_messages(conv)
    assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == (
        "<|im_start|><|im_end|>\n" * 2 + "<|im_start|>Hello.<|im_end|>\n"
    )


def test_unknown_label_policy_lists_the_valid_ones(tok):
    with pytest.raises(ValueError, match=r"unknown label_policy 'qwen'; expected one of assistant, qwen_vl_finetune"):
        make_encoder(tok, label_policy="qwen")


def test_label_policy_is_a_run_key_given_to_the_encoder(load_sft, tok):
    from lavis.tasks.sft import LanguageModelingTask

    model, processors = SimpleNamespace(image_tokens=N), SimpleNamespace(tokenizer=tok, image=None, video=None)
    for option, policy in (((), "assistant"), (("run.label_policy=qwen_vl_finetune",), "qwen_vl_finetune")):
        cfg = load_sft(*option)
        assert cfg.run.label_policy == policy
        assert LanguageModelingTask(cfg).sample_processor(model, processors).encoder.label_policy == policy
    with pytest.raises(ConfigError, match=r"run.label_policy: 'qwen' is not one of 'assistant', 'qwen_vl_finetune'"):
        load_sft("run.label_policy=qwen")


def test_qwen_tiktoken_normalises_to_nfc(qwen_tok):
    # As Qwen's tokenization_qwen.py: unicodedata.normalize("NFC", text) before encoding.
    composed, decomposed = "Café déjà vu", "Cafe\u0301 de\u0301ja\u0300 vu"
    assert composed != decomposed
    assert qwen_tok.encode(decomposed) == qwen_tok.encode(composed)
    assert qwen_tok.decode(qwen_tok.encode(decomposed)) == composed


# --------------------------------------------------------------------------- truncation


def full_identity_1(tok) -> EncodedText:
    return make_encoder(tok).encode_messages(messages("identity_1"))


def test_truncate_keeps_short_samples_whole(tok):
    full = full_identity_1(tok)
    same = make_encoder(tok, max_len=len(full.input_ids)).truncate(full)
    assert same.input_ids == full.input_ids and same.labels == full.labels
    assert same.images == ["assets/demo.png"]


@pytest.mark.parametrize("where", ["after_img_start", "middle", "before_img_end"])
def test_truncate_inside_image_span_skips(tok, where):
    full = full_identity_1(tok)
    (s, e), = full.image_spans
    cut = {"after_img_start": s + 1, "middle": (s + e) // 2, "before_img_end": e - 1}[where]
    with pytest.raises(SkipSample, match="cut inside an image") as info:
        make_encoder(tok, max_len=cut).truncate(full)
    assert info.value.reason == "too_long"


def test_truncate_after_image_keeps_it(tok):
    full = full_identity_1(tok)
    (s, e), = full.image_spans
    first_end = full.input_ids.index(tok.im_end_id, e)  # the first user turn's <|im_end|>
    first_answer_end = full.input_ids.index(tok.im_end_id, first_end + 1)  # the first answer's
    cut = first_answer_end + 1
    out = make_encoder(tok, max_len=cut).truncate(full)
    assert out.input_ids == full.input_ids[:cut]
    assert out.labels == full.labels[:cut]
    assert out.images == ["assets/demo.png"]
    assert out.image_spans == [(s, e)]
    assert decoded_spans(tok, out) == ["图中是一只拉布拉多犬。<|im_end|>"]
    # A cut inside the answer keeps the supervised prefix.
    out = make_encoder(tok, max_len=cut - 2).truncate(full)
    assert out.labels == full.labels[: cut - 2]
    assert tok.decode([t for t in out.labels if t != IGNORE_INDEX]) == tok.decode(full.input_ids[cut - 1 - len(
        tok.encode("图中是一只拉布拉多犬。")) : cut - 2])


@pytest.mark.parametrize("where", ["at_img_end", "before_answer"])
def test_truncate_leaving_no_target_skips(tok, where):
    full = full_identity_1(tok)
    (s, e), = full.image_spans
    first_supervised = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    cut = {"at_img_end": e, "before_answer": first_supervised}[where]
    with pytest.raises(SkipSample, match="no target left") as info:
        make_encoder(tok, max_len=cut).truncate(full)
    assert info.value.reason == "too_long"


def test_truncate_exactly_before_an_image_drops_it(tok, image_root):
    # An answered text turn, then an image turn: a cut right at <img> keeps the first answer, no image.
    conv = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好!"},
        {"role": "user", "content": "Picture 1: <img>assets/demo.png</img>\n这是什么?"},
        {"role": "assistant", "content": "红色。"},
    ]
    encoder = make_encoder(tok)
    full = encoder.encode_messages(conv)
    (s, e), = full.image_spans
    out = make_encoder(tok, max_len=s).truncate(full)
    assert out.images == [] and out.image_spans == []
    assert tok.img_start_id not in out.input_ids and tok.img_pad_id not in out.input_ids
    assert decoded_spans(tok, out) == ["你好!<|im_end|>"]
    # Through the sample processor: no image tensor for the dropped image.
    processor = SampleProcessor(make_encoder(tok, max_len=s), CLIPImageProcessor(IMAGE_SIZE))
    sample = processor({"messages": conv, "image_root": str(image_root)})
    assert sample["input_ids"].tolist() == full.input_ids[:s]
    assert sample["pixel_values"].shape == (0, 3, IMAGE_SIZE, IMAGE_SIZE)
    # One token more and the cut falls inside the span.
    with pytest.raises(SkipSample) as info:
        processor.encoder.max_len = s + 1
        processor({"messages": conv, "image_root": str(image_root)})
    assert info.value.reason == "too_long"


# --------------------------------------------------------------------------- LLaVA conversion


def write_json(path: Path, data) -> str:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return str(path)


def test_llava_placeholder_becomes_picture(tmp_path, tok):
    ann = write_json(tmp_path / "llava.json", [
        {
            "id": "000000033471",
            "image": "coco/train2017/000000033471.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
                {"from": "gpt", "value": "The bus in the image is white and red."},
                {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                {"from": "gpt", "value": "The back of the bus features an advertisement."},
            ],
        },
    ])
    records = LLaVAConversationBuilder(ann, "/data/llava").build()
    assert len(records) == 1
    item = records[0]
    assert item["id"] == "000000033471"
    assert item["image_root"] == "/data/llava"
    assert item["messages"] == [
        {"role": "user", "content": "Picture 1: <img>coco/train2017/000000033471.jpg</img>\n"
                                    "What are the colors of the bus in the image?"},
        {"role": "assistant", "content": "The bus in the image is white and red."},
        {"role": "user", "content": "What feature can be seen on the back of the bus?"},
        {"role": "assistant", "content": "The back of the bus features an advertisement."},
    ]
    enc = make_encoder(tok).encode_messages(item["messages"])
    assert enc.images == ["coco/train2017/000000033471.jpg"]
    assert tok.decode(enc.input_ids).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nPicture 1: <img>"
        + "<imgpad>" * N + "</img>\nWhat are the colors of the bus in the image?<|im_end|>\n"
    )
    assert decoded_spans(tok, enc) == [
        "The bus in the image is white and red.<|im_end|>",
        "The back of the bus features an advertisement.<|im_end|>",
    ]


def test_llava_placeholders_numbered_in_order(tmp_path):
    ann = write_json(tmp_path / "llava.json", [
        {
            "id": "two",
            "image": ["a.jpg", "b.jpg"],
            "conversations": [
                {"from": "human", "value": "Compare <image>\nwith\n<image>"},
                {"from": "gpt", "value": "Same."},
            ],
        },
        {
            "id": "text-only",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
        },
    ])
    records = LLaVAConversationBuilder(ann).build()
    assert records[0]["messages"][0] == {
        "role": "user", "content": "Compare Picture 1: <img>a.jpg</img>\nwith\nPicture 2: <img>b.jpg</img>\n",
    }
    assert records[1]["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert records[1]["id"] == "text-only"


def test_llava_image_without_placeholder_goes_first(tmp_path):
    ann = write_json(tmp_path / "llava.json", [
        {
            "id": "no-placeholder",
            "image": "x/y.png",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "What is shown?"},
                {"from": "gpt", "value": "A cat."},
            ],
        },
    ])
    msgs = LLaVAConversationBuilder(ann).build()[0]["messages"]
    assert msgs == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Picture 1: <img>x/y.png</img>\nWhat is shown?"},
        {"role": "assistant", "content": "A cat."},
    ]


@pytest.mark.parametrize(
    "image, value, counts",
    [
        ("a.jpg", "<image>\n<image>\nTwo?", "2 <image> placeholders for 1 images"),
        (["a.jpg", "b.jpg", "c.jpg"], "<image>\nThree?", "1 <image> placeholders for 3 images"),
    ],
)
def test_llava_placeholder_count_mismatch(tmp_path, image, value, counts):
    record = {"id": "bad", "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "x"}]}
    if image is not None:
        record["image"] = image
    good = {"id": "good", "image": "g.jpg", "conversations": [
        {"from": "human", "value": "<image>\nOk?"}, {"from": "gpt", "value": "Ok."}]}
    ann = write_json(tmp_path / "llava.json", [good, record])
    with pytest.raises(AnnotationError) as info:
        LLaVAConversationBuilder(ann).build()
    assert str(info.value) == f"{ann}: record 1 (id 'bad'): {counts}"


# --------------------------------------------------------------------------- the image text forms


def test_pictures_are_numbered_as_qwen_vl_numbers_them():
    assert image_reference("a b/c.png") == "<img>a b/c.png</img>"
    assert pictures(["a.png", "b.png"]) == "Picture 1: <img>a.png</img>\nPicture 2: <img>b.png</img>\n"
    assert pictures(["c.png"], first=3) == "Picture 3: <img>c.png</img>\n"  # numbered on after a history's pictures
    assert IMAGE_SPAN.findall(pictures(["a.png", "b.png"])) == ["a.png", "b.png"]


def test_the_image_text_forms_are_written_in_one_place():
    """Builders, evaluation, inference and the synthetic world call image_reference / pictures: no other
    module spells ``<img>{...}</img>`` or ``Picture {n}:`` itself."""
    home = Path(__file__).resolve().parents[1] / "lavis" / "processors" / "conversation.py"
    spelled = re.compile(r"""f["'][^"'\n]*(<img>\{|Picture \{[^}]*\}: )""")
    elsewhere = [f"{path.relative_to(home.parents[2])}:{n}"
                 for path in home.parents[1].rglob("*.py") if path != home
                 for n, line in enumerate(path.read_text().splitlines(), 1) if spelled.search(line)]
    assert not elsewhere
    assert spelled.search(home.read_text())  # the pattern does find the one home
