"""The ``qwen2_vl_lm`` LLM (Qwen2-VL / Qwen2.5-VL's language model, M-RoPE): logits equal to transformers' own
model's, 3-D positions in generation (greedy, beams, left padding), both checkpoint layouts, resizing, the meta
device, the default YAML and LoRA; tiny random models built here."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lavis.common.config.merging import CONFIG_ROOT
from lavis.common.registry import registry
from lavis.models.llm import qwen2_vl_lm as module
from lavis.models.llm.qwen2_vl_lm import MRopeCausalLM, Qwen2_5_VLCausalLM, Qwen2VLCausalLM
from lavis.models.positions import position_ids_from_mask

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

YAML = CONFIG_ROOT / "models" / "llm" / "qwen2_vl_lm.yaml"
HIDDEN, VOCAB = 64, 320
# head_dim 16: the rotary frequencies (head_dim / 2 = 8) split over (temporal, height, width)
TEXT = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=VOCAB, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=None, eos_token_id=None)
VISION = {"qwen2_vl": dict(depth=1, embed_dim=32, hidden_size=HIDDEN, num_heads=2),
          "qwen2_5_vl": dict(depth=1, hidden_size=32, out_hidden_size=HIDDEN, num_heads=2, intermediate_size=64, fullatt_block_indexes=[0])}
REFERENCE = {"qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
             "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)}
ATOL = 1e-5

build = registry.get("llm", "qwen2_vl_lm")


def reference(family: str = "qwen2_vl", tie: bool = False, seed: int = 0):
    """A tiny transformers Qwen2-VL / Qwen2.5-VL (vision tower included), random weights, eval mode."""
    config_cls, model_cls = REFERENCE[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(text_config=TEXT, vision_config=VISION[family], tie_word_embeddings=tie)).eval()
    with torch.no_grad():  # weights well above the init's 0.02: sharp attention, so that positions change the logits
        for name, p in model.named_parameters():
            if name.startswith(("model.language_model.", "lm_head.")) and p.ndim == 2:
                p.normal_(std=0.3)
    return model


def ours_from(ref, family: str = "qwen2_vl", tie: bool = False) -> MRopeCausalLM:
    """Ours from the same text config, holding the reference's language-model and LM-head weights."""
    llm = build(config={"model_type": family, **TEXT, "tie_word_embeddings": tie}).eval()
    llm.model.load_state_dict(ref.model.language_model.state_dict())
    if not tie:
        llm.lm_head.load_state_dict(ref.lm_head.state_dict())
    return llm


def ref_logits(ref, embeds, mask, positions):
    hidden = ref.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    return ref.lm_head(hidden)


def image_row(before: int, grid: tuple[int, int], after: int, pad: int = 0) -> torch.Tensor:
    """[3, L] positions as Qwen2-VL gives them: ``pad`` pads (position 1, as get_rope_index fills them), text,
    an h x w image block (one temporal step; height and width vary), text again from the largest position + 1."""
    h, w = grid
    text = torch.arange(before).expand(3, -1)
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    image = torch.stack([torch.zeros(h * w, dtype=torch.long), rows, cols]) + before
    start = int(image.max()) + 1 if h * w else before
    tail = (torch.arange(after) + start).expand(3, -1)
    return torch.cat([torch.ones(3, pad, dtype=torch.long), text, image, tail], dim=1)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded rows of 11: a 2x3 image between text, and a shorter all-text row (3 pads)."""
    positions = torch.stack([image_row(3, (2, 3), 2), image_row(8, (0, 0), 0, pad=3)], dim=1)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0
    return positions, mask


@pytest.fixture(scope="module")
def pair():
    ref = reference()
    return ref, ours_from(ref)


# --------------------------------------------------------------------------- logits


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("padded", [False, True])
def test_logits_equal_transformers_language_model(family, padded):
    ref = reference(family)
    llm = ours_from(ref, family)
    assert isinstance(llm, {"qwen2_vl": Qwen2VLCausalLM, "qwen2_5_vl": Qwen2_5_VLCausalLM}[family])
    torch.manual_seed(1)
    embeds = torch.randn(2, 11, HIDDEN)
    positions, mask = batch()
    if not padded:
        mask = torch.ones_like(mask)
    assert not torch.equal(positions[0], positions[1]) and not torch.equal(positions[:, 0][1], positions[:, 0][2])
    with torch.no_grad():
        ours = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        theirs = ref_logits(ref, embeds, mask, positions)
        text_only = ref_logits(ref, embeds, mask, positions[0].expand(3, -1, -1))
    real = mask.bool()
    assert (ours - theirs)[real].abs().max() < ATOL
    assert (ours - text_only)[real].abs().max() > 1e-3  # the per-axis positions matter


def test_names_are_qwen2_causal_lm_names(pair):
    _, llm = pair
    names = {name for name, _ in llm.named_parameters()}
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.1.self_attn.q_proj.bias"} <= names
    assert all(n.startswith(("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")) for n in names)
    assert llm.position_dims == 3 and llm.mrope_section == [2, 3, 3]
    assert "Qwen2VLDecoderLayer" in llm._no_split_modules


def test_decoder_hidden_states_are_forwards(pair):
    _, llm = pair
    torch.manual_seed(2)
    embeds = torch.randn(2, 11, HIDDEN)
    positions, mask = batch()
    with torch.no_grad():
        hidden = llm.get_decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
        logits = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(llm.get_output_embeddings()(hidden), logits)
    assert llm.get_input_embeddings() is llm.model.embed_tokens


def test_two_d_and_missing_positions_are_text_positions(pair):
    _, llm = pair
    torch.manual_seed(3)
    embeds = torch.randn(2, 11, HIDDEN)
    _, mask = batch()
    text = position_ids_from_mask(mask)
    with torch.no_grad():
        three = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=text.expand(3, -1, -1)).logits
        two = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=text).logits
        none = llm(inputs_embeds=embeds, attention_mask=mask).logits
        alone = llm(inputs_embeds=embeds[1:, 3:]).logits
    assert torch.equal(two, three) and torch.equal(none, three)
    assert (none[1, 3:] - alone[0]).abs().max() < 1e-4  # left padding changes nothing (float rounding: logits ~ 4)


def test_cache_continues_the_prefill(pair):
    """Prefill with a cache, then one token through ``past_key_values`` (the deprecated name) and ``cache``."""
    _, llm = pair
    torch.manual_seed(4)
    embeds = torch.randn(2, 12, HIDDEN)
    positions = torch.cat([batch()[0], torch.full((3, 2, 1), 20)], dim=-1)
    mask = torch.ones(2, 12, dtype=torch.long)
    with torch.no_grad():
        full = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        for name in ("past_key_values", "cache"):
            out = llm(inputs_embeds=embeds[:, :11], attention_mask=mask[:, :11], position_ids=positions[..., :11], use_cache=True)
            step = llm(inputs_embeds=embeds[:, 11:], attention_mask=mask, position_ids=positions[..., 11:], **{name: out.cache})
            assert (step.logits[:, -1] - full[:, -1]).abs().max() < 1e-4  # float rounding only: logits ~ 4


# --------------------------------------------------------------------------- generation


def generation_batch(llm):
    """Two left-padded prompts: text, a 2x3 image, text (11); text then a 2x2 image at the end (6, 5 pads).
    The second ends on the image: its axes' last positions differ (3, 3, 4 here), the next token is at 5 on all."""
    torch.manual_seed(5)
    embeds = torch.randn(2, 11, HIDDEN)
    positions = torch.stack([image_row(3, (2, 3), 2), image_row(2, (2, 2), 0, pad=5)], dim=1)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :5] = 0
    return embeds, mask, positions


def greedy_by_full_forwards(ref, embeds, mask, positions, steps: int, per_axis: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference decoding: the whole sequence again at every step, positions extended by hand: from the row's
    largest position + 1 on all axes (Qwen2-VL), or with ``per_axis`` from each axis' last position + 1.
    Returns the tokens [B, steps] and each step's logits [B, steps, V]."""
    tokens, logits = [], []
    real = positions.masked_fill(mask[None] == 0, -1)
    nxt = positions[..., -1] + 1 if per_axis else real.amax(dim=(0, 2)).expand(3, -1) + 1  # [3, B]
    with torch.no_grad():
        for _ in range(steps):
            logits.append(ref_logits(ref, embeds, mask, positions)[:, -1])
            token = logits[-1].argmax(-1)
            tokens.append(token)
            embeds = torch.cat([embeds, ref.model.language_model.embed_tokens(token)[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = torch.cat([positions, nxt[..., None]], dim=-1)
            nxt = nxt + 1
    return torch.stack(tokens, dim=1), torch.stack(logits, dim=1)


GREEDY = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)


def test_greedy_generation_equals_full_forwards(pair):
    ref, llm = pair
    embeds, mask, positions = generation_batch(llm)
    tokens, logits = greedy_by_full_forwards(ref, embeds, mask, positions, 12)
    with torch.no_grad():
        out = llm.generate(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, return_dict_in_generate=True,
                           output_logits=True, **GREEDY)
    assert out.sequences.shape == (2, 12)
    assert torch.equal(out.sequences, tokens)
    assert (torch.stack(out.logits, dim=1) - logits).abs().max() < 1e-4  # cached decoding vs full forwards; logits ~ 4
    # transformers' default continuation (each axis' last position + 1) gives other logits to the image-ending row
    _, per_axis = greedy_by_full_forwards(ref, embeds, mask, positions, 2, per_axis=True)
    assert torch.allclose(per_axis[0], logits[0, :2], atol=1e-5) and (per_axis[1, 1] - logits[1, 1]).abs().max() > 1e-2


def test_generation_row_alone_equals_row_in_batch(pair):
    _, llm = pair
    embeds, mask, positions = generation_batch(llm)
    for beams in (1, 2):
        options = {**GREEDY, "num_beams": beams, **({"early_stopping": True, "length_penalty": 1.0} if beams > 1 else {})}
        with torch.no_grad():
            together = llm.generate(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **options)
            alone = [llm.generate(inputs_embeds=embeds[i:i + 1, start:], attention_mask=mask[i:i + 1, start:],
                                  position_ids=positions[:, i:i + 1, start:], **options) for i, start in ((0, 0), (1, 5))]
        assert together.shape == (2, 12), beams
        assert torch.equal(together, torch.cat(alone)), beams


def test_generation_options_lavis_passes(pair):
    _, llm = pair
    embeds, mask, positions = generation_batch(llm)
    streamed = []

    class Streamer:
        def put(self, value):
            streamed.append(value)

        def end(self):
            streamed.append(None)

    with torch.no_grad():
        sampled = llm.generate(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, max_new_tokens=5, min_new_tokens=2,
                               num_beams=1, num_return_sequences=1, do_sample=True, temperature=0.7, top_p=0.9, top_k=0,
                               eos_token_id=[7], pad_token_id=0, use_cache=True, synced_gpus=False, suppress_tokens=[1, 2],
                               streamer=Streamer())
        no_positions = llm.generate(inputs_embeds=embeds, attention_mask=mask, **GREEDY)
        text = position_ids_from_mask(mask)
        explicit = llm.generate(inputs_embeds=embeds, attention_mask=mask, position_ids=text.expand(3, -1, -1), **GREEDY)
        two_d = llm.generate(inputs_embeds=embeds, attention_mask=mask, position_ids=text, **GREEDY)
        cached = llm.generate(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **GREEDY)
        uncached = llm.generate(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **GREEDY, use_cache=False)
    assert sampled.shape[0] == 2 and 2 <= sampled.shape[1] <= 5
    assert not torch.isin(sampled, torch.tensor([1, 2])).any()
    assert streamed[-1] is None and len(streamed) >= 2
    assert torch.equal(no_positions, explicit) and torch.equal(two_d, explicit)
    assert torch.equal(uncached, cached)


def test_extend_positions_continues_from_the_largest_attended_position():
    positions = torch.tensor([[[1, 0, 1, 2]], [[1, 0, 3, 3]], [[1, 0, 2, 4]]])  # [3, 1, 4]; pad first
    mask = torch.tensor([[0, 1, 1, 1]])
    out = module.extend_positions(positions, mask, 2)
    assert out[:, 0, 4:].tolist() == [[5, 6]] * 3
    masked_pad = module.extend_positions(torch.tensor([[[9, 0]]] * 3), torch.tensor([[0, 1]]), 1)
    assert masked_pad[:, 0, -1].tolist() == [1, 1, 1]
    assert module.extend_positions(torch.tensor([[0, 1, 2]]), None, 1).tolist() == [[0, 1, 2, 3]]


# --------------------------------------------------------------------------- pretrained


def released_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key layout of the released Qwen2-VL checkpoints: ``model.X`` and ``visual.X``."""
    def rename(key: str) -> str:
        if key.startswith("model.language_model."):
            return "model." + key.removeprefix("model.language_model.")
        return key.removeprefix("model.") if key.startswith("model.visual.") else key

    return {rename(k): v.contiguous() for k, v in state.items()}


def write(directory, config: dict, state: dict[str, torch.Tensor]):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(state, str(directory / "model.safetensors"))
    return directory


def expected_state(ref, tie: bool) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v for k, v in ref.model.language_model.state_dict().items()}
    state["lm_head.weight"] = ref.lm_head.weight.detach()
    return state


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("tie", [False, True])
def test_pretrained_loads_both_key_layouts(tmp_path, family, tie):
    ref = reference(family, tie=tie)
    ref.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    state = {k: v for k, v in ref.state_dict().items() if not (tie and k == "lm_head.weight")}  # tied: no lm_head
    internal = write(tmp_path / "internal", config, {k: v.contiguous() for k, v in state.items()})  # model.language_model.*
    released = write(tmp_path / "released", config, released_layout(state))
    assert any(k.startswith("model.language_model.") for k in load_file(internal / "model.safetensors"))
    assert any(k.startswith("visual.") for k in load_file(released / "model.safetensors"))
    expected = expected_state(ref, tie)
    for directory in (tmp_path / "saved", internal, released):
        llm = build(pretrained=str(directory))
        assert type(llm).__name__ == {"qwen2_vl": "Qwen2VLCausalLM", "qwen2_5_vl": "Qwen2_5_VLCausalLM"}[family]
        got = llm.state_dict()
        assert got.keys() == expected.keys(), directory.name
        assert all(torch.equal(got[k], expected[k]) for k in expected), directory.name
        assert (llm.lm_head.weight is llm.model.embed_tokens.weight) == tie


def test_pretrained_old_flat_config_and_inline_overrides(tmp_path):
    """A config.json with the text fields at the top level (the released Qwen2-VL files), rope as rope_scaling."""
    ref = reference()
    flat = {"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"], "tie_word_embeddings": False,
            **{k: v for k, v in TEXT.items() if k != "rope_parameters"}, "rope_theta": 10000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "vision_config": VISION["qwen2_vl"]}
    directory = write(tmp_path / "flat", flat, released_layout(ref.state_dict()))
    llm = build(pretrained=str(directory), config={"attention_dropout": 0.25, "rope_theta": 500.0})
    assert llm.config.hidden_size == HIDDEN and llm.mrope_section == [2, 3, 3]
    assert llm.config.attention_dropout == 0.25 and llm.config.rope_parameters["rope_theta"] == 500.0
    assert torch.equal(llm.lm_head.weight, ref.lm_head.weight)
    with pytest.raises(ValueError, match=r"model\.llm\.config\.hidden_size: 128 contradicts .* model\.llm\.config: null"):
        build(pretrained=str(directory), config={"hidden_size": 128})
    with pytest.raises(ValueError, match=r"model\.llm\.config\.model_type 'qwen2_5_vl' contradicts"):
        build(pretrained=str(directory), config={"model_type": "qwen2_5_vl"})


def test_pretrained_errors_name_the_key(tmp_path):
    other = tmp_path / "qwen2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
    with pytest.raises(ValueError, match=r"model\.llm\.pretrained.*config\.json.*got 'qwen2'.*hf_causal_lm"):
        build(pretrained=str(other))
    with pytest.raises(ValueError, match=r"model\.llm\.pretrained: .* is not a local directory"):
        build(pretrained=str(tmp_path / "absent"))
    ref = reference()
    ref.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model\.llm\.pretrained: no model\.safetensors"):
        build(pretrained=str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"model\.llm\.config\.model_type must be one of qwen2_vl"):
        build(config={**TEXT, "model_type": "qwen2"})
    with pytest.raises(ValueError, match=r"needs a 'model_type'"):
        build(config=TEXT)
    with pytest.raises(ValueError, match=r"mrope_section must be 3 numbers summing to head_dim / 2 = 8"):
        build(config={**TEXT, "model_type": "qwen2_vl", "rope_parameters": {"mrope_section": [4, 4, 4]}})


def test_missing_lm_head_of_an_untied_checkpoint_is_an_error(tmp_path):
    ref = reference()
    ref.save_pretrained(tmp_path / "saved")
    state = {k: v for k, v in released_layout(ref.state_dict()).items() if k != "lm_head.weight"}
    directory = write(tmp_path / "headless", json.loads((tmp_path / "saved" / "config.json").read_text()), state)
    with pytest.raises(ValueError, match=r"model\.llm\.pretrained: .* lacks 1 of its weights.*lm_head\.weight"):
        build(pretrained=str(directory))


# --------------------------------------------------------------------------- meta device, YAML


def test_meta_device_reads_no_weights(tmp_path, monkeypatch):
    ref = reference()
    ref.save_pretrained(tmp_path / "saved")

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read under the meta device")

    monkeypatch.setattr(module, "load_language_model", refuse)
    monkeypatch.setattr("lavis.models.hf_checkpoint._tensors", refuse)
    with torch.device("meta"):
        llm = build(pretrained=str(tmp_path / "saved"))
        fallback = build(pretrained=str(tmp_path / "absent"), config={"model_type": "qwen2_vl", **TEXT})
    for model in (llm, fallback):
        assert all(p.device.type == "meta" for p in model.parameters())
        assert model.config.hidden_size == HIDDEN


QWEN2_VL_2B_TEXT = {"model_type": "qwen2_vl", "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
                    "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936,
                    "rope_parameters": {"rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}, "tie_word_embeddings": True}


def test_default_yaml_needs_a_model_and_builds_qwen2_vl_2b_text_model_on_meta():
    """The default names no model (its config would merge into other checkpoints' and families'); with the
    config its comment gives, Qwen2-VL-2B's language model."""
    cfg = yaml.safe_load(YAML.read_text())
    assert cfg.pop("type") == "qwen2_vl_lm" and cfg["config"] is None and cfg["pretrained"] is None
    with pytest.raises(ValueError, match=r"model\.llm: set 'pretrained'"):
        build(**cfg)
    with torch.device("meta"):
        llm = build(**{**cfg, "config": QWEN2_VL_2B_TEXT})
    assert llm.activation_checkpointing is False and llm.model.gradient_checkpointing is False
    assert llm.config.model_type == "qwen2_vl_text" and llm.mrope_section == [16, 24, 24]
    assert llm.lm_head.weight is llm.model.embed_tokens.weight
    assert 1.5e9 < sum(p.numel() for p in llm.parameters()) < 1.6e9  # Qwen2-VL-2B's language model: 1.54B


def test_dtype_and_attention_and_checkpointing_flags():
    llm = build(config={"model_type": "qwen2_5_vl_text", **TEXT}, dtype="bfloat16", attn_implementation="eager",
                gradient_checkpointing=True)
    assert llm.lm_head.weight.dtype == torch.bfloat16 and llm.config._attn_implementation == "eager"
    assert llm.activation_checkpointing is True and llm.model.gradient_checkpointing is False
    with pytest.raises(ValueError, match=r"model\.llm\.dtype"):
        build(config={"model_type": "qwen2_vl", **TEXT}, dtype="int8")


# --------------------------------------------------------------------------- resizing, LoRA


@pytest.mark.parametrize("tie", [False, True])
def test_resize_token_embeddings_grows_the_vocabulary(tie):
    llm = build(config={"model_type": "qwen2_vl", **TEXT, "tie_word_embeddings": tie})
    before = llm.get_input_embeddings().weight[:VOCAB].clone()
    llm.resize_token_embeddings(VOCAB + 10, mean_resizing=False)
    assert llm.get_input_embeddings().weight.shape == (VOCAB + 10, HIDDEN)
    assert llm.lm_head.weight.shape == (VOCAB + 10, HIDDEN) and llm.config.vocab_size == VOCAB + 10
    assert torch.equal(llm.get_input_embeddings().weight[:VOCAB], before)
    assert (llm.lm_head.weight is llm.model.embed_tokens.weight) == tie
    logits = llm(input_ids=torch.tensor([[VOCAB + 9, 3]])).logits
    assert logits.shape == (1, 2, VOCAB + 10)


def test_lora_injects_and_trains():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(6)
    llm = build(config={"model_type": "qwen2_vl", **TEXT})
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False), llm)
    trained = {name for name, p in llm.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    assert sum(".q_proj.lora_A." in name for name in trained) == TEXT["num_hidden_layers"]
    embeds = torch.randn(2, 11, HIDDEN)
    positions, mask = batch()
    labels = torch.randint(0, VOCAB, (2, 11))

    def loss():
        logits = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

    optimizer = torch.optim.SGD([p for p in llm.parameters() if p.requires_grad], lr=0.5)
    first = loss()
    first.backward()
    optimizer.step()
    with torch.no_grad():
        assert loss() < first.detach() - 1e-4
