"""The web chat demo (lavis.web): the conversation state without a browser, then the page itself served by
``python -m lavis.web`` and driven by headless Chromium (Debian's ``chromium`` and ``chromium-driver``;
without them the browser tests fail).

The browser test saves a screenshot to ``tmp_path``; with ``LAVIS_UPDATE_SCREENSHOT=1`` it replaces the
README's ``docs/web_demo.png``. ``LAVIS_WEB_CKPT`` serves another model than the 2-step ``chat_run``
(e.g. ``outputs/sft``, whose answers and boxes make a better picture).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO
from helpers import moving_squares, write_video
from hf_qwen2_vl import tiny_checkpoint
from PIL import Image, ImageChops
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import lavis
from lavis.interop.convert.hf_qwen2_vl import from_hf
from lavis.serving.boxes import PALETTE, draw_boxes
from lavis.serving.engine import ChatEngine, SamplingOptions
from lavis.serving.web import BadInput, Conversation, build_demo, stream_answer

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("LAVIS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LAVIS_CHROMEDRIVER", "/usr/bin/chromedriver")
MAX_NEW_TOKENS = 32  # the page's default in these tests
GREEDY = SamplingOptions(max_new_tokens=8)
BOXED = "<ref>the square</ref><box>(100,200),(500,600)</box>"


def picture_file(directory: Path, name: str, size: tuple[int, int] = (100, 50), colour=(255, 255, 255)) -> str:
    path = directory / name
    Image.new("RGB", size, colour).save(path)
    return str(path)


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is None


class FakeCompletion:
    """What ChatEngine.submit returns, with a scripted answer (pieces, then optionally an error)."""

    def __init__(self, pieces: list[str], error: Exception | None = None) -> None:
        self.pieces, self.error = pieces, error
        self.done = self.cancelled = False

    def stream(self) -> Iterator[str]:
        yield from self.pieces
        if self.error is not None:
            raise self.error
        self.done = True

    def cancel(self) -> None:
        self.cancelled = True


class FakeEngine:
    """Records what is submitted; answers each submit with the next scripted completion (or raises it)."""

    def __init__(self, *answers: FakeCompletion | Exception) -> None:
        self.answers = list(answers)
        self.submitted: list[tuple[list[dict[str, str]], SamplingOptions, dict[str, Image.Image]]] = []

    def submit(self, messages, options=None, images=None) -> FakeCompletion:
        self.submitted.append((messages, options, dict(images or {})))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


# ---------------------------------------------------------------------------------------------
# the conversation state


def test_pictures_are_numbered_on_across_turns_and_go_with_the_next_query(tmp_path):
    a, b, c = (picture_file(tmp_path, f"{name}.png") for name in "abc")
    conversation = Conversation()
    assert conversation.query("Hello") == "Hello"
    conversation.add_image(a)
    conversation.add_image(b)
    first = conversation.query("Which is brighter?")
    assert first == f"Picture 1: <img>{a}</img>\nPicture 2: <img>{b}</img>\nWhich is brighter?"
    conversation.commit(first, "The first.")
    assert conversation.query("And now?") == "And now?"  # sent pictures are not sent again
    conversation.add_image(c)
    second = conversation.query("And this one?")
    assert second == f"Picture 3: <img>{c}</img>\nAnd this one?"
    assert conversation.messages(second) == [
        {"role": "user", "content": first},
        {"role": "assistant", "content": "The first."},
        {"role": "user", "content": second},
    ]
    conversation.commit(second, "Darker.")
    assert (conversation.images, conversation.pending) == ([a, b, c], [])


def test_stream_answer_streams_the_response_and_commits_the_turn(tmp_path):
    path = picture_file(tmp_path, "red.png", colour=(200, 0, 0))
    engine = FakeEngine(FakeCompletion(["The ", "shape", " is red."]), FakeCompletion([BOXED]))
    conversation = Conversation()
    conversation.add_image(path)

    first = list(stream_answer(engine, conversation, "  What colour is it? ", GREEDY))
    query = f"Picture 1: <img>{path}</img>\nWhat colour is it?"
    assert first == [(query, "The "), (query, "The shape"), (query, "The shape is red.")]
    messages, options, images = engine.submitted[0]
    assert messages == [{"role": "user", "content": query}] and options == GREEDY
    assert same_pixels(images[path], Image.open(path))  # the picture goes in memory, by its path
    assert conversation.history == [(query, "The shape is red.")]

    *_, (second, response) = stream_answer(engine, conversation, "Where is it?", GREEDY)
    assert (second, response) == ("Where is it?", BOXED)
    assert engine.submitted[1][0][:2] == [{"role": "user", "content": query},
                                          {"role": "assistant", "content": "The shape is red."}]


def test_the_boxes_of_a_response_are_drawn_on_the_latest_picture(tmp_path):
    conversation = Conversation()
    assert conversation.drawn(BOXED) is None  # no picture: nothing to draw on
    conversation.add_image(picture_file(tmp_path, "first.png", (40, 40)))
    latest = picture_file(tmp_path, "latest.png", (100, 50))
    conversation.add_image(latest)

    drawn = conversation.drawn(BOXED)
    assert same_pixels(drawn, draw_boxes(Image.open(latest), BOXED))
    assert drawn.getpixel((10, 20)) == PALETTE[0]  # the box's top-left corner: (100, 200) of [0, 1000)
    assert not same_pixels(drawn, Image.open(latest))
    assert same_pixels(conversation.drawn("No box here."), Image.open(latest))  # without boxes: the picture


def test_the_chat_shows_pictures_queries_and_responses_as_written(tmp_path):
    a, b = picture_file(tmp_path, "a.png"), picture_file(tmp_path, "b.png")
    conversation = Conversation()
    conversation.add_image(a)
    query = conversation.query("Where is it?")
    conversation.commit(query, BOXED)
    conversation.add_image(b)
    assert conversation.chat_messages(current=("Is it <big>?", "Ye")) == [
        {"role": "user", "content": {"path": a}},
        {"role": "user", "content": "Where is it?"},
        # escaped: the chat renders HTML, and the tags should show
        {"role": "assistant", "content": "&lt;ref&gt;the square&lt;/ref&gt;&lt;box&gt;(100,200),(500,600)&lt;/box&gt;"},
        {"role": "user", "content": "Is it &lt;big&gt;?"},
        {"role": "assistant", "content": "Ye"},
        {"role": "user", "content": {"path": b}},
    ]


def test_bad_pictures_are_refused_with_a_message_and_leave_the_conversation_as_it_was(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_text("not an image")
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "whole.png")
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    conversation = Conversation()
    for path, max_pixels, message in [
        (garbage, 10_000, "garbage.png is not an image PIL can read"),
        (truncated, 10_000, "truncated.png is not an image PIL can read"),
        (tmp_path / "missing.png", 10_000, "missing.png is not an image PIL can read"),
        (tmp_path / "whole.png", 64 * 64 - 1, "whole.png is too large: 64 x 64 pixels"),
    ]:
        with pytest.raises(BadInput, match=message) as refused:
            conversation.add_image(str(path), max_pixels)
        assert str(tmp_path) not in str(refused.value)  # the name only, not where the server keeps it
    assert conversation == Conversation()


def test_an_empty_message_or_a_refused_conversation_is_bad_input_and_sends_nothing(tmp_path):
    engine = FakeEngine(ValueError("the conversation (900 tokens) and max_new_tokens (512) exceed 1024 positions"))
    conversation = Conversation()
    conversation.add_image(picture_file(tmp_path, "a.png"))
    with pytest.raises(BadInput, match="Type a message"):
        next(stream_answer(engine, conversation, " \n", GREEDY))
    assert engine.submitted == []
    with pytest.raises(BadInput, match="exceed 1024 positions.*Clear history"):
        next(stream_answer(engine, conversation, "Describe it.", GREEDY))
    assert conversation.history == [] and len(conversation.pending) == 1  # the picture waits for the next try


def test_a_failed_or_abandoned_generation_commits_nothing():
    failing = FakeCompletion(["Half an"], error=RuntimeError("out of memory"))
    abandoned = FakeCompletion(["One", " two", " three"])
    engine = FakeEngine(failing, abandoned, FakeCompletion(["Fine."]))
    conversation = Conversation()
    with pytest.raises(RuntimeError, match="out of memory"):
        list(stream_answer(engine, conversation, "Hello?", GREEDY))
    answer = stream_answer(engine, conversation, "Count.", GREEDY)
    next(answer)
    answer.close()  # the page went away mid-answer
    assert abandoned.cancelled
    assert conversation.history == []
    list(stream_answer(engine, conversation, "Hello?", GREEDY))
    assert conversation.history == [("Hello?", "Fine.")]


# ---------------------------------------------------------------------------------------------
# videos (a model with a video processor)


def video_file(directory: Path, name: str = "clip.mp4") -> str:
    """A 2-second mp4 (8 frames at 4 a second) of a square moving."""
    return str(write_video(directory / name, moving_squares(8), rate=4))


def test_an_uploaded_video_goes_with_the_next_query_numbered_apart_from_pictures(tmp_path):
    picture, video = picture_file(tmp_path, "a.png"), video_file(tmp_path)
    engine = FakeEngine(FakeCompletion(["The ", "square."]))
    conversation = Conversation()
    conversation.add_upload(picture)
    conversation.add_upload(video)
    *_, (query, response) = stream_answer(engine, conversation, "What moves?", GREEDY)
    assert query == f"Picture 1: <img>{picture}</img>\nVideo 1: <video>{video}</video>\nWhat moves?"
    _, _, images = engine.submitted[0]
    assert images[video] == video  # the video processor reads the uploaded file
    assert same_pixels(images[picture], Image.open(picture))
    assert conversation.history == [(query, "The square.")]

    again = video_file(tmp_path, "again.mp4")
    conversation.add_upload(again)
    assert conversation.query("And now?") == f"Video 2: <video>{again}</video>\nAnd now?"
    assert conversation.latest_picture() == picture  # boxes are drawn on pictures, never on a video
    assert conversation.chat_messages() == [
        {"role": "user", "content": {"path": picture}},
        {"role": "user", "content": {"path": video}},
        {"role": "user", "content": "What moves?"},
        {"role": "assistant", "content": "The square."},
        {"role": "user", "content": {"path": again}},
    ]


def test_bad_videos_or_a_model_without_video_are_refused_and_leave_the_conversation_as_it_was(tmp_path):
    video = video_file(tmp_path)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_text("not a video")
    conversation = Conversation()
    with pytest.raises(BadInput, match=r"clip\.mp4: this model takes no video \(its config's model\.video_processor is "
                                       r"null\)"):
        conversation.add_upload(video, no_video="its config's model.video_processor is null")
    with pytest.raises(BadInput, match=r"garbage\.mp4 is not a video PyAV can read \(corrupt_video\)") as refused:
        conversation.add_upload(str(garbage))
    assert str(tmp_path) not in str(refused.value)
    with pytest.raises(BadInput, match=r"clip\.mp4 is too long: 2\.0 s, over the 1\.5-second limit"):
        conversation.add_upload(video, max_seconds=1.5)
    assert conversation == Conversation()
    with pytest.raises(BadInput, match="<video>…</video> in a message is not accepted"):
        next(stream_answer(FakeEngine(), conversation, f"<video>{video}</video>What moves?", GREEDY))


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
    """A tiny random Qwen2-VL converted by from-hf: a native-resolution model with a video processor."""
    root = tmp_path_factory.mktemp("qwen2_vl")
    return lavis.load_model(from_hf(tiny_checkpoint(root / "hf", "qwen2_vl"), root / "ours"), device="cpu")[0]


def test_the_demo_answers_an_uploaded_video_as_the_engine_answers_the_video_prompt(video_model, tmp_path):
    video = video_file(tmp_path)
    engine = ChatEngine(video_model, read_image_files=False)  # as the demo serves: uploads only
    try:
        upload = next(b for b in build_demo(engine).blocks.values() if getattr(b, "elem_id", None) == "upload")
        assert upload.file_types == ["image", "video"]
        conversation = Conversation()
        conversation.add_upload(video)
        *_, (query, response) = stream_answer(engine, conversation, "What moves?", GREEDY)
    finally:
        engine.close()
    direct = ChatEngine(video_model)  # <video>path</video> read from disk
    try:
        expected = direct.submit([{"role": "user", "content": f"Video 1: <video>{video}</video>\nWhat moves?"}], GREEDY)
        assert response == expected.result(timeout=120)
    finally:
        direct.close()
    fixed_size = SimpleNamespace(max_length=None, max_batch_size=1)  # no model: takes no video
    upload = next(b for b in build_demo(fixed_size).blocks.values() if getattr(b, "elem_id", None) == "upload")
    assert upload.file_types == ["image"]


# ---------------------------------------------------------------------------------------------
# the page in a browser


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(request) -> Path:
    override = os.environ.get("LAVIS_WEB_CKPT")
    return Path(override) if override else request.getfixturevalue("chat_run")  # relative: to the checkout


@pytest.fixture(scope="module")
def served(ckpt, tmp_path_factory) -> Iterator[str]:
    """The demo's URL: ``python -m lavis.web`` serving ``ckpt`` on CPU on a free port."""
    root = tmp_path_factory.mktemp("web")
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(root / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(root / "server.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "lavis.web", "--ckpt", str(ckpt), "--device", "cpu", "--port", str(port),
             "--max-new-tokens", str(MAX_NEW_TOKENS), "--max-batch-size", "2"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the demo did not serve {url}:\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as page:
                    if page.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium with a 1280 x 900 viewport."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        pytest.fail(f"the web demo's browser tests need Chromium and its driver, missing: {', '.join(missing)} "
                    "(Debian: apt-get install chromium chromium-driver)")
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def model(ckpt):
    return lavis.load_model(REPO / ckpt, device="cpu")[0]


class Page:
    """The demo open in the browser, in a fresh session."""

    def __init__(self, driver, url: str) -> None:
        self.driver = driver
        driver.get(url)
        self.wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#query textarea"), "the page to load")
        # Every text the newest answer shows, to tell that answers stream in.
        driver.execute_script("""
            window.answerTexts = [];
            new MutationObserver(() => {
              const answers = document.querySelectorAll('#chat [data-testid="bot"]');
              if (answers.length) window.answerTexts.push(answers[answers.length - 1].innerText);
            }).observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true});
        """)

    def wait(self, condition, what: str, timeout: float = 60):
        waiting = WebDriverWait(self.driver, timeout, poll_frequency=0.1,
                                ignored_exceptions=[StaleElementReferenceException])  # the page changed meanwhile
        try:
            return waiting.until(lambda _: condition())
        except TimeoutException:
            pytest.fail(f"timed out waiting for {what}; the page reads:\n{self.text()}")

    def css(self, selector: str):
        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def text(self) -> str:
        return self.driver.execute_script("return document.body.innerText")

    def upload(self, path: str | Path) -> None:
        chooser = self.css("input[type=file]")[0]
        # ChromeDriver adds to the files a `multiple` input holds; a user's new choice replaces them.
        self.driver.execute_script("arguments[0].value = ''", chooser)
        chooser.send_keys(str(path))

    def send(self, text: str) -> None:
        box = self.css("#query textarea")[0]
        box.send_keys(text)
        self.css("#send")[0].click()

    def answers(self) -> list[str]:
        shown = self.driver.execute_script(
            "return [...document.querySelectorAll('#chat [data-testid=\"bot\"]')].map(answer => answer.innerText)")
        return [" ".join(answer.split()) for answer in shown]

    def answered(self, expected: list[str]) -> list[str]:
        """Wait until the chat shows exactly these answers (compared with whitespace collapsed)."""
        expected = [" ".join(answer.split()) for answer in expected]
        self.wait(lambda: self.answers() == expected and not self.css("#query textarea")[0].get_attribute("value"),
                  f"the answers {expected}")
        return self.driver.execute_script("return window.answerTexts")

    def warnings(self) -> str:
        return "\n".join(toast.text for toast in self.css(".toast-body"))

    def picture(self) -> Image.Image:
        """The picture shown beside the chat, as served."""
        self.wait(lambda: self.css("#picture img"), "the picture beside the chat")
        with urllib.request.urlopen(self.css("#picture img")[0].get_attribute("src"), timeout=10) as response:
            return Image.open(BytesIO(response.read()))


def test_a_conversation_in_the_browser_streams_answers_and_draws_boxes(served, browser, model, small_world, tmp_path):
    picture = small_world / "images" / "test" / "000003.png"
    question, grounding = "What colour is the shape?", "Give the bounding box of the shape."
    first, history = model.chat([{"image": str(picture)}, {"text": question}], max_new_tokens=MAX_NEW_TOKENS)
    second, _ = model.chat(grounding, history=history, max_new_tokens=MAX_NEW_TOKENS)

    page = Page(browser, served)
    page.upload(picture)
    page.wait(lambda: page.css("#chat img") and page.css("#picture img"), "the upload in the chat and beside it")
    page.send(question)
    shown = page.answered([first])
    final = " ".join(first.split())
    partial = {text for text in (" ".join(t.split()) for t in shown) if text and final.startswith(text)} - {final}
    if len(final.split()) >= 4:  # an answer of a few tokens may arrive in one piece
        assert len(partial) >= 2, f"the answer did not stream in: the chat showed {shown}"
    assert question in page.text()

    page.send(grounding)
    page.answered([first, second])
    assert grounding in page.text()
    # Beside the chat: the picture with the boxes of the last answer drawn (the picture as it is when there are none).
    with Image.open(picture) as original:
        assert same_pixels(page.picture(), draw_boxes(original, second))

    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert [name for name in resources if not name.startswith(served)] == []  # all served locally: works offline
    screenshot = (REPO / "docs" if os.environ.get("LAVIS_UPDATE_SCREENSHOT") == "1" else tmp_path) / "web_demo.png"
    assert browser.save_screenshot(str(screenshot))

    page.css("#clear")[0].click()
    page.wait(lambda: not page.answers() and not page.css("#chat img, #picture img"), "the cleared chat")
    page.send(question)
    page.answered([model.chat(question, max_new_tokens=MAX_NEW_TOKENS)[0]])  # no picture, no history


def test_pictures_of_later_turns_are_numbered_on_and_boxes_go_on_the_latest(served, browser, model, small_world):
    first_picture, second_picture = (small_world / "images" / "test" / f"{k:06d}.png" for k in (3, 4))
    question, grounding = "What colour is the shape?", "Give the bounding box of the shape."
    first, history = model.chat([{"image": str(first_picture)}, {"text": question}], max_new_tokens=MAX_NEW_TOKENS)
    second, history = model.chat([{"image": str(second_picture)}, {"text": grounding}], history=history,
                                  max_new_tokens=MAX_NEW_TOKENS)
    assert history[1][0].startswith("Picture 2: ")

    page = Page(browser, served)
    page.upload(first_picture)
    page.wait(lambda: len(page.css("#chat img")) == 1, "the first picture in the chat")
    page.send(question)
    page.answered([first])
    page.upload(second_picture)
    page.wait(lambda: len(page.css("#chat img")) == 2, "the second picture in the chat")
    page.send(grounding)
    page.answered([first, second])
    with Image.open(second_picture) as latest:
        assert same_pixels(page.picture(), draw_boxes(latest, second))


def test_bad_input_in_the_browser_shows_a_message_and_the_next_message_is_answered(served, browser, model, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not a picture")
    question = "What is in the picture?"
    expected, _ = model.chat(question, max_new_tokens=MAX_NEW_TOKENS)

    page = Page(browser, served)
    page.upload(not_an_image)
    page.wait(lambda: "notes.png is not an image PIL can read" in page.warnings(), "a warning about the upload")
    page.send("   ")
    page.wait(lambda: "Type a message first." in page.warnings(), "a warning about the empty message")
    page.css("#query textarea")[0].clear()
    page.send(question)
    page.answered([expected])
    assert not page.css("#chat img")  # the refused upload is not in the conversation
