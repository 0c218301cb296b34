"""Training: the loss falls, gradient accumulation, exact resume after SIGKILL, checkpoints, SIGTERM."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import KILLED_DURING_SAVE, REPO, SFT_PROJECT, popen_train, run_train, sft_options
from helpers import assert_same_end, finish, sigkill_at_first_checkpoint, stop_all
from safetensors.torch import load_file

from lavis.common import checkpoint as ckpt
from lavis.common.config import load_config
from lavis.common.optim import linear_warmup_cosine
from lavis.runners import build_runner
from lavis.runners.checkpointer import OutputDirInUse
from lavis.tracking.logging import read_metrics

pytestmark = pytest.mark.integration

QUICK = ("run.save_every=1000",)


def step_dirs(output_dir: Path) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(output_dir)]


def tensors_of(state, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested state (dicts and lists), keyed by its path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in tensors_of(value, f"{prefix}/{key}").items()}


def assert_bitwise_equal(a, b, what: str) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys() and len(ta) > 50, what
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:3]}"


def hidden_dirs(output_dir: Path) -> list[str]:
    return sorted(p.name for p in (output_dir / "checkpoints").glob(".*"))


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 180.0, poll: float = 0.02) -> None:
    """Poll ``predicate`` until true; fail (with the log) if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"train.py exited with {proc.returncode} before the awaited event:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting:\n{log.read_text()[-3000:]}")
        time.sleep(poll)


# --------------------------------------------------------------------------- learning


def test_loss_falls_and_logged_lr_follows_the_schedule(load_sft, tmp_path):
    out = tmp_path / "out"
    cfg = load_sft(
        "run.max_steps=30", "run.warmup_steps=3", "run.lr=2e-3", "run.min_lr=2e-4", "run.log_every=5",
        "run.save_every=1000", output_dir=out,
    )
    last = build_runner(cfg).train()
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert last == records[-1]
    for r in records:
        assert math.isfinite(r["loss"]) and r["skipped"] == 0
        assert 0.0 <= r["data_wait_share"] <= 1.0  # the share of the window's time spent waiting for batches
        # the lr logged at step s is the one step s used (0-based optimiser step s - 1)
        assert r["lr"] == pytest.approx(linear_warmup_cosine(r["step"] - 1, 30, 3, 2e-3, 2e-4), rel=1e-12)
    first, final = records[0]["loss"], records[-1]["loss"]
    assert 5.0 < first < 8.0  # about ln(vocab) = ln(1088) = 7.0 at the start
    assert final <= 0.7 * first, [r["loss"] for r in records]
    assert step_dirs(out) == ["step_00000030"]  # the last step is always saved


def test_gradient_accumulation_matches_a_larger_batch(load_sft, tmp_path):
    common = ("run.max_steps=3", "run.warmup_steps=1", "run.lr=1e-3", *QUICK[:1])
    big = build_runner(load_sft(*common, "run.batch_size=8", "run.grad_accum=1", output_dir=tmp_path / "big"))
    init = {k: v.detach().clone() for k, v in big.trainable_state().items()}
    big.train()
    acc = build_runner(load_sft(*common, "run.batch_size=4", "run.grad_accum=2", output_dir=tmp_path / "acc"))
    acc.train()
    a = {k: v.detach() for k, v in big.trainable_state().items()}
    b = {k: v.detach() for k, v in acc.trainable_state().items()}
    assert a.keys() == b.keys() == init.keys()
    moved = max(float((a[k] - init[k]).abs().max()) for k in a)
    assert moved > 1e-3  # training changed the weights, so the comparison below means something
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, worst
    la = read_metrics(tmp_path / "big" / "metrics.jsonl")
    lb = read_metrics(tmp_path / "acc" / "metrics.jsonl")
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [1, 2, 3]
    for ra, rb in zip(la, lb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)


# --------------------------------------------------------------------------- exact resume


def test_resume_after_sigkill_is_bitwise_identical(small_world, tmp_path):
    """Runs A train 24 steps uninterrupted (in this process). Runs B (num_workers 0 and 2, side by
    side, in subprocesses) are SIGKILLed once their first checkpoint exists, then rerun with
    ``run.resume=auto``; every run ends with the same weights, optimiser state and losses, bit for bit.
    Attention dropout is on, so the RNG state must be restored exactly, not just weights and data."""
    steps = 24

    def options(out: Path, *extra: str) -> list[str]:
        return sft_options(
            small_world, out, f"run.max_steps={steps}", "run.save_every=4", "run.keep_last=3", "run.warmup_steps=4",
            "model.llm.config.attention_dropout=0.1",  # draws from the RNG: its state must be restored exactly
            *extra,
        )

    workers = (0, 2)
    outs = {w: tmp_path / f"b{w}" for w in workers}
    logs = {w: tmp_path / f"b{w}.log" for w in workers}
    procs = {w: popen_train(options(outs[w], f"run.num_workers={w}"), logs[w]) for w in workers}
    try:
        killed_at = sigkill_at_first_checkpoint(procs, outs, logs)
        for w in workers:
            assert 4 <= killed_at[w] < steps
            procs[w] = popen_train(options(outs[w], f"run.num_workers={w}", "run.resume=auto"), logs[w])

        # Meanwhile, the uninterrupted runs (the data order depends on the number of data workers).
        for w in workers:
            build_runner(load_config(SFT_PROJECT, options(tmp_path / f"a{w}", f"run.num_workers={w}"))).train()

        for w in workers:
            assert finish(procs[w], logs[w]) == 0, logs[w].read_text()[-3000:]
    finally:
        stop_all(procs)

    for w in workers:
        out_a, out_b = tmp_path / f"a{w}", outs[w]
        resumed = f"resumed from {out_b / 'checkpoints' / f'step_{killed_at[w]:08d}'} at step {killed_at[w]}"
        assert resumed in logs[w].read_text()
        # weights, optimiser, data and random state, and every step's loss, bit for bit
        sa, _ = assert_same_end(out_a, out_b, steps, f"num_workers={w}")
        assert sa["data"]["samples_seen"] == steps * 4 and sa["ranks"][0]["skipped"] == {}  # 96 > 64: crosses an epoch
        assert step_dirs(out_a) == step_dirs(out_b) == ["step_00000016", "step_00000020", "step_00000024"]
        assert hidden_dirs(out_b) == []  # the killed run's temporary directory (if any) was cleaned up


# --------------------------------------------------------------------------- checkpoints


def test_keep_last_prunes_older_checkpoints(load_sft, tmp_path):
    out = tmp_path / "out"
    runner = build_runner(load_sft("run.max_steps=7", "run.save_every=2", "run.keep_last=2", output_dir=out))
    runner.train()
    assert step_dirs(out) == ["step_00000006", "step_00000007"]  # 2 and 4 were pruned; the last step saved
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000006", "step_00000007"]
    for name, step in (("step_00000006", 6), ("step_00000007", 7)):
        d = out / "checkpoints" / name
        assert sorted(p.name for p in d.iterdir()) == ["config.yaml", "meta.json", "model.safetensors", "optimizer.pt", "state.pt"]
        assert json.loads((d / "meta.json").read_text())["step"] == step
        assert torch.load(d / "state.pt", weights_only=True)["step"] == step


def test_resume_auto_ignores_temporary_and_incomplete_directories(load_sft, tmp_path):
    out = tmp_path / "out"
    opts = ("run.save_every=2", "run.keep_last=5")
    build_runner(load_sft("run.max_steps=4", *opts, output_dir=out)).train()
    root = out / "checkpoints"
    assert step_dirs(out) == ["step_00000002", "step_00000004"]

    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        # A killed run's temporary directory, complete-looking and newer than any checkpoint.
        leftover = root / f".step_00000010.tmp-{dead.pid}"
        shutil.copytree(root / "step_00000004", leftover)
        (leftover / ckpt.META_NAME).write_text(json.dumps({"step": 10}))
        # A temporary directory of a process that is still writing it.
        writing = root / f".step_00000012.tmp-{alive.pid}"
        shutil.copytree(root / "step_00000004", writing)
        # A final-named directory without meta.json (never complete).
        shutil.copytree(root / "step_00000004", root / "step_00000008")
        (root / "step_00000008" / ckpt.META_NAME).unlink()

        runner = build_runner(load_sft("run.max_steps=6", "run.resume=auto", *opts, output_dir=out))
        assert runner.checkpointer.resume_path() == root / "step_00000004"
        runner.train()
        assert runner.step == 6
        assert not leftover.exists()  # pruned: its writer is dead
        assert writing.exists()  # kept: its writer may still be renaming it
    finally:
        alive.kill()
        alive.wait()
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]  # appended after the resume at step 4
    assert json.loads((root / "step_00000006" / ckpt.META_NAME).read_text())["step"] == 6


def test_checkpoint_holds_only_trainable_weights(load_sft, tmp_path):
    out = tmp_path / "out"
    runner = build_runner(
        load_sft("run.max_steps=1", "model.freeze.vision=frozen", *QUICK, output_dir=out)
    )
    runner.train()
    d = out / "checkpoints" / "step_00000001"
    weights = load_file(str(d / ckpt.WEIGHTS_NAME))
    model = runner.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(weights) == trainable
    assert not any(k.startswith("vision.") for k in weights)
    assert any(k.startswith("adapter.") for k in weights) and any(k.startswith("llm.") for k in weights)
    assert sum(w.numel() for w in weights.values()) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    ) == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vision."))
    params = dict(model.named_parameters())
    assert all(torch.equal(weights[k], params[k].detach()) for k in weights)
    meta = json.loads((d / ckpt.META_NAME).read_text())
    files = meta.pop("files")
    assert sorted(files) == ["config.yaml", "model.safetensors", "optimizer.pt", "state.pt"]
    assert files["model.safetensors"]["bytes"] == os.path.getsize(d / "model.safetensors")
    assert meta == {
        "step": 1, "weights": "trainable",
        "freeze": {"vision": {"type": "frozen"}, "adapter": {"type": "trainable"}, "llm": {"type": "trainable"}},
        "strategy": "single", "world_size": 1, "sharded": False,
    }

    # Resuming it under another freeze policy is refused with a reason.
    other = build_runner(load_sft("run.max_steps=2", f"run.resume={d}", *QUICK, output_dir=tmp_path / "o"))
    with pytest.raises(ValueError, match="freeze policy"):
        other.load(d)


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(small_world, tmp_path):
    out, log = tmp_path / "out", tmp_path / "train.log"
    max_steps = 2000
    proc = popen_train(sft_options(small_world, out, f"run.max_steps={max_steps}", *QUICK), log)
    try:
        metrics = out / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc, log)
        proc.send_signal(signal.SIGTERM)
        rc = finish(proc, log, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, log.read_text()[-3000:]
    found = ckpt.list_checkpoints(out)
    assert len(found) == 1
    step = json.loads((found[0] / ckpt.META_NAME).read_text())["step"]
    assert 2 <= step < max_steps
    assert found[0].name == f"step_{step:08d}"
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == step
    assert "signal 15" in log.read_text()
    assert os.path.getsize(found[0] / ckpt.WEIGHTS_NAME) > 1_000_000


def test_a_run_killed_while_saving_and_a_damaged_checkpoint_resume_bitwise_from_the_last_good_one(small_world, load_sft, tmp_path, caplog):
    """Run B is SIGKILLed half-way through writing its step-6 checkpoint (the weights file cut in half);
    afterwards a byte of its step-4 checkpoint flips on disk. Checkpoints record a checksum per file:
    run.resume=auto passes over the unfinished one (never listed), warns about the damaged one and
    continues from step 4's predecessor, ending bitwise equal to the uninterrupted run A. run.resume
    naming the damaged checkpoint is an error."""
    options = ("run.max_steps=8", "run.save_every=2", "run.keep_last=5", "model.llm.config.attention_dropout=0.1")
    out = tmp_path / "b"
    killed = subprocess.run(
        [sys.executable, str(KILLED_DURING_SAVE), "--cfg-path", str(SFT_PROJECT), "--options", *sft_options(small_world, out, *options)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "KILL_DURING_SAVE": "step_00000006"},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert "killed while writing" in killed.stdout
    assert step_dirs(out) == ["step_00000002", "step_00000004"]
    (unfinished,) = (out / "checkpoints").glob(".step_00000006.tmp-*")
    assert (unfinished / ckpt.WEIGHTS_NAME).is_file() and not (unfinished / ckpt.META_NAME).exists()

    damaged = out / "checkpoints" / "step_00000004"
    data = bytearray((damaged / ckpt.OPTIMIZER_NAME).read_bytes())
    data[-100] ^= 0xFF
    (damaged / ckpt.OPTIMIZER_NAME).write_bytes(bytes(data))
    assert ckpt.verify(damaged) == ["optimizer.pt: checksum differs"]
    with pytest.raises(ValueError, match="step_00000004 is damaged: optimizer.pt: checksum differs"):
        build_runner(load_sft(*options, f"run.resume={damaged}", output_dir=tmp_path / "c")).train()

    with caplog.at_level("INFO"):
        build_runner(load_sft(*options, "run.resume=auto", output_dir=out)).train()
    assert "step_00000004 is damaged (optimizer.pt: checksum differs): trying the one before it" in caplog.text
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'} at step 2" in caplog.text
    assert not unfinished.exists()  # a dead writer's staging directory is cleared
    assert ckpt.verify(damaged) == []  # rewritten by the resumed run

    build_runner(load_sft(*options, output_dir=tmp_path / "a")).train()
    final_a, final_b = (d / "checkpoints" / "step_00000008" for d in (tmp_path / "a", out))
    for name in (ckpt.WEIGHTS_NAME, ckpt.OPTIMIZER_NAME):
        a, b = (load_file(str(d / name)) if name.endswith(".safetensors") else torch.load(d / name, weights_only=True)
                for d in (final_a, final_b))
        assert_bitwise_equal(a, b, name)
    losses = [[(r["step"], r["loss"]) for r in read_metrics(d / "metrics.jsonl")] for d in (tmp_path / "a", out)]
    assert losses[0] == losses[1] and [s for s, _ in losses[0]] == list(range(1, 9))


def test_a_second_run_into_an_earlier_runs_output_dir_is_refused_or_moves_it_aside(load_sft, small_world, tmp_path):
    """A run never destroys another run's files: without run.resume an output_dir holding a run is refused
    (naming the three ways out), with run.overwrite the earlier run is moved aside, whole."""
    out = tmp_path / "out"
    build_runner(load_sft("run.max_steps=4", "run.save_every=2", output_dir=out)).train()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert step_dirs(out) == ["step_00000002", "step_00000004"]

    with pytest.raises(OutputDirInUse) as err:
        build_runner(load_sft("run.max_steps=3", "run.save_every=1", output_dir=out)).train()
    message = str(err.value)
    assert f"run.output_dir {out} holds an earlier run (config.yaml, metrics.jsonl, 2 checkpoint(s) up to step_00000004)" in message
    assert "run.resume=auto" in message and "another run.output_dir" in message and "run.overwrite=true" in message
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched

    # train.py says the same and exits with 2, before writing anything.
    proc = run_train(sft_options(small_world, out, "run.max_steps=3"))
    assert proc.returncode == 2 and "holds an earlier run" in proc.stderr and "Traceback" not in proc.stderr
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    build_runner(load_sft("run.max_steps=3", "run.save_every=1000", "run.overwrite=true", output_dir=out)).train()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert len(aside) == 1
    assert {p.relative_to(aside[0]): p.read_bytes() for p in aside[0].rglob("*") if p.is_file()} == before
    assert step_dirs(out) == ["step_00000003"] and [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


def test_resume_with_another_number_of_data_workers_is_refused(load_sft, tmp_path):
    out = tmp_path / "out"
    build_runner(load_sft("run.max_steps=2", "run.save_every=2", output_dir=out)).train()
    resumed = build_runner(load_sft("run.max_steps=4", "run.resume=auto", "run.num_workers=2", output_dir=out))
    with pytest.raises(ValueError, match=r"written with 1 data workers; .* same number \(run.num_workers=0\)"):
        resumed.train()
