"""A failed or interrupted job ends, whole, within seconds; and run.resume never costs a run its records.

Every error, in a data worker or in the trainer, and an interrupt sent to the trainer alone, end the
job with a non-zero exit and leave no process behind (one process and 2-rank torchrun, with the
default data workers). The skips that led to a data failure are in ``skipped.jsonl``.
``run.resume=auto`` on a run that has no checkpoint, and a resume this config cannot continue, change
nothing in the run's directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, SFT_PROJECT, popen_train, run_train, sft_options

from lavis.common import checkpoint as ckpt
from lavis.runners import build_runner
from lavis.runners.checkpointer import OutputDirInUse
from lavis.tracking.logging import read_metrics

pytestmark = pytest.mark.integration

ENDS_WITHIN_S = 30
STARTUP_TIMEOUT_S = 240
WORKERS = "run.num_workers=2"  # the default of projects/sft.yaml; the conftest options set 0


def processes_of(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (a run's unique output_dir)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in text and int(cmdline.parent.name) != os.getpid():
            found.append(f"{cmdline.parent.name}: {text}")
    return found


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def kill_all(marker: str) -> None:
    for line in processes_of(marker):
        try:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def wait_for_text(log: Path, text: str, proc: subprocess.Popen, marker: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while text not in (log.read_text() if log.exists() else ""):
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before '{text}':\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            kill_all(marker)
            pytest.fail(f"no '{text}' in {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def ends_within(proc: subprocess.Popen, log: Path, marker: str, since: float) -> int:
    """The job's exit code; it must end, every process of it, within ENDS_WITHIN_S of ``since``."""
    try:
        rc = proc.wait(timeout=max(1.0, since + ENDS_WITHIN_S - time.monotonic()))
    except subprocess.TimeoutExpired:
        kill_all(marker)
        proc.kill()
        pytest.fail(f"still running {ENDS_WITHIN_S} s later:\n{log.read_text()[-3000:]}")
    while processes_of(marker) and time.monotonic() < since + ENDS_WITHIN_S:
        time.sleep(0.1)
    left = processes_of(marker)
    kill_all(marker)
    assert not left, f"processes left behind: {left}"
    return rc


def torchrun(options: list[str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "train.py"), "--cfg-path", str(SFT_PROJECT), "--options", *options]
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def unusable_data_options(world: Path, out: Path) -> list[str]:
    """Every image one directory too deep; the skip-ratio bound off, so the data workers' own bound
    (32 consecutive unusable samples) is what fails the run."""
    return sft_options(world, out, WORKERS, "run.batch_size=2", "run.max_steps=50", "run.max_skip_ratio=1.0",
                       f"datasets.synthetic_sft.image_root={world / 'images'}")


def training_options(world: Path, out: Path) -> list[str]:
    return sft_options(world, out, WORKERS, "run.batch_size=2", "run.max_steps=100000", "run.save_every=100000")


def assert_failure_skips_recorded(out: Path) -> None:
    records = read_metrics(out / "skipped.jsonl")
    assert len(records) >= 32
    assert {r["reason"] for r in records} == {"missing_image"}
    assert all({"step", "rank", "dataset", "id", "detail"} <= r.keys() for r in records)


# --------------------------------------------------------------------------- one process


def test_a_data_worker_error_ends_the_job_and_its_skips_are_recorded(small_world, tmp_path):
    out, log = tmp_path / "out", tmp_path / "train.log"
    proc = popen_train(unusable_data_options(small_world, out), log)
    wait_for_text(log, "global batch", proc, str(out))
    rc = ends_within(proc, log, str(out), time.monotonic())
    text = log.read_text()
    assert rc == 1, text[-3000:]
    assert "error: 32 consecutive samples of dataset 'synthetic_sft' were unusable" in text
    assert "Traceback" not in text
    assert_failure_skips_recorded(out)


def test_an_interrupt_to_the_trainer_alone_ends_the_job(small_world, tmp_path):
    out, log = tmp_path / "out", tmp_path / "train.log"
    proc = popen_train(training_options(small_world, out), log)
    wait_for_text(log, "step 2/", proc, str(out))
    proc.send_signal(signal.SIGINT)  # the trainer's pid only, not its process group
    rc = ends_within(proc, log, str(out), time.monotonic())
    assert rc == 130 and "interrupted at step" in log.read_text()


def test_a_trainer_killed_outright_takes_its_data_workers_with_it(small_world, tmp_path):
    out, log = tmp_path / "out", tmp_path / "train.log"
    proc = popen_train(training_options(small_world, out), log)
    wait_for_text(log, "step 2/", proc, str(out))
    proc.kill()
    assert ends_within(proc, log, str(out), time.monotonic()) == -signal.SIGKILL


def test_a_data_failure_without_workers_records_the_skips_that_failed_the_run(load_sft, small_world, tmp_path):
    """run.num_workers=0: the stream's bound raises in the trainer itself; the skips are recorded too."""
    from lavis.datasets.stream import UnusableData

    out = tmp_path / "out"
    runner = build_runner(load_sft("run.max_steps=50", f"datasets.synthetic_sft.image_root={small_world / 'images'}",
                                   output_dir=out))
    with pytest.raises(UnusableData, match="consecutive samples of dataset 'synthetic_sft' were unusable"):
        runner.train()
    assert_failure_skips_recorded(out)


# --------------------------------------------------------------------------- two ranks


@pytest.mark.distributed
def test_a_data_worker_error_ends_a_two_rank_job(small_world, tmp_path):
    out, log = tmp_path / "out", tmp_path / "train.log"
    proc = torchrun([*unusable_data_options(small_world, out), "run.strategy=ddp"], log)
    wait_for_text(log, "global batch", proc, str(out))
    rc = ends_within(proc, log, str(out), time.monotonic())
    assert rc != 0
    assert "32 consecutive samples of dataset 'synthetic_sft' were unusable" in log.read_text()
    assert_failure_skips_recorded(out)


@pytest.mark.distributed
def test_an_interrupt_to_one_ranks_trainer_ends_a_two_rank_job(small_world, tmp_path):
    out, log = tmp_path / "out", tmp_path / "train.log"
    proc = torchrun([*training_options(small_world, out), "run.strategy=ddp"], log)
    wait_for_text(log, "step 2/", proc, str(out))
    # The trainers are torchrun's children (their data workers, the trainers' children, share the command line).
    trainers = [pid for pid in (int(line.split(":")[0]) for line in processes_of(str(out))) if parent_of(pid) == proc.pid]
    assert len(trainers) == 2
    os.kill(trainers[-1], signal.SIGINT)
    rc = ends_within(proc, log, str(out), time.monotonic())
    assert rc != 0 and "interrupted at step" in log.read_text()


# --------------------------------------------------------------------------- run.resume keeps what is there


def files_of(out: Path) -> dict[Path, bytes]:
    return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_resume_auto_without_a_checkpoint_keeps_the_runs_records(load_sft, small_world, tmp_path):
    """A run that crashed before its first checkpoint: resume=auto says there is nothing to continue and
    changes nothing; with run.overwrite it is moved aside whole; on an empty directory it starts."""
    from lavis.datasets.stream import UnusableData

    out = tmp_path / "out"
    with pytest.raises(UnusableData):  # crashes at its first batch (no image found), before any checkpoint
        build_runner(load_sft("run.max_steps=50", f"datasets.synthetic_sft.image_root={small_world / 'images'}",
                              output_dir=out)).train()
    before = files_of(out)
    assert {Path("config.yaml"), Path("metrics.jsonl"), Path("skipped.jsonl")} <= before.keys()
    assert before[Path("skipped.jsonl")]

    with pytest.raises(OutputDirInUse) as err:
        build_runner(load_sft("run.max_steps=2", "run.resume=auto", output_dir=out)).train()
    message = str(err.value)
    assert "no complete checkpoint to continue from" in message and "nothing in it was changed" in message
    assert "run.overwrite=true" in message and "another run.output_dir" in message
    assert files_of(out) == before

    proc = run_train(sft_options(small_world, out, "run.max_steps=2", "run.resume=auto"))
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert files_of(out) == before

    build_runner(load_sft("run.max_steps=2", "run.resume=auto", "run.overwrite=true", output_dir=out)).train()
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert files_of(aside) == before
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]

    fresh = tmp_path / "fresh"
    build_runner(load_sft("run.max_steps=1", "run.resume=auto", output_dir=fresh)).train()
    assert ckpt.list_checkpoints(fresh)


def test_a_resume_this_config_cannot_continue_changes_nothing(small_world, tmp_path):
    """A model key changed since the run began (a shape differs): a clear error naming the tensor and both
    shapes, exit 2, and the run's config.yaml, metrics and checkpoints as they were."""
    out = tmp_path / "out"
    first = run_train(sft_options(small_world, out, "run.max_steps=2", "run.save_every=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    before = files_of(out)
    proc = run_train(sft_options(small_world, out, "run.max_steps=4", "run.resume=auto",
                                 "model.llm.config.intermediate_size=96"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "cannot be continued by this config" in proc.stderr and "parameter shape(s) differ" in proc.stderr
    assert "mlp" in proc.stderr and "in the checkpoint" in proc.stderr
    assert files_of(out) == before

    missing = tmp_path / "nowhere" / "checkpoints" / "step_00000002"
    proc = run_train(sft_options(small_world, tmp_path / "other", "run.max_steps=4", f"run.resume={missing}"))
    assert proc.returncode == 2 and "is not a complete checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((ckpt.list_checkpoints(out)[-1] / ckpt.META_NAME).read_text())["step"] == 2


# --------------------------------------------------------------------------- the data workers themselves


class FailingStream(torch.utils.data.IterableDataset):
    """Batches from each worker: ``fail_after`` good ones, then an error (or, with ``hang``, a worker that
    never answers again)."""

    def __init__(self, fail_after: int, hang: bool = False) -> None:
        self.fail_after, self.hang = fail_after, hang

    def __iter__(self):
        for i in range(self.fail_after):
            yield {"i": i}
        if self.hang:
            time.sleep(3600)
        raise KeyError("a bug in a processor")


def worker_pids_of(batches) -> list[int]:
    return [w.pid for w in batches.gi_frame.f_locals["iterator"]._workers]


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_any_worker_error_reaches_the_trainer_and_closing_ends_every_worker():
    from lavis.datasets.loader import worker_batches

    batches = worker_batches(FailingStream(fail_after=1), num_workers=2, pin_memory=False, seed=0)
    assert next(batches) == {"i": 0}
    pids = worker_pids_of(batches)
    with pytest.raises(KeyError, match="a bug in a processor"):
        for _ in batches:
            pass
    batches.close()
    assert not [pid for pid in pids if alive(pid)]


def test_a_hung_worker_is_killed_when_the_loop_ends():
    """A worker that ignores the DataLoader's shutdown (and SIGTERM, as every worker does) is killed."""
    from lavis.datasets.loader import worker_batches

    batches = worker_batches(FailingStream(fail_after=1, hang=True), num_workers=2, pin_memory=False, seed=0)
    next(batches), next(batches)
    pids = worker_pids_of(batches)
    started = time.monotonic()
    batches.close()
    assert time.monotonic() - started < ENDS_WITHIN_S
    assert not [pid for pid in pids if alive(pid)]
