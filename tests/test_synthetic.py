"""Tests of the synthetic world and the embedded tokenizer."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lavis.datasets.synthetic import world
from lavis.datasets.synthetic.world import (
    COLOURS,
    Scene,
    box_text,
    describe,
    ensure_world,
    generate_scenes,
    parse_boxes,
    ref_phrase,
    render,
)

REPO = Path(__file__).resolve().parents[1]
TINY = {"train": 24, "val": 6}
GROUNDING = re.compile(r"<ref>[^<]+</ref><box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>")


# --------------------------------------------------------------------------- scenes


def test_generate_scenes_deterministic_and_valid():
    a = generate_scenes(3, 200)
    assert a == generate_scenes(3, 200)
    assert a != generate_scenes(4, 200)
    assert a != generate_scenes(3, 200, split="val")
    counts = {len(s.objects) for s in a}
    assert counts == {1, 2}
    for s in a:
        assert (s.width, s.height) == (128, 128)
        for o in s.objects:
            x1, y1, x2, y2 = o.bbox
            assert 0 <= x1 < x2 <= s.width and 0 <= y1 < y2 <= s.height
            assert 0.25 * 128 - 1 <= x2 - x1 <= 0.45 * 128 + 1
            assert o.colour in COLOURS and o.shape in world.SHAPES
            assert o.position == world.position_word(o.bbox, s.width, s.height)
        if len(s.objects) == 2:
            p, q = s.objects
            assert not world._overlap(p.bbox, q.bbox, 0)
            assert p.colour != q.colour and p.shape != q.shape


def test_render_colours():
    for s in generate_scenes(0, 30):
        img = render(s)
        assert img.size == (128, 128) and img.mode == "RGB"
        assert render(s).tobytes() == img.tobytes()
        for o in s.objects:
            x1, y1, x2, y2 = o.bbox
            assert img.getpixel(((x1 + x2) // 2, (y1 + y2) // 2)) == COLOURS[o.colour]
        # a pixel outside every box is background
        free = [
            (x, y)
            for x, y in [(0, 0), (127, 0), (0, 127), (127, 127), (64, 0), (0, 64)]
            if not any(o.bbox[0] <= x < o.bbox[2] and o.bbox[1] <= y < o.bbox[3] for o in s.objects)
        ]
        assert free
        for xy in free:
            assert img.getpixel(xy) == tuple(s.background)


def test_scene_roundtrip_and_text_helpers():
    s = generate_scenes(1, 10)[0]
    assert Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    o = s.objects[0]
    assert ref_phrase(o) == f"the {o.colour} {o.shape}"
    assert o.colour in describe(s) and o.shape in describe(s)
    two = Scene(
        "x.png",
        128,
        128,
        [
            world.Obj("circle", "red", (0, 0, 40, 40), "top left"),
            world.Obj("square", "orange", (80, 80, 120, 120), "bottom right"),
        ],
    )
    assert describe(two) == "a red circle at the top left and an orange square at the bottom right"


def test_box_text_rule():
    assert box_text((0, 0, 64, 128), 128, 128) == "(0,0),(500,999)"
    assert box_text((1, 3, 127, 100), 128, 128) == "(7,23),(992,781)"  # int() truncates
    assert box_text((10, 20, 200, 100), 200, 100) == "(50,200),(999,999)"  # clamped to 999
    assert parse_boxes("<ref>a</ref><box>(7,23),(992,781)</box>") == [(7, 23, 992, 781)]
    assert world.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- world on disk


def _user_turns(rec):
    return [t["value"] for t in rec["conversations"] if t["from"] == "user"]


def test_ensure_world_formats(tmp_path):
    root = ensure_world(tmp_path / "w", seed=5, sizes=TINY)
    marker = json.loads((root / "WORLD.json").read_text())
    assert marker["seed"] == 5 and marker["sizes"] == TINY
    assert not list(tmp_path.glob(".w.*"))  # no temporary leftovers
    for split, n in TINY.items():
        assert len(list((root / "images" / split).glob("*.png"))) == n
        scenes = world.load_scenes(root, split)
        assert scenes == generate_scenes(5, n, split)
        sft = json.loads((root / f"sft_{split}.json").read_text())
        assert len(sft) == n
        for rec in sft:
            conv = rec["conversations"]
            assert [t["from"] for t in conv] == ["user", "assistant"] * (len(conv) // 2)
            first, *rest = _user_turns(rec)
            paths = re.findall(r"<img>(.*?)</img>", first)
            for p in paths:
                assert (root / p).is_file()
            assert not any("<img>" in u for u in rest)
            task = rec["meta"]["task"]
            if task == "text":
                assert not paths
            else:
                assert first.startswith(f"Picture 1: <img>{paths[0]}</img>\n")
            if task == "multi_image":
                assert len(paths) == 2 and "\nPicture 2: <img>" in first
            for turn, answer in zip(rec["meta"]["turns"], conv[1::2]):
                assert turn["answer"] == answer["value"]
                if turn["task"] == "grounding":
                    assert GROUNDING.fullmatch(answer["value"])
                elif turn["qtype"] in world.ANSWER_VOCAB:
                    assert answer["value"] in world.ANSWER_VOCAB[turn["qtype"]]
        llava = json.loads((root / f"llava_{split}.json").read_text())
        assert len(llava) == min(n, world.LLAVA_MAX_RECORDS)
        for rec in llava:
            assert (root / rec["image"]).is_file()
            assert rec["conversations"][0]["from"] == "human"
            assert rec["conversations"][0]["value"].startswith("<image>\n")
            assert rec["conversations"][1]["from"] == "gpt"


def test_sft_mix_covers_all_tasks():
    scenes = generate_scenes(0, 400)
    recs = world.build_sft_records(scenes, 0, "train")
    assert recs == world.build_sft_records(scenes, 0, "train")
    assert {r["meta"]["task"] for r in recs} == set(world.SFT_TASK_WEIGHTS)
    multi = [r for r in recs if r["meta"]["task"] == "multi_turn"]
    assert multi and all(2 <= len(r["conversations"]) // 2 <= 3 for r in multi)


def test_ensure_world_no_regeneration(tmp_path):
    root = ensure_world(tmp_path / "w", seed=0, sizes=TINY)
    mtime = (root / "WORLD.json").stat().st_mtime_ns
    assert ensure_world(tmp_path / "w", seed=0, sizes=dict(TINY)) == root
    assert (root / "WORLD.json").stat().st_mtime_ns == mtime
    # different sizes: the old world is replaced
    ensure_world(tmp_path / "w", seed=0, sizes={"train": 3})
    assert json.loads((root / "WORLD.json").read_text())["sizes"] == {"train": 3}
    assert not (root / "scenes_val.json").exists()


def test_ensure_world_refuses_foreign_directory(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        ensure_world(tmp_path / "w", sizes=TINY)
    assert (tmp_path / "w" / "precious.txt").read_text() == "keep me"


def test_ensure_world_concurrent(tmp_path):
    sizes = {"train": 150, "val": 20}
    code = (
        "import sys; from lavis.datasets.synthetic.world import ensure_world; "
        f"ensure_world(sys.argv[1], seed=2, sizes={sizes!r})"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "w")], cwd=REPO) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    root = tmp_path / "w"
    assert json.loads((root / "WORLD.json").read_text())["sizes"] == sizes
    assert len(list((root / "images" / "train").glob("*.png"))) == 150
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # temp copies cleaned up


def test_ensure_world_lost_race(tmp_path, monkeypatch):
    """Another process finishes first: our rename fails, we keep the winner's world."""
    root = tmp_path / "w"
    original = world.write_world

    def write_then_someone_else_wins(out, seed, sizes):
        original(out, seed, sizes)
        if not root.exists():
            other = tmp_path / "other"
            other.mkdir()
            original(other, seed, sizes)
            (other / "winner").write_text("1")
            other.rename(root)

    monkeypatch.setattr(world, "write_world", write_then_someone_else_wins)
    assert ensure_world(root, seed=1, sizes=TINY) == root
    assert (root / "winner").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


# --------------------------------------------------------------------------- tokenizer

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def shipped():
    from lavis.processors.tokenizer import EMBEDDED_TOKENIZER_PATH

    return tokenizers.Tokenizer.from_file(str(EMBEDDED_TOKENIZER_PATH))


@pytest.mark.parametrize(
    "text",
    [
        "Picture 1: <img>images/train/000012.png</img>\nWhat colour is the circle?",
        "你好,我是Qwen-VL",
        (
            "<|im_start|>user\nFind it.<|im_end|>\n<|im_start|>assistant\n"
            "<ref>the red circle</ref><box>(1,2),(3,4)</box><|im_end|><|endoftext|>"
        ),
        "  odd   spacing\t\ttabs\r\n and ünïcödé 🙂 ",
    ],
)
def test_tokenizer_roundtrip(shipped, text):
    ids = shipped.encode(text).ids
    assert shipped.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_special_tokens(shipped):
    from lavis.datasets.synthetic.tokenizer import VOCAB_SIZE
    from lavis.processors.tokenizer import SPECIAL_TOKENS

    ids = [shipped.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(VOCAB_SIZE, VOCAB_SIZE + len(SPECIAL_TOKENS)))
    assert shipped.get_vocab_size() == VOCAB_SIZE + len(SPECIAL_TOKENS)
    enc = shipped.encode("x<ref>the red circle</ref><box>(1,2),(3,4)</box><imgpad><imgpad>")
    for tok in ("<ref>", "</ref>", "<box>", "</box>"):
        assert tok in enc.tokens
    assert enc.tokens[-2:] == ["<imgpad>", "<imgpad>"]


def test_tokenizer_digits_single(shipped):
    enc = shipped.encode("(123,456),(789,999) 2024")
    digits = [t for t in enc.tokens if any(c.isdigit() for c in t)]
    assert digits == list("123456789999") + list("2024")
    assert len(shipped.encode(" red circle").ids) == 2  # the corpus words are merged


def test_tokenizer_loads_with_transformers():
    transformers = pytest.importorskip("transformers")
    from lavis.processors.tokenizer import EMBEDDED_TOKENIZER_PATH

    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(EMBEDDED_TOKENIZER_PATH))
    text = "Picture 1: <img>a.png</img>\n你好 <ref>x</ref>"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.convert_tokens_to_ids("<|im_end|>") == 1026


def test_shipped_tokenizer_is_current(shipped):
    from lavis.datasets.synthetic.tokenizer import build_tokenizer

    fresh = json.loads(build_tokenizer().to_str())
    assert fresh == json.loads(shipped.to_str()), "run: python -m lavis.datasets.synthetic.tokenizer"


def test_ensure_world_without_sizes_keeps_an_existing_world(tmp_path):
    root = world.ensure_world(tmp_path / "w", sizes={"train": 3, "val": 1, "test": 1})
    stamp = (root / "WORLD.json").stat().st_mtime_ns
    assert world.ensure_world(root) == root
    assert (root / "WORLD.json").stat().st_mtime_ns == stamp
    assert len(json.loads((root / "sft_train.json").read_text())) == 3
