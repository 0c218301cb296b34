"""Evaluation metrics: VQAv2 accuracy, grounding Acc@0.5, captioning CIDEr/BLEU-4, multiple choice."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from lavis.tasks.metrics import (
    caption_scores,
    choose_option,
    grounding_accuracy,
    normalize_vqa_answer,
    parse_first_box,
    tokenize_caption,
    vqa_accuracy,
    vqa_accuracy_by,
    vqa_score,
)

# --------------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("two", "2"),
        ("Ten", "10"),
        ("none", "0"),
        ("a dog", "dog"),
        ("The red an apple", "red apple"),
        ("yes.", "yes"),
        ("Yes!", "yes"),  # '!' is punctuation (the 2015 beta's list lacked it)
        ("2.5", "2.5"),  # a period followed by a digit stays
        ("3.", "3"),
        ("dont", "don't"),  # ASCII apostrophes (the 2015 beta used U+2019)
        ("isnt", "isn't"),
        ("don't", "don't"),  # the apostrophe is not punctuation
        ("10:30", "10:30"),  # nor is the colon
        ("1,000", "1000"),  # digit,digit comma: every punctuation mark is deleted
        ("red,blue", "red blue"),  # no digit comma, no adjacent space: replaced by a space
        ("red, blue", "red blue"),  # ", " touches a space: deleted
        ("  left\tside\n", "left side"),
        ("well-known", "well known"),  # '-' is punctuation: a space inside a word
        ("{red}", "red"),
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_vqa_accuracy_normalised_prediction_matches() -> None:
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    assert vqa_accuracy("a dog", ["dog"] * 10) == 1.0
    assert vqa_accuracy("yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("dont", ["don't"] * 10) == 1.0
    assert vqa_accuracy("1,000", ["1000"] * 10) == 1.0
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0


@pytest.mark.parametrize(
    ("agreeing", "expected"),
    [
        (0, 0.0),
        (1, 0.3),  # 9 subsets keep it: 1/3 each; (9 * 1/3 + 0) / 10
        (2, 0.6),  # (8 * 2/3 + 2 * 1/3) / 10
        (3, 0.9),  # (7 * 1 + 3 * 2/3) / 10
        (4, 1.0),  # every 9-subset keeps >= 3
        (10, 1.0),
    ],
)
def test_vqa_accuracy_human_agreement(agreeing: int, expected: float) -> None:
    answers = ["cat"] * agreeing + ["dog"] * (10 - agreeing)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_accuracy_ground_truth_handling_is_official() -> None:
    # Official: answers are not digit/article-normalised (VQAv2 ships them normalised) ...
    assert vqa_accuracy("2", ["two"] * 10) == 0.0
    assert vqa_accuracy("2", ["two"] * 10, normalize_answers=True) == 1.0
    # ... and get the punctuation rule only when they are not all identical.
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0
    assert vqa_accuracy("yes", ["yes."] * 5 + ["no"] * 5) == 1.0


VQA_EVAL_CASES = json.loads((Path(__file__).parent / "fixtures" / "vqa_eval_cases.json").read_text())


@pytest.mark.parametrize("case", VQA_EVAL_CASES["cases"], ids=[c["rule"] for c in VQA_EVAL_CASES["cases"]])
def test_vqa_accuracy_equals_the_official_evaluator_case_for_case(case: dict) -> None:
    """Per-question accuracy as Qwen-VL's eval_mm/vqa_eval.py (LAVIS's vqaEval.py) computes it, on cases
    made to hit every normalisation rule (tests/fixtures/vqa_eval_cases.json, made with that code)."""
    assert vqa_accuracy(case["prediction"], case["answers"]) == pytest.approx(case["accuracy"], abs=1e-12)


def test_vqa_task_reports_the_official_overall_and_per_answer_type_figures() -> None:
    from lavis.tasks.vqa import VQATask

    results = [{"prediction": c["prediction"], "answers": c["answers"], "answer_type": c["answer_type"]}
               for c in VQA_EVAL_CASES["cases"]]
    metrics = VQATask().metrics(results)
    assert round(100 * metrics["accuracy"], 2) == VQA_EVAL_CASES["overall"]
    per_type = {t: round(100 * metrics[f"accuracy/{t}"], 2) for t in ("yes/no", "number", "other")}
    assert per_type == VQA_EVAL_CASES["per_answer_type"]


def test_vqa_score_means_and_counts() -> None:
    out = vqa_score(["2", "cat"], [["2"] * 10, ["cat"] + ["dog"] * 9])
    assert out["count"] == 2
    assert out["accuracy"] == pytest.approx((1.0 + 0.3) / 2)
    assert vqa_score([], []) == {"accuracy": 0.0, "count": 0}
    with pytest.raises(ValueError):
        vqa_score(["a"], [])
    with pytest.raises(ValueError):
        vqa_accuracy("a", [])


# --------------------------------------------------------------------------------------- grounding


def test_parse_first_box_forms() -> None:
    assert parse_first_box("<ref>dog</ref><box>(100,200),(500,600)</box>") == (100, 200, 500, 600)
    # continuation of a prompt ending in "<box>", with or without the closing tag
    assert parse_first_box("(100,200),(500,600)</box>") == (100, 200, 500, 600)
    assert parse_first_box(" (100, 200), (500, 600)") == (100, 200, 500, 600)
    # swapped corners are put in order
    assert parse_first_box("<box>(500,600),(100,200)</box>") == (100, 200, 500, 600)
    assert parse_first_box("<box>(100,600),(500,200)</box>") == (100, 200, 500, 600)
    # the first of several
    assert parse_first_box("a <box>(1,2),(3,4)</box> b <box>(5,6),(7,8)</box>") == (1, 2, 3, 4)
    assert parse_first_box("(1,2),(3,4)</box> and <box>(5,6),(7,8)</box>") == (1, 2, 3, 4)
    # nothing parseable
    assert parse_first_box("I cannot see a dog.") is None
    assert parse_first_box("") is None
    assert parse_first_box("<box>(1,2)</box>") is None


def test_parse_first_box_scales_non_square() -> None:
    # width 200, height 100: x * 200 / 1000, y * 100 / 1000
    assert parse_first_box("<box>(100,200),(500,600)</box>", 200, 100) == pytest.approx((20, 20, 100, 60))
    assert parse_first_box("(500,600),(100,200)</box>", 200, 100) == pytest.approx((20, 20, 100, 60))
    with pytest.raises(ValueError):
        parse_first_box("<box>(1,2),(3,4)</box>", 200)


def test_grounding_accuracy_lenient_parser_hand_cases() -> None:
    """The lenient parser (diagnosis): any box spelling, corners ordered, scaled by 1000."""
    preds = [
        "<ref>dog</ref><box>(100,200),(500,600)</box>",  # non-square exact: IoU 1 -> hit
        "<box>(500,600),(100,200)</box>",  # swapped corners: hit
        "(100,200),(500,600)</box>",  # bare continuation of the "<box>" prompt: hit
        "there is no dog",  # no box: miss, unparseable
        "<box>(50,0),(150,100)</box>",  # IoU 5000 / 15000 = 1/3: miss
        "<box>(0,0),(100,50)</box>",  # IoU 5000 / 10000 = 0.5 exactly: hit (>=)
        # width/height mixed up would give pixels (10,40,50,120): IoU 600/5800 with the GT
        "<box>(100,400),(500,1200)</box>",
    ]
    gts = [(20, 20, 100, 60)] * 3 + [(0, 0, 10, 10)] + [(0, 0, 100, 100)] * 2 + [(20, 20, 100, 60)]
    sizes = [(200, 100)] * 3 + [(100, 100)] + [(1000, 1000)] * 2 + [(100, 100)]
    out = grounding_accuracy(preds, gts, sizes, parser="lenient")
    assert out == {"accuracy": pytest.approx(4 / 7), "correct": 4, "unparseable": 1, "count": 7}
    # the IoU=1/3 case passes a lower threshold
    assert grounding_accuracy(preds[4:5], gts[4:5], sizes[4:5], threshold=0.3, parser="lenient")["correct"] == 1
    with pytest.raises(ValueError):
        grounding_accuracy(preds, gts[:2], sizes)
    with pytest.raises(ValueError, match="unknown grounding parser 'strict'"):
        grounding_accuracy(preds, gts, sizes, parser="strict")


# -------------------------------------------------------------------------------------- captioning

PREDS = {
    1: "A man riding a horse.",
    2: "Two dogs playing in the snow!",
    3: "A plate of food, on a table.",
}
REFS = {
    1: ["A man is riding a horse.", "A person rides a brown horse."],
    2: ["Two dogs play in the snow.", "Dogs running through (fresh) snow."],
    3: ["A plate with food on it.", "Food on a white plate."],
}
# The same captions tokenized by hand as PTBTokenizer does (lowercase, punctuation dropped, brackets named).
HAND_RES = {
    1: ["a man riding a horse"],
    2: ["two dogs playing in the snow"],
    3: ["a plate of food on a table"],
}
HAND_GTS = {
    1: ["a man is riding a horse", "a person rides a brown horse"],
    2: ["two dogs play in the snow", "dogs running through -lrb- fresh -rrb- snow"],
    3: ["a plate with food on it", "food on a white plate"],
}


def test_tokenize_caption() -> None:
    assert tokenize_caption("A Dog's toy, well-known (really) don't... \"ok\"!") == (
        "a dog 's toy well-known -lrb- really -rrb- do n't ok"
    )
    assert tokenize_caption("1,000 people; 3.5 km: end.") == "1,000 people 3.5 km end"
    assert tokenize_caption("?!") == "?!"  # as PTBTokenizer: a run of marks is one token, kept


def test_caption_scores_match_pycocoevalcap() -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    for k, pred in PREDS.items():
        assert [tokenize_caption(pred)] == HAND_RES[k]
        assert [tokenize_caption(r) for r in REFS[k]] == HAND_GTS[k]
    out = caption_scores(PREDS, REFS)
    cider, _ = Cider().compute_score(HAND_GTS, HAND_RES)
    bleu, _ = Bleu(4).compute_score(HAND_GTS, HAND_RES, verbose=0)
    assert out["count"] == 3
    assert out["CIDEr"] == pytest.approx(cider)
    assert out["BLEU-4"] == pytest.approx(bleu[3])
    assert out["CIDEr"] > 0
    assert 0.0 <= out["BLEU-4"] <= 1.0


def test_caption_scores_perfect_beats_wrong() -> None:
    perfect = caption_scores({k: v[0] for k, v in REFS.items()}, REFS)
    wrong = caption_scores({1: REFS[3][0], 2: REFS[1][0], 3: REFS[2][0]}, REFS)
    assert perfect["CIDEr"] > wrong["CIDEr"] + 1.0
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 <= wrong["BLEU-4"] < perfect["BLEU-4"]


def test_caption_scores_bad_input() -> None:
    with pytest.raises(ValueError):
        caption_scores({1: "a dog"}, {1: ["a dog"], 2: ["a cat"]})
    with pytest.raises(ValueError):
        caption_scores({1: "a dog"}, {1: []})
    assert caption_scores({}, {})["count"] == 0


# --------------------------------------------------------------------------------- multiple choice


def test_choose_option() -> None:
    assert choose_option({"A": 1.2, "B": 0.7, "C": 0.9, "D": 2.0}) == "B"
    assert choose_option({"A": 0.5, "B": 0.3, "C": 0.3}) == "B"  # tie -> first in order
    assert choose_option({"C": 0.3, "B": 0.3, "A": 0.9}) == "C"
    assert choose_option({"A": math.nan, "B": 2.0}) == "B"
    with pytest.raises(ValueError):
        choose_option({})


GROUNDING_EVAL_CASES = json.loads((Path(__file__).parent / "fixtures" / "grounding_eval_cases.json").read_text())


@pytest.mark.parametrize("case", GROUNDING_EVAL_CASES["cases"], ids=[c["rule"] for c in GROUNDING_EVAL_CASES["cases"]])
def test_grounding_hits_equal_qwen_vl_s_evaluator_case_for_case(case: dict) -> None:
    """Hit or miss, and the IoU, as the scoring loop of Qwen-VL's eval_mm/evaluate_grounding.py gives them
    (tests/fixtures/grounding_eval_cases.json, made with that loop), with special tokens around the box."""
    from lavis.tasks.metrics import qwen_vl_box_iou

    size = (GROUNDING_EVAL_CASES["image"]["width"], GROUNDING_EVAL_CASES["image"]["height"])
    gt = tuple(GROUNDING_EVAL_CASES["gt_box_xyxy"])
    for output in (case["output"], f"{case['output']}</box><|endoftext|>"):  # as decoded with special tokens
        measured = qwen_vl_box_iou(output, gt, *size)
        assert (measured == case["iou"]) or (case["iou"] is None and math.isnan(measured)), output
        assert grounding_accuracy([output], [gt], [size])["correct"] == int(case["hit"])
    lenient = grounding_accuracy([case["output"]], [gt], [size], parser="lenient")["correct"]
    if case["rule"] in ("swapped corners", "spaces after commas"):
        assert lenient == 1 and not case["hit"]  # where the two parsers part


PTB_CAPTIONS = json.loads((Path(__file__).parent / "fixtures" / "ptb_captions.json").read_text())


@pytest.mark.parametrize("caption, expected", list(zip(PTB_CAPTIONS["captions"], PTB_CAPTIONS["ptb"])))
def test_the_java_free_tokenizer_equals_ptb_on_realistic_captions(caption: str, expected: str) -> None:
    """The fallback tokenizer against pycocoevalcap's PTBTokenizer (tests/fixtures/ptb_captions.json, made
    with it): times, prices, percentages, abbreviations, brackets, clitics, slashes, repeated marks."""
    assert tokenize_caption(caption) == expected


@pytest.mark.skipif(not shutil.which("java"), reason="PTBTokenizer needs Java")
def test_caption_scores_with_ptb_equal_the_coco_caption_pipeline() -> None:
    """CIDEr and BLEU-4 as COCOEvalCap computes them (PTBTokenizer on both sides, then its scorers)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = PTB_CAPTIONS["captions"]
    predictions = {i: captions[i] for i in range(0, 40, 4)}
    references = {i: captions[i + 1: i + 4] for i in predictions}
    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = PTBTokenizer().tokenize({k: [{"caption": v}] for k, v in predictions.items()})
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    ours = caption_scores(predictions, references)
    assert ours["ptb"] == 1
    assert abs(ours["CIDEr"] - cider) < 1e-6 and abs(ours["BLEU-4"] - bleu[3]) < 1e-6
    simple = caption_scores(predictions, references, tokenizer="simple")
    assert simple["ptb"] == 0 and abs(simple["CIDEr"] - cider) < 1e-6  # the fallback agrees on these captions


def test_without_java_captions_fall_back_with_a_warning(monkeypatch, caplog) -> None:
    monkeypatch.setattr("lavis.tasks.metrics.shutil.which", lambda name: None)
    with caplog.at_level("WARNING"):
        out = caption_scores({1: "a dog"}, {1: ["a dog", "a brown dog"]})
    assert out["ptb"] == 0 and "no Java, so PTBTokenizer cannot run" in caplog.text


TEXT_VQA_CASES = json.loads((Path(__file__).parent / "fixtures" / "text_vqa_eval_cases.json").read_text())


@pytest.mark.parametrize("case", TEXT_VQA_CASES["anls"], ids=[c["rule"] for c in TEXT_VQA_CASES["anls"]])
def test_anls_equals_the_docvqa_evaluator_case_for_case(case: dict) -> None:
    from lavis.tasks.metrics import anls

    assert anls(case["prediction"], case["answers"]) == pytest.approx(case["score"], abs=1e-12)


@pytest.mark.parametrize("case", TEXT_VQA_CASES["relaxed"], ids=[c["rule"] for c in TEXT_VQA_CASES["relaxed"]])
def test_relaxed_accuracy_equals_qwen_vl_s_chartqa_scoring_case_for_case(case: dict) -> None:
    from lavis.tasks.metrics import relaxed_accuracy

    assert relaxed_accuracy(case["prediction"], case["annotations"]) == case["score"]


@pytest.mark.parametrize("case", TEXT_VQA_CASES["exact"], ids=[c["rule"] for c in TEXT_VQA_CASES["exact"]])
def test_exact_match_equals_qwen_vl_s_gqa_scoring_case_for_case(case: dict) -> None:
    from lavis.tasks.metrics import exact_match

    assert exact_match(case["prediction"], case["annotations"]) == case["score"]


def test_vqa_accuracy_by_groups_predictions_and_keeps_the_evaluations_overall():
    ten = ["2"] * 10
    results = {"metrics": {"accuracy": 0.5}, "predictions": [
        {"id": "1", "prediction": "2", "answers": ten}, {"id": "2", "prediction": "3", "answers": ten},
        {"id": "3", "prediction": "red", "answers": ["red"] * 2 + ["blue"] * 8}]}
    table = vqa_accuracy_by(results, {"1": "count", "2": "count", "3": "colour"})
    assert table["count"] == pytest.approx(0.5) and table["colour"] == pytest.approx(0.6) and table["all"] == 0.5
