"""The webdataset caption builder: tar shards -> caption records, split between ranks x workers.

Shards come from the standard ``tar`` command (``./`` prefixes, directory entries, files in a
subdirectory) and from ``write_shards``; bad input (a member missing, a shard cut short, a shard
gone) gives counted ``{"skipped": reason}`` records and the other shards still come.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from lavis.common.config import check_params, component_defaults, constructor_args
from lavis.common.registry import registry
from lavis.datasets.builders.base import AnnotationError, StreamingSource
from lavis.datasets.builders.webdataset import (
    CAPTION_PROMPT,
    WebDatasetCaptionBuilder,
    buffer_shuffle,
    split_member_name,
)
from lavis.datasets.shards import write_shards
from lavis.datasets.synthetic.world import write_caption_shards

needs_tar = pytest.mark.skipif(shutil.which("tar") is None, reason="the tar command is not installed")


def png(colour: tuple[int, int, int], size: int = 4) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def source(shards, **kwargs):
    """The built streaming source (no shuffling unless asked)."""
    kwargs.setdefault("shuffle_buffer", 0)
    kwargs.setdefault("shuffle_shards", False)
    return WebDatasetCaptionBuilder(shards, **kwargs).build()


def epoch(src, seed=0, epoch=0, worker=0, num_workers=1) -> list[dict]:
    return list(src.iterate(seed, epoch, worker, num_workers))


def ids(records) -> list[str]:
    return [r["id"] for r in records if "skipped" not in r]


def make_samples(n: int, prefix: str = "") -> list[tuple[str, bytes, str]]:
    return [(f"{prefix}{i:06d}", png((i * 37 % 256, i * 11 % 256, 200)), f"caption number {i}") for i in range(n)]


def shard_set(tmp_path: Path, n: int, per_shard: int, name: str = "shard") -> list[str]:
    return write_shards(make_samples(n), str(tmp_path / f"{name}-%06d.tar"), per_shard)


# --------------------------------------------------------------------------- reading tar files


RED, BLUE, GREEN = png((255, 0, 0)), png((0, 0, 255)), png((0, 255, 0))


def write_files(directory: Path) -> list[str]:
    """Three samples as loose files: jpg+txt, png+json (with other fields), jpg+json+txt."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "000001.jpg": RED,
        "000001.txt": b"  a red square\n",
        "000002.json": json.dumps({"url": "http://x", "caption": "a blue square ", "width": 4}).encode(),
        "000002.png": BLUE,
        "000003.jpg": GREEN,
        "000003.json": json.dumps({"caption": "from json"}).encode(),
        "000003.txt": b"from txt",
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return list(files)


def expected(shard: str, prefix: str = "") -> list[dict]:
    def rec(key, ext, caption, image):
        path = f"{prefix}{key}.{ext}"
        return {
            "id": f"{shard}/{prefix}{key}",
            "prompt": f"<img>{path}</img>{CAPTION_PROMPT}",
            "target": " " + caption,
            "image_bytes": {path: image},
        }

    # caption_keys default [txt, json]: txt wins over json when both are there
    return [
        rec("000001", "jpg", "a red square", RED),
        rec("000002", "png", "a blue square", BLUE),
        rec("000003", "jpg", "from txt", GREEN),
    ]


@needs_tar
@pytest.mark.parametrize("layout", ["file_list", "dot_prefix", "subdirectory"])
def test_reads_shards_written_by_tar(tmp_path, layout):
    files = tmp_path / "files"
    names = write_files(files / "sub.v1" if layout == "subdirectory" else files)
    shard = tmp_path / "shard.tar"
    if layout == "file_list":  # tar -cf shard.tar 000001.jpg 000001.txt ...
        args, prefix = names, ""
    elif layout == "dot_prefix":  # members "./", "./000001.jpg", ...
        args, prefix = ["--sort=name", "."], ""
    else:  # members "sub.v1/" (a directory entry with a dot), "sub.v1/000001.jpg", ...
        args, prefix = ["--sort=name", "sub.v1"], "sub.v1/"
    subprocess.run(["tar", "-cf", str(shard), *args], cwd=files, check=True)
    members = tarfile.open(shard).getnames()
    if layout == "dot_prefix":
        assert "./000001.jpg" in members and "." in members  # what the builder must cope with
    if layout == "subdirectory":
        assert "sub.v1" in members and "sub.v1/000001.jpg" in members

    records = epoch(source(str(shard)))
    assert records == expected("shard.tar", prefix)


@needs_tar
def test_a_shard_whose_members_are_not_grouped_is_refused_with_how_to_rewrite_it(tmp_path):
    """``tar cf shard.tar -C dir .`` can store all images, then all captions: streamed, 9 of 12 samples
    were lost and counted twice. Such a shard is refused, at start when it is the first, with the fix;
    the rewritten shard reads every sample."""
    files = tmp_path / "files"
    names = write_files(files)
    ungrouped = sorted(names, key=lambda n: (n.split(".", 1)[1], n))  # by extension: samples apart
    shard = tmp_path / "shard.tar"
    subprocess.run(["tar", "-cf", str(shard), *ungrouped], cwd=files, check=True)
    assert tarfile.open(shard).getnames()[:2] == ["000001.jpg", "000003.jpg"]

    hint = "a sample's files must follow each other (webdataset's layout). Rewrite the shard sorted by name, " \
           "e.g. tar --sort=name -cf shard.tar -C <dir> ."
    with pytest.raises(AnnotationError) as err:
        registry.get("builder", "webdataset_caption")(shards=str(shard)).build()
    assert str(err.value).startswith(f"{shard}: member ") and hint in str(err.value)
    # A later shard written so is refused when it is read (the start checks the first shard only).
    good = tmp_path / "good.tar"
    subprocess.run(["tar", "--sort=name", "-cf", str(good), *names], cwd=files, check=True)
    src = registry.get("builder", "webdataset_caption")(shards=[str(good), str(shard)], shuffle_shards=False).build()
    with pytest.raises(AnnotationError, match="Rewrite the shard sorted by name"):
        epoch(src)
    subprocess.run(["tar", "--sort=name", "-cf", str(shard), "-C", str(files), "."], check=True)
    assert epoch(source(str(shard))) == expected("shard.tar")


def test_json_caption_field_and_caption_key_order(tmp_path):
    samples = [("a", RED, "unused")]
    [shard] = write_shards(samples, str(tmp_path / "s-%06d.tar"), 10)
    with tarfile.open(shard, "a") as tar:  # add a json caption next to the txt
        data = json.dumps({"caption": "c", "alt_text": "an alt text"}).encode()
        info = tarfile.TarInfo("a.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    [rec] = epoch(source(shard, caption_keys=["json", "txt"], json_caption_field="alt_text"))
    assert rec["target"] == " an alt text"
    [rec] = epoch(source(shard, caption_keys=["json"]))
    assert rec["target"] == " c"
    [rec] = epoch(source(shard))
    assert rec["target"] == " unused"


def test_member_names():
    assert split_member_name("a/b/000123.jpg") == ("a/b/000123", "jpg")
    assert split_member_name("./a/b/000123.seg.png") == ("a/b/000123", "seg.png")
    assert split_member_name("000123.txt") == ("000123", "txt")
    assert split_member_name("README") is None
    assert split_member_name("./.DS_Store") is None


def test_record_feeds_the_sample_processor(tmp_path):
    from lavis.processors.conversation import ConversationEncoder
    from lavis.processors.image import CLIPImageProcessor
    from lavis.processors.sample import SampleProcessor
    from lavis.processors.tokenizer import HFTokenizer

    [shard] = write_shards([("k/000007", png((255, 0, 0), 8), "a red square")], str(tmp_path / "s-%06d.tar"), 4)
    [record] = epoch(source(shard))
    assert record["prompt"] == "<img>k/000007.png</img>Generate the caption in English:"
    encoder = ConversationEncoder(HFTokenizer(), num_image_tokens=4, system_message="", max_len=256)
    sample = SampleProcessor(encoder, CLIPImageProcessor(image_size=8))(record)  # no file on disk: bytes
    assert sample["pixel_values"].shape == (1, 3, 8, 8)
    red, green = sample["pixel_values"][0, 0].mean(), sample["pixel_values"][0, 1].mean()
    assert red > 1 and green < 0  # normalised pure red
    assert (sample["labels"] != -100).sum() > 0


# --------------------------------------------------------------------------- shards, config


def test_brace_expansion_relative_paths_and_missing_shard(tmp_path, monkeypatch):
    written = shard_set(tmp_path, 8, 2)
    assert [Path(p).name for p in written] == [f"shard-{i:06d}.tar" for i in range(4)]
    monkeypatch.chdir(tmp_path)
    src = source("shard-{000000..000003}.tar")
    assert isinstance(src, StreamingSource)
    assert len(epoch(src)) == 8
    assert len(source(["shard-{000000..000001}.tar", "shard-000003.tar"]).shards) == 3

    with pytest.raises(AnnotationError, match=r"1 of 5 shard files not found: shard-000004\.tar$"):
        source("shard-{000000..000004}.tar")
    with pytest.raises(AnnotationError, match="shard-000009.tar"):
        source(["shard-000000.tar", "shard-000009.tar"])


def test_registered_and_default_yaml_documents_every_key():
    builder = registry.get("builder", "webdataset_caption")
    assert builder is WebDatasetCaptionBuilder
    defaults = component_defaults("builder", "webdataset_caption")
    args = constructor_args(builder, "builder")
    assert set(defaults) == {"builder", *args}
    for name, param in args.items():
        if name != "shards":
            assert defaults[name] == param.default, name
    params = {k: v for k, v in defaults.items() if k != "builder"}
    params["shards"] = "x-{0..3}.tar"
    assert check_params(builder, "builder", params, "datasets.caps") == params


# --------------------------------------------------------------------------- split between workers


def assert_partition(src, num_workers, total, seed=3, epoch_no=0):
    shares = [ids(epoch(src, seed, epoch_no, w, num_workers)) for w in range(num_workers)]
    counts = Counter(i for share in shares for i in share)
    assert len(counts) == total and set(counts.values()) == {1}, (num_workers, counts)
    return shares


@pytest.mark.parametrize("num_workers", [1, 2, 3, 5])
def test_each_sample_once_per_epoch_across_workers(tmp_path, num_workers):
    shards = shard_set(tmp_path, 19, 5)  # 5, 5, 5, 4 samples
    src = source(shards, shuffle_buffer=4, shuffle_shards=True)
    for epoch_no in (0, 1):
        shares = assert_partition(src, num_workers, 19, epoch_no=epoch_no)
        assert all(shares)
        if num_workers > len(shards):  # fewer shards than workers: samples, not shards, are dealt
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_one_shard_three_workers(tmp_path):
    shards = shard_set(tmp_path, 10, 100)
    assert len(shards) == 1
    shares = assert_partition(source(shards, shuffle_buffer=3), 3, 10)
    assert sorted(map(len, shares)) == [3, 3, 4]


@pytest.mark.parametrize("ranks, workers", [(2, 2), (3, 1), (1, 3), (2, 3)])
def test_ranks_times_dataloader_workers(tmp_path, ranks, workers):
    """Global data worker = rank * workers + local worker, of ranks * workers (as BatchStream does)."""
    src = source(shard_set(tmp_path, 19, 5), shuffle_buffer=8, shuffle_shards=True)
    seen = Counter()
    for rank in range(ranks):
        for local in range(workers):
            seen.update(ids(epoch(src, 5, 0, rank * workers + local, ranks * workers)))
    assert len(seen) == 19 and set(seen.values()) == {1}


def test_worker_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="worker 2 is not one of 2"):
        epoch(source(shard_set(tmp_path, 2, 1)), worker=2, num_workers=2)


# --------------------------------------------------------------------------- order


def test_determinism_and_shuffling(tmp_path):
    shards = shard_set(tmp_path, 40, 10)
    tar_order = [f"shard-{i // 10:06d}.tar/{i:06d}" for i in range(40)]
    src = source(shards, shuffle_buffer=16, shuffle_shards=True)
    first = ids(epoch(src, seed=1, epoch=0))
    assert sorted(first) == sorted(tar_order) and first != tar_order
    assert ids(epoch(src, seed=1, epoch=0)) == first  # same (seed, epoch, worker): same order
    assert ids(epoch(src, seed=1, epoch=1)) != first  # another epoch: another order
    assert ids(epoch(src, seed=2, epoch=0)) != first
    w0 = ids(epoch(src, 1, 0, 0, 2))
    assert ids(epoch(src, 1, 0, 0, 2)) == w0

    # no shuffling at all: tar order
    assert ids(epoch(source(shards, shuffle_buffer=0, shuffle_shards=False), seed=1)) == tar_order
    # shuffled shards, no sample buffer: whole shards in tar order, the shard order seeded by epoch
    orders = []
    for epoch_no in range(4):
        got = ids(epoch(source(shards, shuffle_buffer=0, shuffle_shards=True), 1, epoch_no))
        blocks = [got[i : i + 10] for i in range(0, 40, 10)]
        assert all(block == sorted(block) and len({b.split("/")[0] for b in block}) == 1 for block in blocks)
        orders.append([b[0].split("/")[0] for b in blocks])
    assert len({tuple(o) for o in orders}) > 1


def test_seeds_of_shard_order_and_shuffle_buffer(tmp_path):
    """The documented contract: shard order by Random(f"{seed}:{epoch}"), the same on every worker;
    the sample buffer by Random(f"{seed}:{epoch}:{worker}")."""
    import random

    shards = shard_set(tmp_path, 40, 5)  # 8 shards of 5
    for seed, epoch_no, worker in [(1, 0, 0), (1, 0, 1), (1, 1, 1), (2, 3, 2)]:
        order = list(shards)
        random.Random(f"{seed}:{epoch_no}").shuffle(order)
        mine = [
            f"{Path(s).name}/{i:06d}"
            for s in order[worker::3]
            for i in range(5 * shards.index(s), 5 * shards.index(s) + 5)
        ]
        src = source(shards, shuffle_buffer=0, shuffle_shards=True)
        assert ids(epoch(src, seed, epoch_no, worker, 3)) == mine
        src = source(shards, shuffle_buffer=6, shuffle_shards=True)
        rng = random.Random(f"{seed}:{epoch_no}:{worker}")
        assert ids(epoch(src, seed, epoch_no, worker, 3)) == list(buffer_shuffle(mine, 6, rng))


def test_buffer_shuffle():
    import random

    items = list(range(100))
    assert list(buffer_shuffle(items, 0, random.Random(0))) == items
    assert list(buffer_shuffle(items, 1, random.Random(0))) == items
    out = list(buffer_shuffle(items, 10, random.Random(0)))
    assert sorted(out) == items and out != items
    # a buffer of 10 holds item i back at most until 10 newer items came, and never emits it early
    assert all(out.index(i) >= i - 9 for i in items)
    assert out == list(buffer_shuffle(iter(items), 10, random.Random(0)))


# --------------------------------------------------------------------------- bad input


def write_raw_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_missing_members_are_counted_skips(tmp_path):
    shard = write_raw_tar(
        tmp_path / "bad.tar",
        [
            ("000001.jpg", RED), ("000001.txt", b"one"),
            ("000002.txt", b"two, no image"),
            ("000003.jpg", GREEN), ("000003.txt", b"three"),
            ("000004.jpg", BLUE),  # no caption
            ("000005.png", BLUE), ("000005.json", b"{not json"),
            ("000006.png", BLUE), ("000006.txt", b"   "),
            ("000007.jpg", RED), ("000007.txt", b"seven"),
            ("000008.jpg", RED), ("000008.txt", b"eight"), ("000008.jpg", GREEN),  # a member twice
        ],
    )
    records = epoch(source(shard))
    assert [(r.get("skipped"), r["id"]) for r in records] == [
        (None, "bad.tar/000001"),
        ("missing_image", "bad.tar/000002"),
        (None, "bad.tar/000003"),
        ("missing_caption", "bad.tar/000004"),
        ("bad_caption", "bad.tar/000005"),
        ("bad_caption", "bad.tar/000006"),
        (None, "bad.tar/000007"),
        (None, "bad.tar/000008"),
        ("missing_caption", "bad.tar/000008"),
    ]
    assert records[-3]["target"] == " seven"
    assert records[-2]["image_bytes"] == {"000008.jpg": RED}


def header_offset(shard: str, member_index: int) -> int:
    with tarfile.open(shard) as tar:
        return tar.getmembers()[member_index].offset


@pytest.mark.parametrize("cut", ["half", "header_boundary", "empty"])
def test_truncated_shard_is_counted_and_the_next_shards_read(tmp_path, caplog, cut):
    shards = shard_set(tmp_path, 30, 10)
    broken = shards[1]
    size = Path(broken).stat().st_size
    # "header_boundary": the cut falls exactly before a member's header, where tarfile on its own
    # would see a tidy end of archive and lose the rest of the shard without a word
    keep = {"half": size // 2, "header_boundary": header_offset(broken, 8), "empty": 0}[cut]
    with open(broken, "r+b") as f:
        f.truncate(keep)
    read_before = {"half": None, "header_boundary": 3, "empty": 0}[cut]

    with caplog.at_level(logging.WARNING, logger="lavis.datasets.builders.webdataset"):
        records = epoch(source(shards))
    skipped = [r for r in records if "skipped" in r]
    assert [(r["skipped"], r["id"]) for r in skipped] == [("truncated_shard", "shard-000001.tar")]
    assert skipped[0]["detail"].startswith(f"shard {broken} is truncated or corrupt (")
    got = ids(records)
    assert got[:10] == [f"shard-000000.tar/{i:06d}" for i in range(10)]
    assert got[-10:] == [f"shard-000002.tar/{i:06d}" for i in range(20, 30)]
    from_broken = [i for i in got if i.startswith("shard-000001.tar/")]
    assert from_broken == [f"shard-000001.tar/{i:06d}" for i in range(10, 10 + len(from_broken))]
    assert len(from_broken) < 10
    if read_before is not None:
        assert len(from_broken) == read_before
    # the skip comes right after the last sample read from the broken shard
    assert records[10 + len(from_broken)] == skipped[0]
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "shard-000001.tar" in warning.getMessage()
    lost = f"{len(from_broken)} samples were read from it, about {10 - len(from_broken)} lost (the complete shards hold 10 each)"
    assert lost in warning.getMessage() and lost in skipped[0]["detail"]


def test_a_broken_shard_is_warned_about_once_and_counted_in_every_epoch(tmp_path, caplog):
    """The warning repeated once per epoch (7 times in a run); now it comes once, and each epoch still
    counts the shard it lost."""
    shards = shard_set(tmp_path, 20, 10)
    with open(shards[0], "r+b") as f:
        f.truncate(Path(shards[0]).stat().st_size // 2)
    src = source(shards)
    with caplog.at_level(logging.WARNING, logger="lavis.datasets.builders.webdataset"):
        skips = [r for e in range(4) for r in epoch(src, 0, e) if "skipped" in r]
    assert len(skips) == 4
    assert len([r for r in caplog.records if "truncated or corrupt" in r.getMessage()]) == 1


def test_truncated_shard_counted_once_when_all_workers_read_it(tmp_path):
    shards = shard_set(tmp_path, 20, 10)
    with open(shards[0], "r+b") as f:
        f.truncate(Path(shards[0]).stat().st_size // 2)
    src = source(shards, shuffle_buffer=5, shuffle_shards=True)
    records = [r for w in range(3) for r in epoch(src, 0, 0, w, 3)]
    assert Counter(r.get("skipped") for r in records)["truncated_shard"] == 1
    got = Counter(ids(records))
    assert set(got.values()) == {1} and {f"shard-000001.tar/{i:06d}" for i in range(10, 20)} <= set(got)


def test_shard_gone_after_build_is_counted(tmp_path, caplog):
    shards = shard_set(tmp_path, 4, 2)
    src = source(shards)
    Path(shards[0]).unlink()
    with caplog.at_level(logging.WARNING):
        records = epoch(src)
    assert (records[0]["skipped"], records[0]["id"]) == ("unreadable_shard", "shard-000000.tar")
    assert records[0]["detail"].startswith(f"shard {shards[0]} cannot be opened (")
    assert ids(records) == ["shard-000001.tar/000002", "shard-000001.tar/000003"]
    assert "shard-000000.tar" in caplog.text


# --------------------------------------------------------------------------- writing shards


def test_write_shards_round_trip_and_determinism(tmp_path):
    samples = make_samples(7, prefix="d/")
    paths = write_shards(samples, str(tmp_path / "a" / "x-%06d.tar"), 3)
    assert [Path(p).name for p in paths] == ["x-000000.tar", "x-000001.tar", "x-000002.tar"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [Path(p).name for p in paths]  # no temp files
    records = epoch(source(paths))
    assert [(r["id"], r["target"], r["image_bytes"]) for r in records] == [
        (f"x-{i // 3:06d}.tar/{key}", f" {caption}", {f"{key}.png": image})
        for i, (key, image, caption) in enumerate(samples)
    ]
    again = write_shards(iter(samples), str(tmp_path / "b" / "x-%06d.tar"), 3)

    def digest(p):
        return hashlib.sha256(Path(p).read_bytes()).hexdigest()

    assert list(map(digest, paths)) == list(map(digest, again))
    with tarfile.open(paths[0]) as tar:
        assert {(m.mtime, m.uid, m.gid, m.mode) for m in tar.getmembers()} == {(0, 0, 0, 0o644)}
    assert write_shards([], str(tmp_path / "c-%06d.tar"), 3) == []
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_shards(samples, str(tmp_path / "d-%06d.tar"), 0)


def test_same_format_as_the_webdataset_library(tmp_path):
    """Our shards read with webdataset, and webdataset's TarWriter shards (gzip too) read with ours."""
    import webdataset as wds

    paths = write_shards(make_samples(5, prefix="p/"), str(tmp_path / "ours-%06d.tar"), 3)
    theirs = [(s["__key__"], s["png"], s["txt"].decode()) for s in wds.WebDataset(paths, shardshuffle=False)]
    assert theirs == make_samples(5, prefix="p/")

    shard = str(tmp_path / "theirs-000000.tar.gz")
    with wds.TarWriter(shard) as writer:
        for key, image, caption in make_samples(3, prefix="d/"):
            writer.write({"__key__": key, "jpg": image, "json": {"caption": caption, "url": "x"}})
    records = epoch(source(shard))
    assert [(r["id"], r["target"], r["image_bytes"]) for r in records] == [
        (f"theirs-000000.tar.gz/{key}", f" {caption}", {f"{key}.jpg": image})
        for key, image, caption in make_samples(3, prefix="d/")
    ]


def test_write_caption_shards_on_a_tiny_world(tmp_path):
    from lavis.datasets.synthetic.world import describe, ensure_world, load_scenes

    root = ensure_world(tmp_path / "world", sizes={"train": 12, "val": 2, "test": 2})
    paths = write_caption_shards(root, "train", samples_per_shard=5)
    assert paths == [str(root / "shards" / f"train-{i:06d}.tar") for i in range(3)]
    records = epoch(source(str(root / "shards" / "train-{000000..000002}.tar")))
    scenes = load_scenes(root, "train")
    assert len(records) == 12
    for i, (record, scene) in enumerate(zip(records, scenes)):
        key = f"{i:06d}"
        assert record["id"] == f"train-{i // 5:06d}.tar/{key}"
        assert record["prompt"] == f"<img>{key}.png</img>Generate the caption in English:"
        assert record["target"] == " " + describe(scene)
        assert record["image_bytes"] == {f"{key}.png": (root / scene.image).read_bytes()}
    [val] = write_caption_shards(root, "val")
    assert Path(val).name == "val-000000.tar" and len(epoch(source(val))) == 2
