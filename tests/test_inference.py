"""Inference on trained runs: lavis.load_model (and its load_from chain), chat, from_list_format, the chat CLI."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_train, sft_options
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file

import lavis
from lavis.models import build_model
from lavis.models.chat import from_list_format
from lavis.models.generation import left_pad
from lavis.models.weights import weights_chain
from lavis.processors.image import load_image
from lavis.serving.boxes import draw_boxes, find_boxes

pytestmark = pytest.mark.integration

STEP_DIR = Path("checkpoints") / "step_00000002"
MAX_NEW = 12


def weights_of(run: Path) -> Path:
    return run / STEP_DIR / "model.safetensors"


@pytest.fixture(scope="module")
def runs(small_world, tmp_path_factory) -> dict[str, Path]:
    """Two 2-step runs: A trains everything and saves full weights; B starts from A with the ViT
    frozen and saves its trainable weights only (adapter and LLM)."""
    root = tmp_path_factory.mktemp("inference")
    a, b = root / "A", root / "B"
    for out, extra in (
        (a, ["run.save_weights=full"]),
        (b, [f"model.load_from={a}", "model.freeze.vision=frozen", "run.save_weights=trainable"]),
    ):
        # A small lr: the 2 steps barely move the model (as the warm-up of projects/sft.yaml would).
        result = run_train(sft_options(small_world, out, "run.max_steps=2", "run.save_every=2", "run.lr=5e-5",
                                       "run.min_lr=5e-6", *extra))
        assert result.returncode == 0, result.stderr[-3000:]
        assert weights_of(out).is_file()
    return {"A": a, "B": b}


@pytest.fixture(scope="module")
def model_a(runs):
    """(model, processors) of run A, loaded once for the chat tests."""
    return lavis.load_model(runs["A"], device="cpu")


@pytest.fixture(scope="module")
def varied(runs, tmp_path_factory):
    """(run directory, (model, processors)): a copy of run A whose LLM weights are redrawn larger (std 0.15,
    seed 0), and its adapter's output projection too (so that the image vectors outweigh the token
    embeddings). After 2 steps of training a model repeats one token whatever it is shown; this one's
    greedy answers depend on the prompt, the history and the pictures, so that comparing answers tells
    them apart."""
    out = tmp_path_factory.mktemp("varied") / "run"
    shutil.copytree(runs["A"], out)
    model, processors = lavis.load_model(runs["A"], device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.normal_(0.0, 0.15)
        model.adapter.proj.normal_(0.0, 0.15)
    state = model.state_dict()
    save_file({key: state[key].clone().contiguous() for key in load_file(str(weights_of(runs["A"])))},
              str(weights_of(out)))
    return out, (model, processors)


@pytest.fixture(scope="module")
def images(small_world) -> list[str]:
    return [str(small_world / "images" / "test" / f"{i:06d}.png") for i in range(2)]


def assert_weights_equal(model, state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> int:
    """Every tensor of ``state`` under ``prefixes`` equals the model's; returns how many were compared."""
    model_state = model.state_dict()
    compared = 0
    for key, tensor in state.items():
        if key.startswith(prefixes):
            assert torch.equal(model_state[key].cpu(), tensor), key
            compared += 1
    return compared


# --- load_model -------------------------------------------------------------------------------------


def test_load_model_returns_eval_model_with_checkpoint_weights(runs, model_a):
    model, processors = model_a
    assert not any(module.training for module in model.modules())
    assert model.processors is processors and processors.tokenizer is not None and processors.image is not None
    state = load_file(str(weights_of(runs["A"])))
    assert {key.split(".", 1)[0] for key in state} == {"vision", "adapter", "llm"}
    for component in ("vision.", "adapter.", "llm."):
        assert assert_weights_equal(model, state, (component,)) > 0
    # A full checkpoint covers every parameter.
    assert {name for name, _ in model.named_parameters()} <= set(state)


@pytest.mark.parametrize("where", ["checkpoint_dir", "weights_file"])
def test_load_model_accepts_a_checkpoint_dir_or_its_weights_file(runs, model_a, where):
    path = weights_of(runs["A"]) if where == "weights_file" else runs["A"] / STEP_DIR
    model, _ = lavis.load_model(str(path), device="cpu")
    assert not model.training
    expected = model_a[0].state_dict()
    got = model.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_load_model_without_a_run_is_a_helpful_file_not_found(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint") as err:
        lavis.load_model(empty, device="cpu")
    assert str(empty) in str(err.value)
    # A checkpoint directory outside any run carries its own config.yaml: it loads alone.
    loose = tmp_path / "loose"
    shutil.copytree(runs["A"] / STEP_DIR, loose)
    model, _ = lavis.load_model(loose, device="cpu")
    expected = load_file(str(weights_of(runs["A"])))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in expected.items())
    # Without it (and outside a run) there is nothing to build the model from.
    (loose / "config.yaml").unlink()
    for path in (loose, loose / "model.safetensors"):
        with pytest.raises(FileNotFoundError, match="config.yaml"):
            lavis.load_model(path, device="cpu")


# --- trainable-only checkpoints and the load_from chain -----------------------------------------------


def test_trainable_only_checkpoint_is_completed_from_its_load_from_chain(runs):
    a_state, b_state = load_file(str(weights_of(runs["A"]))), load_file(str(weights_of(runs["B"])))
    assert not any(key.startswith("vision.") for key in b_state)  # frozen in B: not saved
    assert {key.split(".", 1)[0] for key in b_state} == {"adapter", "llm"}
    # B trained its adapter and LLM: they differ from A's, so the comparisons below tell the files apart.
    assert any(not torch.equal(a_state[key], b_state[key]) for key in b_state if key.startswith("adapter."))
    assert any(not torch.equal(a_state[key], b_state[key]) for key in b_state if key.startswith("llm."))

    assert [p.resolve() for p in weights_chain(str(runs["B"]))] == [
        weights_of(runs["A"]).resolve(), weights_of(runs["B"]).resolve()
    ]
    model, _ = lavis.load_model(runs["B"], device="cpu")
    assert not model.training
    assert assert_weights_equal(model, a_state, ("vision.",)) > 0
    assert assert_weights_equal(model, b_state, ("adapter.",)) > 0
    assert assert_weights_equal(model, b_state, ("llm.",)) > 0
    assert {name for name, _ in model.named_parameters()} <= set(a_state) | set(b_state)


def test_export_of_a_trainable_only_run(runs, tmp_path):
    """``--weights trainable`` writes what B's checkpoint holds and keeps its load_from; ``--weights full``
    (the default) completes it from A (B's load_from) into one file that stands alone, here in bf16."""
    from lavis.interop.export import export

    a_state, b_state = load_file(str(weights_of(runs["A"]))), load_file(str(weights_of(runs["B"])))
    part = export(runs["B"], tmp_path / "part", weights="trainable")
    assert load_file(str(part / "model.safetensors")).keys() == b_state.keys()
    assert OmegaConf.load(part / "config.yaml").model.load_from == str(runs["A"])
    whole = export(runs["B"], tmp_path / "whole", weights="full", dtype="bfloat16")
    exported = load_file(str(whole / "model.safetensors"))
    assert all(exported[k].dtype == torch.bfloat16 for k in exported)
    for key in a_state:
        assert torch.equal(exported[key], (b_state.get(key, a_state[key])).to(torch.bfloat16)), key
    assert OmegaConf.load(whole / "config.yaml").model.load_from is None
    model, _ = lavis.load_model(whole, device="cpu")  # no chain to follow
    named = dict(model.named_parameters())
    buffers = {k for k, v in model.state_dict(keep_vars=True).items() if not isinstance(v, torch.nn.Parameter)}
    assert exported.keys() == a_state.keys() | buffers and set(a_state) >= set(named)  # persistent buffers travel too
    assert all(torch.equal(named[k].to(torch.bfloat16), v) for k, v in exported.items() if k in named)


def test_missing_load_from_of_a_trainable_only_run_is_a_file_not_found(runs, tmp_path):
    moved = tmp_path / "B"
    shutil.copytree(runs["B"], moved)
    missing = tmp_path / "gone" / "A"
    for path in moved.rglob("config.yaml"):  # the run's and each checkpoint's own
        config = OmegaConf.load(path)
        config.model.load_from = str(missing)
        OmegaConf.save(config, path)
    with pytest.raises(FileNotFoundError, match="trainable weights only") as err:
        lavis.load_model(moved, device="cpu")
    assert str(missing) in str(err.value)
    with pytest.raises(FileNotFoundError):
        weights_chain(str(moved))


# --- from_list_format and chat -------------------------------------------------------------------------


def test_from_list_format():
    items = [
        {"image": "a.png"},
        {"text": "Where is the cat?"},
        {"box": (10, 20, 300, 400), "ref": "the cat"},
        {"box": [1, 2, 3, 4]},
        {"image": "b.png"},
        {"text": "And here?"},
    ]
    assert from_list_format(items) == (
        "Picture 1: <img>a.png</img>\nWhere is the cat?<ref>the cat</ref><box>(10,20),(300,400)</box>"
        "<box>(1,2),(3,4)</box>Picture 2: <img>b.png</img>\nAnd here?"
    )
    assert from_list_format([{"image": "c.png"}, {"text": "Hi"}], first_picture=3) == "Picture 3: <img>c.png</img>\nHi"
    assert from_list_format([{"box": (1, 2, 3, 4), "ref": ""}]) == "<box>(1,2),(3,4)</box>"
    with pytest.raises(ValueError, match="unknown query item"):
        from_list_format([{"text": "ok"}, {"video": "clip.mp4"}])


def test_chat_history_grows_and_pictures_are_numbered_on(varied, images):
    model, _ = varied[1]
    first = [{"image": images[0]}, {"text": "What colour is the shape?"}]
    r1, h1 = model.chat(first, max_new_tokens=MAX_NEW)
    assert isinstance(r1, str) and r1
    assert h1 == [(f"Picture 1: <img>{images[0]}</img>\nWhat colour is the shape?", r1)]
    r2, h2 = model.chat([{"image": images[1]}, {"text": "How many shapes?"}], history=h1, max_new_tokens=MAX_NEW)
    assert len(h1) == 1  # the caller's history is not mutated
    assert h2 == h1 + [(f"Picture 2: <img>{images[1]}</img>\nHow many shapes?", r2)]
    r3, h3 = model.chat("Thank you.", history=h2, max_new_tokens=MAX_NEW)  # text only, no picture
    assert h3 == h2 + [("Thank you.", r3)]
    # A query string with its own <img> span; list-format pictures are numbered after it.
    query = f"<img>{images[1]}</img>\nDescribe it."
    r4, h4 = model.chat(query, max_new_tokens=MAX_NEW)
    assert h4 == [(query, r4)]
    _, h5 = model.chat([{"image": images[0]}, {"text": "And this?"}], history=h4, max_new_tokens=MAX_NEW)
    assert h5[1][0] == f"Picture 2: <img>{images[0]}</img>\nAnd this?"


def test_chat_is_greedy_generate_on_the_chatml_prompt(varied, images):
    """chat's answers equal decoding model.generate on a prompt encoded by hand (ChatML, image spans
    expanded, history included), over two turns."""
    model, processors = varied[1]
    tok = processors.tokenizer
    nl = tok.encode("\n")

    def turn(role: str, *pieces) -> list[int]:
        ids = [tok.im_start_id, *tok.encode(role), *nl]
        for piece in pieces:
            ids += piece if isinstance(piece, list) else tok.encode(piece)
        return ids + [tok.im_end_id, *nl]

    span = [tok.img_start_id] + [tok.img_pad_id] * model.num_image_tokens + [tok.img_end_id]
    prompt = turn("system", model.system_message)
    pictures, history = [], []
    for i, (path, text) in enumerate(zip(images, ["What colour is the shape?", "How many shapes?"])):
        prompt += turn("user", f"Picture {i + 1}: ", span, f"\n{text}")
        pictures.append(processors.image(load_image(path)))
        input_ids, mask = left_pad([prompt + [tok.im_start_id, *tok.encode("assistant"), *nl]], tok.pad_id)
        tokens = model.generate(input_ids, mask, torch.stack(pictures), max_new_tokens=MAX_NEW,
                                stop_ids=tok.stop_ids, pad_id=tok.pad_id, suppress_ids=tok.image_span_ids)[0].tolist()
        assert 0 < len(tokens) <= MAX_NEW
        end = next((k for k, t in enumerate(tokens) if t in tok.stop_ids), len(tokens))
        expected = tok.decode(tokens[:end])

        query = [{"image": path}, {"text": text}]
        response, new_history = model.chat(query, history=history, max_new_tokens=MAX_NEW)
        assert response == expected
        # The answer depends on what chat must get right: the history and the picture.
        if history:
            assert model.chat(query, max_new_tokens=MAX_NEW)[0] != expected
        other = [{"image": images[1 - i]}, {"text": text}]
        assert model.chat(other, history=history, max_new_tokens=MAX_NEW)[0] != expected
        history = new_history
        prompt += turn("assistant", response)


def test_chat_errors(runs, varied, tmp_path):
    model, _ = varied[1]
    missing = str(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        model.chat([{"image": missing}, {"text": "What is this?"}], max_new_tokens=2)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        model.chat(f"<img>{missing}</img>What is this?", max_new_tokens=2)
    from lavis.common.config import load_config

    bare, _ = build_model(load_config(runs["A"] / "config.yaml").model)
    with pytest.raises(ValueError, match="no processors attached"):
        bare.chat("Hello", max_new_tokens=2)


def test_chat_rejects_a_stray_image_token_with_value_error(varied):
    with pytest.raises(ValueError):
        varied[1][0].chat("What is <img> here?", max_new_tokens=2)


def test_interactive_chat_survives_a_missing_image(varied, monkeypatch, capsys):
    from lavis.serving.terminal import ChatSession, interactive

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi <img>/no/such.png</img>\nHello\n:quit\n"))
    interactive(ChatSession(varied[1][0], 2, 1), [])
    out, err = capsys.readouterr()
    assert "no/such.png" in err and out.count("assistant> ") == 1


# --- the CLI ----------------------------------------------------------------------------------------------


def run_chat_cli(*args: str, stdin: str = "") -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``python -m lavis.chat ARGS`` (bytes decoded as UTF-8, newlines kept)."""
    result = subprocess.run([sys.executable, "-m", "lavis.chat", *args], cwd=REPO, input=stdin.encode(),
                            capture_output=True, timeout=120, check=False,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def test_cli_one_shot_prints_the_response_and_draws(varied, images, tmp_path):
    run, (model, _) = varied
    out_png = tmp_path / "boxes.png"
    query = "Find the red circle."
    code, out, err = run_chat_cli("--ckpt", str(run), "--image", images[0], "--query", query,
                                  "--draw", str(out_png), "--max-new-tokens", str(MAX_NEW), "--device", "cpu")
    assert code == 0, err[-3000:]
    expected, _ = model.chat([{"image": images[0]}, {"text": query}], max_new_tokens=MAX_NEW)
    assert out == expected + "\n"
    # --draw with a picture always saves a PNG: the picture, with the response's boxes (if any) drawn.
    assert f"saved {out_png}" in err
    with Image.open(images[0]) as src, Image.open(out_png) as drawn:
        assert drawn.format == "PNG" and drawn.size == src.size
        same = np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(src.convert("RGB")))
    assert same == (not find_boxes(expected))
    with Image.open(out_png) as drawn:
        assert np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(draw_boxes(images[0], expected)))


def test_cli_interactive_session(varied, images, tmp_path):
    run, (model, _) = varied
    drawn = tmp_path / "d.png"
    stdin = (f"What colour is the shape?\n:image {images[1]}\nHow many shapes?\n:draw {drawn}\n"
             ":clear\n:quit\nNever asked.\n")
    code, out, err = run_chat_cli("--ckpt", str(run), "--image", images[0], "--max-new-tokens", str(MAX_NEW),
                                  "--device", "cpu", stdin=stdin)
    assert code == 0, err[-3000:]
    assert out.count("assistant> ") == 2
    r1, history = model.chat([{"image": images[0]}, {"text": "What colour is the shape?"}], max_new_tokens=MAX_NEW)
    r2, _ = model.chat([{"image": images[1]}, {"text": "How many shapes?"}], history, max_new_tokens=MAX_NEW)
    assert f"assistant> {r1}\n" in out and f"assistant> {r2}\n" in out
    assert f"saved {drawn}" in err
    with Image.open(drawn) as saved:  # the second answer's boxes on the second picture
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(draw_boxes(images[1], r2)))
    assert "(history cleared)" in err and "Traceback" not in err


def test_cli_bad_ckpt_exits_2_without_traceback(tmp_path):
    code, out, err = run_chat_cli("--ckpt", str(tmp_path / "nowhere"), "--query", "Hello")
    assert code == 2
    assert "error:" in err and "nowhere" in err
    assert "Traceback" not in err
    assert out == ""
