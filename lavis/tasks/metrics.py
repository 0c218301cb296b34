"""Evaluation metrics for Qwen-VL-style benchmarks, each as the evaluator researchers publish with
computes it: VQA accuracy (the VQA repository's vqaEval.py as LAVIS and Qwen-VL run it), grounding
Acc@IoU (Qwen-VL's evaluate_grounding.py), captioning CIDEr/BLEU-4 (pycocoevalcap with its
PTBTokenizer, which needs Java; a Java-free fallback tokenizer otherwise), multiple-choice
selection by lowest loss, and a CHAIR-style hallucination rate of captions of the synthetic world.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

from lavis.processors.boxes import denorm_box, iou, parse_boxes

__all__ = [
    "anls",
    "caption_hallucination",
    "caption_scores",
    "exact_match",
    "choose_option",
    "grounding_accuracy",
    "hallucination_rate",
    "normalize_vqa_answer",
    "object_mentions",
    "parse_first_box",
    "relaxed_accuracy",
    "tokenize_caption",
    "vqa_accuracy",
    "vqa_score",
]

Box = tuple[float, float, float, float]
log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# VQA accuracy: the rules of the VQA repository's vqaEval.py as LAVIS ships it and Qwen-VL's
# eval_mm/vqa_eval.py runs it (not the 2015 beta, whose punctuation list held ':' and "'" but not
# '!' or '-', and whose contractions used U+2019). tests/fixtures/vqa_eval_cases.json holds that
# code's per-question accuracies on cases that hit every rule.
# ---------------------------------------------------------------------------------------------

# The contractions map, verbatim (ASCII apostrophes; a few keys are capitalised so never match
# lowercased text, and "somebody'd" maps to "somebodyd": kept as is).
_VQA_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_VQA_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_VQA_ARTICLES = frozenset({"a", "an", "the"})
# '.' has its own rule; ':', "'", '$', '%' and '&' are not punctuation here.
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The original's "(?!<=\d)" is a (buggy) negative *lookahead*, true before any '.', so this removes
# every period that is not followed by a digit ("yes." -> "yes", "2.5" stays).
_VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The original passes re.UNICODE (== 32) positionally as ``count``: at most 32 periods are removed.
_VQA_PERIOD_COUNT = int(re.UNICODE)


def _vqa_process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: each punctuation mark is deleted if it touches a space
    (or if the text contains a digit,digit comma anywhere), otherwise replaced by a space; then
    periods not followed by a digit are removed."""
    out = text
    strip_all = _VQA_COMMA_STRIP.search(text) is not None
    for p in _VQA_PUNCT:
        if strip_all or (p + " " in text) or (" " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _VQA_PERIOD_STRIP.sub("", out, count=_VQA_PERIOD_COUNT)


def _vqa_process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lowercase, number words -> digits, drop articles,
    expand apostrophe-less contractions."""
    words = [_VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _VQA_ARTICLES]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """Normalise a predicted answer exactly as the official VQA evaluation does.

    Examples: ``"Two."`` -> ``"2"``, ``"a dog"`` -> ``"dog"``, ``"dont"`` -> ``"don't"``,
    ``"1,000"`` -> ``"1000"``, ``"2.5"`` -> ``"2.5"``, ``"t-shirt"`` -> ``"t shirt"``.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_process_digit_article(_vqa_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str], normalize_answers: bool = False) -> float:
    """VQA accuracy of one prediction against the human answers (10 in VQAv2).

    Mean over leave-one-out subsets of ``answers`` of ``min(#matches in subset / 3, 1)``: 3 or more
    agreeing humans -> 0.9..1.0 (3 of 10 gives 0.9), 1 of 10 -> 0.3.

    As in the official code, the prediction is fully normalised (:func:`normalize_vqa_answer`)
    while the answers, which VQAv2 ships already normalised, only get the punctuation rule, and
    only when they are not all identical. ``normalize_answers=True`` fully normalises the answers
    too (for datasets whose answers are raw text).
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = normalize_vqa_answer(prediction)
    if normalize_answers:
        gts = [normalize_vqa_answer(a) for a in answers]
    elif len(set(answers)) > 1:
        gts = [_vqa_process_punctuation(a) for a in answers]
    else:
        gts = list(answers)
    matches = [gt == pred for gt in gts]
    total = sum(matches)
    # Leaving answer i out keeps total - matches[i] matches among the others.
    accs = [min(1.0, (total - m) / 3.0) for m in matches]
    return sum(accs) / len(accs)


def vqa_accuracy_by(results: Mapping[str, Any], group_of: Mapping[str, str]) -> dict[str, float]:
    """VQA accuracy of an evaluation's ``vqa.json`` (``{"predictions": [{"id", "prediction", "answers"}], "metrics"}``)
    per group (``group_of``: prediction id -> e.g. its question type), and overall as the evaluation reported it."""
    scores: dict[str, list[float]] = {}
    for sample in results["predictions"]:
        scores.setdefault(group_of[str(sample["id"])], []).append(vqa_accuracy(sample["prediction"], sample["answers"]))
    table = {group: sum(s) / len(s) for group, s in scores.items()}
    table["all"] = float(results["metrics"]["accuracy"])
    return table


def vqa_score(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], normalize_answers: bool = False
) -> dict[str, float | int]:
    """Mean :func:`vqa_accuracy` over a dataset: ``{"accuracy": in [0, 1], "count": n}``."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    accs = [vqa_accuracy(p, a, normalize_answers) for p, a in zip(predictions, answers)]
    return {"accuracy": sum(accs) / len(accs) if accs else 0.0, "count": len(accs)}


# ---------------------------------------------------------------------------------------------
# Text-oriented VQA: ANLS (DocVQA, InfographicsVQA), relaxed accuracy (ChartQA), exact match (GQA,
# OCR-VQA, AI2D), as Qwen-VL's eval_mm computes them (tests/fixtures/text_vqa_eval_cases.json).
# ---------------------------------------------------------------------------------------------


def _levenshtein(a: str, b: str) -> int:
    if len(a) > len(b):
        a, b = b, a
    row = list(range(len(a) + 1))
    for j, cb in enumerate(b):
        previous, row = row, [j + 1]
        for i, ca in enumerate(a):
            row.append(previous[i] if ca == cb else 1 + min(previous[i], previous[i + 1], row[-1]))
    return row[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one answer, as the DocVQA/InfographicsVQA evaluation
    (infographicsvqa_eval.py): 1 - the smallest edit distance to an answer (both lowercased, spaces
    collapsed) over the longer raw length; below ``threshold``: 0."""
    if not answers:
        raise ValueError("anls needs at least one answer")
    found = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in answers:
        length = max(len(answer.upper()), len(prediction.upper()))
        distances.append(0.0 if length == 0 else _levenshtein(" ".join(answer.strip().lower().split()), found) / length)
    score = 1 - min(distances)
    return score if score >= threshold else 0.0


def _number(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, annotations: Sequence[str], max_relative_change: float = 0.05) -> float:
    """ChartQA's relaxed accuracy as Qwen-VL's evaluate_vqa.py computes it: 1 if, for some annotation,
    both parse as numbers (``"5%"`` is 0.05) within ``max_relative_change`` of the *answer* (that
    script passes the answer as pix2struct's ``target``; an answer of 0 is compared as text), or the
    texts are equal ignoring case; the answer is stripped, the annotations are not."""
    answer = prediction.strip()
    for annotation in annotations:
        base, other = _number(answer), _number(annotation)
        if other is not None and base:
            if abs(other - base) / abs(base) <= max_relative_change:
                return 1.0
        elif annotation.lower() == answer.lower():
            return 1.0
    return 0.0


def exact_match(prediction: str, annotations: Sequence[str]) -> float:
    """1 if the answer equals an annotation ignoring case and surrounding spaces (GQA, OCR-VQA, AI2D in
    Qwen-VL's evaluate_vqa.py)."""
    answer = prediction.strip().lower()
    return float(any(answer == a.strip().lower() for a in annotations))


# ---------------------------------------------------------------------------------------------
# Grounding (RefCOCO-style): first predicted box, [0, 1000) -> pixels, Acc@IoU>=threshold.
# ---------------------------------------------------------------------------------------------

# A bare box at the very start of the output: Qwen-VL's grounding prompt ends with "<box>", so the
# generated continuation is "(x1,y1),(x2,y2)</box>" (the closing tag may be cut by a stop string).
_LEADING_BARE_BOX = re.compile(r"\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*,\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)")


def parse_first_box(text: str, width: int | None = None, height: int | None = None) -> tuple | None:
    """First box in a generated answer, or ``None`` if there is none.

    Accepts a leading bare ``(x1,y1),(x2,y2)`` (continuation of a ``...<box>`` prompt) or else the
    first ``<box>(x1,y1),(x2,y2)</box>`` anywhere (via :func:`lavis.processors.boxes.parse_boxes`).
    Corners are put in order (``x1 <= x2``, ``y1 <= y2``). Returns Qwen-VL's integer [0, 1000)
    coordinates, or pixel coordinates when ``width`` and ``height`` are given.
    """
    m = _LEADING_BARE_BOX.match(text)
    if m is not None:
        box = tuple(int(v) for v in m.groups())
    else:
        boxes = parse_boxes(text)
        if not boxes:
            return None
        box = boxes[0]
    x1, y1, x2, y2 = box
    box = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
    if width is None and height is None:
        return box
    if width is None or height is None:
        raise ValueError("give both width and height, or neither")
    return denorm_box(box, width, height)


# Qwen-VL's eval_mm/evaluate_grounding.py: the answer is decoded without special tokens, and its first
# "(a),(b)" (no spaces around the comma between them) is split on ',' into two numbers per point.
_QWEN_VL_BOX = re.compile(r"\((.*?)\),\((.*?)\)")
_SPECIAL_TOKENS = re.compile(r"<\|(?:endoftext|im_start|im_end|extra_\d+)\|>|</?(?:ref|box|quad|img)>|<imgpad>")
GROUNDING_PARSERS = ("qwen_vl", "lenient")


def parse_box_qwen_vl(text: str) -> Box:
    """The first box of an answer as Qwen-VL's grounding evaluation reads it, in [0, 999] units;
    ``(0, 0, 0, 0)`` (a miss) when it cannot. Corners are kept as written (swapped ones miss)."""
    found = _QWEN_VL_BOX.findall(_SPECIAL_TOKENS.sub("", text))
    try:
        x1, y1 = (float(v) for v in found[0][0].split(","))
        x2, y2 = (float(v) for v in found[0][1].split(","))
    except (IndexError, ValueError):
        return (0.0, 0.0, 0.0, 0.0)
    return (x1, y1, x2, y2)


def qwen_vl_box_iou(text: str, gt: Box, width: int, height: int) -> float:
    """IoU of the answer's box with the pixel ground truth exactly as evaluate_grounding.py computes
    it: float32, coordinates / 999 times the image size, torchvision's area and IoU (NaN when the
    union is empty)."""
    import torch

    box = torch.tensor(parse_box_qwen_vl(text), dtype=torch.float32).view(-1, 4) / 999
    box[:, 0::2] *= width
    box[:, 1::2] *= height
    target = torch.tensor(gt, dtype=torch.float32).view(-1, 4)
    area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
    target_area = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    low, high = torch.max(box[:, None, :2], target[:, :2]), torch.min(box[:, None, 2:], target[:, 2:])
    wh = (high - low).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    return (inter / (area[:, None] + target_area - inter)).item()


def grounding_accuracy(
    predictions: Sequence[str],
    gt_boxes: Sequence[Box],
    sizes: Sequence[tuple[int, int]],
    threshold: float = 0.5,
    parser: str = "qwen_vl",
) -> dict[str, float | int]:
    """Acc@IoU>=``threshold`` of generated boxes against pixel ground truth ``(x1, y1, x2, y2)``.

    ``sizes`` are the images' ``(width, height)``. ``parser``: ``qwen_vl`` scores as Qwen-VL's
    evaluate_grounding.py (:func:`qwen_vl_box_iou`); ``lenient`` (for diagnosis) reads any box
    spelling (:func:`parse_first_box`), orders its corners and scales by 1000. A prediction without a
    parseable box is a miss (counted in ``"unparseable"``). Returns ``{"accuracy", "correct",
    "unparseable", "count"}``.
    """
    if not len(predictions) == len(gt_boxes) == len(sizes):
        raise ValueError(f"lengths differ: {len(predictions)} predictions, {len(gt_boxes)} boxes, {len(sizes)} sizes")
    if parser not in GROUNDING_PARSERS:
        raise ValueError(f"unknown grounding parser '{parser}'; expected one of {', '.join(GROUNDING_PARSERS)}")
    correct = unparseable = 0
    for text, gt, (width, height) in zip(predictions, gt_boxes, sizes):
        if parser == "qwen_vl":
            unparseable += parse_box_qwen_vl(text) == (0.0, 0.0, 0.0, 0.0)
            correct += qwen_vl_box_iou(text, tuple(gt), width, height) >= threshold
            continue
        box = parse_first_box(text, width, height)
        if box is None:
            unparseable += 1
        elif iou(box, tuple(gt)) >= threshold:
            correct += 1
    n = len(predictions)
    return {"accuracy": correct / n if n else 0.0, "correct": correct, "unparseable": unparseable, "count": n}


# ---------------------------------------------------------------------------------------------
# Captioning: CIDEr and BLEU-4 with pycocoevalcap's scorers on Java-free tokenization.
# ---------------------------------------------------------------------------------------------

_CAPTION_NT = re.compile(r"(?<=\w)n't\b")
# PTB's token classes, in order: clitics, abbreviations (u.s., p.m., mr.), numbers with . , : / inside,
# words (hyphens and slashes inside), brackets, symbols, runs of ! or ?, other punctuation.
_CAPTION_TOKEN = re.compile(
    r"n't|'(?:s|re|ve|ll|m|d)\b"
    r"|(?:[a-z]\.){2,}|\b(?:mr|mrs|ms|dr|st|jr|sr|vs|etc|inc|co|no|mt)\.(?=\s)"
    r"|\d+(?:[.,:/-]\d+)*"
    r"|[^\W_]+(?:[-/][^\W_]+)*"
    r"|[()\[\]{}]|[$%#&@*+=<>^~|]|[!?]{2,}|\.\.\.|--|[^\w\s]"
)
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# pycocoevalcap's PTBTokenizer drops these tokens after tokenizing (its bracket names are upper case,
# so the lower-cased -lrb- ... stay).
_PTB_REMOVED = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'})


def tokenize_caption(text: str) -> str:
    """Lowercase and tokenize a caption as pycocoevalcap's ``PTBTokenizer`` does, without Java (the
    fallback of :func:`caption_scores`; equal to PTB on tests/fixtures/ptb_captions.json).

    Clitics split (``dog's`` -> ``dog 's``, ``can't`` -> ``ca n't``); abbreviations, numbers
    (``10:30``, ``5.99``, ``1,000``), hyphenated and slashed words stay whole; ``$ % # & @`` are
    tokens; brackets become ``-lrb-`` ...; single punctuation marks and quotes are dropped.
    """
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    text = re.sub(r"\bcan't\b", "ca n't", text)
    text = _CAPTION_NT.sub(" n't", text)
    tokens = (_PTB_BRACKETS.get(t, t) for t in _CAPTION_TOKEN.findall(text))
    return " ".join(t for t in tokens if t not in _PTB_REMOVED)


CAPTION_TOKENIZERS = ("ptb", "simple")


def ptb_available() -> bool:
    """Whether pycocoevalcap's PTBTokenizer can run (it starts Java)."""
    return shutil.which("java") is not None


def tokenize_captions(captions: Mapping[Hashable, Sequence[str]], tokenizer: str) -> dict[Hashable, list[str]]:
    """Captions per id, tokenized by pycocoevalcap's PTBTokenizer (``ptb``, as the COCO caption
    evaluation does) or by :func:`tokenize_caption` (``simple``, no Java)."""
    if tokenizer == "simple":
        return {k: [tokenize_caption(c) for c in v] for k, v in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def caption_scores(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], tokenizer: str = "ptb"
) -> dict[str, float | int]:
    """Corpus CIDEr (CIDEr-D as in coco-caption) and BLEU-4 of ``predictions`` (one caption per id)
    against ``references`` (captions per id), as pycocoevalcap's COCOEvalCap computes them: both
    sides tokenized by PTBTokenizer (``tokenizer="ptb"``, which needs Java), then its scorers.

    Without Java, or with ``tokenizer="simple"``, :func:`tokenize_caption` tokenizes instead and
    ``"ptb"`` is 0 in the result: the figures may then differ from published ones. Both mappings must
    have the same ids; CIDEr's IDF comes from this set's references. Returns ``{"CIDEr", "BLEU-4",
    "count", "ptb"}``.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if tokenizer not in CAPTION_TOKENIZERS:
        raise ValueError(f"unknown caption tokenizer '{tokenizer}'; expected one of {', '.join(CAPTION_TOKENIZERS)}")
    if set(predictions) != set(references):
        missing = set(references) - set(predictions)
        extra = set(predictions) - set(references)
        raise ValueError(f"ids differ: {len(missing)} without prediction, {len(extra)} without references")
    if tokenizer == "ptb" and not ptb_available():
        log.warning("captioning: no Java, so PTBTokenizer cannot run; tokenizing without it: CIDEr and BLEU may "
                    "differ from published figures (install Java, e.g. apt-get install default-jre-headless)")
        tokenizer = "simple"
    ptb = int(tokenizer == "ptb")
    if not predictions:
        return {"CIDEr": 0.0, "BLEU-4": 0.0, "count": 0, "ptb": ptb}
    empty = [k for k in predictions if not references[k]]
    if empty:
        raise ValueError(f"no references for id {empty[0]!r}")
    gts = tokenize_captions(references, tokenizer)
    res = tokenize_captions({k: [v] for k, v in predictions.items()}, tokenizer)
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"CIDEr": float(cider), "BLEU-4": float(bleu[3]), "count": len(res), "ptb": ptb}


# ---------------------------------------------------------------------------------------------
# Hallucination in captions, CHAIR-style (Rohrbach et al. 2018), for the synthetic world: the objects a
# caption names ("a red circle": a colour word followed by a shape word) that the scene does not hold.
# ---------------------------------------------------------------------------------------------


def _vocabulary(colours: Iterable[str] | None, shapes: Iterable[str] | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if colours is None or shapes is None:
        from lavis.datasets.synthetic.world import COLOUR_NAMES, SHAPES

        colours, shapes = colours or COLOUR_NAMES, shapes or SHAPES
    return tuple(colours), tuple(shapes)


def object_mentions(caption: str, colours: Iterable[str] | None = None,
                    shapes: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """The distinct ``(colour, shape)`` objects ``caption`` names, in order of first mention: a colour word
    directly followed by a shape word (a plural too: "two red circles"), case-insensitive. The vocabulary
    defaults to the synthetic world's colours and shapes."""
    colours, shapes = _vocabulary(colours, shapes)
    pattern = re.compile(rf"\b({'|'.join(map(re.escape, colours))})\s+({'|'.join(map(re.escape, shapes))})s?\b")
    return list(dict.fromkeys((m[1], m[2]) for m in pattern.finditer(caption.lower())))


def _scene_objects(scene: Any) -> set[tuple[str, str]]:
    """``{(colour, shape)}`` of a world ``Scene``, its dict (``scenes_{split}.json``) or ``(colour, shape)`` pairs."""
    objects = scene.get("objects") if isinstance(scene, Mapping) else getattr(scene, "objects", scene)
    return {(o["colour"], o["shape"]) if isinstance(o, Mapping) else
            (o.colour, o.shape) if hasattr(o, "colour") else tuple(o) for o in objects}


def hallucination_rate(caption: str, scene: Any, colours: Iterable[str] | None = None,
                       shapes: Iterable[str] | None = None) -> float:
    """The share of the objects ``caption`` names (:func:`object_mentions`) that ``scene`` does not hold (a
    ``Scene``, its dict as ``scenes_{split}.json`` stores it, or ``(colour, shape)`` pairs): CHAIR_i of one
    caption. 0.0 for a caption that names none."""
    mentioned = object_mentions(caption, colours, shapes)
    if not mentioned:
        return 0.0
    present = _scene_objects(scene)
    return sum(m not in present for m in mentioned) / len(mentioned)


def caption_hallucination(captions: Iterable[tuple[str, Any]], colours: Iterable[str] | None = None,
                          shapes: Iterable[str] | None = None) -> dict[str, float | int]:
    """CHAIR over ``(caption, scene)`` pairs: ``CHAIR_i`` (absent objects named / objects named, over all
    captions), ``CHAIR_s`` (the share of captions naming at least one absent object), ``mentioned`` (objects
    named) and ``count`` (captions)."""
    count = mentioned = hallucinated = with_hallucination = 0
    for caption, scene in captions:
        names = object_mentions(caption, colours, shapes)
        absent = sum(m not in _scene_objects(scene) for m in names)
        count, mentioned, hallucinated = count + 1, mentioned + len(names), hallucinated + absent
        with_hallucination += absent > 0
    return {"CHAIR_i": hallucinated / mentioned if mentioned else 0.0,
            "CHAIR_s": with_hallucination / count if count else 0.0, "mentioned": mentioned, "count": count}


# ---------------------------------------------------------------------------------------------
# Multiple choice (ScienceQA, MMBench): the option whose answer has the lowest mean loss.
# ---------------------------------------------------------------------------------------------


def choose_option(option_losses: Mapping[str, float]) -> str:
    """Option with the lowest loss; ties go to the first in the mapping's order, NaN never wins."""
    if not option_losses:
        raise ValueError("choose_option needs at least one option")
    return min(option_losses, key=lambda k: math.inf if math.isnan(option_losses[k]) else option_losses[k])
