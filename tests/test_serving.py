"""The serving engine behind the web demo and the API: batched answers equal one-at-a-time answers and
model.chat's, streams add up to the answer, per-request limits, cancellation, bad input, errors."""

from __future__ import annotations

import threading

import pytest
from PIL import Image

import lavis
from lavis.serving.engine import ChatEngine, SamplingOptions

QUESTIONS = ["What colour is the shape?", "Give the bounding box of the shape.", "Describe the image.",
             "How many shapes are there?", "Is there a circle?"]


@pytest.fixture(scope="module")
def model(chat_run):
    model, _ = lavis.load_model(chat_run, device="cpu")
    return model


def turn(small_world, k: int, question: str) -> list[dict[str, str]]:
    image = small_world / "images" / "test" / f"{k:06d}.png"
    return [{"role": "user", "content": f"Picture 1: <img>{image}</img>\n{question}"}]


def test_batched_answers_equal_one_at_a_time_and_model_chat(model, small_world):
    conversations = [turn(small_world, k, q) for k, q in enumerate(QUESTIONS)]
    options = SamplingOptions(max_new_tokens=16)
    answers = {}
    for batch_size in (1, 8):
        engine = ChatEngine(model, max_batch_size=batch_size, batch_window_s=0.2)
        try:
            completions = [engine.submit(c, options) for c in conversations]
            answers[batch_size] = [c.result(timeout=120) for c in completions]
            assert max(engine.batch_sizes) == min(batch_size, len(conversations))
        finally:
            engine.close()
    assert answers[8] == answers[1]
    for conversation, answer in zip(conversations, answers[1]):
        assert model.chat(conversation[0]["content"], max_new_tokens=16)[0] == answer


def test_a_stream_adds_up_to_the_answer_and_each_request_keeps_its_own_limit(model, small_world):
    engine = ChatEngine(model, max_batch_size=4, batch_window_s=0.2)
    try:
        short = engine.submit(turn(small_world, 0, QUESTIONS[2]), SamplingOptions(max_new_tokens=3))
        long = engine.submit(turn(small_world, 1, QUESTIONS[2]), SamplingOptions(max_new_tokens=24))
        pieces = list(long.stream(timeout=120))
        assert "".join(pieces) == long.result() == long.text
        assert short.result(timeout=120) is not None and len(short.tokens) <= 3
        if short.finish_reason == "length":
            assert len(short.tokens) == 3
        assert engine.batch_sizes == [2]  # both in one batch, each cut at its own limit
        assert long.finish_reason in ("stop", "length") and len(long.tokens) <= 24
    finally:
        engine.close()


def test_requests_with_other_sampling_settings_go_in_other_batches(model, small_world):
    engine = ChatEngine(model, max_batch_size=8, batch_window_s=0.2)
    try:
        greedy = [engine.submit(turn(small_world, k, QUESTIONS[0]), SamplingOptions(max_new_tokens=4)) for k in range(2)]
        sampled = engine.submit(turn(small_world, 2, QUESTIONS[0]),
                                SamplingOptions(max_new_tokens=4, do_sample=True, temperature=0.7, top_p=0.9))
        for completion in [*greedy, sampled]:
            completion.result(timeout=120)
        assert sorted(engine.batch_sizes) == [1, 2]
    finally:
        engine.close()


def test_a_cancelled_request_ends_as_cancelled_and_others_finish(model, small_world):
    engine = ChatEngine(model, max_batch_size=2, batch_window_s=0.2)
    try:
        cancelled = engine.submit(turn(small_world, 0, QUESTIONS[2]), SamplingOptions(max_new_tokens=64))
        kept = engine.submit(turn(small_world, 1, QUESTIONS[2]), SamplingOptions(max_new_tokens=8))
        cancelled.cancel()
        kept.result(timeout=120)
        cancelled.result(timeout=120)
        assert cancelled.finish_reason == "cancelled" and kept.finish_reason in ("stop", "length")
    finally:
        engine.close()


def test_bad_input_fails_at_submit_naming_it(model, small_world, tmp_path):
    engine = ChatEngine(model)
    try:
        with pytest.raises(FileNotFoundError, match="missing.png"):
            engine.submit([{"role": "user", "content": f"<img>{tmp_path / 'missing.png'}</img>What is it?"}])
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"not a png")
        with pytest.raises(FileNotFoundError, match="broken.png"):
            engine.submit([{"role": "user", "content": f"<img>{broken}</img>What is it?"}])
        with pytest.raises(ValueError, match="exceed the model's"):
            engine.submit(turn(small_world, 0, "hi"), SamplingOptions(max_new_tokens=100_000))
        with pytest.raises(ValueError, match="temperature"):
            SamplingOptions(do_sample=True, temperature=0)
        in_memory = {"upload-1.png": Image.new("RGB", (32, 32), (250, 0, 0))}
        answer = engine.submit([{"role": "user", "content": "Picture 1: <img>upload-1.png</img>\nWhat is it?"}],
                               SamplingOptions(max_new_tokens=4), images=in_memory).result(timeout=120)
        assert isinstance(answer, str)
    finally:
        engine.close()


def test_a_failing_generation_reaches_its_callers_and_the_engine_keeps_serving(model, small_world, monkeypatch):
    engine = ChatEngine(model, max_batch_size=1)
    real, calls = model.generate, []

    def fail_once(*args, **kwargs):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", fail_once)
    try:
        failed = engine.submit(turn(small_world, 0, QUESTIONS[0]), SamplingOptions(max_new_tokens=4))
        with pytest.raises(RuntimeError, match="simulated"):
            failed.result(timeout=120)
        assert failed.finish_reason == "error"
        assert isinstance(engine.submit(turn(small_world, 0, QUESTIONS[0]), SamplingOptions(max_new_tokens=4)).result(timeout=120), str)
        assert calls == ["lavis-chat-engine"] * 2  # the model runs on the engine's thread only
    finally:
        engine.close()
