"""Training the native-resolution components (qwen2_vl_vit + patch_merger + qwen2_vl_lm) with the freeze
policies: a text-only batch still runs the visual path where it must, LoRA on the LLM and on the ViT trains
the adapters alone (the family's default targets), a LoRA run resumes bitwise, and ``export --format hf``
of a LoRA run from a converted transformers checkpoint is a Qwen2-VL directory holding ``W + scale * B @ A``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import sft_options
from hf_qwen2_vl import tiny_checkpoint
from safetensors.torch import load_file
from test_native_resolution import NATIVE, records

from lavis.common import checkpoint as ckpt
from lavis.common.config import load_config
from lavis.datasets.collate import PadCollator
from lavis.models import build_model
from lavis.models.freeze import LORA_TARGETS
from lavis.models.vlm import canonical_name
from lavis.processors.conversation import ConversationEncoder
from lavis.processors.sample import SampleProcessor
from lavis.runners import build_runner
from lavis.tracking.logging import read_metrics

LLM_LORA = "model.freeze.llm={policy: lora, r: 8}"  # alpha 16 (the default): scale 2
VISION_LORA = "model.freeze.vision={type: lora, r: 4, alpha: 8}"  # scale 2 (type, not policy: NATIVE set type trainable)
STEPS = ("run.max_steps=8", "run.save_every=1000", "run.lr=5e-3", "run.min_lr=5e-4", "run.batch_size=2")
# The layers the families' default targets (LORA_TARGETS) adapt, in a ViT block / an LLM decoder layer; a Qwen2-VL
# ViT has no gate/up/down_proj (Qwen2.5-VL's MLP).
VISION_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
LLM_TARGETS = tuple(f"{'mlp' if t in ('up_proj', 'gate_proj') else 'self_attn'}.{t}" for t in LORA_TARGETS["qwen2_vl_text"])


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter by canonical name, copied."""
    return {canonical_name(n): p.detach().clone() for n, p in model.named_parameters()}


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


def lora_modules(names, component: str) -> set[str]:
    """The layers of ``component`` that carry a LoRA adapter (their names up to ``.lora_A``)."""
    return {n.split(".lora_A.")[0] for n in names if n.startswith(f"{component}.") and ".lora_A." in n}


# --------------------------------------------------------------------------- text-only batches


@pytest.mark.parametrize("vision, every_step, runs", [("trainable", False, True), ("frozen", False, False), ("frozen", True, True)])
def test_a_text_only_batch_runs_the_visual_path_on_a_blank_image_where_needed(load_sft, tmp_path, vision, every_step, runs):
    """In training, a batch without images runs the ViT and the merger on one blank merge window (grid 1 x 2 x 2)
    when they train (their gradient is then zero) or when ``vision_every_step`` (FSDP's encode_images_every_step)
    asks for it; otherwise it does not run them. The loss is the text-only loss either way."""
    frozen = ("model.freeze.vision=frozen", "model.freeze.adapter=frozen") if vision == "frozen" else ()
    cfg = load_sft(*NATIVE, *frozen)
    torch.manual_seed(0)
    model, proc = build_model(cfg.model)
    encoder = ConversationEncoder(proc.tokenizer, model.image_tokens, cfg.model.system_message, max_len=4096)
    sample = SampleProcessor(encoder, proc.image)(records(tmp_path)[2])  # "Say hello." / "Hello there!": no image
    batch = PadCollator(proc.tokenizer.pad_id)([sample])
    assert batch["pixel_values"].num_images == 0
    calls = []
    model.vision.register_forward_hook(lambda module, args, out: calls.append(args[1].tolist()))
    model.train()
    model.vision_every_step = every_step
    loss = model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"], labels=batch["labels"])
    reference = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])  # pixel_values None: the same
    assert calls == ([[[1, 2, 2]]] * 2 if runs else [])
    assert torch.equal(loss.loss_sum, reference.loss_sum)
    (loss.loss_sum / loss.num_tokens).backward()
    visual = [p for p in (*model.vision.parameters(), *model.adapter.parameters()) if p.requires_grad]
    assert len(visual) == (0 if vision == "frozen" else len(list(model.vision.parameters())) + len(list(model.adapter.parameters())))
    assert all(p.grad is not None and not p.grad.any() for p in visual)  # present (DDP / FSDP reduce them) and zero
    assert all(p.grad is not None for p in model.llm.parameters())


# --------------------------------------------------------------------------- LoRA and freezing


@pytest.mark.integration
@pytest.mark.parametrize("vision", ["frozen", "lora"])
def test_lora_on_the_native_llm_and_vit_trains_the_adapters_only(load_sft, tmp_path, vision):
    """``model.freeze.llm={policy: lora, r: 8}`` with the ViT frozen or under LoRA too (the merger trains whole):
    adapters sit on the family's default layers (Qwen2's q/k/v/o/up/gate_proj in every LLM layer; qkv, attn.proj,
    fc1, fc2 in every ViT block), only they and the merger are trainable and in the checkpoint, they and the
    merger move in 8 steps while every base weight keeps its bits, and the loss falls."""
    out = tmp_path / vision
    policy = VISION_LORA if vision == "lora" else "model.freeze.vision=frozen"
    runner = build_runner(load_sft(*NATIVE, LLM_LORA, policy, *STEPS, "run.save_every=8", output_dir=out))
    model = runner.model
    before = parameters(model)
    trainable = {canonical_name(n) for n, p in model.named_parameters() if p.requires_grad}
    llm_layers, vit_blocks = model.llm.config.num_hidden_layers, len(model.vision.model.blocks)
    assert lora_modules(before, "llm") == {f"llm.model.layers.{i}.{t}" for i in range(llm_layers) for t in LLM_TARGETS}
    assert lora_modules(before, "vision") == (
        {f"vision.model.blocks.{i}.{t}" for i in range(vit_blocks) for t in VISION_TARGETS} if vision == "lora" else set())
    assert trainable == {n for n in before if ".lora_" in n or n.startswith("adapter.")}
    runner.train()
    after = parameters(model)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved == trainable  # every adapter matrix and merger weight moved; nothing else did, to the bit
    saved = load_file(str(ckpt.list_checkpoints(out)[-1] / ckpt.WEIGHTS_NAME))
    assert saved.keys() == trainable and all(torch.equal(saved[n], after[n]) for n in saved)
    logged = losses(out)
    assert len(logged) == 8 and sum(logged[-3:]) / 3 < sum(logged[:3]) / 3, logged


@pytest.mark.integration
def test_a_native_lora_run_resumes_bitwise(load_sft, tmp_path):
    """LoRA on the ViT and the LLM (dropout 0.05 in both, so the random state counts): a run resumed from its
    step-2 checkpoint ends at step 4 with the uninterrupted run's weights, optimiser state and losses, bit for bit."""
    options = (*NATIVE, LLM_LORA, VISION_LORA, *STEPS, "run.max_steps=4", "run.save_every=2", "run.keep_last=5")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    build_runner(load_sft(*options, output_dir=straight)).train()
    middle = ckpt.list_checkpoints(straight)[0]
    assert middle.name == "step_00000002"
    build_runner(load_sft(*options, f"run.resume={middle}", output_dir=resumed)).train()
    a, b = (ckpt.list_checkpoints(d)[-1] for d in (straight, resumed))
    assert a.name == b.name == "step_00000004"
    weights = [load_file(str(d / ckpt.WEIGHTS_NAME)) for d in (a, b)]
    assert weights[0].keys() == weights[1].keys() and any(k.startswith("vision.") and ".lora_" in k for k in weights[0])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    optim = [torch.load(d / "optimizer.pt", weights_only=True) for d in (a, b)]
    flat = [torch.nn.utils.parameters_to_vector([t for s in o["state"].values() for t in s.values() if t.ndim]) for o in optim]
    assert torch.equal(flat[0], flat[1])
    assert losses(straight)[2:] == losses(resumed)


# --------------------------------------------------------------------------- export --format hf


def converted_project(root: Path) -> Path:
    """A tiny transformers Qwen2-VL checkpoint converted by from-hf, and a project training from it: the converted
    config.yaml as its base (its model), ``model.load_from`` the converted directory, the synthetic conversations."""
    from lavis.interop.convert.hf_qwen2_vl import from_hf

    converted = from_hf(tiny_checkpoint(root / "hf", "qwen2_vl", seed=1), root / "converted")
    project = root / "project.yaml"
    project.write_text(f"base: [{converted / 'config.yaml'}]\nmodel: {{load_from: {converted}}}\n"
                       "datasets:\n  synthetic_sft: {builder: qwen_vl_conversation}\n")
    return project


@pytest.mark.integration
def test_export_hf_of_a_native_lora_run_is_a_transformers_qwen2_vl_with_the_adapters_merged(small_world, tmp_path):
    """A LoRA run (LLM r 8, ViT r 4; merger trained whole) from a converted tiny Qwen2-VL exports with
    ``--format hf`` as ``OUT/hf/``, which Qwen2VLForConditionalGeneration loads: each adapted layer holds
    ``W + scale * B @ A`` (W the converted base, A and B the run's), which differs from W; the merger holds the
    run's weights and every other tensor the base's. OUT's own model.safetensors is the same merged model."""
    from transformers import Qwen2VLForConditionalGeneration

    from lavis.interop.convert.hf_qwen2_vl import to_hf_names
    from lavis.interop.export import main as export_main

    project = converted_project(tmp_path)
    run = tmp_path / "run"
    cfg = load_config(project, sft_options(small_world, run, LLM_LORA, VISION_LORA, *STEPS, "run.max_steps=4", "run.save_every=4"))
    build_runner(cfg).train()
    assert export_main([str(run), str(tmp_path / "out"), "--format", "hf"]) == 0

    base = load_file(str(tmp_path / "converted" / "model.safetensors"))
    trained = load_file(str(ckpt.list_checkpoints(run)[-1] / ckpt.WEIGHTS_NAME))
    scale = 2.0  # alpha / r: 16 / 8 (LLM), 8 / 4 (ViT)
    expected = dict(base)
    adapted = set()
    for key in [k for k in trained if ".lora_A." in k]:
        module = key.split(".lora_A.")[0]
        down, up = trained[key], trained[key.replace(".lora_A.", ".lora_B.")]
        expected[f"{module}.weight"] = base[f"{module}.weight"] + scale * up @ down
        adapted.add(f"{module}.weight")
    expected.update({k: v for k, v in trained.items() if k.startswith("adapter.")})
    assert len(adapted) == 2 * len(LLM_TARGETS) + 2 * len(VISION_TARGETS)

    hf = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "out" / "hf")
    theirs = {k: v.detach() for k, v in hf.state_dict().items()}
    ours = to_hf_names(expected, "transformers5")  # transformers 5's names, as from_pretrained holds them
    assert theirs.keys() == ours.keys()
    for name, tensor in theirs.items():
        assert torch.allclose(tensor, ours[name], rtol=0, atol=1e-6), name
    hf_adapted = to_hf_names({name: base[name] for name in adapted}, "transformers5")
    for name, weight in hf_adapted.items():
        assert (theirs[name] - weight).abs().max() > 1e-4, name  # the adapters changed the layer
    exported = load_file(str(tmp_path / "out" / ckpt.WEIGHTS_NAME))
    assert exported.keys() == expected.keys() and all(torch.allclose(exported[k], expected[k], rtol=0, atol=1e-6) for k in exported)
