"""Drawing a response's boxes on its image (lavis.visualize) and plotting metrics.jsonl (lavis.plot)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lavis.serving.boxes import PALETTE, draw_boxes, find_boxes
from lavis.tracking.plots import main as plot_main
from lavis.tracking.plots import plot_metrics

REPO = Path(__file__).resolve().parents[1]
WHITE = (255, 255, 255)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def white(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), WHITE)


# ---------------------------------------------------------------------------------------------
# find_boxes


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<ref>a dog</ref><box>(10,20),(300,400)</box>", [("a dog", (10, 20, 300, 400))]),
        (
            "<ref>a dog</ref><box>(1,2),(3,4)</box> and <ref> a cat </ref><box>(5,6),(7,8)</box>",
            [("a dog", (1, 2, 3, 4)), ("a cat", (5, 6, 7, 8))],
        ),
        (
            "<ref>two dogs</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>, <box>(9,9),(10,10)</box>",
            [("two dogs", (1, 2, 3, 4)), ("two dogs", (5, 6, 7, 8)), ("two dogs", (9, 9, 10, 10))],
        ),
        (
            "<ref>a dog</ref><box>(1,2),(3,4)</box> on a mat <box>(5,6),(7,8)</box>",
            [("a dog", (1, 2, 3, 4)), (None, (5, 6, 7, 8))],
        ),
        ("The answer is <box>(100,200),(300,400)</box>.", [(None, (100, 200, 300, 400))]),
        ("(100,200),(300,400)</box>", [(None, (100, 200, 300, 400))]),
        (" (100, 200), (300, 400)", [(None, (100, 200, 300, 400))]),
        ("<ref>sky</ref><box>(900,800),(100,50)</box>", [("sky", (100, 50, 900, 800))]),
        ("There is no dog in the picture.", []),
        ("<ref>a dog</ref> is not boxed", []),
    ],
    ids=["pair", "two-pairs", "boxes-sharing-a-ref", "box-after-text", "bare-tag", "bare-continuation",
         "bare-continuation-spaces", "swapped-corners", "no-box", "ref-without-box"],
)
def test_find_boxes(response: str, expected: list) -> None:
    assert find_boxes(response) == expected


# ---------------------------------------------------------------------------------------------
# draw_boxes


@pytest.mark.parametrize(("width", "height"), [(200, 100), (100, 250)])
def test_draw_boxes_outline_is_scaled_to_pixels(width: int, height: int) -> None:
    image = draw_boxes(white(width, height), "<box>(100,200),(600,800)</box>")
    x1, y1, x2, y2 = width // 10, height // 5, width * 6 // 10, height * 8 // 10
    mid_x, mid_y = (x1 + x2) // 2, (y1 + y2) // 2
    colour = PALETTE[0]

    for edge in [(x1, mid_y), (x2, mid_y), (mid_x, y1), (mid_x, y2)]:
        assert image.getpixel(edge) == colour, edge
    for outside in [(x1 - 1, mid_y), (x2 + 1, mid_y), (mid_x, y1 - 1), (mid_x, y2 + 1)]:
        assert image.getpixel(outside) == WHITE, outside
    assert image.getpixel((mid_x, mid_y)) == WHITE
    assert image.getpixel((0, 0)) == WHITE


def test_draw_boxes_orders_swapped_corners() -> None:
    ordered = draw_boxes(white(200, 100), "<box>(100,200),(600,800)</box>")
    swapped = draw_boxes(white(200, 100), "<box>(600,800),(100,200)</box>")
    assert ordered.getpixel((20, 50)) == PALETTE[0]
    assert swapped.tobytes() == ordered.tobytes()


def test_draw_boxes_gives_each_box_its_own_colour() -> None:
    image = draw_boxes(white(200, 100), "<box>(100,200),(300,800)</box><box>(600,200),(900,800)</box>")
    assert image.getpixel((20, 50)) == PALETTE[0]
    assert image.getpixel((120, 50)) == PALETTE[1]
    assert PALETTE[0] != PALETTE[1]


def _count(image: Image.Image, colour: tuple[int, int, int], region: tuple[int, int, int, int]) -> int:
    counts = {pixel: count for count, pixel in image.crop(region).getcolors(maxcolors=image.width * image.height)}
    return counts.get(colour, 0)


def test_draw_boxes_writes_label_tag_above_box() -> None:
    labelled = draw_boxes(white(200, 100), "<ref>dog</ref><box>(100,500),(600,900)</box>")
    unlabelled = draw_boxes(white(200, 100), "<box>(100,500),(600,900)</box>")
    above_box = (20, 0, 120, 50)
    assert _count(unlabelled, PALETTE[0], above_box) == 0
    assert _count(labelled, PALETTE[0], above_box) > 50
    assert _count(labelled, PALETTE[0], (0, 0, 20, 100)) == 0


def test_draw_boxes_keeps_tag_inside_image_when_box_touches_top() -> None:
    labelled = draw_boxes(white(200, 100), "<ref>dog</ref><box>(100,0),(600,900)</box>")
    unlabelled = draw_boxes(white(200, 100), "<box>(100,0),(600,900)</box>")
    inside_top_left = (23, 3, 60, 20)
    assert _count(unlabelled, PALETTE[0], inside_top_left) == 0
    assert _count(labelled, PALETTE[0], inside_top_left) > 50


def test_draw_boxes_works_on_a_copy_and_saves_png(tmp_path: Path) -> None:
    source = Image.new("L", (200, 100), 255)
    out_path = tmp_path / "nested" / "dir" / "boxes.png"
    image = draw_boxes(source, "<ref>dog</ref><box>(100,200),(600,800)</box>", out_path)

    assert image.mode == "RGB"
    assert source.getextrema() == (255, 255)
    assert out_path.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(out_path) as saved:
        assert saved.format == "PNG"
        assert saved.size == (200, 100)
        assert saved.convert("RGB").tobytes() == image.tobytes()


def test_draw_boxes_reads_image_path(tmp_path: Path) -> None:
    path = tmp_path / "input.jpg"
    white(200, 100).save(path)
    image = draw_boxes(str(path), "(100,200),(600,800)")
    assert image.size == (200, 100)
    assert image.getpixel((20, 50)) == PALETTE[0]


def test_draw_boxes_without_boxes_returns_unchanged_image(tmp_path: Path) -> None:
    source = white(200, 100)
    source.putpixel((5, 5), (1, 2, 3))
    out_path = tmp_path / "none.png"
    image = draw_boxes(source, "I cannot see a dog.", out_path)
    assert image is not source
    assert image.tobytes() == source.tobytes()
    with Image.open(out_path) as saved:
        assert saved.convert("RGB").tobytes() == source.tobytes()


# ---------------------------------------------------------------------------------------------
# plot


def write_metrics(output_dir: Path, records: list[dict]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


TRAIN_RECORDS = [
    {"step": step, "loss": 3.0 / step, "lr": 1e-4 * step, "grad_norm": 1.0, "skipped_by_reason": {}}
    for step in (10, 20, 30, 40)
]
EVAL_RECORDS = [
    {"step": 20, "eval/vqa/accuracy": 0.25, "eval/grounding/acc@0.5": 0.1},
    {"step": 40, "eval/vqa/accuracy": 0.5, "eval/grounding/acc@0.5": 0.2},
]


def run_plot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lavis.plot", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_plot_cli_writes_curves_png(tmp_path: Path) -> None:
    run_dir = tmp_path / "my_run"
    write_metrics(run_dir, TRAIN_RECORDS[2:] + EVAL_RECORDS + TRAIN_RECORDS[:2])

    result = run_plot(str(run_dir))

    assert result.returncode == 0, result.stderr
    out_path = run_dir / "curves.png"
    assert result.stdout.strip() == str(out_path)
    assert out_path.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(out_path) as image:
        assert image.format == "PNG"
        assert image.size == (1000, 900)


def test_plot_metrics_without_eval_has_two_panels(tmp_path: Path) -> None:
    out_path = plot_metrics(list(reversed(TRAIN_RECORDS)), tmp_path / "sub" / "train.png", title="run")
    assert out_path == tmp_path / "sub" / "train.png"
    with Image.open(out_path) as image:
        assert image.size == (1000, 600)


def test_plot_cli_missing_directory_exits_2(tmp_path: Path) -> None:
    result = run_plot(str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "no such directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_plot_missing_metrics_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plot_main([str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "curves.png").exists()


def test_plot_records_without_loss_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_metrics(tmp_path, EVAL_RECORDS)
    assert plot_main([str(tmp_path), "-o", str(tmp_path / "out.png")]) == 2
    assert "no records with a step and a loss" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()
