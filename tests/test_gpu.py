"""GPU-only checks, skipped on a machine without CUDA (`make gpu-check` runs them on a lent GPU, README "GPU
checks"): a short bf16 run learns on the GPU; packing and DPO's shared-prompt row give the same losses and
gradients as their unpacked forms with the GPU's SDPA kernels (fp32); flash-attention 2's varlen path gives the
block mask's loss (when ``flash_attn`` is installed); a Q-LoRA step (when ``bitsandbytes`` is installed)."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from test_dpo import (
    MODELS,
    assert_close_gradients,
    assert_shared_row_equals_separate,
    built,
    gradients,
    pairs,
    task_for,
)

from lavis.datasets.collate import PackCollator, PadCollator, move_to
from lavis.runners import build_runner
from lavis.tracking.logging import read_metrics

# LAVIS_TEST_DEVICE=cpu runs the same checks on the CPU (to check the tests themselves; no flash-attention or Q-LoRA)
DEVICE = os.environ.get("LAVIS_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HAS_FLASH_ATTN = DEVICE == "cuda" and importlib.util.find_spec("flash_attn") is not None
HAS_BITSANDBYTES = DEVICE == "cuda" and importlib.util.find_spec("bitsandbytes") is not None
CUDA = f"run.device={DEVICE}"


def to_test_device(batch: dict) -> dict:
    return move_to(batch, torch.device(DEVICE))


@pytest.fixture
def dpo_cfg(load_sft):
    def load(*extra: str):
        return load_sft("run.task=dpo", CUDA, *extra)
    return load


def test_a_short_bf16_run_learns_on_the_gpu(load_sft, tmp_path):
    out = tmp_path / "gpu"
    cfg = load_sft(CUDA, "run.precision=bf16", "run.max_steps=40", "run.batch_size=8", "run.lr=1e-3", output_dir=out)
    runner = build_runner(cfg)
    assert runner.device.type == DEVICE and all(p.device.type == DEVICE for p in runner.model.parameters())
    runner.train()
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def sft_samples(runner, n: int = 6) -> list[dict]:
    """The first ``n`` samples of the run's dataset, processed as the stream processes them."""
    processor = runner.task.sample_processor(runner.model, runner.processors)
    return [processor(runner.sources[0].data[i]) for i in range(n)]


def summed_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(batch["input_ids"], batch.get("attention_mask"), position_ids=batch.get("position_ids"),
                pixel_values=batch["pixel_values"], labels=batch["labels"], **batch.get("attention_kwargs", {}))
    return out.loss_sum, out.num_tokens


def test_packed_rows_equal_padded_ones_with_the_gpus_sdpa(load_sft, small_world):
    """Packing's block mask through the GPU's SDPA kernels (fp32): the padded batch's summed loss and gradients."""
    runner = build_runner(load_sft(CUDA))
    model, proc = runner.model.train(), runner.processors
    samples = sft_samples(runner)
    results = []
    for batch in (PadCollator(proc.tokenizer.pad_id)(samples), PackCollator(proc.tokenizer.pad_id)([samples[:3], samples[3:]])):
        loss, tokens = summed_loss(model, to_test_device(batch))
        (loss / tokens).backward()
        results.append((loss.item(), int(tokens), gradients(model)))
    (padded, n_padded, grads_padded), (packed, n_packed, grads_packed) = results
    assert n_packed == n_padded  # a conversation's first token (<|im_start|>) is never supervised
    assert abs(padded - packed) <= 1e-4 * max(1.0, abs(padded))
    assert_close_gradients(grads_padded, grads_packed, atol=1e-4)


@pytest.mark.parametrize("model_name", MODELS)
def test_one_row_per_pair_equals_the_answers_run_separately_on_the_gpu(dpo_cfg, small_world, model_name):
    assert_shared_row_equals_separate(dpo_cfg(*MODELS[model_name], "run.dpo.reference=precomputed", "run.dpo.beta=0.5"),
                                      small_world, DEVICE, atol=1e-4)


@pytest.mark.skipif(not HAS_FLASH_ATTN, reason="flash_attn is not installed")
def test_flash_attention_packing_gives_the_block_masks_loss(load_sft, small_world):
    """flash-attention 2's varlen kernel on packed rows (cu_seqlens, no mask) against SDPA's block mask, bf16."""
    losses = {}
    for attention in ("sdpa", "flash_attention_2"):
        torch.manual_seed(0)
        runner = build_runner(load_sft(CUDA, f"model.llm.attn_implementation={attention}"))
        model, proc = runner.model.to(torch.bfloat16).eval(), runner.processors
        samples = sft_samples(runner)
        isolation = "cu_seqlens" if attention.startswith("flash") else "block_mask"
        batch = to_test_device(PackCollator(proc.tokenizer.pad_id, isolation)([samples[:3], samples[3:]]))
        with torch.no_grad():
            loss, tokens = summed_loss(model, batch)
        losses[attention] = loss.float().item() / int(tokens)
    assert abs(losses["sdpa"] - losses["flash_attention_2"]) <= 2e-2 * abs(losses["sdpa"]), losses


@pytest.mark.skipif(not HAS_FLASH_ATTN, reason="flash_attn is not installed")
def test_dpo_under_flash_attention_gives_the_shared_rows_loss(dpo_cfg, small_world):
    """Each pair as two samples under flash-attention 2 (bf16) against the shared row under SDPA."""
    losses = {}
    for attention in ("sdpa", "flash_attention_2"):
        cfg = dpo_cfg("run.dpo.reference=precomputed", f"model.llm.attn_implementation={attention}")
        model, proc = built(cfg)
        model.to("cuda", torch.bfloat16)
        task = task_for(cfg, model, proc)
        samples = [task.sample_processor(model, proc)(r) for r in pairs(small_world)]
        with torch.no_grad():
            losses[attention] = task.train_step(model, to_test_device(task.collator(proc, attention)(samples))).loss_sum.float().item()
    assert abs(losses["sdpa"] - losses["flash_attention_2"]) <= 2e-2 * abs(losses["sdpa"]), losses


@pytest.mark.skipif(not HAS_BITSANDBYTES, reason="bitsandbytes is not installed")
def test_a_qlora_step_trains_the_adapters_alone(load_sft, tmp_path):
    out = tmp_path / "qlora"
    cfg = load_sft(CUDA, "run.precision=bf16", "model.freeze.llm=qlora", "model.freeze.vision=frozen",
                   "model.freeze.adapter=frozen", "run.max_steps=3", output_dir=out)
    runner = build_runner(cfg)
    trainable = {n for n, p in runner.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    runner.train()
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
