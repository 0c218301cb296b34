"""Evaluation: config of evaluation entries, the evaluation tasks and their records, the Evaluator
(batching, skips, chat prompts, multiple-choice scoring), evaluate.py (also under a 2-process
torchrun) and evaluation during training (metrics.jsonl, the best checkpoint, wandb)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TINY_PRESET, eval_options

from lavis.common.config import ConfigError
from lavis.datasets.builders.base import AnnotationError
from lavis.models import build_model
from lavis.processors.boxes import box_text
from lavis.tasks.evaluation import Evaluator


@pytest.fixture
def tiny(load_sft, small_world):
    """``tiny(*names, *options)`` -> (cfg, model, processors): an untrained tiny model with evaluations."""

    def make(*names: str, options: tuple[str, ...] = (), max_samples: int | None = None):
        cfg = load_sft(*eval_options(small_world, *names, max_samples=max_samples), *options)
        torch.manual_seed(0)
        model, processors = build_model(cfg.model)
        return cfg, model, processors

    return make


# --------------------------------------------------------------------------- config


def test_an_evaluation_entry_takes_its_task_and_builder_defaults(load_sft, small_world):
    cfg = load_sft(*eval_options(small_world, "vqa"), "evaluation.vqa.max_new_tokens=4")
    entry = cfg.evaluation["vqa"]
    assert (entry.task, entry.builder) == ("vqa", "vqa")
    assert entry.task_params["prompt"] == "{question} Answer:"  # configs/tasks/vqa.yaml
    assert entry.task_params["max_new_tokens"] == 4  # --options win
    assert entry.builder_params["ann_path"].endswith("vqa_val.jsonl")
    assert "prompt" not in entry.builder_params and "ann_path" not in entry.task_params


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["evaluation.vqa.max_sample=3"], "did you mean 'max_samples'"),
        (["evaluation.vqa.task=sft"], "'sft' is a training task"),
        (["evaluation.vqa.task=vqaa"], "did you mean 'vqa'"),
        (["run.task=vqa"], "'vqa' is an evaluation task"),
        (["run.eval_every=2", "run.best_metric=vqq/accuracy"], "no evaluation named 'vqq'"),
        (["run.eval_every=2", "run.best_metric=vqa/CIDEr"], "reports no metric 'CIDEr'"),
        (["run.best_metric=vqa/accuracy"], "needs run.eval_every"),
        (["run.eval_every=0"], "run.eval_every must be >= 1"),
    ],
)
def test_evaluation_config_errors_name_the_key(load_sft, small_world, options, message):
    from lavis.common.registry import RegistryError

    with pytest.raises((ConfigError, RegistryError), match=message):
        load_sft(*eval_options(small_world, "vqa"), *options)


def test_an_unparseable_option_value_is_a_config_error(load_sft):
    with pytest.raises(ConfigError, match="quote such values"):
        load_sft("evaluation.vqa.prompt={q} Answer:")


def test_eval_every_without_evaluations_is_an_error(load_sft):
    with pytest.raises(ConfigError, match="no evaluation is configured"):
        load_sft("run.eval_every=5")


def test_a_prompt_without_the_tasks_field_fails_when_built(tiny):
    cfg, model, processors = tiny("vqa", options=("evaluation.vqa.prompt='{q} Answer:'",))
    with pytest.raises(ConfigError, match=r"fields: \{question\}"):
        Evaluator(cfg, model, processors)


# --------------------------------------------------------------------------- builders keep what the metrics need


def test_vqa_records_keep_every_human_answer(small_world):
    from lavis.datasets.builders.vqa import VQABuilder

    vqav2 = VQABuilder(
        ann_path=str(small_world / "vqa_annotations_val.json"),
        question_path=str(small_world / "vqa_questions_val.json"),
        image_pattern="images/{split}/{image_id:06d}.png",
        split="val",
    ).build()
    simple = VQABuilder(ann_path=str(small_world / "vqa_val.jsonl")).build()
    annotations = json.loads((small_world / "vqa_annotations_val.json").read_text())["annotations"]
    assert vqav2[0]["answers"] == [a["answer"] for a in annotations[0]["answers"]]
    assert len(vqav2[0]["answers"]) == 10
    assert [r["answers"] for r in vqav2.records] == [r["answers"] for r in simple.records]
    assert vqav2[0]["image"] == "images/val/000000.png"


def test_ref_records_keep_the_pixel_box_and_image_size(small_world):
    from lavis.datasets.builders.grounding import RefGroundingBuilder

    source = json.loads((small_world / "refs_val.json").read_text())[0]
    record = RefGroundingBuilder(ann_path=str(small_world / "refs_val.json")).build()[0]
    x, y, w, h = source["bbox"]
    assert record["bbox"] == [x, y, x + w, y + h]
    assert (record["width"], record["height"]) == (source["width"], source["height"])
    assert record["target"] == f"<box>{box_text((x, y, x + w, y + h), source['width'], source['height'])}</box>"


def write_mc(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_multiple_choice_builder_writes_qwen_vls_prompt(tmp_path):
    from lavis.datasets.builders.multiple_choice import MultipleChoiceBuilder

    path = write_mc(
        tmp_path / "mc.jsonl",
        [
            {"id": "q1", "image": "a.png", "question": "Which is red?", "choices": ["sky", "tomato"], "answer": 1, "hint": "fruit"},
            {"question": "2+2?", "choices": {"A": "3", "B": "4", "C": "5"}, "answer": "B"},
        ],
    )
    first, second = MultipleChoiceBuilder(ann_path=str(path)).build().records
    assert first["prompt"] == "<img>a.png</img>Context: fruit\nQuestion: Which is red?\nOptions: A. sky\nB. tomato\nAnswer:"
    assert (first["target"], first["answer"]) == (" B", "B")
    assert second["prompt"] == "Context: N/A\nQuestion: 2+2?\nOptions: A. 3\nB. 4\nC. 5\nAnswer:"
    assert (second["id"], second["image"], second["answer"]) == ("1", None, "B")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "'answer' must be a choice index"),
        ({"question": "q", "choices": ["a"], "answer": 0}, "2 to 10 options"),
        ({"question": "q", "choices": {"B": "x", "A": "y"}, "answer": "A"}, "keys must be A, B"),
        ({"question": "q", "answer": "A"}, "missing key 'choices'"),
    ],
)
def test_multiple_choice_builder_rejects_malformed_records(tmp_path, record, message):
    from lavis.datasets.builders.multiple_choice import MultipleChoiceBuilder

    with pytest.raises(AnnotationError, match=message):
        MultipleChoiceBuilder(ann_path=str(write_mc(tmp_path / "mc.jsonl", [record]))).build()


# --------------------------------------------------------------------------- the Evaluator


def test_results_file_holds_metrics_and_every_prediction(tiny, tmp_path):
    cfg, model, processors = tiny("vqa", "grounding", "caption", max_samples=5)
    results = Evaluator(cfg, model, processors).evaluate(tmp_path, step=7, model_name="tiny")
    for name, reference_keys in (
        ("vqa", {"question", "answers"}),
        ("grounding", {"expression", "bbox", "width", "height"}),
        ("caption", {"references"}),
    ):
        saved = json.loads((tmp_path / "eval" / f"{name}.json").read_text())
        assert saved["metrics"] == results[name].metrics
        assert (saved["step"], saved["model"], saved["metrics"]["count"]) == (7, "tiny", 5)
        assert len(saved["predictions"]) == 5
        assert reference_keys | {"id", "output", "prediction", "image"} <= set(saved["predictions"][0])
    assert {"CIDEr", "BLEU-4"} <= set(results["caption"].metrics)
    # Captions are evaluated per image, against all of that image's captions.
    captions = json.loads((Path(cfg.evaluation["caption"].builder_params["ann_path"])).read_text())
    first_image = captions["images"][0]["file_name"]
    refs = [a["caption"] for a in captions["annotations"] if a["image_id"] == captions["images"][0]["id"]]
    assert results["caption"].results[0]["id"] == first_image
    assert results["caption"].results[0]["references"] == refs


def test_predictions_do_not_depend_on_the_batch_size(tiny):
    outputs = []
    for batch_size in (1, 3, 16):
        cfg, model, processors = tiny("vqa", "grounding", options=(f"run.eval_batch_size={batch_size}",), max_samples=7)
        results = Evaluator(cfg, model, processors).evaluate()
        outputs.append({name: [r["output"] for r in res.results] for name, res in results.items()})
    assert outputs[0] == outputs[1] == outputs[2]
    assert any(outputs[0]["vqa"])  # something was generated


def test_a_missing_image_is_a_counted_skip(tiny, small_world, tmp_path):
    records = [json.loads(line) for line in (small_world / "vqa_val.jsonl").read_text().splitlines()[:4]]
    records[1]["image"] = "images/val/does_not_exist.png"
    ann = tmp_path / "vqa.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg, model, processors = tiny("vqa", options=(f"evaluation.vqa.ann_path={ann}",))
    result = Evaluator(cfg, model, processors).evaluate()["vqa"]
    assert result.skipped == {"missing_image": 1}
    assert (result.metrics["count"], result.metrics["skipped"]) == (3, 1)
    assert [r["id"] for r in result.results] == [records[k]["id"] for k in (0, 2, 3)]


def fixed_outputs(monkeypatch, answer_for):
    """Replace generation by ``answer_for(sample)``: the metrics then have known values."""

    def generate(self, task, batch):
        return [answer_for(sample) for sample, _, _ in batch]

    monkeypatch.setattr(Evaluator, "_generate", generate)


def test_metrics_of_known_outputs(tiny, monkeypatch):
    cfg, model, processors = tiny("vqa", "grounding", "caption")

    def answer(sample):
        ref = sample.reference
        if "answers" in ref:  # VQA: the canonical answer with a trailing period (normalised away)
            return f" {ref['answers'][0]}."
        if "bbox" in ref:  # grounding: the right box for even ids (as Qwen-VL's scorer reads it); no box for odd ones
            if int(sample.id.split("-")[2]) % 2:
                return "somewhere on the left"
            return box_text(ref["bbox"], ref["width"], ref["height"]) + "</box>"
        return ref["references"][0]

    fixed_outputs(monkeypatch, answer)
    results = Evaluator(cfg, model, processors).evaluate()
    assert results["vqa"].metrics["accuracy"] == pytest.approx(1.0)
    grounding = results["grounding"]
    expected = sum(int(r["id"].split("-")[2]) % 2 == 0 for r in grounding.results)
    assert grounding.metrics["correct"] == expected
    assert grounding.metrics["unparseable"] == len(grounding.results) - expected
    assert grounding.metrics["accuracy"] == pytest.approx(expected / len(grounding.results))
    assert results["caption"].metrics["BLEU-4"] > 0.5


def test_chat_evaluations_wrap_the_prompt_in_a_user_turn(tiny):
    cfg, model, processors = tiny("vqa", options=("evaluation.vqa.chat=true",), max_samples=1)
    evaluator = Evaluator(cfg, model, processors)
    sample = evaluator.samples["vqa"][0]
    expected = evaluator.encoder.encode_messages(
        [{"role": "user", "content": f"Picture 1: <img>{sample.images[0]}</img>\n{sample.text}"}], add_generation_prompt=True
    )
    assert evaluator._encode(evaluator.tasks["vqa"], sample)[0] == expected.input_ids
    raw = evaluator.encoder.encode_text(f"<img>{sample.images[0]}</img>{sample.text}", supervised=False)
    evaluator.tasks["vqa"].chat = False
    assert evaluator._encode(evaluator.tasks["vqa"], sample)[0] == raw.input_ids


def test_multiple_choice_picks_the_lowest_mean_option_loss(tiny, small_world, tmp_path):
    questions = [
        {"id": f"q{k}", "image": f"images/val/{k:06d}.png", "question": "What colour is the shape?",
         "choices": ["red", "green", "blue", "yellow"][: 2 + k % 3], "answer": k % 2}
        for k in range(5)
    ]
    ann = write_mc(tmp_path / "mc.jsonl", questions)
    options = (
        "evaluation.mc.task=multiple_choice", "evaluation.mc.builder=multiple_choice",
        f"evaluation.mc.ann_path={ann}", f"evaluation.mc.image_root={small_world}", "run.eval_batch_size=2",
    )
    cfg, model, processors = tiny(options=options)
    evaluator = Evaluator(cfg, model, processors)
    result = evaluator.evaluate()["mc"]
    model.eval()
    for sample, res in zip(evaluator.samples["mc"], result.results):
        prompt, pixels = evaluator._encode(evaluator.tasks["mc"], sample)
        losses = {}
        for option in sample.options:  # one sequence at a time, full logits, by hand
            ids = evaluator.encoder.encode_text(option, supervised=True).input_ids
            full = torch.tensor([prompt + ids])
            with torch.no_grad():
                logits = model(full, pixel_values=pixels).logits[0, len(prompt) - 1 : -1]
            losses[option.strip()] = F.cross_entropy(logits.float(), torch.tensor(ids)).item()
        assert res["prediction"] == min(losses, key=losses.get)
        assert res["answer"] == "AB"[int(sample.id[1:]) % 2]
    correct = sum(r["prediction"] == r["answer"] for r in result.results)
    assert result.metrics["accuracy"] == pytest.approx(correct / 5)


# --------------------------------------------------------------------------- evaluate.py


def write_eval_project(path: Path, world: Path, **extra_run) -> Path:
    run = {"output_dir": str(path.parent / "out"), "device": "cpu", "eval_batch_size": 3, **extra_run}
    project = {
        "base": [str(TINY_PRESET)],
        "evaluation": {
            "vqa": {"task": "vqa", "builder": "vqa", "ann_path": str(world / "vqa_val.jsonl"), "image_root": str(world),
                    "max_samples": 7, "benchmark": "VQA", "benchmark_split": "val"},
            "grounding": {"task": "grounding", "builder": "ref_grounding", "ann_path": str(world / "refs_val.json"),
                          "image_root": str(world), "max_samples": 5},
        },
        "run": run,
    }
    path.write_text(json.dumps(project))  # JSON is YAML
    return path


def run_evaluate(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
def test_evaluate_py_prints_a_table_and_writes_results(small_world, tmp_path):
    project = write_eval_project(tmp_path / "eval.yaml", small_world)
    proc = run_evaluate(["evaluate.py", "--cfg-path", str(project)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "untrained" in proc.stderr  # model.load_from is null
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["benchmark", "split", "metric", "value", "samples", "skipped"]
    assert any(line.split()[:3] == ["VQA", "val", "accuracy"] and line.split()[4:] == ["7", "0"] for line in lines)
    assert any(line.split()[:3] == ["grounding", "-", "accuracy"] for line in lines)
    assert json.loads((tmp_path / "out" / "eval" / "vqa.json").read_text())["metrics"]["count"] == 7
    summary = json.loads((tmp_path / "out" / "eval" / "results.json").read_text())
    vqa = next(r for r in summary["results"] if (r["evaluation"], r["metric"]) == ("vqa", "accuracy"))
    assert (vqa["benchmark"], vqa["split"], vqa["task"], vqa["samples"], vqa["skipped"]) == ("VQA", "val", "vqa", 7, 0)
    markdown = (tmp_path / "out" / "eval" / "results.md").read_text().splitlines()
    assert markdown[2] == "| benchmark | split | metric | value | samples | skipped |"
    assert f"| VQA | val | accuracy | {vqa['value']:.4f} | 7 | 0 |" in markdown


@pytest.mark.parametrize(
    ("options", "message"),
    [(["model.load_from=/nonexistent/run"], "no checkpoint at /nonexistent/run"), (["run.eval_every=oops"], "config error")],
)
def test_evaluate_py_errors_exit_2_with_a_message(small_world, tmp_path, options, message, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    project = write_eval_project(tmp_path / "eval.yaml", small_world)
    assert evaluate.main(["--cfg-path", str(project), "--options", *options]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.integration
def test_two_process_torchrun_evaluation_equals_one_process(small_world, tmp_path):
    """Shards by rank and gathers: the same predictions and metrics as a single process."""
    project = write_eval_project(tmp_path / "eval.yaml", small_world)
    single = run_evaluate(["evaluate.py", "--cfg-path", str(project), "--options", f"run.output_dir={tmp_path / 'one'}"])
    assert single.returncode == 0, single.stderr[-3000:]
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "evaluate.py"]
    double = run_evaluate([*launch, "--cfg-path", str(project), "--options", f"run.output_dir={tmp_path / 'two'}"], timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("benchmark  split") == 1  # only rank 0 prints the table
    for name in ("vqa", "grounding"):
        one = json.loads((tmp_path / "one" / "eval" / f"{name}.json").read_text())
        two = json.loads((tmp_path / "two" / "eval" / f"{name}.json").read_text())
        assert two["predictions"] == one["predictions"]
        assert two["metrics"] == one["metrics"]


# --------------------------------------------------------------------------- evaluation during training


def test_training_evaluates_logs_and_keeps_the_best_checkpoint(load_sft, small_world, tmp_path, monkeypatch):
    from lavis.runners import build_runner

    cfg = load_sft(
        *eval_options(small_world, "vqa", max_samples=3),
        "run.max_steps=6", "run.eval_every=2", "run.save_every=6", "run.best_metric=vqa/accuracy",
    )
    runner = build_runner(cfg)
    scores = iter([0.5, 0.75, 0.25])  # at steps 2, 4, 6: the best is step 4
    real_metrics = runner.evaluator.tasks["vqa"].metrics
    monkeypatch.setattr(runner.evaluator.tasks["vqa"], "metrics", lambda results: {**real_metrics(results), "accuracy": next(scores)})
    runner.train()
    out = Path(cfg.run.output_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/vqa/accuracy" in r]
    assert [(r["step"], r["eval/vqa/accuracy"]) for r in evals] == [(2, 0.5), (4, 0.75), (6, 0.25)]
    assert all("loss" not in r for r in evals) and len([r for r in records if "loss" in r]) == 6
    meta = json.loads((out / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["best"] == {"metric": "vqa/accuracy", "value": 0.75, "step": 4}
    assert json.loads((out / "eval" / "vqa.json").read_text())["step"] == 6
    # The best so far travels with the resumable state.
    state = torch.load(out / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    assert state["best"] == meta["best"]


def test_best_mode_min_keeps_the_lowest(load_sft, small_world, monkeypatch):
    from lavis.runners import build_runner

    cfg = load_sft(
        *eval_options(small_world, "vqa", max_samples=2), "run.max_steps=4", "run.eval_every=1",
        "run.save_every=4", "run.best_metric=vqa/accuracy", "run.best_mode=min",
    )
    runner = build_runner(cfg)
    scores = iter([0.5, 0.2, 0.9, 0.2])
    monkeypatch.setattr(runner.evaluator.tasks["vqa"], "metrics", lambda results: {"accuracy": next(scores), "count": 2})
    runner.train()
    meta = json.loads((Path(cfg.run.output_dir) / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["best"]["step"] == 2  # the first 0.2; an equal later value is not better


def test_wandb_gets_the_training_and_evaluation_metrics(load_sft, small_world, monkeypatch):
    from lavis.runners import build_runner

    logged, finished, inits = [], [], []
    fake = types.ModuleType("wandb")

    class Run:
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            finished.append(True)

    fake.init = lambda **kwargs: inits.append(kwargs) or Run()
    fake.Table = lambda columns, data: dict(zip(columns, zip(*data)))
    fake.Image = lambda image: image.size
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_sft(*eval_options(small_world, "vqa", max_samples=2), "run.max_steps=2", "run.eval_every=2",
                   "run.save_every=2", "run.wandb.project=demo", "run.wandb.tags=[a,b]")
    build_runner(cfg).train()
    assert inits[0]["project"] == "demo" and inits[0]["tags"] == ["a", "b"] and inits[0]["config"] == cfg.raw
    assert [step for step, values in logged if "loss" in values] == [1, 2]
    evals = [(step, values) for step, values in logged if "eval/vqa/accuracy" in values]
    assert [step for step, _ in evals] == [2] and math.isfinite(evals[0][1]["eval/vqa/accuracy"])
    (step, tables), = [(step, values) for step, values in logged if "eval/results" in values]
    assert step == 2 and tables["eval/results"]["metric"] == ("accuracy",) and tables["eval/results"]["samples"] == (2,)
    assert len(tables["eval/samples/vqa"]["prediction"]) == 2 and tables["eval/samples/vqa"]["image"][0] == (128, 128)
    assert finished == [True]


@pytest.mark.parametrize("chat", [False, True])
def test_answers_are_generated_and_read_as_qwen_vl_s_evaluation(tiny, monkeypatch, chat):
    """Per task Qwen-VL's minimum of new tokens (VQA 1, captions 8, grounding 10); a raw prompt stops only
    at <|endoftext|>, a chat turn also at <|im_end|>; the answer's text leaves special tokens out."""
    cfg, model, processors = tiny("vqa", "grounding", "caption", options=(f"evaluation.vqa.chat={chat}",
                                  f"evaluation.grounding.chat={chat}", f"evaluation.caption.chat={chat}"), max_samples=2)
    tok = processors.tokenizer
    seen = {}
    answer = tok.encode("<ref>cat</ref> (1,2),(3,4)") + [tok.eod_id, tok.encode("x")[0]]

    def generate(input_ids, attention_mask, pixel_values, **options):
        seen.setdefault(options["min_new_tokens"], options["stop_ids"])
        return torch.tensor([answer] * input_ids.shape[0])

    monkeypatch.setattr(model, "generate", generate)
    results = Evaluator(cfg, model, processors).evaluate()
    stops = (tok.im_end_id, tok.eod_id) if chat else (tok.eod_id,)
    assert seen == {1: stops, 8: stops, 10: stops}
    assert {r["output"] for result in results.values() for r in result.results} == {"cat (1,2),(3,4)"}
