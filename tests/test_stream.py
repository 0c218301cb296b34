"""The data stream and packing: packed == unpacked loss, the packing collator's mask, greedy packing,
the seeded mixture, exact resume (stream and runner, padded and packed, map-style and streaming
sources), worker splitting and skip accounting."""

from __future__ import annotations

import copy
import itertools
import random
from collections import Counter

import pytest
import torch
from conftest import SFT_PROJECT, sft_options
from helpers import reference_varlen_attention
from torch.utils.data import DataLoader

from lavis.common.config import load_config
from lavis.datasets.builders.base import RecordDataset, StreamingSource
from lavis.datasets.collate import PackCollator, PadCollator
from lavis.datasets.stream import (
    BatchStream,
    Source,
    SourceChooser,
    SourceCursor,
    StreamConfig,
)
from lavis.models import build_model
from lavis.processors.conversation import IGNORE_INDEX
from lavis.processors.errors import SkipSample
from lavis.runners.iter_runner import IterRunner
from lavis.tasks.base import TrainingTask
from lavis.tasks.sft import LanguageModelingTask

# --------------------------------------------------------------------------- helpers


class IdProcessor:
    """A record ``{"id", "n"}`` -> a sample of ``n`` tokens that remembers its id; logs every call."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []

    def __call__(self, record: dict) -> dict:
        if record.get("fail"):
            raise SkipSample(record["fail"])
        self.log.append((record["id"], record["n"]))
        return {"input_ids": torch.zeros(record["n"], dtype=torch.long), "id": record["id"]}


def id_collate(items: list) -> dict:
    """Padded: a list of samples -> their ids; packed: rows of samples -> ids and lengths per row."""
    if items and isinstance(items[0], list):
        return {
            "rows": [[s["id"] for s in row] for row in items],
            "lengths": [[len(s["input_ids"]) for s in row] for row in items],
        }
    return {"ids": [s["id"] for s in items]}


def ids_of(batch: dict) -> list[str]:
    return list(batch["ids"]) if "ids" in batch else [i for row in batch["rows"] for i in row]


def records(name: str, size: int, length=lambda i: 1 + i % 5) -> list[dict]:
    return [{"id": f"{name}{i}", "n": length(i)} for i in range(size)]


class ShuffledStream(StreamingSource):
    """A streaming source of ``size`` records per epoch, reshuffled each epoch and split by worker."""

    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size

    def iterate(self, seed: int, epoch: int, worker: int, num_workers: int):
        order = list(range(self.size))
        random.Random(f"{self.name}:{seed}:{epoch}").shuffle(order)
        for k in order[worker::num_workers]:
            yield {"id": f"{self.name}{k}@{epoch}", "n": 1 + k % 4}


class ListStream(StreamingSource):
    """A streaming source that yields the same records every epoch, all to every worker."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def iterate(self, seed: int, epoch: int, worker: int, num_workers: int):
        yield from self.items


def take(stream: BatchStream, count: int) -> list[dict]:
    it = iter(stream)
    return [next(it) for _ in range(count)]


def take_samples(stream: BatchStream, count: int) -> list[str]:
    out: list[str] = []
    for batch in stream:
        out += ids_of(batch)
        if len(out) >= count:
            return out[:count]
    raise AssertionError("unreachable")


def mixture_sources() -> list[Source]:
    """Three sources of different kinds and sizes (epochs wrap quickly) with ratios 0.5 / 0.3 / 0.2."""
    return [
        Source("a", records("a", 7), 0.5),
        Source("b", RecordDataset(records("b", 5), image_root=""), 0.3),
        Source("c", ShuffledStream("c", 9), 0.2),
    ]


# --------------------------------------------------------------------------- the tiny model


def _build(world, out, *options):
    cfg = load_config(SFT_PROJECT, sft_options(world, out, *options))
    torch.manual_seed(0)
    model, processors = build_model(cfg.model)
    model.eval()  # no dropout: the losses below must be deterministic
    return cfg, model, processors


@pytest.fixture(scope="module")
def qwen(small_world, tmp_path_factory):
    """(cfg, model, processors) of the embedded tiny model (Qwen2 LLM, RoPE, SDPA), fp32."""
    return _build(small_world, tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="module")
def gpt2(small_world, tmp_path_factory):
    """The same VLM with a GPT-2 LLM: absolute learned position embeddings, so position ids matter."""
    return _build(
        small_world, tmp_path_factory.mktemp("gpt2"), "model.llm.config.model_type=gpt2",
        "model.llm.config.bos_token_id=0", "model.llm.config.eos_token_id=0",
    )


def real_samples(built) -> list[dict]:
    """8 processed samples of different lengths: 2 with two images, 2 text-only conversations,
    3 with one image, and a text-only prompt/target record."""
    cfg, model, processors = built
    task = LanguageModelingTask(cfg)
    data = task.build_sources()[0].data
    processor = task.sample_processor(model, processors)
    by_images: dict[int, list[dict]] = {0: [], 1: [], 2: []}
    one_image_lengths: set[int] = set()
    for i in range(len(data)):
        record = data[i]
        images = sum(m["content"].count("<img>") for m in record["messages"])
        sample = processor(record)
        n = len(sample["input_ids"])
        assert sample["pixel_values"].shape[0] == images
        if len(by_images.get(images, "...")) < (3 if images == 1 else 2) and n not in one_image_lengths:
            by_images[images].append(sample)
            if images == 1:
                one_image_lengths.add(n)
    picked = by_images[2] + by_images[0] + by_images[1]
    picked.append(processor({"prompt": "", "target": "red and blue"}))
    assert len(picked) == 8, {k: len(v) for k, v in by_images.items()}
    assert [s["pixel_values"].shape[0] for s in picked] == [2, 2, 0, 0, 1, 1, 1, 0]
    return picked


def lm_loss(model, batch: dict) -> tuple[float, int]:
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"],
            position_ids=batch.get("position_ids"), pixel_values=batch["pixel_values"],
        )
    return float(out.loss_sum.double()), int(out.num_tokens)


def mean_loss(parts: list[tuple[float, int]]) -> float:
    return sum(s for s, _ in parts) / sum(n for _, n in parts)


# Rows of several samples each, of unequal lengths (so rows 1 and 2 end in padding).
ROWS = [[0, 2, 7], [1, 4], [3, 5, 6]]


# --------------------------------------------------------------------------- 1-2. packed == unpacked


@pytest.fixture(scope="module")
def qwen_setup(qwen):
    _, model, processors = qwen
    assert model.llm.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    samples = real_samples(qwen)
    pad_id = processors.tokenizer.pad_id
    packed = PackCollator(pad_id)([[samples[i] for i in row] for row in ROWS])
    return model, samples, pad_id, packed


def test_packed_and_unpacked_losses_agree(qwen_setup):
    model, samples, pad_id, packed = qwen_setup
    lengths = [len(s["input_ids"]) for s in samples]
    assert len(set(lengths)) >= 6, lengths  # really different lengths (29 .. 121 tokens, and 4)
    assert packed["num_samples"] == 8 and packed["pixel_values"].shape[0] == 7
    assert packed["attention_mask"].shape[-1] < sum(lengths)  # really packed: rows hold several samples

    pad = PadCollator(pad_id)
    alone = [lm_loss(model, pad([s])) for s in samples]
    padded = lm_loss(model, pad(samples))
    packed_loss = lm_loss(model, packed)
    # Packing supervises the same tokens: each sample's first token is unsupervised in both.
    assert packed_loss[1] == padded[1] == sum(n for _, n in alone)
    reference = mean_loss(alone)
    assert abs(mean_loss([padded]) - reference) < 1e-5
    assert abs(mean_loss([packed_loss]) - reference) < 1e-5, (mean_loss([packed_loss]), reference)

    # Per sample too: keep only one sample's labels in the packed batch.
    starts = {}
    for r, row in enumerate(ROWS):
        offset = 0
        for i in row:
            starts[i] = (r, offset, offset + lengths[i])
            offset += lengths[i]
    for i, (loss_sum, count) in enumerate(alone):
        r, start, end = starts[i]
        labels = torch.full_like(packed["labels"], IGNORE_INDEX)
        labels[r, start:end] = packed["labels"][r, start:end]
        one = lm_loss(model, {**packed, "labels": labels})
        assert one[1] == count
        assert abs(one[0] - loss_sum) <= 1e-5 * max(1.0, abs(loss_sum)), (i, one, loss_sum)


def test_packing_without_isolation_leaks_between_samples(qwen_setup):
    """Test 1 can fail: with a plain padding mask (per-sample position ids kept), or with no mask and
    no per-sample position ids, the samples of a row see each other and the loss moves far beyond 1e-5."""
    model, samples, pad_id, packed = qwen_setup
    isolated = mean_loss([lm_loss(model, packed)])
    row_positions = torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])
    padding_mask = (packed["labels"] != IGNORE_INDEX) | (packed["input_ids"] != pad_id)
    leaky = {**packed, "attention_mask": padding_mask.long()}
    assert abs(mean_loss([lm_loss(model, leaky)]) - isolated) > 1e-3
    # With no mask, the position resets are all that could separate the samples: row-wide
    # positions 0..L-1 (or none) leak.
    no_mask = {**packed, "attention_mask": None}
    assert abs(mean_loss([lm_loss(model, {**no_mask, "position_ids": row_positions})]) - isolated) > 1e-3
    assert abs(mean_loss([lm_loss(model, {**no_mask, "position_ids": None})]) - isolated) > 1e-3
    # With the block mask, Qwen2's RoPE (relative) gives the same loss for row-wide positions: the
    # mask alone isolates here; that position ids matter with absolute positions is tested below.
    assert abs(mean_loss([lm_loss(model, {**packed, "position_ids": row_positions})]) - isolated) < 1e-4


def test_per_sample_position_ids_are_needed_with_absolute_positions(gpt2):
    """With a GPT-2 LLM (learned absolute positions), packing matches unpacked only thanks to the
    per-sample position ids: positions 0..L-1 along the row change the loss."""
    _, model, processors = gpt2
    assert model.llm.config._attn_implementation == "sdpa"
    samples = real_samples(gpt2)
    pad_id = processors.tokenizer.pad_id
    packed = PackCollator(pad_id)([[samples[i] for i in row] for row in ROWS])
    reference = mean_loss([lm_loss(model, PadCollator(pad_id)([s])) for s in samples])
    assert abs(mean_loss([lm_loss(model, packed)]) - reference) < 1e-5
    row_positions = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])}
    assert abs(mean_loss([lm_loss(model, row_positions)]) - reference) > 1e-3
    assert abs(mean_loss([lm_loss(model, {**packed, "position_ids": None})]) - reference) > 1e-3


# --------------------------------------------------------------------------- 3. PackCollator structure


def hand_sample(ids: list[int], labels: list[int], images: list[float]) -> dict:
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "pixel_values": torch.tensor(images).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone(),
    }


def test_pack_collator_builds_block_diagonal_causal_masks():
    a = hand_sample([11, 12], [11, 12], [1.0])
    b = hand_sample([21, 22, 23], [-100, 22, 23], [])
    c = hand_sample([31, 32, 33], [31, 32, 33], [3.0, 4.0])
    out = PackCollator(pad_id=7)([[a, b], [c]])
    assert out["input_ids"].tolist() == [[11, 12, 21, 22, 23], [31, 32, 33, 7, 7]]
    # the first token of every sample is unsupervised; padding is never supervised
    assert out["labels"].tolist() == [[-100, 12, -100, 22, 23], [-100, 32, 33, -100, -100]]
    assert out["position_ids"][0].tolist() == [0, 1, 0, 1, 2]
    assert out["position_ids"][1, :3].tolist() == [0, 1, 2]
    expected = torch.tensor(
        [
            [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]],
            [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]],
        ],
        dtype=torch.bool,
    )[:, None]
    assert out["attention_mask"].dtype == torch.bool
    assert torch.equal(out["attention_mask"], expected)
    assert out["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 3.0, 4.0]  # row, then sample order
    assert out["num_samples"] == 3
    assert out["num_input_tokens"] == 8
    # the inputs are untouched (the collator copies labels before masking the first token)
    assert a["labels"].tolist() == [11, 12]

    flash = PackCollator(pad_id=7, isolation="cu_seqlens")([[a, b], [c]])
    assert flash["attention_mask"] is None
    for key in ("input_ids", "labels", "position_ids", "pixel_values"):
        assert torch.equal(flash[key], out[key]), key
    # the flattened batch: a, b | c, then each padding position on its own
    kwargs = flash["attention_kwargs"]
    assert kwargs["cu_seq_lens_q"].tolist() == kwargs["cu_seq_lens_k"].tolist() == [0, 2, 5, 8, 9, 10]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 3
    with pytest.raises(ValueError, match="isolation"):
        PackCollator(pad_id=7, isolation="position_ids")


# --------------------------------------------------------------------------- 4. greedy packing


def test_greedy_packing_fills_rows_drops_too_long_and_loses_nothing():
    max_len, rows_per_batch = 10, 3
    lengths = [(i * 5) % 14 + 1 for i in range(40)]  # 1..14: some longer than max_len
    assert any(n > max_len for n in lengths) and lengths.count(max_len) > 0
    data = records("r", 40, length=lambda i: lengths[i])
    processor = IdProcessor()
    cfg = StreamConfig(batch_size=rows_per_batch, max_len=max_len, pack=True, seed=3)
    batches = take(BatchStream([Source("r", data)], processor, id_collate, cfg), 25)  # > 1 epoch

    emitted = []
    for batch in batches:
        assert len(batch["rows"]) == rows_per_batch
        for row, row_lengths in zip(batch["rows"], batch["lengths"]):
            assert row and sum(row_lengths) <= max_len
            for i, n in zip(row, row_lengths):
                assert n == lengths[int(i[1:])] <= max_len  # never cut, never too long
            emitted.append((row, sum(row_lengths)))
    # greedy: a row is closed only when the next sample (next row, or next batch) does not fit
    for (_, used), (next_row, _) in itertools.pairwise(emitted):
        assert used + lengths[int(next_row[0][1:])] > max_len

    # every usable drawn sample is in exactly one row, in draw order; the last one is held over
    drawn = [i for i, n in processor.log if n <= max_len]
    flat = [i for batch in batches for i in ids_of(batch)]
    assert drawn == flat + [drawn[-1]]
    # too-long samples are counted, once, in the batch of the sample drawn after them (those met
    # while drawing the held-over sample are counted with it, in the next batch)
    too_long = usable = 0
    counted = None
    for _, n in processor.log:
        if n > max_len:
            too_long += 1
        else:
            usable += 1
            if usable == len(flat):
                counted = too_long
    assert counted > 5
    assert sum(b["skipped"].get("too_long", 0) for b in batches) == counted
    assert sum(b["skipped"].get("too_long", 0) for b in batches) == too_long
    assert all(set(b["skipped"]) <= {"too_long"} for b in batches)


def test_padded_stream_keeps_long_samples():
    """Only packing drops over-long samples (the padded path truncates in the sample processor)."""
    data = records("r", 4, length=lambda i: 20)
    cfg = StreamConfig(batch_size=2, max_len=10, pack=False, seed=0)
    batch = take(BatchStream([Source("r", data)], IdProcessor(), id_collate, cfg), 1)[0]
    assert len(batch["ids"]) == 2 and not batch["skipped"]


# --------------------------------------------------------------------------- 5. mixture


def test_chooser_follows_the_ratios_and_the_seed():
    ratios = [0.5, 0.3, 0.2]
    chooser = SourceChooser(ratios, seed=11, worker=0)
    draws = [chooser(i) for i in range(10_000)]
    shares = Counter(draws)
    for k, ratio in enumerate(ratios):
        assert abs(shares[k] / 10_000 - ratio) < 0.02, shares

    def sequence(seed: int, worker: int, count: int) -> list[int]:
        chooser = SourceChooser(ratios, seed=seed, worker=worker)
        return [chooser(i) for i in range(count)]

    assert draws == sequence(11, 0, 10_000)
    assert draws[:500] != sequence(12, 0, 500)
    assert draws[:500] != sequence(11, 1, 500)
    # seekable: any draw can be asked for in any order
    fresh = SourceChooser(ratios, seed=11, worker=0)
    for i in (9_999, 0, 4_096, 4_095, 8_200, 17):
        assert fresh(i) == draws[i]
    assert SourceChooser([1.0], seed=11, worker=0)(123) == 0


def test_stream_mixture_follows_the_ratios_and_the_seed():
    def sequence(seed: int, draws: int) -> list[str]:
        cfg = StreamConfig(batch_size=500, max_len=64, pack=False, seed=seed)
        return take_samples(BatchStream(mixture_sources(), IdProcessor(), id_collate, cfg), draws)

    ids = sequence(5, 10_000)
    shares = Counter(i[0] for i in ids)
    for name, ratio in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        assert abs(shares[name] / 10_000 - ratio) < 0.02, shares
    # every source cycles through its records (several epochs of each here)
    assert {i for i in ids if i[0] == "a"} == {f"a{k}" for k in range(7)}
    assert {i for i in ids if i[0] == "b"} == {f"b{k}" for k in range(5)}
    assert sequence(5, 300) == ids[:300]
    other = sequence(6, 300)
    assert other != ids[:300]
    assert [i[0] for i in other] != [i[0] for i in ids[:300]]  # the source sequence itself differs


# --------------------------------------------------------------------------- 6. exact resume


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_stream_resumes_exactly_mid_mixture(pack):
    cfg = {"batch_size": 3, "max_len": 8, "pack": pack, "seed": 21}
    reference = take_samples(BatchStream(mixture_sources(), IdProcessor(), id_collate, StreamConfig(**cfg)), 400)

    for k in (1, 7, 23):  # several epochs of every source have passed by the last one
        processor = IdProcessor()
        first = take(BatchStream(mixture_sources(), processor, id_collate, StreamConfig(**cfg)), k)
        seen = [i for b in first for i in ids_of(b)]
        assert seen == reference[: len(seen)]
        state = copy.deepcopy(first[-1]["data_state"])
        assert state["worker"] == 0
        resumed = BatchStream(
            mixture_sources(), IdProcessor(), id_collate, StreamConfig(**cfg, states={state["worker"]: state["state"]})
        )
        after = take_samples(resumed, 100)
        assert after == reference[len(seen) : len(seen) + 100], k
        if pack:
            # the sample drawn but held over for the next batch comes first after the resume
            assert [i for i, _ in processor.log] == seen + [after[0]]
        else:
            assert [i for i, _ in processor.log] == seen


class IdTask(TrainingTask):
    """Stands in for the SFT task in the runner: id samples, id collation."""

    def sample_processor(self, model, processors):
        return IdProcessor()

    def collator(self, processors, attn_implementation):
        return id_collate


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_runner_data_iterator_resumes_exactly(qwen, small_world, tmp_path, num_workers, pack):
    _, model, processors = qwen
    run_cfg = load_config(
        SFT_PROJECT,
        sft_options(
            small_world, tmp_path / "out", f"run.num_workers={num_workers}", f"run.pack={str(pack).lower()}",
            "run.batch_size=3", "run.max_len=8", "run.seed=4",
        ),
    )

    def runner() -> IterRunner:
        return IterRunner(run_cfg, model, processors, IdTask(), mixture_sources())

    def samples(batches, count: int) -> list[str]:
        out: list[str] = []
        for batch in batches:
            assert "data_state" not in batch  # the runner keeps it
            out += ids_of(batch)
            if len(out) >= count:
                batches.close()
                return out[:count]
        raise AssertionError("unreachable")

    reference = samples(runner().data_iterator(), 160)
    k = 5  # odd: with 2 workers the resumed loader must start with worker 1
    interrupted = runner()
    batches = interrupted.data_iterator()
    seen = [i for _ in range(k) for i in ids_of(next(batches))]
    batches.close()
    assert interrupted.batches_seen == k
    assert sorted(interrupted.data_states) == list(range(max(1, num_workers)))
    assert seen == reference[: len(seen)]

    resumed = runner()  # as IterRunner.load restores them
    resumed.batches_seen = interrupted.batches_seen
    resumed.data_states = copy.deepcopy(interrupted.data_states)
    assert samples(resumed.data_iterator(), 100) == reference[len(seen) : len(seen) + 100]


# --------------------------------------------------------------------------- 7. splitting


@pytest.mark.parametrize("num_workers", [1, 2, 3])
@pytest.mark.parametrize("seed", [9, 2**32 - 1], ids=["seed9", "seed2^32-1"])  # any seed numpy accepts
def test_cursors_split_an_epoch_exactly(num_workers, seed):
    data = records("r", 10)
    source = Source("r", data)
    for epoch in (0, 1):
        got = []
        for g in range(num_workers):
            cursor = SourceCursor(source, 0, seed=seed, worker=g, num_workers=num_workers, state=(epoch, 0))
            while True:
                record = cursor.next_record()
                if cursor.state[0] != epoch:
                    break
                got.append(record["id"])
        assert sorted(got) == sorted(r["id"] for r in data), (num_workers, epoch)
    # epochs are reshuffled
    e0, e1 = (SourceCursor(source, 0, seed, 0, 1, (e, 0)) for e in (0, 1))
    assert [e0.next_record()["id"] for _ in range(10)] != [e1.next_record()["id"] for _ in range(10)]


@pytest.mark.parametrize("ranks, loader_workers", [(1, 1), (2, 1), (1, 2), (3, 1)])
def test_ranks_and_loader_workers_split_an_epoch_exactly(ranks, loader_workers):
    size, total = 10, ranks * loader_workers
    data = records("r", size)
    got = []
    for rank in range(ranks):
        cfg = StreamConfig(batch_size=1, max_len=8, pack=False, seed=2, rank=rank, world_size=ranks)
        stream = BatchStream([Source("r", data)], IdProcessor(), id_collate, cfg)
        per_worker: dict[int, list[str]] = {}
        loader = DataLoader(stream, batch_size=None, num_workers=0 if loader_workers == 1 else loader_workers)
        for batch in loader:
            per_worker.setdefault(batch["data_state"]["worker"], []).extend(batch["ids"])
            if sum(map(len, per_worker.values())) >= 2 * size:
                break
        del loader
        assert sorted(per_worker) == list(range(loader_workers))
        for local, ids in per_worker.items():
            g = rank * loader_workers + local
            got += ids[: len(range(g, size, total))]  # this worker's share of epoch 0
    assert sorted(got) == sorted(r["id"] for r in data), (ranks, loader_workers)


@pytest.mark.parametrize("ranks", [2, 4])
def test_ranks_together_draw_the_global_batch_of_one_process(ranks):
    """Batch b per rank on R ranks: step by step, the ranks' samples are distinct and together are the
    R x b samples one process with batch R x b draws (one map-style source, no loader workers), also
    across epoch boundaries (what makes a DDP/FSDP run equal a single-process run)."""
    data = records("r", 12)

    def batches(rank: int, world_size: int, batch_size: int):
        cfg = StreamConfig(batch_size=batch_size, max_len=8, pack=False, seed=5, rank=rank, world_size=world_size)
        return iter(BatchStream([Source("r", data)], IdProcessor(), id_collate, cfg))

    single = batches(0, 1, 2 * ranks)
    per_rank = [batches(r, ranks, 2) for r in range(ranks)]
    steps_per_epoch = 12 // (2 * ranks)
    for step in range(3 * steps_per_epoch):  # three epochs
        flat = [i for b in per_rank for i in next(b)["ids"]]
        if step < steps_per_epoch:
            assert len(set(flat)) == len(flat)  # distinct across ranks (within an epoch)
        assert sorted(flat) == sorted(next(single)["ids"])


def test_streaming_sources_split_themselves():
    stream = ShuffledStream("s", 10)
    for workers in (1, 2, 3):
        got = [r["id"] for g in range(workers) for r in stream.iterate(0, 0, g, workers)]
        assert sorted(got) == sorted(f"s{k}@0" for k in range(10))
        cursors = [SourceCursor(Source("s", stream), 0, 0, g, workers) for g in range(workers)]
        assert len({c.next_record()["id"] for c in cursors}) == workers


# --------------------------------------------------------------------------- 8. skips


def test_skipped_records_are_counted_in_the_batch():
    items = [
        {"id": "x1", "n": 1},
        {"skipped": "missing_image"},
        {"id": "x2", "n": 1},
        {"skipped": "missing_image"},
        {"skipped": "corrupt_image"},
        {"id": "bad", "n": 1, "fail": "remote_image"},  # the processor raises SkipSample
        {"id": "x3", "n": 1},
    ]
    for pack in (False, True):
        cfg = StreamConfig(batch_size=3 if not pack else 1, max_len=3, pack=pack, seed=0)
        batch = take(BatchStream([Source("web", ListStream(items))], IdProcessor(), id_collate, cfg), 1)[0]
        assert ids_of(batch) == ["x1", "x2", "x3"]
        assert batch["skipped"] == Counter(missing_image=2, corrupt_image=1, remote_image=1)


def test_too_many_consecutive_skips_raise_naming_the_dataset():
    two_skips = [{"skipped": "missing_image"}, {"skipped": "missing_image"}, {"id": "x", "n": 1}]
    three_skips = [
        {"skipped": "missing_image"},
        {"skipped": "missing_image"},
        {"id": "bad", "n": 1, "fail": "corrupt_image"},
        {"id": "y", "n": 1},
    ]
    cfg = StreamConfig(batch_size=8, max_len=8, pack=False, seed=0, max_consecutive_skips=3)
    batch = take(BatchStream([Source("web", ListStream(two_skips))], IdProcessor(), id_collate, cfg), 1)[0]
    assert batch["ids"] == ["x"] * 8 and batch["skipped"] == Counter(missing_image=16)
    sources = [Source("fine", ListStream(two_skips)), Source("broken", ListStream(three_skips))]
    with pytest.raises(RuntimeError, match=r"3 consecutive samples of dataset 'broken'.*missing_image.*corrupt_image"):
        take(BatchStream(sources, IdProcessor(), id_collate, cfg), 1)


def test_cu_seqlens_reach_the_attention_and_isolate_like_the_block_mask(qwen_setup):
    """The flash-attention path (no mask, cu_seqlens) gives the block mask's loss when the kernel
    honours cu_seqlens: checked with a reference varlen kernel registered on CPU."""
    model, samples, pad_id, packed = qwen_setup
    isolated = mean_loss([lm_loss(model, packed)])
    varlen = PackCollator(pad_id, isolation="cu_seqlens")([[samples[i] for i in row] for row in ROWS])
    with reference_varlen_attention(model), torch.no_grad():
        out = model(
            input_ids=varlen["input_ids"], labels=varlen["labels"], attention_mask=None,
            position_ids=varlen["position_ids"], pixel_values=varlen["pixel_values"], **varlen["attention_kwargs"],
        )
    assert abs(float(out.loss_sum.double()) / int(out.num_tokens) - isolated) < 1e-5
