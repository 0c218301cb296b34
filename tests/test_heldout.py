"""heldout_loss: the training loss of held-out records as an evaluation: equal to the loss computed directly,
whatever the batch; preference pairs give the policy's pairwise accuracy from the answers' log-probabilities;
during training it is a validation curve in metrics.jsonl and can pick the best checkpoint; bad inputs fail at
start naming the evaluation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_dpo import built, separate_logps

from lavis.common.config import ConfigError
from lavis.common.registry import registry
from lavis.datasets.collate import PadCollator
from lavis.runners import build_runner
from lavis.tasks.evaluation import Evaluator
from lavis.tasks.sft import LanguageModelingTask
from lavis.tracking.logging import read_metrics


def heldout(world, name: str = "heldout", builder: str = "qwen_vl_conversation", ann: str = "sft_val.json",
            *extra: str) -> list[str]:
    return [f"evaluation.{name}.task=heldout_loss", f"evaluation.{name}.builder={builder}",
            f"evaluation.{name}.ann_path={world / ann}", f"evaluation.{name}.image_root={world}", *extra]


def test_the_loss_is_the_training_loss_of_the_records_whatever_the_batch(load_sft, small_world):
    results = []
    for batch_size in (1, 3):
        cfg = load_sft(*heldout(small_world), f"run.eval_batch_size={batch_size}")
        model, proc = built(cfg)
        results.append(Evaluator(cfg, model, proc).evaluate()["heldout"])
    one, three = results
    assert one.metrics["count"] == 8 and one.metrics["skipped"] == 0
    assert abs(one.metrics["loss"] - three.metrics["loss"]) < 1e-5
    assert one.metrics["perplexity"] == pytest.approx(math.exp(one.metrics["loss"]))

    # The same records through the training task's own path, in one batch.
    records = json.loads((small_world / "sft_val.json").read_text())
    data = registry.get("builder", "qwen_vl_conversation")(
        ann_path=str(small_world / "sft_val.json"), image_root=str(small_world)).build()
    processor = LanguageModelingTask(cfg).sample_processor(model, proc)
    batch = PadCollator(proc.tokenizer.pad_id)([processor(data[i]) for i in range(len(records))])
    with torch.no_grad():
        out = LanguageModelingTask(cfg).train_step(model.eval(), batch)
    assert one.metrics["tokens"] == int(out.num_tokens)
    assert abs(one.metrics["loss"] - float(out.loss_sum) / int(out.num_tokens)) < 1e-5
    assert {r["id"] for r in one.results} == {r["id"] for r in records}


def test_preference_pairs_give_the_policys_pairwise_accuracy(load_sft, small_world):
    cfg = load_sft(*heldout(small_world, "pairs", "qwen_vl_preference", "preference_val.json"))
    model, proc = built(cfg)
    result = Evaluator(cfg, model, proc).evaluate()["pairs"]
    assert set(result.metrics) >= {"pair_accuracy", "margin", "chosen_nll", "count"} and result.metrics["count"] == 8

    data = registry.get("builder", "qwen_vl_preference")(
        ann_path=str(small_world / "preference_val.json"), image_root=str(small_world)).build()
    records = [data[i] for i in range(len(data))]
    with torch.no_grad():
        logps = separate_logps(model.eval(), proc, cfg, records)  # each answer a conversation of its own
    margins = (logps[:, 0] - logps[:, 1]).tolist()
    assert result.metrics["pair_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 8)
    assert result.metrics["margin"] == pytest.approx(sum(margins) / 8, abs=1e-4)
    by_id = {r["id"]: r for r in result.results}
    assert by_id[records[0]["id"]]["chosen_logp"] == pytest.approx(float(logps[0, 0]), abs=1e-4)


@pytest.mark.integration
def test_during_training_it_is_a_validation_curve_that_picks_the_best_checkpoint(load_sft, small_world, tmp_path):
    out = tmp_path / "run"
    cfg = load_sft(*heldout(small_world), "run.max_steps=6", "run.eval_every=2", "run.save_every=2", "run.lr=1e-3",
                   "run.best_metric=heldout/loss", "run.best_mode=min", output_dir=out)
    build_runner(cfg).train()
    curve = [(r["step"], r["eval/heldout/loss"]) for r in read_metrics(out / "metrics.jsonl") if "eval/heldout/loss" in r]
    assert [step for step, _ in curve] == [2, 4, 6] and curve[-1][1] < curve[0][1]
    best = json.loads((out / "checkpoints" / "best" / "meta.json").read_text())
    assert best["step"] == min(curve, key=lambda c: c[1])[0]


def test_bad_inputs_fail_at_start_naming_the_evaluation(load_sft, small_world, tmp_path):
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(json.loads((small_world / "sft_val.json").read_text())[:2]
                                + json.loads((small_world / "preference_val.json").read_text())[:2]))
    cfg = load_sft(*heldout(small_world, "pairs", "qwen_vl_preference", str(mixed)))
    model, proc = built(cfg)
    with pytest.raises((ConfigError, ValueError), match=r"chosen|mix"):
        Evaluator(cfg, model, proc)
    cfg = load_sft("evaluation.web.task=heldout_loss", "evaluation.web.builder=webdataset_caption",
                   f"evaluation.web.shards={small_world}/shards/train-000000.tar")
    with pytest.raises(ConfigError, match="not a stream"):
        Evaluator(cfg, *built(cfg))


@pytest.mark.distributed
def test_under_fsdp_two_ranks_score_as_one_process(load_sft, small_world, tmp_path):
    """Held-out loss and pair accuracy during a 2-rank FSDP run (gloo; the ranks' shards uneven, so one rank runs
    a filler batch in lock-step) equal one process's, the weights the same (lr 1e-9)."""
    import subprocess
    import sys

    from conftest import REPO, SFT_PROJECT, sft_options
    from helpers import stop_all

    evals = [*heldout(small_world, "lm", "qwen_vl_conversation", "sft_val.json", "evaluation.lm.max_samples=7"),
             *heldout(small_world, "pairs", "qwen_vl_preference", "preference_val.json")]
    steps = ("run.max_steps=2", "run.eval_every=2", "run.eval_batch_size=3", "run.lr=1e-9", "run.min_lr=1e-9",
             "run.save_every=1000")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
               "--cfg-path", str(SFT_PROJECT), "--options",
               *sft_options(small_world, tmp_path / "fsdp", *evals, *steps, "run.strategy=fsdp")]
    with open(tmp_path / "fsdp.log", "w") as log:
        procs = {"fsdp": subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)}
    try:
        build_runner(load_sft(*evals, *steps, output_dir=tmp_path / "single")).train()
        assert procs["fsdp"].wait(timeout=300) == 0, (tmp_path / "fsdp.log").read_text()[-4000:]
    finally:
        stop_all(procs)
    ra, rb = ([r for r in read_metrics(d / "metrics.jsonl") if "eval/lm/loss" in r][-1] for d in (tmp_path / "fsdp", tmp_path / "single"))
    assert ra["eval/lm/count"] == rb["eval/lm/count"] == 7 and ra["eval/pairs/count"] == 8
    for key in ("eval/lm/loss", "eval/lm/tokens", "eval/pairs/pair_accuracy", "eval/pairs/margin", "eval/pairs/chosen_nll"):
        assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-5), key


def test_with_a_reference_pairs_give_dpos_rewards(load_sft, small_world, tmp_path):
    """reference: TRL's held-out rewards (beta x log-ratio to the reference) from each answer's log-probabilities
    under the model and under the reference (a 1-step run saved whole), each answer run as its own conversation."""
    from lavis import load_model

    ref_run = tmp_path / "ref"
    build_runner(load_sft("run.max_steps=1", "run.save_every=1", "run.save_weights=full", "run.lr=1e-2",
                          output_dir=ref_run)).train()
    cfg = load_sft(*heldout(small_world, "pairs", "qwen_vl_preference", "preference_val.json",
                            f"evaluation.pairs.reference={ref_run}", "evaluation.pairs.beta=0.5"))
    model, proc = built(cfg)
    result = Evaluator(cfg, model, proc).evaluate()["pairs"]

    data = registry.get("builder", "qwen_vl_preference")(
        ann_path=str(small_world / "preference_val.json"), image_root=str(small_world)).build()
    records = [data[i] for i in range(len(data))]
    reference, _ = load_model(ref_run, device="cpu")
    with torch.no_grad():
        policy, ref = (separate_logps(m.eval(), proc, cfg, records) for m in (model, reference))
    rewards = 0.5 * (policy - ref)
    assert result.metrics["rewards/accuracies"] == pytest.approx(float((rewards[:, 0] > rewards[:, 1]).float().mean()))
    assert result.metrics["rewards/margins"] == pytest.approx(float((rewards[:, 0] - rewards[:, 1]).mean()), abs=1e-4)
    assert result.metrics["rewards/chosen"] == pytest.approx(float(rewards[:, 0].mean()), abs=1e-4)
    assert abs(result.metrics["rewards/margins"]) > 1e-3  # the two models differ: the check can fail

    conversations = load_sft(*heldout(small_world, "lm", "qwen_vl_conversation", "sft_val.json",
                                      f"evaluation.lm.reference={ref_run}"))
    with pytest.raises(ConfigError, match="reference scores preference pairs"):
        Evaluator(conversations, *built(conversations))
    missing = load_sft(*heldout(small_world, "pairs", "qwen_vl_preference", "preference_val.json",
                                "evaluation.pairs.reference=nowhere"))
    with pytest.raises(ConfigError, match="heldout_loss: reference: "):
        Evaluator(missing, *built(missing))
