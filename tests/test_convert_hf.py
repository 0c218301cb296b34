"""``lavis.convert from-hf`` / ``to-hf``: transformers Qwen2-VL / Qwen2.5-VL checkpoints <-> ours.

Tiny random checkpoints of both families in both tensor layouts (``tests/hf_qwen2_vl.py``) go through
``from-hf`` (self-describing OUT, every tensor kept bit for bit under our names) and back through
``to-hf`` (the same key set and bits, a directory transformers loads). Bad inputs name what is wrong.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hf_qwen2_vl import TOKEN_IDS, tiny_checkpoint
from safetensors.torch import load_file

from lavis.interop.convert.cli import main
from lavis.interop.convert.hf_qwen2_vl import LAYOUTS, from_hf, rename, to_hf
from lavis.interop.convert.layout import ConversionError

CASES = [("qwen2_vl", "released"), ("qwen2_vl", "transformers5"), ("qwen2_5_vl", "released"), ("qwen2_5_vl", "transformers5")]
DTYPES = {"qwen2_5_vl": torch.bfloat16}  # one family kept in bf16 (dtype kept), the other in fp32


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, Path]]:
    """(source, from-hf OUT) per (kind, layout)."""
    root = tmp_path_factory.mktemp("hf")
    found = {}
    for kind, layout in CASES:
        src = tiny_checkpoint(root / f"{kind}-{layout}", kind, layout, dtype=DTYPES.get(kind, torch.float32))
        assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) >= 2
        found[kind, layout] = (src, from_hf(src, root / f"{kind}-{layout}-ours"))
    return found


@pytest.fixture(scope="module")
def round_trip(converted, tmp_path_factory):
    """``round_trip(kind, layout)``: (source, from-hf OUT, to-hf OUT of it), written once."""
    root, done = tmp_path_factory.mktemp("back"), {}

    def get(kind: str, layout: str) -> tuple[Path, Path, Path]:
        if (kind, layout) not in done:
            src, out = converted[kind, layout]
            done[kind, layout] = (src, out, to_hf(out, root / f"{kind}-{layout}"))
        return done[kind, layout]

    return get


# --------------------------------------------------------------------------- from-hf


@pytest.mark.parametrize("kind, layout", CASES)
def test_from_hf_keeps_every_tensor_under_our_names(converted, kind, layout):
    src, out = converted[kind, layout]
    source, ours = read_weights(src), load_file(str(out / "model.safetensors"))
    assert len(ours) == len(source)
    for name, tensor in source.items():
        mine = ours[rename(name, LAYOUTS[layout])]
        assert mine.dtype == tensor.dtype == DTYPES.get(kind, torch.float32) and torch.equal(mine, tensor), name
    assert {n.split(".")[0] for n in ours} == {"vision", "adapter", "llm"}
    assert ("llm.lm_head.weight" in ours) == (kind == "qwen2_vl")  # Qwen2.5-VL's tiny model ties its embeddings
    assert "adapter.mlp.0.weight" in ours and "vision.model.blocks.1.attn.qkv.weight" in ours
    assert not any(".merger." in n for n in ours)


@pytest.mark.parametrize("kind, layout", CASES)
def test_from_hf_output_describes_itself(converted, kind, layout):
    from lavis.models.loading import model_config
    from lavis.processors.tokenizer import HFTokenizer

    src, out = converted[kind, layout]
    meta = json.loads((out / "meta.json").read_text())
    assert meta == {"weights": "converted", "weights_file": "model.safetensors", "converted_from": str(src),
                    "located_keys": ["model.tokenizer.path"], "hf_layout": layout}
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "hf_config.json", "tokenizer.json", "tokenizer_config.json",
                                                "vocab.json", "merges.txt", "chat_template.jinja", "preprocessor_config.json",
                                                "generation_config.json"}
    assert (out / "hf_config.json").read_bytes() == (src / "config.json").read_bytes()
    model = model_config(out / "config.yaml").model  # validated; the tokenizer located where OUT lies
    assert (model.vision.type, model.adapter.type, model.llm.type) == ("qwen2_vl_vit", "patch_merger", "qwen2_vl_lm")
    assert model.tokenizer.params["path"] == str(out) and model.load_from is None
    assert model.adapter.params == {"merge_size": 2, "norm": "layernorm" if kind == "qwen2_vl" else "rmsnorm", "pretrained": None}
    vision, llm = model.vision.params["config"], model.llm.params["config"]
    assert vision["model_type"] == llm["model_type"] == kind and vision["depth"] == 2
    assert llm["hidden_size"] == 64 and llm["tie_word_embeddings"] == (kind == "qwen2_5_vl")
    assert llm["rope_parameters"]["mrope_section"] == [2, 3, 3]
    dtype = "bfloat16" if kind == "qwen2_5_vl" else "float32"
    assert model.llm.params["dtype"] == model.vision.params["dtype"] == dtype
    image = model.image_processor.params
    assert (image["min_pixels"], image["max_pixels"], image["merge_size"]) == (56 * 56, 28 * 28 * 64, 2)  # both file forms
    tokenizer = HFTokenizer(str(out), model.tokenizer.params["special_tokens"])
    assert (tokenizer.img_start_id, tokenizer.img_pad_id) == (TOKEN_IDS["<|vision_start|>"], TOKEN_IDS["<|image_pad|>"])
    assert len(tokenizer) == len(TOKEN_IDS) + 1024  # nothing added: every framework token is mapped or present


def test_a_moved_output_still_loads_its_tokenizer(converted, tmp_path):
    from lavis.models.loading import model_config

    _, out = converted["qwen2_vl", "released"]
    moved = shutil.copytree(out, tmp_path / "moved")
    assert model_config(moved / "config.yaml").model.tokenizer.params["path"] == str(moved)


# --------------------------------------------------------------------------- to-hf


@pytest.mark.parametrize("kind, layout", CASES)
def test_to_hf_gives_back_the_source_bit_for_bit(round_trip, kind, layout):
    src, _, back = round_trip(kind, layout)
    source, written = read_weights(src), read_weights(back)
    assert written.keys() == source.keys()  # the source's layout (meta.json hf_layout), tied lm_head left out
    for name, tensor in source.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name


@pytest.mark.parametrize("kind, layout", CASES)
def test_to_hf_output_loads_in_transformers_with_the_source_weights(round_trip, kind, layout):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    src, _, back = round_trip(kind, layout)
    theirs, ours = AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(back)
    assert ours.model_type == kind and ours.tie_word_embeddings == theirs.tie_word_embeddings
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert getattr(ours, key) == getattr(theirs, key), key
    def text(config) -> dict:  # the released form's rope_scaling 'type: mrope' is read as rope_type default
        fields = config.text_config.to_diff_dict() | {"dtype": None}
        fields.pop("tie_word_embeddings", None)  # the composite config's key (compared above)
        fields["rope_parameters"] = {k: v for k, v in fields["rope_parameters"].items() if k != "type"}
        return fields

    assert text(ours) == text(theirs)
    assert ours.vision_config.to_dict() == theirs.vision_config.to_dict()
    expected = AutoModelForImageTextToText.from_pretrained(src).state_dict()
    model = AutoModelForImageTextToText.from_pretrained(back)
    assert type(model).__name__ == ("Qwen2VLForConditionalGeneration" if kind == "qwen2_vl" else "Qwen2_5_VLForConditionalGeneration")
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    processor = AutoProcessor.from_pretrained(back)
    size = processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (56 * 56, 28 * 28 * 64)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                         add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")
    assert json.loads((back / "generation_config.json").read_text()) == json.loads((src / "generation_config.json").read_text())


@pytest.mark.parametrize("kind, layout", CASES)
def test_load_model_holds_the_source_weights(converted, kind, layout):
    """``lavis.load_model(OUT)`` builds the three components from OUT's config.yaml and loads every tensor."""
    import lavis

    src, out = converted[kind, layout]
    model, processors = lavis.load_model(out, device="cpu")
    params = dict(model.named_parameters())
    source = read_weights(src)
    for name, tensor in source.items():
        ours = params[rename(name, LAYOUTS[layout])]
        # the adapter is built in fp32: a bf16 checkpoint's values are kept exactly
        assert torch.equal(ours.detach().to(tensor.dtype), tensor), name
    tied = kind == "qwen2_5_vl"
    assert len(params) == len(source) and (model.llm.lm_head.weight is model.llm.get_input_embeddings().weight) == tied
    assert processors.tokenizer.img_pad_id == TOKEN_IDS["<|image_pad|>"]


# End-to-end logits parity (transformers' *ForConditionalGeneration on the source vs lavis.load_model(OUT) on
# the same image and prompt, through AutoProcessor and our qwen2_vl_image + chat encoding) goes here.


# --------------------------------------------------------------------------- what is refused


def error_of(*args) -> str:
    with pytest.raises(ConversionError) as caught:
        from_hf(*args)
    return str(caught.value)


def test_from_hf_names_what_is_wrong_with_its_input(converted, tmp_path):
    src, out = converted["qwen2_vl", "released"]
    message = error_of(tmp_path / "absent", tmp_path / "o1")
    assert "absent/config.json not found" in message and "qwen2_vl" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"{empty / 'config.json'} not found" in error_of(empty, tmp_path / "o2")
    assert "to-hf converts it" in error_of(out, tmp_path / "o3")  # our own output given back

    other = shutil.copytree(src, tmp_path / "llama")
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    message = error_of(other, tmp_path / "o4")
    assert "model_type 'llama'" in message and "no 'vision_config'" in message and "'qwen2_vl' or 'qwen2_5_vl'" in message

    v1 = tmp_path / "qwen_vl"
    v1.mkdir()
    (v1 / "config.json").write_text(json.dumps({"model_type": "qwen", "visual": {"width": 32}}))
    (v1 / "qwen.tiktoken").write_text("")
    message = error_of(v1, tmp_path / "o5")
    assert "model_type 'qwen'" in message and "from-qwen-vl converts it" in message

    no_weights = shutil.copytree(src, tmp_path / "no_weights")
    for file in [*no_weights.glob("*.safetensors"), no_weights / "model.safetensors.index.json"]:
        file.unlink()
    assert "no weights (model.safetensors" in error_of(no_weights, tmp_path / "o6")

    shard_gone = shutil.copytree(src, tmp_path / "shard_gone")
    next(iter(sorted(shard_gone.glob("model-*.safetensors")))).unlink()
    assert "shards are missing" in error_of(shard_gone, tmp_path / "o7")

    no_tokenizer = shutil.copytree(src, tmp_path / "no_tokenizer")
    for name in ("tokenizer.json", "vocab.json"):
        (no_tokenizer / name).unlink()
    assert "no tokenizer" in error_of(no_tokenizer, tmp_path / "o8")

    no_processor = shutil.copytree(src, tmp_path / "no_processor")
    (no_processor / "preprocessor_config.json").unlink()
    assert "preprocessor_config.json not found" in error_of(no_processor, tmp_path / "o9")
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())  # nothing written


def test_from_hf_refuses_incomplete_or_foreign_weights(tmp_path):
    from huggingface_hub import save_torch_state_dict

    src = tiny_checkpoint(tmp_path / "src", "qwen2_vl", shards=1)
    state = load_file(str(src / "model.safetensors"))
    state.pop("visual.merger.mlp.2.bias")
    save_torch_state_dict(state, src)
    message = error_of(src, tmp_path / "out")
    assert "missing" in message and "visual.merger.mlp.2.bias" in message
    state["visual.merger.mlp.2.bias"] = torch.zeros(64)
    state["model.visual.blocks.0.norm1.weight"] = torch.zeros(32)  # both layouts at once
    save_torch_state_dict(state, src)
    assert "both of the released layout" in error_of(src, tmp_path / "out")
    state.pop("model.visual.blocks.0.norm1.weight")
    state["text_projection.weight"] = torch.zeros(2)
    save_torch_state_dict(state, src)
    assert "text_projection.weight" in error_of(src, tmp_path / "out")


def test_from_hf_refuses_a_non_empty_output_without_overwrite(converted, tmp_path):
    src, _ = converted["qwen2_5_vl", "released"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert "is not empty" in error_of(src, out)
    from_hf(src, out, overwrite=True)
    assert (out / "model.safetensors").is_file()
    assert (next(tmp_path.glob("out.old-*")) / "mine.txt").read_text() == "keep"


def test_to_hf_refuses_a_model_of_other_components(tmp_path):
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from lavis.common.config import load_config
    from lavis.common.resources import CONFIG_ROOT

    run = tmp_path / "export"
    run.mkdir()
    raw = load_config(CONFIG_ROOT / "models" / "presets" / "tiny.yaml").raw
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
    save_file({"adapter.x": torch.zeros(1)}, str(run / "model.safetensors"))
    with pytest.raises(ConversionError) as caught:
        to_hf(run, tmp_path / "out")
    message = str(caught.value)
    assert "model.vision.type 'timm_vit'" in message and "qwen2_vl_vit" in message and "patch_merger" in message
    assert not (tmp_path / "out").exists()


def test_cli(converted, tmp_path, capsys):
    src, _ = converted["qwen2_vl", "transformers5"]
    assert main(["from-hf", str(src), str(tmp_path / "ours")]) == 0
    assert load_file(str(tmp_path / "ours" / "model.safetensors")).keys() == load_file(str(converted["qwen2_vl", "transformers5"][1] /
                                                                                        "model.safetensors")).keys()
    with pytest.raises(SystemExit) as exited:
        main(["from-hf", str(tmp_path / "absent"), str(tmp_path / "x")])
    assert exited.value.code == 2 and "config.json not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["to-hf", str(src), str(tmp_path / "y")])  # a transformers checkpoint is not a model trained here
    assert exited.value.code == 2 and "from-hf converts it" in capsys.readouterr().err


def test_cli_to_hf(round_trip, tmp_path):
    src, out, _ = round_trip("qwen2_vl", "transformers5")
    assert main(["to-hf", str(out), str(tmp_path / "back")]) == 0
    assert read_weights(tmp_path / "back").keys() == read_weights(src).keys()
