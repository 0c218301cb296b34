"""The dpo task: the loss is TRL's, one row per pair (shared prompt and pictures) equals the two answers run
separately (tiny Qwen-VL and a native-resolution M-RoPE model), pairs pack, the adapters-off reference is a
frozen copy's, named skips and config errors, and a short run through train.py learns the preference."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import sft_options
from helpers import reference_varlen_attention
from test_native_resolution import NATIVE

from lavis.common.config import ConfigError
from lavis.datasets.collate import PadCollator, move_to
from lavis.models import build_model
from lavis.models.vlm import canonical_name
from lavis.processors.conversation import IGNORE_INDEX, ConversationEncoder
from lavis.processors.errors import SkipSample
from lavis.processors.sample import SampleProcessor
from lavis.tasks.dpo import DPOTask, PairCollator, answer_logps, dpo_losses

PICTURES = ("images/train/000000.png", "images/train/000001.png", "images/train/000002.png")


def pairs(world: Path) -> list[dict]:
    """Preference records as the builders write them: one or two pictures, answers of different lengths."""
    def user(text: str, *images: str) -> list[dict]:
        shown = "".join(f"Picture {i}: <img>{p}</img>\n" for i, p in enumerate(images, 1))
        return [{"role": "user", "content": shown + text}]

    records = [
        {"id": "a", "messages": user("What colour is the square?", PICTURES[0]), "chosen": "yellow", "rejected": "a blue circle"},
        {"id": "b", "messages": user("Is there a triangle?", PICTURES[1], PICTURES[2]), "chosen": "no", "rejected": "yes, on the left"},
        {"id": "c", "messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"},
                                 *user("Describe it.", PICTURES[2])], "chosen": "a red square at the top", "rejected": "nothing"},
    ]
    for i, record in enumerate(records):  # a fixed reference, so that the policy's path alone is compared
        record.update(image_root=str(world), ref_chosen_logp=-3.0 - i, ref_rejected_logp=-4.5 + i)
    return records


@pytest.fixture
def dpo_cfg(load_sft):
    def load(*extra: str):
        return load_sft("run.task=dpo", *extra)
    return load


def built(cfg):
    torch.manual_seed(0)
    model, proc = build_model(cfg.model)
    return model.train(), proc


def task_for(cfg, model, proc) -> DPOTask:
    task = DPOTask(cfg)
    task.setup(model, place=lambda module: module)
    return task


# --------------------------------------------------------------------------- the loss is TRL's


def trl_dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing):
    """TRL 0.19.1 ``DPOTrainer.dpo_loss`` (trl/trainer/dpo_trainer.py, lines 969-1153) for ``loss_type="sigmoid"``,
    ``f_divergence_type="reverse_kl"`` and ``reference_free=False``, the other branches left out, line for line."""
    logratios = chosen_logps - rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    logits = logratios - ref_logratios
    losses = (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing)
        - F.logsigmoid(-beta * logits) * label_smoothing
    )
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


@pytest.mark.parametrize("beta, label_smoothing", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (1.0, 0.45)])
def test_the_loss_is_trls_sigmoid_dpo_loss(beta, label_smoothing):
    gen = torch.Generator().manual_seed(0)
    policy, reference = -20 * torch.rand(64, 2, generator=gen), -20 * torch.rand(64, 2, generator=gen)
    losses, rewards = dpo_losses(policy, reference, beta, label_smoothing)
    expected, chosen, rejected = trl_dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta, label_smoothing)
    assert torch.allclose(losses, expected, rtol=0, atol=1e-6)
    assert torch.allclose(rewards, torch.stack([chosen, rejected], 1), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- one row per pair


def separate_logps(model, proc, cfg, records, move=lambda batch: batch) -> torch.Tensor:
    """Each answer's summed log-probability, each answer a conversation of its own through the SFT path
    (SampleProcessor, PadCollator: no shared prompt, no packing): ``[pairs, 2]``. ``move`` places the batch
    where the model is."""
    encoder = ConversationEncoder(proc.tokenizer, model.image_tokens, cfg.model.system_message, max_len=4096)
    samples = SampleProcessor(encoder, proc.image, truncate=False)
    conversations = [{**r, "messages": [*r["messages"], {"role": "assistant", "content": r[answer]}]}
                     for r in records for answer in ("chosen", "rejected")]
    batch = PadCollator(proc.tokenizer.pad_id)([samples(c) for c in conversations])
    for row, c in enumerate(conversations):  # the last answer alone (an earlier assistant turn is supervised in SFT)
        prompt = encoder.encode_messages(c["messages"][:-1], add_generation_prompt=True, images=samples.loader(c))
        batch["labels"][row, : len(prompt.input_ids)] = IGNORE_INDEX
    batch = move(batch)
    out = model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"], labels=batch["labels"],
                reduction="none")
    rows = out.selected.nonzero()[:, 0]
    return out.losses.new_zeros(len(conversations)).index_add(0, rows, -out.losses).view(len(records), 2)


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {canonical_name(n): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_close_gradients(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and len(a) > 20
    worst = max(((a[k] - b[k]).abs().max().item(), k) for k in a)
    assert worst[0] <= atol, worst


MODELS = {"tiny_qwen_vl": (), "native_mrope": NATIVE}


@pytest.mark.parametrize("model_name", MODELS)
def test_one_row_per_pair_equals_the_answers_run_separately(dpo_cfg, small_world, model_name):
    """The shared-prompt row gives each answer the log-probability it has as a conversation of its own, and the
    DPO loss and every gradient those give (1e-5)."""
    assert_shared_row_equals_separate(dpo_cfg(*MODELS[model_name], "run.dpo.reference=precomputed", "run.dpo.beta=0.5"),
                                      small_world)


def assert_shared_row_equals_separate(cfg, world: Path, device: str = "cpu", atol: float = 1e-5) -> None:
    """One row per pair against each answer as a conversation of its own (``run.dpo.beta=0.5``, precomputed
    references): log-probabilities, DPO loss and every gradient within ``atol``, the model on ``device``."""
    model, proc = built(cfg)
    model.to(device)
    records = pairs(world)
    task = task_for(cfg, model, proc)
    samples = [task.sample_processor(model, proc)(r) for r in records]
    batch = move_to(task.collator(proc, "sdpa")(samples), torch.device(device))
    out = task.train_step(model, batch)
    (out.loss_sum / 3).backward()
    shared = gradients(model)

    logps = separate_logps(model, proc, cfg, records, move=lambda b: move_to(b, torch.device(device)))
    reference = torch.tensor([[r["ref_chosen_logp"], r["ref_rejected_logp"]] for r in records], device=device)
    losses, _ = dpo_losses(logps, reference, 0.5)
    (losses.sum() / 3).backward()
    separate = gradients(model)

    rows = model(**task.inputs(batch), reduction="none")
    assert torch.allclose(answer_logps(rows, batch["answer_index"], 3)[0], logps.detach(), rtol=0, atol=atol)
    assert abs(out.loss_sum.item() - losses.sum().item()) <= atol
    assert_close_gradients(shared, separate, atol)


@pytest.mark.parametrize("model_name", MODELS)
def test_the_pictures_go_through_the_visual_path_once_per_pair(dpo_cfg, small_world, model_name):
    cfg = dpo_cfg(*MODELS[model_name])
    model, proc = built(cfg)
    task = task_for(cfg, model, proc)
    samples = [task.sample_processor(model, proc)(r) for r in pairs(small_world)]
    shared = PairCollator(proc.tokenizer.pad_id)(samples)["pixel_values"]
    separate = PairCollator(proc.tokenizer.pad_id, shared_prompt=False)(samples)["pixel_values"]
    assert vision_count(shared, model_name) == 4 and vision_count(separate, model_name) == 8


def vision_count(pixel_values, model_name: str) -> int:
    """Pictures in a batch's ``pixel_values`` (native resolution: a packed patch tensor)."""
    return pixel_values.num_images if model_name == "native_mrope" else pixel_values.shape[0]


@pytest.mark.parametrize("model_name", MODELS)
def test_packed_pairs_equal_one_pair_per_row(dpo_cfg, small_world, model_name):
    """Several pairs in one row (run.pack) give the loss and gradients of one pair per row (1e-5)."""
    cfg = dpo_cfg(*MODELS[model_name], "run.dpo.label_smoothing=0.1", "run.dpo.sft_weight=0.5")
    model, proc = built(cfg)
    task = task_for(cfg, model, proc)
    samples = [task.sample_processor(model, proc)(r) for r in pairs(small_world)]
    collate = task.collator(proc, "sdpa")
    results = []
    for batch in (collate(samples), collate([samples[:2], samples[2:]])):
        out = task.train_step(model, batch)
        (out.loss_sum / 3).backward()
        results.append((out.loss_sum.item(), {k: v.item() for k, v in out.metrics.items()}, gradients(model)))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    assert abs(loss_a - loss_b) <= 1e-5
    assert metrics_a.keys() == metrics_b.keys() and "nll_loss" in metrics_a
    assert all(abs(metrics_a[k] - metrics_b[k]) <= 1e-4 for k in metrics_a)
    assert_close_gradients(grads_a, grads_b)


@pytest.mark.parametrize("model_name", MODELS)
def test_under_flash_attention_each_pair_runs_as_two_samples_with_the_same_loss(dpo_cfg, small_world, model_name):
    """flash-attention's varlen kernel cannot share a prompt between two answers: the task then collates each pair
    as two samples (cu_seqlens, packed or not), which give the shared row's loss, metrics and gradients (1e-5).
    Checked with a CPU stand-in for the varlen kernel."""
    cfg = dpo_cfg(*MODELS[model_name], "run.dpo.reference=precomputed", "run.dpo.sft_weight=0.3")
    model, proc = built(cfg)
    task = task_for(cfg, model, proc)
    samples = [task.sample_processor(model, proc)(r) for r in pairs(small_world)]
    results = []
    shared = task.collator(proc, "sdpa")(samples)
    varlen = task.collator(proc, "flash_attention_2")
    for batch in (shared, varlen(samples), varlen([samples[:2], samples[2:]])):
        assert ("attention_kwargs" in batch) == (batch is not shared)
        with reference_varlen_attention(model) if batch is not shared else contextlib.nullcontext():
            out = task.train_step(model, batch)
            (out.loss_sum / 3).backward()
        results.append((out.loss_sum.item(), {k: v.item() for k, v in out.metrics.items()}, gradients(model)))
    assert vision_count(shared["pixel_values"], model_name) == 4
    assert vision_count(batch["pixel_values"], model_name) == 8  # the pictures twice: the price of the varlen path
    (loss, metrics, grads), *others = results
    for other_loss, other_metrics, other_grads in others:
        assert abs(loss - other_loss) <= 1e-5
        assert metrics.keys() == other_metrics.keys() and all(abs(metrics[k] - other_metrics[k]) <= 1e-4 for k in metrics)
        assert_close_gradients(grads, other_grads)


def test_the_frozen_copy_reference_starts_equal_to_the_policy(dpo_cfg, small_world):
    """At the start the policy is its own reference: every reward is 0 and the loss log(2) per pair."""
    cfg = dpo_cfg()
    model, proc = built(cfg)
    task = task_for(cfg, model, proc)
    assert task.reference is not None and not any(p.requires_grad for p in task.reference.parameters())
    batch = task.collator(proc, "sdpa")([task.sample_processor(model, proc)(r) for r in pairs(small_world)])
    out = task.train_step(model, batch)
    assert abs(out.loss_sum.item() - 3 * math.log(2)) < 1e-5
    assert abs(out.metrics["rewards/margins"].item()) < 1e-5


# --------------------------------------------------------------------------- the adapters-off reference


def test_the_adapters_off_reference_equals_a_frozen_copy(dpo_cfg, small_world):
    """A LoRA policy whose adapters have moved: its adapters-off log-probabilities are those of a frozen copy of
    the starting model (1e-6), and differ from its own."""
    lora = ("model.freeze.vision=frozen", "model.freeze.adapter=frozen", "model.freeze.llm={policy: lora, r: 4}")
    copy_cfg, off_cfg = dpo_cfg(*lora), dpo_cfg(*lora, "run.dpo.reference=adapters_off")
    model, proc = built(copy_cfg)
    with_copy, adapters_off = task_for(copy_cfg, model, proc), task_for(off_cfg, model, proc)
    assert adapters_off.reference is None
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    batch = with_copy.collator(proc, "sdpa")([with_copy.sample_processor(model, proc)(r) for r in pairs(small_world)])
    frozen, off = with_copy.reference_logps(model, batch), adapters_off.reference_logps(model, batch)
    assert torch.allclose(frozen, off, rtol=0, atol=1e-6)
    with torch.no_grad():
        policy = answer_logps(model(**with_copy.inputs(batch), reduction="none"), batch["answer_index"], 3)[0]
    assert (policy - off).abs().max() > 1e-3  # the adapters matter, and were on again after the reference
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


# --------------------------------------------------------------------------- skips and config errors


def test_named_skips(dpo_cfg, small_world):
    cfg = dpo_cfg("run.max_len=120")
    model, proc = built(cfg)
    process = task_for(cfg, model, proc).sample_processor(model, proc)
    record = pairs(small_world)[0]
    cases = {
        "identical_answers": {"chosen": "yellow", "rejected": " yellow "},
        "too_long": {"rejected": "a blue circle " * 30},
        "image_in_answer": {"rejected": "<img>images/train/000001.png</img>"},
        "malformed_pair": {"messages": [*record["messages"], {"role": "assistant", "content": "x"}]},
    }
    for reason, change in cases.items():
        with pytest.raises(SkipSample) as info:
            process({**record, **change})
        assert info.value.reason == reason
    process(record)  # fits: the prompt and both answers within run.max_len


@pytest.mark.parametrize("options, message", [
    (("run.dpo.beta=0",), "run.dpo.beta must be > 0"),
    (("run.dpo.label_smoothing=0.5",), "run.dpo.label_smoothing must be in [0, 0.5)"),
    (("run.dpo.sft_weight=-1",), "run.dpo.sft_weight must be >= 0"),
    (("run.dpo.reference=adapters",), "run.dpo.reference: 'adapters' is not one of"),
    (("run.dpo.bta=0.1",), "unknown key 'run.dpo.bta' (did you mean 'beta'?)"),
    (("run.dpo.reference=adapters_off",), "run.dpo.reference=adapters_off needs a LoRA policy"),
    (("run.dpo.reference=adapters_off", "model.freeze.llm=lora"), "model.freeze.vision is trainable, so switching the adapters off"),
    (("run.dpo.reference=precomputed", "run.dpo.precompute_ref=true"), "set one of the two"),
    (("run.dpo.reference_file=reference.json",), "run.dpo.reference_file is where run.dpo.precompute_ref=true keeps"),
])
def test_config_errors_name_the_key(dpo_cfg, options, message):
    with pytest.raises(ConfigError, match=None) as info:
        dpo_cfg(*options)
    assert message in str(info.value)


def test_records_without_a_pair_fail_at_start(dpo_cfg):
    """SFT conversations under run.task=dpo: an error naming the dataset, the record and the missing keys."""
    from lavis.datasets.builders.base import AnnotationError

    with pytest.raises(AnnotationError, match=r"datasets.synthetic_sft: record 'train-000000' has no chosen / rejected"):
        DPOTask(dpo_cfg()).build_sources()


# --------------------------------------------------------------------------- a short run through train.py


def preference_file(world: Path, path: Path, limit: int | None = None) -> Path:
    """Pairs of the small world in Qwen-VL's conversation form: the one-turn conversations of its SFT data, the
    right answer against the same answer with a hallucinated object added."""
    conversations = [c for c in json.loads((world / "sft_train.json").read_text()) if len(c["conversations"]) == 2]
    records = []
    for c in conversations:
        answer = c["conversations"][1]["value"]
        records.append({"id": c["id"], "conversations": [
            c["conversations"][0], {"from": "assistant", "chosen": answer, "rejected": f"{answer}, and a purple star"}]})
    assert len(records) >= 24
    path.write_text(json.dumps(records[:limit]))
    return path


def dpo_options(world: Path, out: Path, ann: Path, *extra: str) -> list[str]:
    return [
        *sft_options(world, out),
        "datasets.synthetic_sft.builder=qwen_vl_preference",
        f"datasets.synthetic_sft.ann_path={ann}",
        "run.task=dpo", "run.dpo.beta=0.5", "run.lr=2e-3", "run.min_lr=2e-3", "run.max_steps=6", "run.save_every=1000",
        *extra,
    ]


@pytest.mark.integration
def test_a_short_dpo_run_learns_the_preference(small_world, tmp_path):
    """train.py with run.task=dpo on a few pairs: the loss starts at log 2 (the policy is its reference) and the
    preference margin of the chosen answer grows; config.yaml keeps run.dpo."""
    from conftest import run_train

    from lavis.tracking.logging import read_metrics

    out = tmp_path / "dpo"
    ann = preference_file(small_world, tmp_path / "pairs.json", limit=8)  # each pair seen 3 times in 6 steps of 4
    result = run_train(dpo_options(small_world, out, ann))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert abs(records[0]["loss"] - math.log(2)) < 1e-4 and abs(records[0]["rewards/margins"]) < 1e-4
    margins = [r["rewards/margins"] for r in records]
    assert margins[-1] > 0.5 and records[-1]["rewards/accuracies"] == 1.0, margins
    assert records[-1]["loss"] < 0.5 * math.log(2)
    saved = (out / "config.yaml").read_text()
    assert "task: dpo" in saved and "beta: 0.5" in saved


@pytest.mark.integration
def test_resume_after_sigkill_is_bitwise_identical(small_world, tmp_path):
    """DPO runs killed with SIGKILL at their first checkpoint and resumed end as uninterrupted ones, bit for bit:
    the frozen copy is made again from the starting model (not from the checkpoint), and a precomputed
    reference is read back from output_dir (not computed again from the resumed weights)."""
    from conftest import SFT_PROJECT, popen_train
    from helpers import assert_same_end, finish, sigkill_at_first_checkpoint, stop_all

    from lavis.common.config import load_config
    from lavis.runners import build_runner
    from lavis.tasks.dpo import REFERENCE_CACHE

    steps = 12
    ann = preference_file(small_world, tmp_path / "pairs.json")
    ways = {"copy": (), "precompute": ("run.dpo.precompute_ref=true",)}

    def options(out: Path, *extra: str) -> list[str]:
        return dpo_options(small_world, out, ann, f"run.max_steps={steps}", "run.save_every=3", "run.keep_last=2",
                           "run.lr=5e-4", "run.min_lr=5e-5", "run.batch_size=3",
                           "model.llm.config.attention_dropout=0.1", *extra)

    outs = {w: tmp_path / f"b_{w}" for w in ways}
    logs = {w: tmp_path / f"b_{w}.log" for w in ways}
    procs = {w: popen_train(options(outs[w], *ways[w]), logs[w]) for w in ways}
    try:
        killed_at = sigkill_at_first_checkpoint(procs, outs, logs)
        for w in ways:
            assert 3 <= killed_at[w] < steps
            procs[w] = popen_train(options(outs[w], *ways[w], "run.resume=auto"), logs[w])
        for w in ways:
            build_runner(load_config(SFT_PROJECT, options(tmp_path / f"a_{w}", *ways[w]))).train()
        for w in ways:
            assert finish(procs[w], logs[w]) == 0, logs[w].read_text()[-3000:]
    finally:
        stop_all(procs)
    for w in ways:
        assert f"at step {killed_at[w]}" in logs[w].read_text()
        assert_same_end(tmp_path / f"a_{w}", outs[w], steps, w)
    text = logs["precompute"].read_text()
    assert "computed and saved to" not in text and f"read from {outs['precompute'] / REFERENCE_CACHE}" in text  # the resumed run's log
    cache = json.loads((outs["precompute"] / REFERENCE_CACHE).read_text())
    assert cache == json.loads((tmp_path / "a_precompute" / REFERENCE_CACHE).read_text())
    assert len(cache["logps"]) == len(json.loads(ann.read_text()))


@pytest.mark.integration
def test_a_shared_reference_file_serves_runs_of_the_same_reference_and_refuses_others(small_world, tmp_path, caplog):
    """run.dpo.reference_file: the first run computes the reference and saves it there; a run that changes
    only what the reference does not depend on (beta, the freeze policies) reads it; one whose reference differs
    (max_len, a rewritten annotation file) is refused, naming what differs; in the run's own output_dir otherwise."""
    import logging
    import os

    from conftest import SFT_PROJECT, run_train

    from lavis.common.config import load_config
    from lavis.runners import build_runner
    from lavis.tasks.dpo import REFERENCE_CACHE

    ann = preference_file(small_world, tmp_path / "pairs.json", limit=6)
    shared = tmp_path / "reference.json"

    def train(name: str, *extra: str):
        cfg = load_config(SFT_PROJECT, dpo_options(small_world, tmp_path / name, ann, "run.max_steps=1",
                                                   "run.dpo.precompute_ref=true", *extra))
        caplog.clear()
        with caplog.at_level(logging.INFO):
            build_runner(cfg).train()
        return caplog.text

    assert f"computed and saved to {shared}" in train("first", f"run.dpo.reference_file={shared}")
    saved = json.loads(shared.read_text())
    assert len(saved["logps"]) == 6 and saved["reference"]["datasets"]["synthetic_sft"]["path"] == str(ann.resolve())
    again = train("beta", f"run.dpo.reference_file={shared}", "run.dpo.beta=0.1", "model.freeze.vision=frozen")
    assert f"read from {shared}" in again and "computed" not in again
    with pytest.raises(ConfigError, match=r"computed with another max_len \(saved: max_len=256\)"):
        train("longer", f"run.dpo.reference_file={shared}", "run.max_len=512")
    os.utime(ann, ns=(0, 0))  # the annotation file rewritten (its time changed)
    with pytest.raises(ConfigError, match=r"computed with another datasets .*delete it to compute them again"):
        train("rewritten", f"run.dpo.reference_file={shared}")
    assert json.loads(shared.read_text()) == saved  # refused, never overwritten
    cli = run_train(dpo_options(small_world, tmp_path / "cli", ann, "run.max_steps=1", "run.dpo.precompute_ref=true",
                                f"run.dpo.reference_file={shared}"))
    assert cli.returncode == 2 and "error: " in cli.stderr and "Traceback" not in cli.stderr, cli.stderr[-2000:]
    assert f"computed and saved to {tmp_path / 'own' / REFERENCE_CACHE}" in train("own")  # without the key: its run's


# --------------------------------------------------------------------------- two ranks


@pytest.mark.distributed
def test_two_ranks_equal_one_process(small_world, tmp_path):
    """2 ranks x batch 1 x grad_accum 2 (torchrun, gloo) against one process x batch 2 x grad_accum 2, after 6 steps:
    weights within 1e-5, logged losses and margins within 1e-5 relative. FSDP with a frozen copy of the model as
    the reference (sharded as the policy), DDP with a LoRA policy and its adapters switched off as the reference."""
    import subprocess
    import sys

    from conftest import REPO, SFT_PROJECT
    from helpers import stop_all

    from lavis.common import checkpoint as ckpt
    from lavis.common.config import load_config
    from lavis.runners import build_runner
    from lavis.tracking.logging import read_metrics

    ann = preference_file(small_world, tmp_path / "pairs.json")
    steps = ("run.max_steps=6", "run.lr=5e-4", "run.min_lr=5e-5", "run.save_every=1000")
    cases = {
        "fsdp": ("run.strategy=fsdp",),
        "ddp": ("run.strategy=ddp", "run.dpo.reference=adapters_off", "model.freeze.vision=frozen",
                "model.freeze.adapter=frozen", "model.freeze.llm={policy: lora, r: 4, alpha: 8, dropout: 0.0}"),
    }
    procs = {}
    for name, extra in cases.items():
        options = dpo_options(small_world, tmp_path / name, ann, *steps, *extra, "run.batch_size=1", "run.grad_accum=2")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   str(REPO / "train.py"), "--cfg-path", str(SFT_PROJECT), "--options", *options]
        with open(tmp_path / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        for name, extra in cases.items():
            single = [o for o in extra if not o.startswith("run.strategy")]
            build_runner(load_config(SFT_PROJECT, dpo_options(small_world, tmp_path / f"single-{name}", ann, *steps, *single,
                                                              "run.batch_size=2", "run.grad_accum=2"))).train()
        for name, proc in procs.items():
            assert proc.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-4000:]
    finally:
        stop_all(procs)
    for name in cases:
        a, b = tmp_path / name, tmp_path / f"single-{name}"
        wa, wb = (ckpt.load_weights_file(ckpt.weights_path(ckpt.list_checkpoints(d)[-1])) for d in (a, b))
        assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5, name
        ra, rb = ([r for r in read_metrics(d / "metrics.jsonl") if "loss" in r] for d in (a, b))
        for key in ("loss", "rewards/margins"):
            assert [r[key] for r in ra] == pytest.approx([r[key] for r in rb], rel=1e-5, abs=1e-5), (name, key)
        # step 1's rewards are 0 up to rounding, whose sign decides its accuracy
        assert [r["rewards/accuracies"] for r in ra[1:]] == [r["rewards/accuracies"] for r in rb[1:]], name
        assert ra[-1]["rewards/margins"] > 0.1, name  # the preference was learnt
