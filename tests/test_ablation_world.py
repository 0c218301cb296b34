"""The resolution ablation: the small-objects data set (deterministic, read by the existing builders, chosen by
``synthetic_world`` through the registry) and the three projects of ``projects/ablations/`` (they validate,
build, and take a training step each)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_PRESET
from PIL import Image

from lavis.common.config import ConfigError, load_config, load_yaml
from lavis.common.registry import RegistryError, registry
from lavis.datasets.synthetic import small_objects, world
from lavis.datasets.synthetic.small_objects import ensure_small_objects

SIZES = {"train": 24, "val": 4, "test": 6}
ABLATIONS = REPO / "projects" / "ablations"
ROWS = ("resampler_fixed", "merger_fixed", "merger_native")
EVAL = ABLATIONS / "eval.yaml"


@pytest.fixture(scope="module")
def objects_root(tmp_path_factory) -> Path:
    return ensure_small_objects(tmp_path_factory.mktemp("small") / "small_objects", seed=3, sizes=SIZES)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- the data set


def test_generation_is_deterministic(objects_root, tmp_path):
    again = small_objects.ensure_small_objects(tmp_path / "again", seed=3, sizes=SIZES)
    assert _files(again) == _files(objects_root)  # every byte, pictures included
    other = small_objects.generate_scenes(4, SIZES["train"], "train")
    assert [s.to_dict() for s in other] != [s.to_dict() for s in small_objects.generate_scenes(3, SIZES["train"], "train")]


def test_pictures_are_wide_tall_or_square_with_small_shapes(objects_root):
    scenes = world.load_scenes(objects_root, "train")
    assert {(s.width, s.height) for s in scenes} <= set(small_objects.CANVASES.values())
    for scene in scenes:
        assert Image.open(objects_root / scene.image).size == (scene.width, scene.height)
        assert small_objects.MIN_OBJECTS <= len(scene.objects) <= small_objects.MAX_OBJECTS
        assert len({o.colour for o in scene.objects}) == len(scene.objects)  # "the green one" is unique
        for o in scene.objects:
            x1, y1, x2, y2 = o.bbox
            assert small_objects.MIN_SIDE <= x2 - x1 == y2 - y1 <= small_objects.MAX_SIDE
            assert 0 <= x1 and x2 <= scene.width and 0 <= y1 and y2 <= scene.height


def test_answers_follow_the_scene(objects_root):
    """Each question's answer is what the scene says: the extreme shape's colour, a shape's form, the counts."""
    scenes = world.load_scenes(objects_root, "test")
    questions = json.loads((objects_root / "vqa_questions_test.json").read_text())["questions"]
    annotations = json.loads((objects_root / "vqa_annotations_test.json").read_text())["annotations"]
    assert len(questions) == len(annotations) == small_objects.VQA_QUESTIONS_PER_IMAGE * SIZES["test"]
    for q, a in zip(questions, annotations):
        scene, answer, text = scenes[q["image_id"]], a["multiple_choice_answer"], q["question"]
        assert answer in small_objects.ANSWER_VOCAB[a["question_type"]]
        assert [x["answer"] for x in a["answers"]] == [answer] * small_objects.VQA_ANSWERS
        if a["question_type"] == "end":
            key = {"far left": lambda o: o.bbox[0], "far right": lambda o: -o.bbox[2],
                   "top": lambda o: o.bbox[1], "bottom": lambda o: -o.bbox[3]}
            end = next(word for word in key if f"at the {word}" in text)
            assert min(scene.objects, key=key[end]).colour == answer
        elif a["question_type"] == "shape":
            assert next(o.shape for o in scene.objects if re.search(rf"\b{o.colour}\b", text)) == answer
        elif a["question_type"] == "count_kind":
            shape = next(s for s in world.SHAPES if f" {s}s " in text)
            assert sum(o.shape == shape for o in scene.objects) == int(answer)
        else:
            assert len(scene.objects) == int(answer)


def test_training_conversations_hold_the_list_turn_anywhere(objects_root):
    """The list turn names the shapes in order along the spread axis; it is not always the first turn."""
    scenes = world.load_scenes(objects_root, "train")
    records = json.loads((objects_root / "sft_train.json").read_text())
    firsts = set()
    for record in records:
        qtypes = [t["qtype"] for t in record["meta"]["turns"]]
        firsts.add(qtypes[0])
        assert qtypes.count("list") == 1 and len(set(qtypes)) == len(qtypes)
        question, answer = (record["conversations"][2 * qtypes.index("list") + k]["value"] for k in (0, 1))
        scene = scenes[record["meta"]["scenes"][0]]
        along = 0 if "from left to right" in question else 1
        named = [(o.colour, o.shape) for o in sorted(scene.objects, key=lambda o: o.bbox[along])]
        assert [tuple(p.split()[-2:]) for p in answer.replace(" and ", ", ").split(", ")] == named
    assert "list" in firsts and len(firsts) > 1


def test_files_parse_with_the_existing_builders(objects_root):
    conversations = registry.get("builder", "qwen_vl_conversation")(
        ann_path=str(objects_root / "sft_train.json"), image_root=str(objects_root)).build()
    assert len(conversations) == SIZES["train"]
    record = conversations[0]
    assert record["messages"][0]["role"] == "user" and "<img>images/train/000000.png</img>" in record["messages"][0]["content"]
    vqa = registry.get("builder", "vqa")(
        ann_path=str(objects_root / "vqa_annotations_test.json"), question_path=str(objects_root / "vqa_questions_test.json"),
        image_root=str(objects_root), split="test", image_pattern="images/{split}/{image_id:06d}.png").build()
    assert len(vqa) == 2 * SIZES["test"]
    assert all(Path(r["image"]).is_file() if Path(r["image"]).is_absolute() else (objects_root / r["image"]).is_file()
               for r in vqa)


def test_marker_reuse_and_replacement(objects_root, tmp_path):
    root = ensure_small_objects(tmp_path / "d", sizes=SIZES)
    mtime = (root / "WORLD.json").stat().st_mtime_ns
    assert ensure_small_objects(root, sizes=dict(SIZES)) == root and (root / "WORLD.json").stat().st_mtime_ns == mtime
    assert ensure_small_objects(root) == root  # sizes=None: an existing one of this seed, whatever its sizes
    world.ensure_world(root, sizes={"train": 2, "val": 1, "test": 1})  # the shapes world replaces it, and back
    assert json.loads((root / "WORLD.json").read_text())["image_size"] == world.IMAGE_SIZE
    ensure_small_objects(root, sizes=SIZES)
    assert json.loads((root / "WORLD.json").read_text())["world"] == "small_objects"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        ensure_small_objects(tmp_path / "foreign", sizes=SIZES)


# --------------------------------------------------------------------------- selection by config


def test_registry_selects_the_generator():
    assert registry.get("synthetic_world", "shapes") is world.ensure_world
    assert registry.get("synthetic_world", "small_objects") is ensure_small_objects
    with pytest.raises(RegistryError, match="did you mean 'small_objects'"):
        registry.get("synthetic_world", "small_object")


def test_config_key_defaults_to_shapes_and_names_the_generator(tmp_path):
    cfg = load_config(REPO / "projects" / "sft.yaml", [f"run.output_dir={tmp_path / 'o'}"])
    assert cfg.datasets["synthetic_sft"].synthetic_world == "shapes"
    assert cfg.evaluation == {} and "synthetic_world" not in cfg.raw["datasets"]["synthetic_sft"]
    row = load_config(ABLATIONS / "merger_native.yaml", [f"run.output_dir={tmp_path / 'o'}"])
    assert row.datasets["small_objects"].synthetic_world == "small_objects"
    assert load_config(EVAL).evaluation["vqa"].synthetic_world == "small_objects"
    with pytest.raises((ConfigError, RegistryError), match="small_objects"):
        load_config(ABLATIONS / "merger_native.yaml", ["datasets.small_objects.synthetic_world=small_object"])


def test_training_and_evaluation_generate_the_named_data_set(tmp_path, monkeypatch):
    """The task generates data through the generator the entry names (here a recording stand-in)."""
    from lavis.tasks.sft import LanguageModelingTask

    called = []
    monkeypatch.setitem(registry._entries["synthetic_world"], "small_objects", lambda root: called.append(root))
    root = ensure_small_objects(tmp_path / "so", sizes=SIZES)
    cfg = load_config(ABLATIONS / "resampler_fixed.yaml", [
        f"datasets.small_objects.ann_path={root / 'sft_train.json'}", f"datasets.small_objects.image_root={root}",
        f"datasets.small_objects.synthetic_root={root}", f"run.output_dir={tmp_path / 'o'}",
        "datasets.shapes_captions=null"])  # the shapes world's captions: generated by the other generator
    sources = LanguageModelingTask(cfg).build_sources()
    assert called == [str(root)] and [(s.name, len(s.data)) for s in sources] == [("small_objects", SIZES["train"])]


# --------------------------------------------------------------------------- the projects


def _row(name: str, root: Path, out: Path, *extra: str, world: Path | None = None):
    """A row's config on the small-objects data at ``root`` (and the shapes world's captions at ``world``, or none)."""
    captions = ["datasets.shapes_captions=null"] if world is None else [
        f"datasets.shapes_captions.ann_path={world / 'captions_train.json'}", f"datasets.shapes_captions.image_root={world}",
        f"datasets.shapes_captions.synthetic_root={world}"]
    return load_config(ABLATIONS / f"{name}.yaml", [
        f"datasets.small_objects.ann_path={root / 'sft_train.json'}", f"datasets.small_objects.image_root={root}",
        f"datasets.small_objects.synthetic_root={root}", f"run.output_dir={out}", *captions, *extra])


def test_rows_share_the_recipe_and_the_llm(objects_root, tmp_path):
    cfgs = {name: _row(name, objects_root, tmp_path / name) for name in ROWS}
    tiny = load_config(TINY_PRESET, [f"run.output_dir={tmp_path / 'tiny'}"])
    for cfg in cfgs.values():
        assert cfg.model.llm == tiny.model.llm  # the tiny preset's LLM, in every row
        for key in ("max_steps", "batch_size", "lr", "min_lr", "warmup_steps", "max_len", "seed"):
            assert getattr(cfg.run, key) == getattr(cfgs["resampler_fixed"].run, key), key
    assert cfgs["resampler_fixed"].model.vision == tiny.model.vision == cfgs["merger_fixed"].model.vision
    assert cfgs["resampler_fixed"].model.adapter == tiny.model.adapter
    assert [cfgs[n].model.adapter.type for n in ROWS] == ["qwen_resampler", "patch_merger", "patch_merger"]
    native = cfgs["merger_native"].model
    assert (native.vision.type, native.image_processor.type) == ("qwen2_vl_vit", "qwen2_vl_image")
    assert load_yaml(ABLATIONS / "common.yaml")["model"]["llm"] == load_yaml(TINY_PRESET)["model"]["llm"]


def test_rows_build_on_the_meta_device_with_their_token_budgets(objects_root, tmp_path):
    from lavis.models import build_model

    picture = Image.open(objects_root / "images" / "test" / "000000.png")
    tokens = {}
    for name in ROWS:
        model, processors = build_model(_row(name, objects_root, tmp_path / name).model, meta=True)
        assert next(model.parameters()).is_meta
        per_image = model.image_tokens
        tokens[name] = per_image(processors.image(picture).grid) if callable(per_image) else per_image
    assert tokens["resampler_fixed"] == 36 and tokens["merger_fixed"] == 16
    assert picture.size in {(384, 96), (96, 384), (192, 192)}
    assert tokens["merger_native"] == 36  # each kind of picture resized to 36 windows: 336x84, 84x336, 168x168


def test_each_row_trains_a_step(objects_root, small_world, tmp_path):
    """One optimiser step of each project, in process, on the small data set (well under a minute on 2 cores)."""
    from lavis.runners.iter_runner import build_runner

    for name in ROWS:
        cfg = _row(name, objects_root, tmp_path / name, "run.max_steps=1", "run.warmup_steps=0", "run.batch_size=4",
                   "run.num_workers=0", "run.device=cpu", "run.save_every=1", "run.save_weights=trainable", "run.log_every=1",
                   world=small_world)
        build_runner(cfg).train()
        metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert metrics and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics if "loss" in m)


def test_eval_project_validates_for_every_row(tmp_path):
    cfg = load_config(EVAL, [f"model.load_from={tmp_path / 'run'}"])
    entry = cfg.evaluation["vqa"]
    assert (entry.task, entry.builder, entry.synthetic_root) == ("vqa", "vqa", "data/small_objects")
    assert entry.builder_params["split"] == "test" and entry.task_params["chat"] is True
