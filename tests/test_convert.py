"""``lavis.convert``: Qwen-VL's released layout <-> ours, with parity against Qwen-VL's own code.

``tests/fixtures/qwen_vl_tiny/`` (see its NOTES.md) holds a tiny Qwen-VL's config.json, the seed its
random weights are redrawn from here (checked by sha256), an image, and what Qwen-VL's original code
computed with them: logits at the text positions at two image sizes and a greedy continuation. The
model is converted with ``from-qwen-vl``, built through the normal config path over
``configs/models/presets/qwen_vl_chat.yaml``, compared, and written back with ``to-qwen-vl``.
Tests that read text need Qwen's real vocabulary from the shared reference (skipped without it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from helpers import FIXTURE, regenerate, tokenizer_file, write_release
from safetensors.torch import load_file, save_file

from lavis.interop.convert.cli import main
from lavis.interop.convert.layout import (
    ConversionError,
    original_shapes,
    to_original,
    to_ours,
)
from lavis.interop.convert.release import (
    ADAPTER_FILE,
    TOKENIZER_FILE,
    VISION_FILE,
    from_qwen_vl,
    to_qwen_vl,
)

pytestmark = pytest.mark.integration

PRESET = REPO / "configs" / "models" / "presets" / "qwen_vl_chat.yaml"
TOLERANCE = 1e-4  # fp32 logits
RELEASE_NUMEL = 19_313_870_336 // 2  # Qwen-VL-Chat's pytorch_model.bin.index.json: total_size in bf16 bytes
# The preset at the fixture's sizes: what a user converting a smaller Qwen-VL would override.
TINY_OPTIONS = (
    "model.vision.image_size=128",
    ("model.vision.model_kwargs={patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 4.0, "
     "pre_norm: true, final_norm: false}"),
    "model.vision.gradient_checkpointing=false",
    "model.llm.gradient_checkpointing=false",
    "model.llm.dtype=float32",
    "model.llm.config=null",  # the preset's inline config holds Qwen-VL-Chat's sizes
)


@pytest.fixture(scope="module")
def fixture() -> dict:
    return json.loads((FIXTURE / "fixture.json").read_text())


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((FIXTURE / "config.json").read_text())


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "reference.safetensors"))


@pytest.fixture(scope="module")
def original(config, fixture) -> dict[str, torch.Tensor]:
    """The fixture's weights in Qwen-VL's layout, redrawn from its seed."""
    return regenerate()["random_original_state"](config, fixture["seed"])


@pytest.fixture(scope="module")
def converted(tmp_path_factory, config, original) -> Path:
    """``from-qwen-vl`` of the fixture's release."""
    root = tmp_path_factory.mktemp("convert")
    release = write_release(root / "release", config, original, tokenizer_file())
    assert len(list(release.glob("model-*.safetensors"))) == 2  # the index path is exercised
    assert main(["from-qwen-vl", str(release), str(root / "converted")]) == 0
    return root / "converted"


@pytest.fixture(scope="module")
def project(tmp_path_factory, converted) -> tuple[Path, list[str]]:
    path = tmp_path_factory.mktemp("project") / "qwen_vl_tiny.yaml"
    path.write_text(f"base: [{PRESET}]\n")
    return path, [f"model.llm.pretrained={converted}", *TINY_OPTIONS]


@pytest.fixture(scope="module")
def ours(project):
    """Our model built from the converted files through load_config + build_model."""
    from lavis.common.config import load_config
    from lavis.models import build_model

    cfg = load_config(*project)
    model, processors = build_model(cfg.model)
    model.eval().attach_processors(processors, cfg.model.system_message)
    return cfg, model, processors


# --------------------------------------------------------------------------- the layout


def test_regenerated_weights_match_the_fixture_checksum(original, fixture):
    assert regenerate()["checksum"](original) == fixture["sha256"]


def test_layout_maps_every_tensor_and_back_bitwise(original, config):
    parts = to_ours(original, config)
    assert sum(map(len, parts.values())) == len(original) + 2 * config["num_hidden_layers"] * 2  # c_attn -> q, k, v
    back = to_original(parts, config)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) and back[k].dtype == original[k].dtype for k in original)


def test_vit_attention_rows_go_from_per_head_to_timm_qkv(original, config):
    """visual.py views in_proj's output as [heads, 3 * head_dim] (q, k, v of head 0, then head 1);
    timm's qkv is [3, heads, head_dim]."""
    parts = to_ours(original, config)
    heads, width = config["visual"]["heads"], config["visual"]["width"]
    head_dim = width // heads
    in_proj = original["transformer.visual.transformer.resblocks.1.attn.in_proj.weight"]
    qkv = parts["vision"]["blocks.1.attn.qkv.weight"]
    for h in range(heads):
        for j in range(3):  # q, k, v
            theirs = in_proj[(3 * h + j) * head_dim: (3 * h + j + 1) * head_dim]
            assert torch.equal(qkv[j * width + h * head_dim: j * width + (h + 1) * head_dim], theirs)


def test_qwen_mlp_w2_is_the_gate(original, config):
    """modeling_qwen.py: c_proj(w1(x) * silu(w2(x))), Qwen2: down_proj(silu(gate_proj(x)) * up_proj(x))."""
    llm = to_ours(original, config)["llm"]
    assert torch.equal(llm["model.layers.0.mlp.gate_proj.weight"], original["transformer.h.0.mlp.w2.weight"])
    assert torch.equal(llm["model.layers.0.mlp.up_proj.weight"], original["transformer.h.0.mlp.w1.weight"])


# --------------------------------------------------------------------------- parity with Qwen-VL's code


def test_converted_files(converted, config):
    from transformers import AutoConfig

    assert {p.name for p in converted.iterdir()} >= {"config.json", "model.safetensors", VISION_FILE, ADAPTER_FILE, TOKENIZER_FILE}
    hf = AutoConfig.from_pretrained(converted)
    assert (hf.model_type, hf.intermediate_size, hf.rms_norm_eps, hf.tie_word_embeddings) == ("qwen2", 256, 1e-6, False)
    assert hf.rope_parameters["rope_theta"] == config["rotary_emb_base"]
    assert "adapter.proj" in load_file(str(converted / ADAPTER_FILE)) and "norm.weight" not in load_file(str(converted / VISION_FILE))


def model_inputs(reference, image_pad_id: int) -> torch.Tensor:
    """Qwen-VL's prompt ids with its image span (path bytes, then pads) as our <imgpad> run."""
    ids = reference["input_ids"].clone()
    start, end = (ids == 151857).nonzero()[0, 0], (ids == 151858).nonzero()[0, 0]
    ids[start + 1: end] = image_pad_id
    return ids[None]


@pytest.mark.parametrize("size", [128, 96])
def test_logits_equal_qwen_vl_at_the_configured_and_another_image_size(ours, reference, size):
    """At 128 px the 16x16 position tables are resized to 32x32 (as Qwen-VL-Chat's at 448 px), at 96
    px to 24x24: bicubic without antialiasing, as Qwen-VL's get_abs_pos."""
    from lavis.processors.image import CLIPImageProcessor, load_image

    _, model, processors = ours
    pixels = CLIPImageProcessor(size)(load_image(FIXTURE / "image.png"))[None]
    with torch.no_grad():
        logits = model(model_inputs(reference, processors.tokenizer.img_pad_id), pixel_values=pixels).logits
    logits = logits[0, reference["positions"]].float()
    worst = (logits[:, reference["columns"]] - reference[f"logits_{size}"]).abs().max().item()
    assert worst < TOLERANCE, worst
    assert (logits.logsumexp(-1) - reference[f"logsumexp_{size}"]).abs().max().item() < TOLERANCE  # all 151,936 columns
    assert torch.equal(logits.argmax(-1), reference[f"argmax_{size}"])


def test_our_prompt_is_qwen_vl_s_outside_the_image_span(ours, reference, fixture):
    from lavis.processors.conversation import ConversationEncoder

    cfg, model, processors = ours
    encoder = ConversationEncoder(processors.tokenizer, model.num_image_tokens, cfg.model.system_message, 1 << 20)
    encoded = encoder.encode_messages([{"role": "user", "content": fixture["query"]}], add_generation_prompt=True)
    assert encoded.input_ids == model_inputs(reference, processors.tokenizer.img_pad_id)[0].tolist()


def test_greedy_chat_continues_as_qwen_vl(ours, fixture):
    _, model, processors = ours
    query = fixture["query"].replace(fixture["image"], str(FIXTURE / fixture["image"]))
    response, _ = model.chat(query, max_new_tokens=fixture["max_new_tokens"])
    generated = fixture["generated_ids"]
    assert response == processors.tokenizer.decode(generated)
    # Qwen-VL's chat() strips the text and, when no stop token came, drops the last token (its decode_tokens)
    assert processors.tokenizer.decode(generated[:-1]).strip() == fixture["response"]


def test_the_converted_directory_loads_itself_wherever_it_lies(tmp_path, converted, ours, reference, fixture):
    """from-qwen-vl's OUT holds its config.yaml (the preset at the release's sizes) and meta.json:
    ``lavis.load_model(OUT)`` is the preset-built model, and still is once OUT has moved (its old
    path gone)."""
    import shutil

    import lavis
    from lavis.processors.image import CLIPImageProcessor, load_image

    _, expected_model, processors = ours
    ids = model_inputs(reference, processors.tokenizer.img_pad_id)
    pixels = CLIPImageProcessor(128)(load_image(FIXTURE / "image.png"))[None]
    with torch.no_grad():
        expected = expected_model(ids, pixel_values=pixels).logits
    out = tmp_path / "first"
    assert main(["from-qwen-vl", str(converted.parent / "release"), str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "meta.json"}
    for moved in (False, True):
        if moved:
            out = shutil.move(out, tmp_path / "elsewhere" / "moved")
            assert not (tmp_path / "first").exists()
        model, _ = lavis.load_model(out, device="cpu")
        with torch.no_grad():
            assert (model(ids, pixel_values=pixels).logits - expected).abs().max().item() < 1e-5
    # lavis.export reads the moved directory where it lies too (its config's files named through it)
    from lavis.interop.export import export

    exported, _ = lavis.load_model(export(out, tmp_path / "exported"), device="cpu")
    with torch.no_grad():
        assert (exported(ids, pixel_values=pixels).logits - expected).abs().max().item() < 1e-5
    query = fixture["query"].replace(fixture["image"], str(FIXTURE / fixture["image"]))
    response, _ = model.chat(query, max_new_tokens=fixture["max_new_tokens"])
    assert response == processors.tokenizer.decode(fixture["generated_ids"])


# --------------------------------------------------------------------------- back to Qwen-VL's layout


def test_round_trip_through_a_saved_model_is_bitwise(tmp_path, ours, original, config):
    """original -> from-qwen-vl -> our model saved as an exported model -> to-qwen-vl -> original."""
    from lavis.models.vlm import canonical_name

    cfg, model, _ = ours
    run = tmp_path / "exported"
    run.mkdir()
    cfg.save(run / "config.yaml")
    save_file({canonical_name(k): v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"))
    assert main(["to-qwen-vl", str(run), str(tmp_path / "qwen_vl")]) == 0
    written = json.loads((tmp_path / "qwen_vl" / "config.json").read_text())
    assert written == config
    back = {}
    for file in (tmp_path / "qwen_vl").glob("*.safetensors"):
        back.update(load_file(str(file)))
    assert back.keys() == original.keys()
    assert [k for k in original if not torch.equal(back[k], original[k])] == []
    assert (tmp_path / "qwen_vl" / TOKENIZER_FILE).read_bytes() == tokenizer_file().read_bytes()


# --------------------------------------------------------------------------- errors


def test_missing_files_are_named(tmp_path, config, original):
    src = tmp_path / "release"
    with pytest.raises(ConversionError, match="config.json not found"):
        from_qwen_vl(src, tmp_path / "out")
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="qwen.tiktoken not found"):
        from_qwen_vl(src, tmp_path / "out")
    (src / TOKENIZER_FILE).write_text("")
    with pytest.raises(ConversionError, match="no weights"):
        from_qwen_vl(src, tmp_path / "out")
    index = {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors",
                            "transformer.wte.weight": "model-00002-of-00002.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"2 of its 2 shards are missing: \['model-00001-of-00002.safetensors'"):
        from_qwen_vl(src, tmp_path / "out")


def test_missing_unexpected_and_misshapen_tensors_are_named(config, original):
    state = dict(original)
    del state["transformer.h.1.mlp.w2.weight"]
    with pytest.raises(ConversionError, match=r"1 tensors missing, e.g. \['transformer.h.1.mlp.w2.weight'\]"):
        to_ours(state, config)
    state = {**original, "transformer.visual.ln_post.weight": torch.zeros(3), "extra.weight": torch.zeros(1)}
    with pytest.raises(ConversionError, match=r"ln_post.weight: \(3,\), expected \(128,\).*unexpected tensors \['extra.weight'\]"):
        to_ours(state, config)


def test_quantized_release_is_refused_by_the_command(tmp_path, config):
    src = tmp_path / "int4"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    proc = subprocess.run([sys.executable, "-m", "lavis.convert", "from-qwen-vl", str(src), str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 2
    assert "quantized release (gptq)" in proc.stderr and "Qwen-VL-Chat" in proc.stderr


def test_shapes_at_the_release_sizes_count_its_parameters(config):
    """Qwen-VL-Chat's sizes give exactly the tensors of its release: its pytorch_model.bin.index.json
    says total_size 19,313,870,336 bytes of bf16."""
    release = dict(config)
    release.update(hidden_size=4096, intermediate_size=22016, kv_channels=128, num_attention_heads=32, num_hidden_layers=32,
                   visual={"heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48, "mlp_ratio": 4.9231,
                           "output_dim": 4096, "patch_size": 14, "width": 1664})
    shapes = original_shapes(release)
    assert shapes["transformer.visual.transformer.resblocks.47.mlp.c_fc.weight"] == (8192, 1664)
    assert shapes["transformer.visual.attn_pool.kv_proj.weight"] == (4096, 1664)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == RELEASE_NUMEL


def test_the_preset_builds_the_release_s_tensors(tmp_path):
    """configs/models/presets/qwen_vl_chat.yaml counted on the meta device (no files needed)."""
    from lavis.common.config import load_config
    from lavis.models import build_model

    (tmp_path / "p.yaml").write_text(f"base: [{PRESET}]\n")
    model, _ = build_model(load_config(tmp_path / "p.yaml").model, meta=True)
    vit = model.vision.model
    assert (vit.pos_embed.shape, vit.norm_pre.eps, vit.blocks[0].mlp.fc1.out_features) == ((1, 256, 1664), 1e-6, 8192)
    assert sum(t.numel() for t in model.state_dict().values()) == RELEASE_NUMEL


def test_a_model_without_qwen_vl_s_shape_is_refused(project):
    from lavis.common.config import load_config
    from lavis.interop.convert.layout import qwen_vl_config
    from lavis.models import build_model

    path, options = project
    model, _ = build_model(load_config(path, [*options, "model.vision.pos_embed_grid=null"]).model)  # a 32x32 table
    with pytest.raises(ConversionError, match="256-row position table"):
        qwen_vl_config(model, 151857)


def test_to_qwen_vl_refuses_another_tokenizer(tmp_path, load_sft):
    """The demo's model (embedded tokenizer): Qwen-VL's code could not read its ids."""
    run = tmp_path / "demo"
    run.mkdir()
    load_sft().save(run / "config.yaml")
    save_file({"llm.lm_head.weight": torch.zeros(1)}, str(run / "model.safetensors"))
    with pytest.raises(ConversionError, match="tokenizer is 'hf_tokenizer'"):
        to_qwen_vl(run, tmp_path / "out")


def test_a_lora_fine_tune_exports_merged_in_qwen_vl_s_layout(tmp_path, project, reference):
    """LoRA on the converted model's LLM (adapters given values) -> ``lavis.export --format qwen-vl``
    (merged) -> back through ``from-qwen-vl`` -> a plain model with the LoRA model's logits."""
    from lavis.common.config import load_config
    from lavis.interop.export import export
    from lavis.models import build_model
    from lavis.models.vlm import canonical_name
    from lavis.processors.image import CLIPImageProcessor, load_image

    path, options = project
    cfg = load_config(path, [*options, "model.freeze.llm={policy: lora, r: 4, alpha: 8, dropout: 0.0}"])
    lora, processors = build_model(cfg.model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    run = tmp_path / "lora_run"
    run.mkdir()
    cfg.save(run / "config.yaml")
    save_file({canonical_name(k): v.contiguous() for k, v in lora.state_dict().items()}, str(run / "model.safetensors"))

    export(run, tmp_path / "exported", format="qwen-vl")
    assert main(["from-qwen-vl", str(tmp_path / "exported" / "qwen_vl"), str(tmp_path / "back")]) == 0
    plain, _ = build_model(load_config(path, [f"model.llm.pretrained={tmp_path / 'back'}", *TINY_OPTIONS]).model)
    pixels = CLIPImageProcessor(128)(load_image(FIXTURE / "image.png"))[None]
    ids = model_inputs(reference, processors.tokenizer.img_pad_id)
    with torch.no_grad():
        expected = lora.eval()(ids, pixel_values=pixels).logits
        got = plain.eval()(ids, pixel_values=pixels).logits
    assert (got - expected).abs().max().item() < 1e-5
    assert not any(".lora_" in k for k in plain.state_dict())
