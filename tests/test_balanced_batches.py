"""Micro-batches by budget (``run.batch_tokens``, ``run.batch_patches``): the budgets hold, every sample is
seen once per epoch in the reference walk's order, a stream resumed from any batch's state continues with
the same batches bit for bit (padded and packed: the held-over sample is drawn again, not lost), bad values
fail naming the key, ``metrics.jsonl`` reports the ranks' balance on a native-resolution run, and such a run on
images of many sizes, text and videos, killed with SIGKILL and resumed, ends bit for bit as an uninterrupted one."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SFT_PROJECT, popen_train, sft_options
from helpers import assert_same_end, finish, moving_squares, sigkill_at_first_checkpoint, stop_all, write_video
from PIL import Image
from test_native_resolution import NATIVE
from test_stream import ShuffledStream

from lavis.common.config import ConfigError, load_config
from lavis.datasets.builders.base import RecordDataset
from lavis.datasets.collate import PackCollator, PadCollator
from lavis.datasets.stream import BatchStream, Source, StreamConfig, sample_cost, vision_patches
from lavis.processors.native_image import PatchImages
from lavis.runners import build_runner
from lavis.runners.iter_runner import max_over_mean, window_mean
from lavis.tracking.logging import read_metrics

MAX_LEN = 64
PATCH_DIM = 3


def mixed_records(name: str, size: int) -> list[dict]:
    """Records of 3..60 tokens, a third of them text-only, the others with 4..400 patches (a few with two images)."""
    out = []
    for i in range(size):
        images = [] if i % 3 == 0 else [4 + (i * 37) % 397] + ([16] if i % 7 == 1 else [])
        out.append({"id": f"{name}{i}", "index": i, "n": 3 + (i * 13) % 58, "images": images})
    return out


def process(record: dict) -> dict:
    """A record -> a sample whose tensors are a pure function of the record (its tokens encode its index)."""
    if record.get("fail"):
        from lavis.processors.errors import SkipSample

        raise SkipSample(record["fail"])
    gen = torch.Generator().manual_seed(hash(record["id"]) % 2**31)
    n, images = record["n"], record["images"]
    ids = torch.randint(10, 1000, (n,), generator=gen)
    ids[0] = record["index"]
    total = sum(images)
    pixels = PatchImages(torch.rand(total, PATCH_DIM, generator=gen),
                         torch.tensor([[1, 2, p // 2] for p in images], dtype=torch.long).view(-1, 3))
    return {"input_ids": ids, "labels": ids.clone(), "pixel_values": pixels, "id": record["id"]}


def sources() -> list[Source]:
    """A map-style and a streaming source (different epoch lengths), one record in 17 unusable."""
    listed = mixed_records("a", 50)
    for k in range(0, 50, 17):
        listed[k] = {**listed[k], "fail": "missing_image"}
    streamed = ShuffledStream("s", 30)
    return [Source("a", RecordDataset(listed, image_root=""), 0.7), Source("s", _NativeStream(streamed), 0.3)]


class _NativeStream(ShuffledStream):
    """``ShuffledStream``'s records, with images and lengths like :func:`mixed_records`'."""

    def __init__(self, inner: ShuffledStream) -> None:
        super().__init__(inner.name, inner.size)

    def iterate(self, seed: int, epoch: int, worker: int, num_workers: int):
        for record in super().iterate(seed, epoch, worker, num_workers):
            k = int(record["id"][1:].split("@")[0])
            yield {**mixed_records("s", self.size)[k], "id": record["id"], "index": 1000 + k}


def collate_with_ids(pack: bool):
    """The real collator, plus each sample's id, tokens and patches (``ids``, ``costs``) for the checks."""
    real = PackCollator(0) if pack else PadCollator(0)

    def collate(items: list) -> dict:
        rows = items if pack else [items]
        batch = real(items)
        batch["ids"] = [s["id"] for row in rows for s in row]
        batch["costs"] = [[sample_cost(s) for s in row] for row in rows] if pack else [sample_cost(s) for s in items]
        return batch

    return collate


def stream(pack: bool, states: dict | None = None, batch_size: int = 4, **budget) -> BatchStream:
    """The two sources' stream (one data worker), padded or packed, from ``states``."""
    cfg = StreamConfig(batch_size=batch_size, max_len=MAX_LEN, pack=pack, seed=5, states=states or {}, **budget)
    return BatchStream(sources(), process, collate_with_ids(pack), cfg)


def take(s: BatchStream, count: int) -> list[dict]:
    return list(itertools.islice(iter(s), count))


BUDGETS = [
    pytest.param(False, {"batch_tokens": 256, "batch_patches": 600}, id="padded-both"),
    pytest.param(False, {"batch_patches": 500}, id="padded-patches"),
    pytest.param(False, {"batch_tokens": 200}, id="padded-tokens"),
    pytest.param(True, {"batch_tokens": 3 * MAX_LEN, "batch_patches": 700}, id="packed-both"),
    pytest.param(True, {"batch_patches": 450}, id="packed-patches"),
]


def equal_batches(a: dict, b: dict) -> bool:
    """Bitwise equal: every tensor (the images' patches and grids too) and every other value."""
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, PatchImages):
            if not (torch.equal(x.patches, y.patches) and torch.equal(x.grid_thw, y.grid_thw)):
                return False
        elif torch.is_tensor(x):
            if not torch.equal(x, y):
                return False
        elif isinstance(x, dict) and "cu_seq_lens_q" in x:
            if not all(torch.equal(v, y[k]) if torch.is_tensor(v) else v == y[k] for k, v in x.items()):
                return False
        elif x != y:
            return False
    return True


# --------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(("pack", "budget"), BUDGETS)
def test_budgets_hold_and_batches_are_full(pack, budget):
    batches = take(stream(pack, **budget), 60)
    tokens = budget.get("batch_tokens", 4 * MAX_LEN)
    patches_budget = budget.get("batch_patches")
    sizes = set()
    for batch, following in itertools.pairwise(batches):
        flat = [c for row in batch["costs"] for c in row] if pack else batch["costs"]
        patches = sum(p for _, p in flat)
        assert vision_patches(batch["pixel_values"]) == patches
        assert batch["pixel_values"].patches.shape[0] == patches
        sizes.add(len(flat))
        next_n, next_p = following["costs"][0][0] if pack else following["costs"][0]
        if pack:
            assert len(batch["costs"]) <= tokens // MAX_LEN
            assert all(sum(n for n, _ in row) <= MAX_LEN for row in batch["costs"])
            assert batch["input_ids"].numel() <= tokens
        else:
            longest = max(n for n, _ in flat)
            assert batch["input_ids"].shape == (len(flat), longest)
            assert len(flat) == 1 or batch["input_ids"].numel() <= tokens
        if patches_budget is not None:
            assert len(flat) == 1 or patches <= patches_budget
        # full: the next batch's first sample did not fit (a budget, or, packed, the last row)
        over_patches = patches_budget is not None and patches + next_p > patches_budget
        if pack:
            assert over_patches or (len(batch["costs"]) == tokens // MAX_LEN
                                    and sum(n for n, _ in batch["costs"][-1]) + next_n > MAX_LEN)
        else:
            assert over_patches or (len(flat) + 1) * max(longest, next_n) > tokens
    assert len(sizes) > 3  # the number of samples really varies with the budget


def test_a_sample_over_the_budget_is_a_batch_of_its_own():
    big = {"id": "big", "index": 0, "n": 10, "images": [900]}
    small = [{"id": f"s{i}", "index": i + 1, "n": 5, "images": [100]} for i in range(6)]
    cfg = StreamConfig(batch_size=4, max_len=MAX_LEN, pack=False, seed=0, batch_patches=300)
    for order in ([big, *small], [*small[:2], big, *small[2:]]):
        data = Source("r", RecordDataset(order, image_root=""))
        batches = take(BatchStream([data], process, collate_with_ids(False), cfg), 6)
        assert ["big"] in [b["ids"] for b in batches]
        assert all(len(b["ids"]) == 1 or sum(p for _, p in b["costs"]) <= 300 for b in batches)
        assert not any(b["skipped"] for b in batches)


def test_vision_patches_counts_native_patches_and_fixed_images():
    assert vision_patches(None) == 0
    assert vision_patches(torch.zeros(3, 3, 8, 8)) == 3  # fixed-size images (Qwen-VL): 1 each
    assert vision_patches(torch.zeros(0, 3, 8, 8)) == 0
    assert vision_patches(PatchImages(torch.zeros(52, 6), torch.tensor([[1, 4, 4], [1, 6, 6]]))) == 52


def test_balance_metric_helpers():
    assert max_over_mean((10, 10, 10, 10)) == 1.0
    assert max_over_mean((40, 0, 0, 0)) == 4.0
    assert max_over_mean((0, 0)) is None
    assert window_mean([1.0, None, 1.5]) == 1.25 and window_mean([None]) is None


# --------------------------------------------------------------------------- order and resume


@pytest.mark.parametrize(("pack", "budget"), BUDGETS)
def test_every_sample_once_per_epoch_in_the_reference_order(pack, budget):
    """The budget decides where batches are cut, never which samples come or in what order: the flattened
    batches are the reference walk (one sample per batch, no budget), every record once per epoch."""
    reference = [b["ids"][0] for b in take(stream(False, batch_size=1), 1500)]
    flat = [i for b in take(stream(pack, **budget), 150) for i in b["ids"]]
    assert 200 < len(flat) <= 1500
    assert flat == reference[: len(flat)]
    epoch0 = [i for i in flat if i.startswith("a")][:47]  # source a: 50 records, 3 of them unusable
    assert sorted(epoch0) == sorted(f"a{k}" for k in range(50) if k % 17)


@pytest.mark.parametrize(("pack", "budget"), BUDGETS)
def test_resume_from_any_batch_gives_the_same_batches_bitwise(pack, budget):
    count, after = 30, 6
    straight = take(stream(pack, **budget), count + after)
    for k in range(1, count + 1):
        position = straight[k - 1]["data_state"]
        resumed = take(stream(pack, states={position["worker"]: position["state"]}, **budget), after)
        for want, got in zip(straight[k : k + after], resumed):
            assert equal_batches(want, got), (k, want["ids"], got["ids"])
        # the state is the one before the held-over sample (one draw per sample taken so far): it is drawn again, first
        assert position["state"]["draws"] == sum(len(b["ids"]) for b in straight[:k])


def test_resumed_skips_are_counted_once():
    """Skips met while drawing a held-over sample are reported with the batch that takes it, resumed or not."""
    budget = {"batch_patches": 500}
    straight = take(stream(False, **budget), 40)
    total = sum(sum(b["skipped"].values()) for b in straight)
    assert total > 2
    for k in (5, 13, 21):
        position = straight[k - 1]["data_state"]
        resumed = take(stream(False, states={position["worker"]: position["state"]}, **budget), 40 - k)
        assert sum(sum(b["skipped"].values()) for b in straight[:k] + resumed) == total


# --------------------------------------------------------------------------- config and metrics


@pytest.mark.parametrize(("option", "key"), [
    ("run.batch_tokens=100", "run.batch_tokens"),  # below run.max_len
    ("run.batch_patches=0", "run.batch_patches"),
    ("run.batch_patches=-5", "run.batch_patches"),
    ("run.batch_tokens=many", "run.batch_tokens"),
    ("run.batch_patches=1.5", "run.batch_patches"),
])
def test_bad_budgets_fail_naming_the_key(load_sft, option, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_sft("run.max_len=512", option)


def test_budgets_are_valid_run_keys(load_sft):
    run = load_sft("run.max_len=512", "run.batch_tokens=512", "run.batch_patches=1").run
    assert (run.batch_tokens, run.batch_patches) == (512, 1)
    assert load_sft().run.batch_tokens is None and load_sft().run.batch_patches is None


def test_native_run_reports_the_ranks_balance(load_sft, tmp_path):
    out = tmp_path / "run"
    cfg = load_sft(*NATIVE, "run.max_steps=2", "run.warmup_steps=0", "run.log_every=1", "run.save_every=1000",
                   "run.max_len=512", "run.batch_tokens=1024", "run.batch_patches=400", output_dir=out)
    runner = build_runner(cfg)
    runner.train()
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["text_tokens_max_over_mean"] == 1.0  # one rank: the slowest is the mean
        assert record["vision_patches_max_over_mean"] in (1.0, None)  # None: a step without images
    assert any(r["vision_patches_max_over_mean"] == 1.0 for r in records)


class _SecondOfTwoRanks:
    """The runner's strategy seen as rank 1 of 2: the other rank's contributions are added to every sum."""

    rank, world_size = 1, 2

    def __init__(self, inner, other: dict[int, float]) -> None:
        self.inner, self.other = inner, other

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def sum_over_ranks(self, values: list) -> list[float]:
        summed = self.inner.sum_over_ranks(values)
        return [v + self.other.get(i, 0.0) for i, v in enumerate(summed)] if len(values) > 1 else summed


def test_the_step_reduction_gathers_each_ranks_tokens_and_patches(load_sft, tmp_path):
    """One collective gives every rank's counts: each rank's in its own slot (here rank 1 of 2, rank 0 adding
    100 tokens and 50 patches in slot 0 of each)."""
    runner = build_runner(load_sft(*NATIVE, "run.max_steps=2", "run.warmup_steps=0", "run.batch_patches=400",
                                   output_dir=tmp_path / "run"))
    batches = runner.data_iterator()
    batch = next(batches)
    batches.close()
    # the step's values: loss, non-finite, stop, samples, tokens of ranks 0 and 1, patches of ranks 0 and 1
    runner.strategy = _SecondOfTwoRanks(runner.strategy, {4: 100.0, 6: 50.0})
    stats = runner.train_step([batch])
    mine = (batch["num_input_tokens"], vision_patches(batch["pixel_values"]))
    assert mine[1] > 0
    assert stats.tokens_per_rank == (100, mine[0]) and stats.patches_per_rank == (50, mine[1])
    assert stats.input_tokens == 100 + mine[0]
    assert max_over_mean(stats.patches_per_rank) == max(50, mine[1]) * 2 / (50 + mine[1])


# --------------------------------------------------------------------------- kill -9 and resume


def mixed_media(root: Path) -> Path:
    """24 conversations under ``root``: a quarter text-only, two videos (8 and 12 frames: 2 and 3 temporal
    patches), the others pictures of six sizes (20x24 to 300x220: 16 to 216 patches); the annotation file."""
    root.mkdir()
    rng = np.random.default_rng(0)
    sizes = [(150, 60), (50, 130), (20, 24), (300, 220), (64, 64), (112, 90)]
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    write_video(root / "short.mp4", moving_squares(8), rate=4)
    write_video(root / "longer.mp4", moving_squares(12, 80, 64), rate=4)
    records = []
    for i in range(24):
        if i % 4 == 0:
            user = f"Say something, number {i}."
        elif i % 8 == 3:
            user = f"Video 1: <video>{'short' if i % 16 == 3 else 'longer'}.mp4</video>\nWhich way does it move?"
        else:
            user = f"Picture 1: <img>im{i % len(sizes)}.png</img>\nWhat is it? {i}"
        records.append({"id": f"m{i}", "conversations": [{"from": "user", "value": user},
                                                          {"from": "assistant", "value": "word " * (1 + i % 7)}]})
    (root / "train.json").write_text(json.dumps(records))
    return root / "train.json"


@pytest.mark.integration
def test_a_budgeted_native_run_killed_and_resumed_ends_bitwise_as_an_uninterrupted_one(small_world, tmp_path):
    """Native resolution, batches cut by ``run.batch_tokens`` and ``run.batch_patches`` (2 to 8 samples), on
    pictures of six sizes, text and two videos: runs B (num_workers 0 and 2, subprocesses) are SIGKILLed once
    their first checkpoint exists and rerun with ``run.resume=auto``; they end with the uninterrupted runs' weights,
    optimiser, data and random state and per-step losses, bit for bit. The held-over sample of each worker's
    stream must be drawn again after the resume (attention dropout on: the random state must be restored too)."""
    steps = 20
    ann = mixed_media(tmp_path / "media")

    def options(out: Path, workers: int, *extra: str) -> list[str]:
        return sft_options(
            small_world, out, *NATIVE, f"datasets.synthetic_sft.ann_path={ann}", f"datasets.synthetic_sft.image_root={ann.parent}",
            "model.llm.config.attention_dropout=0.1", f"run.max_steps={steps}", "run.save_every=4", "run.keep_last=2",
            "run.max_len=256", "run.batch_tokens=512", "run.batch_patches=300", f"run.num_workers={workers}", *extra,
        )

    workers = (0, 2)
    outs = {w: tmp_path / f"b{w}" for w in workers}
    logs = {w: tmp_path / f"b{w}.log" for w in workers}
    procs = {w: popen_train(options(outs[w], w), logs[w]) for w in workers}
    try:
        killed_at = sigkill_at_first_checkpoint(procs, outs, logs)
        for w in workers:
            assert 4 <= killed_at[w] < steps, logs[w].read_text()[-3000:]
            procs[w] = popen_train(options(outs[w], w, "run.resume=auto"), logs[w])

        # Meanwhile, the uninterrupted runs; the first one's batches are looked at first (the same stream).
        runner = build_runner(load_config(SFT_PROJECT, options(tmp_path / "a0", 0)))
        batches = runner.data_iterator()
        seen = [next(batches) for _ in range(steps)]
        batches.close()
        build_runner(load_config(SFT_PROJECT, options(tmp_path / "a0", 0))).train()
        build_runner(load_config(SFT_PROJECT, options(tmp_path / "a2", 2))).train()

        for w in workers:
            assert finish(procs[w], logs[w]) == 0, logs[w].read_text()[-3000:]
    finally:
        stop_all(procs)

    sizes = [b["num_samples"] for b in seen]
    assert len(set(sizes)) >= 3  # the budgets cut batches of several sizes
    grids = torch.cat([b["pixel_values"].grid_thw for b in seen])
    assert (grids[:, 0] > 1).any() and len({tuple(g[1:]) for g in grids.tolist()}) >= 5  # videos; pictures of many sizes
    assert any(b["pixel_values"].num_images < b["num_samples"] for b in seen)  # text-only samples
    for w in workers:
        assert f"resumed from {outs[w] / 'checkpoints' / f'step_{killed_at[w]:08d}'}" in logs[w].read_text()
        sa, _ = assert_same_end(tmp_path / f"a{w}", outs[w], steps, f"num_workers={w}")
        assert sa["ranks"][0]["skipped"] == {}
        if w == 0:
            assert sa["data"]["samples_seen"] == sum(sizes) > 24 * 2  # crosses two epochs
