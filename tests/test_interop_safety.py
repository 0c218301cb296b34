"""``lavis.export`` and ``lavis.convert`` never lose what a user made, and say what is wrong with an input.

- An output directory that holds anything is refused unless asked for (``--overwrite``), which moves
  the old content aside to ``<out>.old-<time>`` (never deletes it); a training run's directory, the
  source (its checkpoint, its run, an earlier stage of its ``load_from`` chain) and a directory
  inside or above them are refused whatever the flags. A refused or failed command leaves no output.
- A default export is self-contained: every weight of the model, ``weights: full`` in its meta,
  ``load_from`` cleared, so it loads where the earlier stages are absent. ``--weights trainable``
  says so (meta and config) and keeps ``load_from``.
- ``from-qwen-vl`` / ``to-qwen-vl`` on something that is not what they read name the path and what
  was expected (a message and exit status 2, never a traceback).
"""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REFERENCE, REPO, run_train, sft_options
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import lavis
from lavis.interop.convert.cli import main as convert_main
from lavis.interop.convert.layout import ConversionError
from lavis.interop.convert.release import TOKENIZER_FILE, from_qwen_vl, to_qwen_vl
from lavis.interop.export import export
from lavis.interop.export import main as export_main

pytestmark = pytest.mark.integration

STEP = Path("checkpoints") / "step_00000002"
FIXTURE = REPO / "tests" / "fixtures" / "qwen_vl_tiny"
PRESET = REPO / "configs" / "models" / "presets" / "qwen_vl_chat.yaml"
QWEN_TIKTOKEN = REFERENCE / "qwen-vl-chat" / "qwen.tiktoken"
TINY_OPTIONS = (
    "model.vision.image_size=128",
    ("model.vision.model_kwargs={patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 4.0, "
     "pre_norm: true, final_norm: false}"),
    "model.vision.gradient_checkpointing=false",
    "model.llm.gradient_checkpointing=false",
    "model.llm.dtype=float32",
    "model.llm.config=null",
)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its content (a directory left exactly as it was compares equal)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def params_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.fixture(scope="module")
def runs(small_world, tmp_path_factory) -> dict[str, Path]:
    """A: 2 steps from scratch, every weight saved. C: from A (ViT frozen), every weight saved
    (``run.save_weights: full``: its checkpoint needs nothing of A). B: from A (ViT frozen), its
    trainable weights only (the ViT comes from A)."""
    root = tmp_path_factory.mktemp("interop")
    runs = {name: root / name for name in "ACB"}
    extra = {
        "A": ["run.save_weights=full"],
        "C": [f"model.load_from={runs['A']}", "model.freeze.vision=frozen", "run.save_weights=full"],
        "B": [f"model.load_from={runs['A']}", "model.freeze.vision=frozen", "run.save_weights=trainable"],
    }
    for name, out in runs.items():
        result = run_train(sft_options(small_world, out, "run.max_steps=2", "run.save_every=2", *extra[name]))
        assert result.returncode == 0, result.stderr[-3000:]
    return runs


@pytest.fixture
def a_moved_away(runs, tmp_path):
    """Run A moved elsewhere for the test's duration (the earlier stage is absent), then put back."""
    moved = tmp_path / "A_elsewhere"
    shutil.move(runs["A"], moved)
    try:
        yield
    finally:
        shutil.move(moved, runs["A"])


# --------------------------------------------------------------------------- export: what it writes over


def test_export_refuses_another_run_s_directory_whatever_the_flags(runs, tmp_path, capsys):
    before = snapshot(runs["B"])
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="training run") as err:
            export(runs["A"], runs["B"], overwrite=overwrite)
        assert str(runs["B"]) in str(err.value)
    assert export_main([str(runs["A"]), str(runs["B"]), "--overwrite"]) == 2
    assert str(runs["B"]) in capsys.readouterr().err
    assert snapshot(runs["B"]) == before  # B still resolves to its own checkpoint
    assert not list(runs["B"].parent.glob("B.old-*"))


@pytest.mark.parametrize("where", ["the run", "its checkpoint", "inside the run", "above the run", "the earlier stage"])
def test_export_refuses_the_source_and_what_it_is_made_of(runs, where):
    run = runs["C"]  # its config names A as model.load_from
    out = {
        "the run": run,
        "its checkpoint": run / STEP,
        "inside the run": run / "exported",
        "above the run": run.parent,
        "the earlier stage": runs["A"],
    }[where]
    before = {name: snapshot(path) for name, path in runs.items()}
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="refusing") as err:
            export(run, out, overwrite=overwrite)
        assert str(out) in str(err.value)
    assert {name: snapshot(path) for name, path in runs.items()} == before
    assert not (run / "exported").exists()
    assert not list(run.parent.parent.glob(f"{run.parent.name}.old-*")) and not list(run.parent.glob("*.old-*"))


def test_export_into_a_non_empty_directory_needs_overwrite_which_moves_it_aside(runs, tmp_path, capsys):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty.*--overwrite") as err:
        export(runs["A"], out)
    assert str(out) in str(err.value)
    assert snapshot(out) == {"notes.txt": b"mine"}
    assert export_main([str(runs["A"]), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and snapshot(out) == {"notes.txt": b"mine"}

    assert export_main([str(runs["A"]), str(out), "--overwrite"]) == 0
    (aside,) = tmp_path.glob("exported.old-*")
    assert snapshot(aside) == {"notes.txt": b"mine"}  # moved, not deleted
    assert {"model.safetensors", "config.yaml", "meta.json"} <= set(snapshot(out))
    # An existing empty directory is fine without the flag.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export(runs["A"], empty) / "model.safetensors").is_file()


def test_a_failed_export_leaves_no_output(runs, tmp_path, a_moved_away):
    """B's ViT is in A, which is gone: nothing is written (no partial directory), A's path is named."""
    out = tmp_path / "exported"
    with pytest.raises(FileNotFoundError, match="load_from") as err:
        export(runs["B"], out)
    assert str(runs["A"]) in str(err.value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["A_elsewhere"]


# --------------------------------------------------------------------------- export: self-contained by default


@pytest.mark.parametrize("run", ["C", "B"])
def test_a_default_export_loads_without_the_earlier_stage(runs, tmp_path, run, request):
    """C saved every weight, B only its trainable ones: both export to a model that stands alone."""
    expected = params_of(lavis.load_model(runs[run], device="cpu")[0])
    out = export(runs[run], tmp_path / "exported")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["weights"] == "full" and meta["self_contained"] is True
    assert OmegaConf.load(out / "config.yaml").model.load_from is None
    request.getfixturevalue("a_moved_away")
    assert not runs["A"].exists()
    got = params_of(lavis.load_model(out, device="cpu")[0])
    assert got.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []


def test_a_trainable_only_export_says_so_and_keeps_load_from(runs, tmp_path):
    part = export(runs["B"], tmp_path / "part", weights="trainable")
    meta = json.loads((part / "meta.json").read_text())
    assert meta["weights"] == "trainable" and meta["self_contained"] is False
    assert OmegaConf.load(part / "config.yaml").model.load_from == str(runs["A"])
    assert not any(k.startswith("vision.") for k in load_file(str(part / "model.safetensors")))
    # A checkpoint that holds every weight is complete whatever was asked: labelled so, no load_from.
    whole = export(runs["C"], tmp_path / "whole", weights="trainable")
    meta = json.loads((whole / "meta.json").read_text())
    assert meta["weights"] == "full" and meta["self_contained"] is True
    assert OmegaConf.load(whole / "config.yaml").model.load_from is None


# --------------------------------------------------------------------------- from-qwen-vl: wrong inputs


def tiny_release_config(vocab: int = 256) -> dict:
    config = json.loads((FIXTURE / "config.json").read_text())
    config["vocab_size"] = vocab  # small: these tests only move tensors
    return config


def write_release(path: Path, config: dict) -> Path:
    """A Qwen-VL release as published (config.json, safetensors, qwen.tiktoken) with random weights."""
    state = runpy.run_path(str(FIXTURE / "regenerate.py"))["random_original_state"](config, 0)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(state, str(path / "model.safetensors"))
    (path / TOKENIZER_FILE).write_text("dG9rZW4= 0\n")
    return path


def convert_fails(capsys, *argv: str) -> str:
    """``python -m lavis.convert ARGV`` exits with status 2 and a one-line message (no traceback); returns it."""
    with pytest.raises(SystemExit) as exit_:
        convert_main(list(argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_from_qwen_vl_names_what_is_not_a_release(tmp_path, capsys):
    out = str(tmp_path / "out")
    # A Qwen2 transformers directory (e.g. from-qwen-vl's own output): config.json of another model.
    qwen2 = tmp_path / "qwen2"
    qwen2.mkdir()
    (qwen2 / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 128, "vocab_size": 256}))
    (qwen2 / "vision.safetensors").write_bytes(b"")
    err = convert_fails(capsys, "from-qwen-vl", str(qwen2), out)
    assert str(qwen2) in err and "not a Qwen-VL release" in err and "'qwen2'" in err and "already" in err
    # A model trained or exported here.
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "config.yaml").write_text("model: {}\n")
    err = convert_fails(capsys, "from-qwen-vl", str(ours), out)
    assert str(ours / "config.json") in err and "to-qwen-vl" in err
    # Qwen-VL's config with its sizes missing, a text-only Qwen, a config that is not JSON, a missing path.
    partial = tmp_path / "partial"
    partial.mkdir()
    config = tiny_release_config()
    del config["kv_channels"], config["visual"]["heads"]
    (partial / "config.json").write_text(json.dumps(config))
    err = convert_fails(capsys, "from-qwen-vl", str(partial), out)
    assert "kv_channels" in err and "visual.heads" in err and str(partial) in err
    del config["visual"]
    (partial / "config.json").write_text(json.dumps(config))
    err = convert_fails(capsys, "from-qwen-vl", str(partial), out)
    assert "no 'visual'" in err
    (partial / "config.json").write_text("{not json")
    assert "not valid JSON" in convert_fails(capsys, "from-qwen-vl", str(partial), out)
    assert str(tmp_path / "nowhere") in convert_fails(capsys, "from-qwen-vl", str(tmp_path / "nowhere"), out)
    assert not (tmp_path / "out").exists()


def test_from_qwen_vl_names_unreadable_weights(tmp_path, capsys):
    src = tmp_path / "release"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(tiny_release_config()))
    (src / TOKENIZER_FILE).write_text("")
    (src / "model.safetensors").write_bytes(b"not a safetensors file")
    err = convert_fails(capsys, "from-qwen-vl", str(src), str(tmp_path / "out"))
    assert str(src / "model.safetensors") in err and "safetensors" in err
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"not a pickle either")
    err = convert_fails(capsys, "from-qwen-vl", str(src), str(tmp_path / "out"))
    assert str(src / "pytorch_model.bin") in err and "torch state dict" in err
    (src / "pytorch_model.bin").unlink()
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    err = convert_fails(capsys, "from-qwen-vl", str(src), str(tmp_path / "out"))
    assert "weight_map" in err and str(src / "model.safetensors.index.json") in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- from-qwen-vl: its output


def test_from_qwen_vl_refuses_its_source_and_a_non_empty_output(tmp_path, capsys):
    release = write_release(tmp_path / "release", tiny_release_config())
    before = snapshot(release)
    for out in (release, release / "converted", tmp_path):
        for flags in ((), ("--overwrite",)):
            err = convert_fails(capsys, "from-qwen-vl", str(release), str(out), *flags)
            assert "refusing" in err and str(out) in err
    assert snapshot(release) == before and not (release / "converted").exists()

    out = tmp_path / "converted"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = convert_fails(capsys, "from-qwen-vl", str(release), str(out))
    assert "not empty" in err and "--overwrite" in err and snapshot(out) == {"notes.txt": b"mine"}
    assert convert_main(["from-qwen-vl", str(release), str(out), "--overwrite"]) == 0
    (aside,) = tmp_path.glob("converted.old-*")
    assert snapshot(aside) == {"notes.txt": b"mine"}
    assert {"config.json", "vision.safetensors", "adapter.safetensors", TOKENIZER_FILE} <= set(snapshot(out))
    assert snapshot(release) == before


# --------------------------------------------------------------------------- to-qwen-vl


def test_to_qwen_vl_names_what_is_not_a_model_trained_here(tmp_path, capsys):
    release = write_release(tmp_path / "release", tiny_release_config())
    err = convert_fails(capsys, "to-qwen-vl", str(release), str(tmp_path / "out"))
    assert str(release) in err and "config.yaml" in err and "from-qwen-vl" in err
    assert "no checkpoint" in convert_fails(capsys, "to-qwen-vl", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory) -> Path:
    """The tiny Qwen-VL converted and saved as a model directory (config.yaml + model.safetensors)."""
    if not QWEN_TIKTOKEN.is_file():
        pytest.skip(f"{QWEN_TIKTOKEN} not found (the shared reference is absent)")
    from lavis.common.config import load_config
    from lavis.models import build_model
    from lavis.models.vlm import canonical_name

    root = tmp_path_factory.mktemp("qwen_run")
    release = write_release(root / "release", tiny_release_config(vocab=151936))
    shutil.copyfile(QWEN_TIKTOKEN, release / TOKENIZER_FILE)
    from_qwen_vl(release, root / "converted")
    (root / "project.yaml").write_text(f"base: [{PRESET}]\n")
    cfg = load_config(root / "project.yaml", [f"model.llm.pretrained={root / 'converted'}", *TINY_OPTIONS])
    model, _ = build_model(cfg.model)
    run = root / "run"
    run.mkdir()
    cfg.save(run / "config.yaml")
    save_file({canonical_name(k): v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"))
    return run


def test_to_qwen_vl_refuses_its_source_and_a_non_empty_output(qwen_run, tmp_path, capsys):
    before = snapshot(qwen_run)
    for out in (qwen_run, qwen_run / "qwen_vl", qwen_run.parent):
        for flags in ((), ("--overwrite",)):
            err = convert_fails(capsys, "to-qwen-vl", str(qwen_run), str(out), *flags)
            assert "refusing" in err and str(out) in err
    assert snapshot(qwen_run) == before
    # --code-from without Qwen-VL's files: named before anything is written.
    (tmp_path / "no_code").mkdir()
    err = convert_fails(capsys, "to-qwen-vl", str(qwen_run), str(tmp_path / "out"), "--code-from", str(tmp_path / "no_code"))
    assert "modeling_qwen.py" in err and not (tmp_path / "out").exists()

    out = tmp_path / "qwen_vl"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = convert_fails(capsys, "to-qwen-vl", str(qwen_run), str(out))
    assert "not empty" in err and "--overwrite" in err and snapshot(out) == {"notes.txt": b"mine"}
    assert convert_main(["to-qwen-vl", str(qwen_run), str(out), "--overwrite"]) == 0
    (aside,) = tmp_path.glob("qwen_vl.old-*")
    assert snapshot(aside) == {"notes.txt": b"mine"}
    assert {"config.json", "generation_config.json", TOKENIZER_FILE} <= set(snapshot(out))
    assert snapshot(qwen_run) == before


def test_to_qwen_vl_as_a_function_refuses_too(qwen_run):
    with pytest.raises(ConversionError, match="refusing"):
        to_qwen_vl(qwen_run, qwen_run)
