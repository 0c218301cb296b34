"""Property-based tests: random and mutated records, conversations, box strings and shard members.

Whatever the input, the only outcomes are a sample, a counted skip, or an error that names the file
(and the record): never another exception. Derandomized, so every CI run tries the same cases.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lavis.datasets.builders.base import AnnotationError
from lavis.datasets.builders.conversation import LLaVAConversationBuilder, QwenVLConversationBuilder
from lavis.datasets.builders.webdataset import WebDatasetCaptionSource
from lavis.processors.boxes import box_problems, parse_boxes
from lavis.processors.conversation import ConversationEncoder
from lavis.processors.errors import SkipSample
from lavis.processors.image import CLIPImageProcessor
from lavis.processors.sample import SampleProcessor
from lavis.processors.tokenizer import HFTokenizer


def cases(n: int) -> settings:
    """``n`` examples, the same on every run."""
    return settings(
        max_examples=n, derandomize=True, database=None, deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


BOX_ALPHABET = "<>/()[],-0123456789 boxquadref\n"
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2000) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["user", "assistant", "system", "human", "gpt", "bot", "", None, 3])
turn_text = st.text(alphabet=BOX_ALPHABET + "Picture1:<img>a.png</img>\nimage", max_size=60)
turns = st.lists(
    st.one_of(st.fixed_dictionaries({"from": roles, "value": turn_text}), json_values), max_size=4
)
random_record = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"id": st.one_of(st.text(max_size=5), st.integers()), "conversations": turns},
        optional={"image": st.one_of(st.text(max_size=6), st.lists(st.text(max_size=6), max_size=3), json_values)},
    ),
)


def well_formed(user: str, assistant: str) -> st.SearchStrategy:
    """A record of the builder's own format whose texts are random (boxes, tags, placeholders)."""
    return st.fixed_dictionaries({
        "id": st.text(max_size=5),
        "conversations": st.tuples(turn_text, turn_text).map(
            lambda t: [{"from": user, "value": t[0]}, {"from": assistant, "value": t[1]}]
        ),
    })


def record_files(user: str, assistant: str) -> st.SearchStrategy:
    """Mostly files of well-formed records (so that builds succeed and the texts are checked), and files
    with random or mutated records among them (so that the refusals are exercised)."""
    good = well_formed(user, assistant)
    return st.one_of(st.lists(good, min_size=1, max_size=5), st.lists(st.one_of(good, random_record), max_size=5))


@cases(1000)
@given(st.text(alphabet=BOX_ALPHABET, max_size=80))
def test_box_text_parsers_never_raise(text):
    assert isinstance(box_problems(text), list)
    for box in parse_boxes(text):
        assert len(box) == 4


@pytest.mark.parametrize(
    "builder, data",
    [(QwenVLConversationBuilder, record_files("user", "assistant")), (LLaVAConversationBuilder, record_files("human", "gpt"))],
    ids=["qwen_vl", "llava"],
)
@cases(400)
@given(st.data())
def test_conversation_builders_build_or_name_the_file_and_record(builder, data, draw):
    data = draw.draw(data)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ann.json"
        path.write_text(json.dumps(data, allow_nan=True))
        try:
            built = builder(str(path)).build()
        except AnnotationError as err:
            assert str(path) in str(err)
            event("refused, naming the file")
            return
        event(f"built, {min(len(built), 2)}+ records")
        for record in built.records:
            assert isinstance(record["id"], str) and record["messages"]
            assert all(not box_problems(m["content"]) for m in record["messages"])


@pytest.fixture(scope="module")
def sample_processor():
    tokenizer = HFTokenizer(path=None)
    encoder = ConversationEncoder(tokenizer, num_image_tokens=4, system_message="You are a helpful assistant.", max_len=96)
    return SampleProcessor(encoder, CLIPImageProcessor(image_size=8))


@cases(300)
@given(st.lists(st.tuples(st.sampled_from(["user", "assistant", "system"]), turn_text), min_size=1, max_size=4))
def test_the_sample_processor_gives_a_sample_or_a_counted_skip(sample_processor, turns_):
    record = {"id": "x", "image_root": "/nonexistent", "messages": [{"role": r, "content": c} for r, c in turns_]}
    try:
        sample = sample_processor(record)
    except SkipSample as skip:
        assert skip.reason
        event(f"skipped: {skip.reason}")
        return
    except AnnotationError:
        event("refused")
        return  # a record the builders refuse at start (no assistant turn, ...)
    event("a sample")
    assert len(sample["input_ids"]) == len(sample["labels"]) <= 96


shard_samples = st.lists(
    st.tuples(st.sampled_from(["000001", "000002", "a/000003", ".hidden", "noext", "./000004"]),
              st.lists(st.sampled_from(["jpg", "txt", "json", "png", "seg.png", ""]), min_size=1, max_size=3)),
    max_size=5,
)
captions = st.one_of(st.text(alphabet="abc xyz", max_size=10).map(str.encode), st.binary(max_size=12))


@cases(500)
@given(shard_samples, st.booleans(), st.randoms(use_true_random=False), captions, st.none() | st.integers(0, 12000))
def test_shards_give_records_counted_skips_or_a_named_refusal(samples, shuffle, rng, payload, cut):
    members = [(stem, ext) for stem, exts in samples for ext in exts]
    if shuffle:  # members out of sample order (tar -cf of an unsorted directory)
        rng.shuffle(members)
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "shard.tar"
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for stem, ext in members:
                info = tarfile.TarInfo(f"{stem}.{ext}" if ext else stem)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        data = buffer.getvalue()
        shard.write_bytes(data if cut is None else data[:cut])  # cut: a shard that breaks off
        source = WebDatasetCaptionSource([str(shard)], 0, False, ["jpg", "png"], ["txt", "json"], "caption")
        try:
            out = list(source.iterate(0, 0, 0, 1))
        except AnnotationError as err:
            assert str(shard) in str(err)
            event("refused, naming the shard")
            return
        event(f"{sum('skipped' not in item for item in out) > 0} records, {sum('skipped' in item for item in out) > 0} skips")
        for item in out:
            assert ("skipped" in item and item["id"]) or {"id", "prompt", "target", "image_bytes"} <= set(item)
