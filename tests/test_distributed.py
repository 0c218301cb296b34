"""Training under ``torchrun`` on the CPU (gloo): DDP and FSDP equal one process, frozen components,
mixed modality across ranks, failure handling, exact resume, resharding and export.

Multi-process tests are marked ``distributed``: ``pytest -m distributed`` runs them alone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import KILLED_DURING_SAVE, REPO, SFT_PROJECT, eval_options, sft_options

from lavis.common import checkpoint as ckpt
from lavis.common.config import load_config
from lavis.datasets.stream import Source, SourceCursor
from lavis.runners import build_runner
from lavis.tracking.logging import read_metrics

pytestmark = pytest.mark.distributed

LAUNCH_TIMEOUT = 240


def torchrun_command(nproc: int, options: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(REPO / "train.py"), "--cfg-path", str(SFT_PROJECT), "--options", *options,
    ]


def launch(nproc: int, options: list[str], log: Path) -> subprocess.Popen:
    """Start ``torchrun`` with ``nproc`` training processes in the background (output to ``log``)."""
    with open(log, "w") as out:
        return subprocess.Popen(torchrun_command(nproc, options), cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def wait(proc: subprocess.Popen, log: Path, timeout: float = LAUNCH_TIMEOUT) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{log.read_text()[-4000:]}")


def run(nproc: int, options: list[str], log: Path) -> None:
    """Run ``torchrun`` to the end; it must succeed."""
    proc = launch(nproc, options, log)
    assert wait(proc, log) == 0, log.read_text()[-4000:]


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    for child in children(pid):
        kill_tree(child, sig)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_until(predicate, proc: subprocess.Popen, log: Path, timeout: float = LAUNCH_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"torchrun exited with {proc.returncode} before the awaited event:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            kill_tree(proc.pid)
            pytest.fail(f"timed out waiting:\n{log.read_text()[-4000:]}")
        time.sleep(0.02)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """Whole tensors of a run's newest checkpoint, whichever layout it was written in."""
    return ckpt.load_weights_file(ckpt.weights_path(ckpt.list_checkpoints(out)[-1]))


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# --------------------------------------------------------------------------- equal to one process

STEPS = ("run.max_steps=6", "run.warmup_steps=2", "run.lr=2e-3", "run.save_every=1000")
FREEZE = {
    "all": (),
    "sft": ("model.freeze.vision=frozen",),  # Qwen-VL's stage 3
    "stage1": ("model.freeze.llm=frozen",),  # Qwen-VL's stage 1
    "lora": ("model.freeze.vision=frozen", "model.freeze.llm={policy: lora, r: 4, alpha: 8, dropout: 0.0}"),
}
CASES = [("ddp", "all"), ("fsdp", "all"), ("fsdp", "sft"), ("fsdp", "stage1"), ("fsdp", "lora")]


def test_two_ranks_equal_one_process_with_the_same_global_batch(small_world, tmp_path):
    """2 ranks x batch 1 x grad_accum 2 vs one process x batch 2 x grad_accum 2: after 6 optimiser
    steps the weights agree within 1e-5 and the logged losses too, under DDP and FSDP, with every
    component trained, with a frozen ViT (SFT), with a frozen LLM (stage 1) and with LoRA on the LLM
    (FSDP units whose base weights are frozen and whose adapters train)."""
    procs = {}
    for strategy, freeze in CASES:
        out = tmp_path / f"{strategy}-{freeze}"
        options = sft_options(small_world, out, *STEPS, *FREEZE[freeze], f"run.strategy={strategy}",
                              "run.batch_size=1", "run.grad_accum=2")
        procs[strategy, freeze] = (launch(2, options, tmp_path / f"{strategy}-{freeze}.log"), out)
    reference = {}
    for freeze, extra in FREEZE.items():
        out = tmp_path / f"single-{freeze}"
        runner = build_runner(load_config(SFT_PROJECT, sft_options(
            small_world, out, *STEPS, *extra, "run.batch_size=2", "run.grad_accum=2")))
        start = {k: v.detach().clone() for k, v in runner.trainable_state().items()}
        runner.train()
        reference[freeze] = (final_weights(out), losses(out), start)
    for (strategy, freeze), (proc, out) in procs.items():
        log = tmp_path / f"{strategy}-{freeze}.log"
        assert wait(proc, log) == 0, log.read_text()[-4000:]
        weights, logged, start = reference[freeze]
        assert max(float((weights[k] - start[k]).abs().max()) for k in start) > 1e-3  # training moved the weights
        got = final_weights(out)
        assert got.keys() == weights.keys() == start.keys(), (strategy, freeze)  # trainable weights only
        assert max_difference(got, weights) < 1e-5, (strategy, freeze)
        assert losses(out) == pytest.approx(logged, rel=1e-5), (strategy, freeze)
        text = log.read_text()
        assert f"global batch 4 = batch_size 1 x grad_accum 2 x 2 rank(s) (run.strategy={strategy})" in text
        assert text.count("global batch") == 1  # logged by rank 0 only
        if strategy == "fsdp":
            assert "ranks 1+ built the model on the meta device and received their shards from rank 0" in text
        assert (ckpt.list_checkpoints(out)[-1] / ckpt.SHARDED_WEIGHTS_NAME).is_dir() == (strategy == "fsdp")


# --------------------------------------------------------------------------- mixed modality


def mixed_modality_data(world: Path, path: Path, seed: int) -> Path:
    """A Qwen-VL conversation file whose records for rank 0 (of 2, first epoch) are text-only and
    whose records for rank 1 all have an image."""
    records = [r for r in json.loads((world / "sft_train.json").read_text()) if "<img>" in json.dumps(r)]
    image = iter(records)
    text = iter(  # the same conversations with their pictures taken out
        {**r, "id": f"text-{r['id']}", "conversations": [
            {**turn, "value": re.sub(r"Picture \d+: <img>.*?</img>\n", "", turn["value"])} for turn in r["conversations"]
        ]}
        for r in records[::-1]
    )
    n = 24
    rank0 = set(SourceCursor(Source("mixed", list(range(n))), 0, seed, worker=0, num_workers=2).epoch_order())
    path.write_text(json.dumps([next(text) if k in rank0 else next(image) for k in range(n)]))
    return path


def test_fsdp_step_with_images_on_one_rank_only(small_world, tmp_path):
    """Rank 0's batches have no image, rank 1's all have one, in the same steps. The ViT and the adapter
    are frozen (nothing trainable asks for the visual path): under FSDP it must still run on every rank,
    or rank 1 gathers ViT shards while rank 0 gathers LLM shards. With it, the run equals one process;
    without it (encode_images_every_step=false), the job fails."""
    data = mixed_modality_data(small_world, tmp_path / "mixed.json", seed=42)

    def options(out: Path, *extra: str) -> list[str]:
        return sft_options(
            small_world, out, *STEPS, "run.seed=42", "model.freeze.vision=frozen", "model.freeze.adapter=frozen",
            f"datasets.synthetic_sft.ann_path={data}", "run.dist_timeout_s=30", *extra,
        )

    fixed = launch(2, options(tmp_path / "fsdp", "run.strategy=fsdp", "run.batch_size=2"), tmp_path / "fsdp.log")
    broken = launch(2, options(tmp_path / "broken", "run.strategy=fsdp", "run.strategy.encode_images_every_step=false",
                               "run.batch_size=2"), tmp_path / "broken.log")
    single = tmp_path / "single"
    build_runner(load_config(SFT_PROJECT, options(single, "run.batch_size=4"))).train()
    assert wait(fixed, tmp_path / "fsdp.log") == 0, (tmp_path / "fsdp.log").read_text()[-4000:]
    assert max_difference(final_weights(tmp_path / "fsdp"), final_weights(single)) < 1e-5
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(single), rel=1e-5)
    assert wait(broken, tmp_path / "broken.log") != 0
    assert not ckpt.list_checkpoints(tmp_path / "broken")


def test_fsdp_evaluates_during_training_like_one_process(small_world, tmp_path):
    """Evaluation during training under FSDP: the ranks split the samples (5 VQA questions: 3 and 2, so
    one rank runs a padding batch) and generate in lock-step; the metrics and every prediction equal a
    single process's."""

    def options(out: Path, *extra: str) -> list[str]:
        return sft_options(
            small_world, out, *STEPS, *eval_options(small_world, "vqa", "grounding", max_samples=5),
            "run.eval_every=3", "run.eval_batch_size=2", *extra,
        )

    proc = launch(2, options(tmp_path / "fsdp", "run.strategy=fsdp", "run.batch_size=2"), tmp_path / "fsdp.log")
    build_runner(load_config(SFT_PROJECT, options(tmp_path / "single", "run.batch_size=4"))).train()
    assert wait(proc, tmp_path / "fsdp.log") == 0, (tmp_path / "fsdp.log").read_text()[-4000:]

    def evaluations(out: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(out / "metrics.jsonl") if "loss" not in r]

    assert [r["step"] for r in evaluations(tmp_path / "fsdp")] == [3, 6]
    assert evaluations(tmp_path / "fsdp") == evaluations(tmp_path / "single")
    for name in ("vqa", "grounding"):
        two, one = (json.loads((tmp_path / run / "eval" / f"{name}.json").read_text()) for run in ("fsdp", "single"))
        assert len(two["predictions"]) == 5
        assert two["predictions"] == one["predictions"]


# --------------------------------------------------------------------------- failures and exact resume


def test_a_dead_rank_ends_the_job_and_a_killed_job_resumes_bitwise(small_world, tmp_path):
    """Run A: 2-rank FSDP, 30 steps, uninterrupted. Run B: the same, but one rank is SIGKILLed after the
    first checkpoint (the job must exit non-zero within 60 s), resumed, SIGKILLed whole after the second
    checkpoint, resumed again. B ends with A's weights, optimiser state and losses, bit for bit."""
    steps = 30

    def options(out: Path, *extra: str) -> list[str]:
        return sft_options(
            small_world, out, f"run.max_steps={steps}", "run.save_every=10", "run.keep_last=5", "run.warmup_steps=3",
            "run.strategy=fsdp", "run.batch_size=2", "model.llm.config.attention_dropout=0.1", *extra,
        )

    out_a, out_b = tmp_path / "a", tmp_path / "b"
    proc_a = launch(2, options(out_a), tmp_path / "a.log")

    proc = launch(2, options(out_b), tmp_path / "b1.log")
    wait_until(lambda: len(ckpt.list_checkpoints(out_b)) >= 1, proc, tmp_path / "b1.log")
    victim = children(proc.pid)[-1]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    rc = wait(proc, tmp_path / "b1.log", timeout=90)
    assert rc != 0 and time.monotonic() - killed < 60, (rc, time.monotonic() - killed)
    first = ckpt.list_checkpoints(out_b)
    assert [p.name for p in first][:1] == ["step_00000010"]

    proc = launch(2, options(out_b, "run.resume=auto"), tmp_path / "b2.log")
    wait_until(lambda: any(p.name == "step_00000020" for p in ckpt.list_checkpoints(out_b)), proc, tmp_path / "b2.log")
    kill_tree(proc.pid)  # kill -9 the whole job: torchrun and every rank
    proc.wait()
    resumed_at = ckpt.list_checkpoints(out_b)[-1].name
    assert resumed_at in ("step_00000020", "step_00000030")

    run(2, options(out_b, "run.resume=auto"), tmp_path / "b3.log")
    assert wait(proc_a, tmp_path / "a.log") == 0, (tmp_path / "a.log").read_text()[-4000:]

    final_a, final_b = ckpt.list_checkpoints(out_a)[-1], ckpt.list_checkpoints(out_b)[-1]
    assert final_a.name == final_b.name == f"step_{steps:08d}"
    for part in (ckpt.SHARDED_WEIGHTS_NAME, ckpt.SHARDED_OPTIMIZER_NAME):
        a, b = ckpt.read_sharded(final_a / part), ckpt.read_sharded(final_b / part)
        assert a.keys() == b.keys() and len(a) > 50
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{part}: {len(different)} tensors differ after resume, e.g. {different[:3]}"
    state_a = torch.load(final_a / ckpt.STATE_NAME, weights_only=True)
    state_b = torch.load(final_b / ckpt.STATE_NAME, weights_only=True)
    assert state_a["data"] == state_b["data"] and len(state_a["ranks"]) == 2
    assert [r["data_states"] for r in state_a["ranks"]] == [r["data_states"] for r in state_b["ranks"]]
    assert losses(out_a) == losses(out_b)  # every step logged once, the same to the last bit


def test_a_rank_killed_while_saving_and_a_damaged_shard_resume_bitwise_from_the_last_good_one(small_world, tmp_path):
    """2-rank FSDP, sharded checkpoints. Rank 1 is SIGKILLed half-way through writing its shard of the
    step-6 checkpoint; afterwards a byte of a step-4 shard flips on disk. run.resume=auto (2 ranks, which
    verify the checksums together) passes over both and continues from step 2, ending bitwise equal to
    the uninterrupted run."""
    def options(out: Path, *extra: str) -> list[str]:
        return sft_options(small_world, out, "run.max_steps=8", "run.save_every=2", "run.keep_last=5",
                           "run.strategy=fsdp", "run.batch_size=2", "model.llm.config.attention_dropout=0.1", *extra)

    out_a, out_b = tmp_path / "a", tmp_path / "b"
    proc_a = launch(2, options(out_a), tmp_path / "a.log")
    log = tmp_path / "b1.log"
    with open(log, "w") as fh:
        command = torchrun_command(2, options(out_b))
        command[command.index(str(REPO / "train.py"))] = str(KILLED_DURING_SAVE)
        env = {**os.environ, "KILL_DURING_SAVE": "step_00000006", "KILL_RANK": "1"}
        proc = subprocess.Popen(command, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
    assert wait(proc, log) != 0
    assert "killed while writing" in log.read_text()
    assert [p.name for p in ckpt.list_checkpoints(out_b)] == ["step_00000002", "step_00000004"]
    assert list((out_b / "checkpoints").glob(".step_00000006.tmp-*"))

    damaged = out_b / "checkpoints" / "step_00000004"
    shard = sorted((damaged / ckpt.SHARDED_WEIGHTS_NAME).glob("*.distcp"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert ckpt.verify(damaged) == [f"{shard.relative_to(damaged)}: checksum differs"]

    run(2, options(out_b, "run.resume=auto"), tmp_path / "b2.log")
    text = (tmp_path / "b2.log").read_text()
    assert "step_00000004 is damaged" in text and f"resumed from {out_b / 'checkpoints' / 'step_00000002'} at step 2" in text
    assert not list((out_b / "checkpoints").glob(".step_*.tmp-*"))
    assert wait(proc_a, tmp_path / "a.log") == 0, (tmp_path / "a.log").read_text()[-4000:]

    final_a, final_b = (d / "checkpoints" / "step_00000008" for d in (out_a, out_b))
    for part in (ckpt.SHARDED_WEIGHTS_NAME, ckpt.SHARDED_OPTIMIZER_NAME):
        a, b = ckpt.read_sharded(final_a / part), ckpt.read_sharded(final_b / part)
        assert a.keys() == b.keys() and len(a) > 50
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{part}: {len(different)} tensors differ after resume, e.g. {different[:3]}"
    assert losses(out_a) == losses(out_b) and len(losses(out_a)) == 8


def test_sigterm_stops_every_rank_at_one_step_with_one_checkpoint(small_world, tmp_path):
    """SIGTERM to torchrun (a preempted node): the ranks agree on a step, save one checkpoint together and
    exit; run.resume=auto continues from it. Data workers (2 per rank) survive the signal until the save."""
    out, log = tmp_path / "out", tmp_path / "train.log"
    options = sft_options(small_world, out, "run.max_steps=5000", "run.save_every=5000", "run.strategy=ddp",
                          "run.batch_size=2", "run.num_workers=2")
    proc = launch(2, options, log)
    metrics = out / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc, log)
    proc.send_signal(signal.SIGTERM)
    wait(proc, log, timeout=60)
    found = ckpt.list_checkpoints(out)
    assert len(found) == 1, log.read_text()[-4000:]
    step = ckpt.read_meta(found[0])["step"]
    assert 3 <= step < 5000
    text = log.read_text()
    assert text.count("signal 15: saving a checkpoint") >= 1
    assert f"stopped at step {step} on a signal" in text
    assert len(torch.load(found[0] / ckpt.STATE_NAME, weights_only=True)["ranks"]) == 2

    resumed = [o if not o.startswith("run.max_steps=") else f"run.max_steps={step + 2}" for o in options]
    run(2, [*resumed, "run.resume=auto"], tmp_path / "resume.log")
    assert f"resumed from {found[0]} at step {step}" in (tmp_path / "resume.log").read_text()
    assert read_metrics(metrics)[-1]["step"] == step + 2


def test_a_hung_rank_fails_the_job_after_the_timeout(small_world, tmp_path):
    """A rank that stops answering (SIGSTOP) makes the other's collective fail after run.dist_timeout_s,
    with a message that says so; the job ends instead of waiting forever (torchrun SIGKILLs the stopped
    rank 30 s later)."""
    out, log = tmp_path / "out", tmp_path / "train.log"
    proc = launch(2, sft_options(small_world, out, "run.max_steps=5000", "run.save_every=5000", "run.strategy=ddp",
                                 "run.batch_size=2", "run.dist_timeout_s=5"), log)
    metrics = out / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc, log)
    stopped = children(proc.pid)[-1]
    os.kill(stopped, signal.SIGSTOP)
    try:
        rc = wait(proc, log, timeout=120)
    finally:
        kill_tree(stopped)
    assert rc != 0
    assert "a collective operation failed" in log.read_text() and "run.dist_timeout_s=5" in log.read_text()


def test_non_finite_loss_stops_every_rank_with_a_message(small_world, tmp_path):
    out, log = tmp_path / "out", tmp_path / "train.log"
    proc = launch(2, sft_options(small_world, out, "run.max_steps=200", "run.save_every=1000", "run.strategy=fsdp",
                                 "run.batch_size=2", "run.lr=1e4", "run.warmup_steps=1", "run.clip_grad=null"), log)
    assert wait(proc, log) != 0
    text = log.read_text()
    assert text.count("non-finite loss at step") == 2, text[-4000:]  # both ranks, the same step
    assert not ckpt.list_checkpoints(out)


# --------------------------------------------------------------------------- other world sizes, export


def test_fsdp_checkpoint_resumes_on_one_and_three_ranks_and_exports(small_world, tmp_path, caplog):
    two = tmp_path / "two"
    run(2, sft_options(small_world, two, "run.max_steps=4", "run.save_every=4", "run.strategy=fsdp",
                       "run.batch_size=2", "run.warmup_steps=2"), tmp_path / "two.log")
    checkpoint = ckpt.list_checkpoints(two)[-1]
    gathered = ckpt.read_sharded(checkpoint / ckpt.SHARDED_WEIGHTS_NAME)
    optim = ckpt.read_sharded(checkpoint / ckpt.SHARDED_OPTIMIZER_NAME)

    # 2 -> 3 ranks, FSDP: resumes with a warning about the data order and trains on.
    three = tmp_path / "three"
    run(3, sft_options(small_world, three, "run.max_steps=6", "run.strategy=fsdp", "run.batch_size=2",
                       "run.warmup_steps=2", f"run.resume={checkpoint}"), tmp_path / "three.log")
    text = (tmp_path / "three.log").read_text()
    assert "was written by 2 ranks and this run has 3" in text and "at step 4" in text
    assert [r["step"] for r in read_metrics(three / "metrics.jsonl")] == [5, 6]

    # 2 -> 1 process, another strategy: the weights and optimiser state are those of the checkpoint.
    runner = build_runner(load_config(SFT_PROJECT, sft_options(
        small_world, tmp_path / "one", "run.max_steps=6", "run.batch_size=4", f"run.resume={checkpoint}")))
    with caplog.at_level("WARNING"):
        runner.load(checkpoint)
    assert "was written by 2 ranks and this run has 1" in caplog.text
    params = runner.trainable_state()
    assert params.keys() == gathered.keys()
    assert all(torch.equal(params[k].detach(), gathered[k]) for k in gathered)
    adam = runner.optimizer.state[params["adapter.query"]]
    assert torch.equal(adam["exp_avg"], optim["state.adapter.query.exp_avg"])
    runner.train()
    assert runner.step == 6

    # Export: one file whose tensors are the gathered model; it loads for inference.
    exported = tmp_path / "export"
    done = subprocess.run([sys.executable, "-m", "lavis.export", str(two), str(exported)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file

    single_file = load_file(str(exported / ckpt.WEIGHTS_NAME))
    assert single_file.keys() == gathered.keys()
    assert all(torch.equal(single_file[k], gathered[k]) for k in gathered)
    import lavis

    # The sharded checkpoint itself, the export, and a later stage's model.load_from all give those weights.
    from lavis.models import build_model

    later = load_config(SFT_PROJECT, sft_options(small_world, tmp_path / "later", f"model.load_from={two}")).model
    for model in (lavis.load_model(two, device="cpu")[0], lavis.load_model(exported, device="cpu")[0], build_model(later)[0]):
        named = dict(model.named_parameters())
        assert all(torch.equal(named[k], v) for k, v in gathered.items())
