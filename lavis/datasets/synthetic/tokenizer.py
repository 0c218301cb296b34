"""The embedded default tokenizer: a small byte-level BPE in Qwen's style.

* pre-tokenisation: Qwen's regex (cl100k with single digits), then byte-level
  mapping, so any UTF-8 text (e.g. Chinese) encodes and decodes losslessly;
* 1024 trained tokens (the 256-byte alphabet + merges learnt from a corpus
  generated from the synthetic world's templates and a few English sentences);
* then the special tokens of ``SPECIAL_TOKENS``, ids 1024.. in that order.

The special tokens, the pattern and the file's path live in :mod:`lavis.processors.tokenizer`.
``python -m lavis.datasets.synthetic.tokenizer`` rewrites the shipped file
``lavis/assets/tokenizer/tokenizer.json`` (``EMBEDDED_TOKENIZER_PATH``), which
loads with ``tokenizers.Tokenizer.from_file`` and
``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lavis.processors.tokenizer import EMBEDDED_TOKENIZER_PATH, QWEN_PATTERN, SPECIAL_TOKENS

from . import world

VOCAB_SIZE = 1024  # trained part, including the 256-byte alphabet
CORPUS_SEED = 1234  # world seed of the tokenizer's training corpus
CORPUS_SCENES = 600  # scenes per split used for the corpus

SYSTEM_PROMPT = "You are a helpful assistant."
STAGE_PROMPTS: tuple[str, ...] = (
    "Generate the caption in English:",
    "Generate the caption in English with grounding:",
    " Answer:",
    "OCR with grounding:",
    "Describe the image in English:",
)
# Plain English for the text-only data and general robustness.
ENGLISH: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "A picture is worth a thousand words, but a good question is worth more.",
    "Please answer the question with a single word or a short phrase.",
    "There are three kinds of shapes in this world: circles, squares and triangles.",
    "Each image shows one or two objects on a plain light background.",
    "Colours such as red, green, blue, yellow, purple and orange are easy to tell apart.",
    "Mixing two primary colours gives a secondary colour.",
    "The sun rises in the east and sets in the west.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She opened the window, looked at the garden and smiled.",
    "We trained a small vision language model on synthetic data.",
    "The model reads the text, looks at the picture and writes an answer.",
    "Numbers are written digit by digit, for example 2024 or 3.14159.",
    "Thank you! I am happy to help. What else would you like to know?",
    "I'm sure it's fine; we'll see what they've done and what you'd like.",
    "Yes, that is correct. No, that is not right. Maybe, it depends.",
    "The cat is sitting on the mat next to a small table.",
    "A train arrived at the station in the morning, and people got off.",
    "He wrote a letter to his friend about the weather and the city.",
    "Children like to play with balls, boxes, toys and coloured blocks.",
    "The left side of the image is darker than the right side.",
    "Look at the top, the bottom, the middle and the corners of the picture.",
    "Questions about position: above, below, next to, between, inside, outside.",
    "The first picture and the second picture show different things.",
    "This is a simple example, but it shows the main idea clearly.",
    "Read the following text and answer: what is the main topic?",
    "Large language models predict the next token given the previous tokens.",
    "Images are split into patches; each patch becomes a visual token.",
    "The bounding box covers the whole object from its top left corner to its bottom right corner.",
    "Find the object, then draw a box around it.",
    "What is in the image? How many are there? Which one is bigger?",
    "Today is a good day to learn something new about the world.",
    "My family visited the mountains last summer and walked along the river every evening.",
    "The teacher explained the lesson slowly so that every student could understand it.",
    "Fresh bread, cheese, apples and milk were on the kitchen table for breakfast.",
    "Doctors recommend drinking enough water, sleeping well and exercising regularly.",
    "The computer program finished its work quickly and printed the results.",
    "Birds were singing in the trees while the wind moved the leaves gently.",
    "Could you tell me how to get to the library? It is near the old bridge.",
    "The ocean is very deep, and many animals live far below its surface.",
    "After dinner we played cards, listened to music and talked about our plans.",
    "Scientists measure temperature, pressure, distance, weight and time carefully.",
    "The history of art includes painting, sculpture, music, poetry and dance.",
    "If it rains tomorrow, the football match will be moved to Sunday afternoon.",
    "Please write your name, address and phone number at the bottom of the form.",
    "Learning a language takes practice: reading, writing, speaking and listening.",
    "The bus was late again, so she decided to ride her bicycle to work instead.",
    "A healthy garden needs sunlight, good soil, water and a little patience.",
    "Our company builds software for hospitals, schools, banks and small shops.",
    "The children laughed when the little dog chased its own tail around the room.",
    "Winter is cold, spring is warm, summer is hot and autumn is cool.",
    "He carefully checked every answer before giving the paper to the teacher.",
    "Mountains, rivers, forests, deserts and islands are parts of the landscape.",
    "The museum opens at nine o'clock and closes at five o'clock in the evening.",
    "Good friends listen to each other, share their stories and help when needed.",
    "The engine started with a loud noise, and the car slowly moved forward.",
    "Every country has its own flag, language, food, music and traditions.",
    "The story ends happily: the king returns home and everyone celebrates together.",
    "Research shows that simple rules often explain surprisingly complex behaviour.",
    "Open the door, turn on the light and put the heavy bag on the floor.",
    "The phone rang twice, but nobody answered because everyone was asleep.",
    "Students should always bring a pencil, paper and their notebook to class.",
)


def _chatml(record: dict) -> str:
    parts = [f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"]
    for turn in record["conversations"]:
        role = "user" if turn["from"] in ("user", "human") else "assistant"
        parts.append(f"<|im_start|>{role}\n{turn['value']}<|im_end|>\n")
    return "".join(parts)


_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def corpus() -> Iterator[str]:
    """Deterministic training text; special tokens are removed (they are never merged into)."""
    texts: list[str] = list(ENGLISH) + list(STAGE_PROMPTS) + ["Picture 1: ", "Picture 2: ", SYSTEM_PROMPT]
    for split in world.SPLITS:
        scenes = world.generate_scenes(CORPUS_SEED, CORPUS_SCENES, split)
        for rec in world.build_sft_records(scenes, CORPUS_SEED, split):
            texts.append(_chatml(rec))
        for rec in world.build_llava_records(scenes, CORPUS_SEED, split):
            texts.append(_chatml(rec))
        for scene in scenes[:100]:  # pretraining-style prompts
            caption = world.describe(scene)
            texts.append(f"{STAGE_PROMPTS[0]}{caption}<|endoftext|>")
            grounded = " and ".join(
                f"{world.grounding_text(o, scene.width, scene.height)} {world.position_phrase(o.position)}"
                for o in scene.objects
            )
            texts.append(f"{STAGE_PROMPTS[1]}{grounded}<|endoftext|>")
            texts.append(f"{STAGE_PROMPTS[4]}{caption}")
            texts.append(f"Question: What colour is the {scene.objects[0].shape}?{STAGE_PROMPTS[2]}")
    for text in texts:
        for piece in _SPECIAL_RE.split(text):
            if piece:
                yield piece


def build_tokenizer() -> Tokenizer:
    """Train the embedded byte-level BPE (deterministic) and add the special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def main() -> None:
    """Rebuild and write the shipped tokenizer file."""
    tok = build_tokenizer()
    EMBEDDED_TOKENIZER_PATH.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(EMBEDDED_TOKENIZER_PATH), pretty=True)
    print(f"wrote {EMBEDDED_TOKENIZER_PATH} (vocab {tok.get_vocab_size()})")


if __name__ == "__main__":
    main()
