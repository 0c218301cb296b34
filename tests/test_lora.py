"""LoRA and Q-LoRA as freeze policies: what trains, checkpoints, exact resume, merging, export and
evaluation of a LoRA run (projects/sft_lora.yaml on the small world, from random weights)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import KILLED_DURING_SAVE, REPO, SFT_PROJECT, eval_options, sft_options
from safetensors.torch import load_file

from lavis.common import checkpoint as ckpt
from lavis.common.config import ConfigError, load_config
from lavis.datasets.collate import PadCollator
from lavis.models import build_model
from lavis.models.freeze import LORA_TARGETS, merge_lora, merge_lora_state
from lavis.models.vlm import canonical_name
from lavis.models.weights import load_trained
from lavis.runners import build_runner
from lavis.tasks.sft import LanguageModelingTask
from lavis.tracking.logging import read_metrics

pytestmark = pytest.mark.integration

LORA_PROJECT = REPO / "projects" / "sft_lora.yaml"
LORA = "model.freeze.llm={policy: lora, r: 4, alpha: 8, dropout: 0.0}"


@pytest.fixture
def load_lora(small_world, tmp_path):
    """``load_lora(*options, output_dir=None)`` -> projects/sft_lora.yaml on the small world, from random weights."""

    def load(*extra: str, output_dir: Path | None = None):
        options = sft_options(small_world, output_dir or tmp_path / "out", "model.load_from=null",
                              "model.freeze.vision=frozen", "run.save_weights=trainable", *extra)
        return load_config(LORA_PROJECT, options)

    return load


def lora_names(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"]).logits


def a_batch(cfg, model, processors) -> dict:
    """Two samples of the config's first dataset, encoded and padded as training does."""
    task = LanguageModelingTask(cfg)
    processor = task.sample_processor(model, processors)
    records = task.build_sources()[0].data
    return PadCollator(processors.tokenizer.pad_id)([processor(records[i]) for i in range(2)])


def randomize_lora(model: torch.nn.Module, seed: int = 0) -> None:
    """LoRA's B starts at zero (the adapted model equals the base); give it values so merging matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_only_the_adapters_train_and_the_loss_falls(load_lora, tmp_path):
    """Under policy lora only the LoRA matrices (on finetune.py's modules) get gradients and enter the
    optimiser; the base weights do not move; checkpoints hold the adapters alone; the loss falls."""
    cfg = load_lora("run.max_steps=30", "run.log_every=1", "run.lr=3e-3", "run.min_lr=3e-4", "run.save_every=30",
                    "model.freeze.adapter=frozen", output_dir=tmp_path / "run")
    runner = build_runner(cfg)
    model = runner.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == lora_names(model) and trainable
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == set(LORA_TARGETS["qwen2"])  # q/k/v/o_proj, up/gate_proj: not down_proj
    in_optimizer = {id(p) for group in runner.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if n in trainable}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    runner.train()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    saved = load_file(str(ckpt.list_checkpoints(tmp_path / "run")[-1] / ckpt.WEIGHTS_NAME))
    assert set(saved) == trainable
    loss = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert sum(loss[-5:]) / 5 < loss[0] - 1.0, loss
    assert "llm        lora r=16" in model.parameter_report()


def test_trainable_keeps_named_parameters_whole_beside_the_adapters(load_lora):
    """``trainable: [embed_tokens]`` trains the embeddings whole too (finetune.py's modules_to_save for
    the base Qwen-VL); a name that matches nothing is an error."""
    model, _ = build_model(load_lora(LORA, "model.freeze.llm.trainable=[embed_tokens]").model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable - lora_names(model) == {"llm.model.embed_tokens.weight"}
    with pytest.raises(ValueError, match=r"'trainable' \['embed_tokenz'\] names no parameters"):
        build_model(load_lora(LORA, "model.freeze.llm.trainable=[embed_tokenz]").model)


def test_merged_and_unmerged_models_give_the_same_logits(load_lora):
    """Folding the adapters into the weights (in the model, or in a state dict loaded into a plain
    model) changes the logits by less than 1e-5; the merged model has the plain parameter names."""
    cfg = load_lora(LORA)
    torch.manual_seed(0)
    model, processors = build_model(cfg.model)
    randomize_lora(model)
    batch = a_batch(cfg, model, processors)
    adapted = logits(model, batch)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    plain_cfg = load_lora("model.freeze.llm=trainable")
    plain, _ = build_model(plain_cfg.model)
    missing, unexpected = plain.load_weights(state, "lora model", lora_scales={"llm": 8 / 4})
    assert not missing and not unexpected
    assert (logits(plain, batch) - adapted).abs().max() < 1e-5

    assert merge_lora(model.llm) == 4 * len(LORA_TARGETS["qwen2"])
    assert not lora_names(model) and set(model.state_dict()) == set(plain.state_dict())
    assert (logits(model, batch) - adapted).abs().max() < 1e-5
    assert merge_lora_state(state, {"llm": 2.0}).keys() == plain.state_dict().keys()


def test_adapters_without_their_settings_are_refused(load_lora):
    cfg = load_lora(LORA)
    model, _ = build_model(cfg.model)
    plain, _ = build_model(load_lora("model.freeze.llm=trainable").model)
    with pytest.raises(ValueError, match="holds LoRA adapters .* but not the LoRA settings"):
        plain.load_weights(model.state_dict(), "a.safetensors")


def test_gradient_checkpointing_gives_the_same_lora_gradients(load_lora):
    grads = []
    for checkpointing in ("false", "true"):
        cfg = load_lora(LORA, f"model.llm.gradient_checkpointing={checkpointing}")
        torch.manual_seed(0)
        model, processors = build_model(cfg.model)
        randomize_lora(model)
        batch = a_batch(cfg, model, processors)
        model.train()
        out = model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"], labels=batch["labels"])
        (out.loss_sum / out.num_tokens).backward()
        grads.append({canonical_name(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4 * 2 * len(LORA_TARGETS["qwen2"])
    assert max(float((grads[0][k] - grads[1][k]).abs().max()) for k in grads[0]) < 1e-6


def test_qlora_without_cuda_fails_at_start_with_what_to_do(load_lora, small_world, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = load_lora("model.freeze.llm=qlora", output_dir=tmp_path / "q")
    with pytest.raises(RuntimeError, match="policy qlora .* needs a CUDA GPU; on this machine use policy lora"):
        build_model(cfg.model)
    counted, _ = build_model(cfg.model, meta=True)  # --print-config counts it anywhere
    assert lora_names(counted)
    with pytest.raises(ConfigError, match="qlora's 4-bit weights are not sharded by run.strategy=fsdp"):
        load_lora("model.freeze.llm=qlora", "run.strategy=fsdp")


def test_a_killed_lora_run_resumes_bitwise_and_chains_into_evaluation_and_export(small_world, load_lora, tmp_path):
    """A LoRA run SIGKILLed while saving resumes from its last checkpoint with bitwise-equal adapters;
    the run's model (adapters over the base of its load_from chain) evaluates through evaluate.py with
    an eval config that knows nothing of LoRA (merged on load), and exports merged, as one plain model
    and as a transformers directory giving the same logits."""
    steps = ("run.max_steps=6", "run.save_every=2", "run.keep_last=5", "model.freeze.llm.dropout=0.1", "run.log_every=1")
    # The base: a short full SFT run, that the LoRA run starts from (model.load_from).
    base = tmp_path / "base"
    build_runner(load_lora("model.freeze.llm=trainable", "run.max_steps=2", "run.save_weights=full", output_dir=base)).train()
    options = (LORA, "model.freeze.llm.dropout=0.1", f"model.load_from={base}", *steps)

    out = tmp_path / "lora"
    command = [sys.executable, str(KILLED_DURING_SAVE), "--cfg-path", str(LORA_PROJECT), "--options",
               *sft_options(small_world, out, "model.freeze.vision=frozen", "run.save_weights=trainable", *options)]
    killed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KILL_DURING_SAVE": "step_00000004"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    build_runner(load_lora(*options, "run.resume=auto", output_dir=out)).train()
    build_runner(load_lora(*options, output_dir=tmp_path / "straight")).train()
    final = [load_file(str(d / "checkpoints" / "step_00000006" / ckpt.WEIGHTS_NAME)) for d in (out, tmp_path / "straight")]
    assert final[0].keys() == final[1].keys() and all(".lora_" in k for k in final[0])
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    losses = [[r["loss"] for r in read_metrics(d / "metrics.jsonl")] for d in (out, tmp_path / "straight")]
    assert losses[0] == losses[1]

    # Evaluation: the eval config's model is plain (no LoRA policy); the adapters are merged on load.
    proc = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), "--cfg-path", str(SFT_PROJECT), "--options",
         f"model.load_from={out}", *eval_options(small_world, "vqa", max_samples=4), f"run.output_dir={tmp_path / 'eval'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "eval" / "vqa.json").read_text())["metrics"]["count"] == 4

    # The run as LoRA over its base (lavis.load_model builds the run's own config) vs a plain model with
    # the adapters merged on load vs the merged export: the same logits.
    import lavis
    from lavis.interop.export import export

    cfg = load_lora(*options)
    lora_model, processors = lavis.load_model(str(out), device="cpu")
    batch = a_batch(cfg, lora_model, processors)
    reference = logits(lora_model, batch)
    plain, _ = build_model(load_lora("model.freeze.llm=trainable", "model.load_from=null").model)
    load_trained(plain, str(out))
    assert (logits(plain, batch) - reference).abs().max() < 1e-5
    exported = export(out, tmp_path / "exported", format="hf")
    merged, _ = lavis.load_model(str(exported), device="cpu")
    assert not lora_names(merged)
    assert (logits(merged, batch) - reference).abs().max() < 1e-5
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(exported / "llm").eval()
    with torch.no_grad():
        ids = batch["input_ids"].clone()
        ids[ids == merged.image_pad_id] = 0  # text only: the LLM alone has no images
        ours = merged.llm(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        theirs = hf(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    assert (ours - theirs).abs().max() < 1e-5


# --------------------------------------------------------------------------- Qwen-VL's finetune.py modes

FINETUNE_MODES = {  # trainable parameters per component of the full-size Qwen-VL-Chat, counted on the meta device
    "full": {"vision": 0, "adapter": 91_791_360, "llm": 7_721_324_544},
    "lora": {"vision": 0, "adapter": 0, "llm": 1_373_634_560},  # adapters + embeddings + LM head (modules_to_save)
    "qlora": {"vision": 0, "adapter": 0, "llm": 128_974_848},  # adapters only
}


@pytest.mark.parametrize("mode", sorted(FINETUNE_MODES))
def test_finetune_projects_train_what_finetune_py_trains_and_name_missing_files_at_start(mode):
    """projects/qwen_vl/finetune_<mode>.yaml: what trains (counted on the meta device, anywhere), and
    their placeholder paths fail at once, every missing key named, before anything is built."""
    from lavis.models.freeze import parameter_counts

    project = REPO / "projects" / "qwen_vl" / f"finetune_{mode}.yaml"
    cfg = load_config(project)
    assert cfg.run.label_policy == "qwen_vl_finetune"
    model, _ = build_model(cfg.model, meta=True)
    counts = parameter_counts(model.components)
    assert {name: counts[name]["trainable"] for name in model.COMPONENTS} == FINETUNE_MODES[mode]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--cfg-path", str(project)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for key in ("model.llm.pretrained", "model.vision.pretrained", "model.tokenizer.path", "datasets.conversations.ann_path"):
        assert f"  {key}: /" in proc.stderr
    assert "python -m lavis.convert from-qwen-vl SRC OUT" in proc.stderr
