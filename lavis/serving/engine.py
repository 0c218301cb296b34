"""Serving one model to many callers: the engine behind the web demo and the API.

Callers :meth:`ChatEngine.submit` conversations from any thread; one worker thread owns the model.
It takes the waiting requests (up to ``max_batch_size`` that share their sampling settings),
generates them as one left-padded batch with the model's batched generation, and hands every new
token to its request as it is generated, so each caller reads its answer as a stream
(:meth:`Completion.stream`) or whole (:meth:`Completion.result`). ``max_batch_size=1`` serves one
request at a time (batching off).

    engine = ChatEngine(model)
    completion = engine.submit([{"role": "user", "content": "Picture 1: <img>cat.png</img>\\nWhat is it?"}])
    for piece in completion.stream():
        print(piece, end="")
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from lavis.models.chat import encode_chat
from lavis.models.generation import left_pad
from lavis.processors.native_image import cat_images

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingOptions:
    """How one answer is generated: greedy, or sampled with ``temperature`` and nucleus ``top_p``."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share a batch (one generation config per batch)."""
        return (True, self.temperature, self.top_p) if self.do_sample else (False,)


class Completion:
    """One request in flight: its answer arrives piece by piece. ``finish_reason`` is ``stop`` (the
    model ended its turn), ``length`` (``max_new_tokens`` reached) or ``cancelled``."""

    def __init__(self, input_ids: list[int], pixels: torch.Tensor, options: SamplingOptions) -> None:
        self.input_ids = input_ids
        self.pixels = pixels
        self.options = options
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()
        self._pieces: queue.Queue[str | None] = queue.Queue()
        self._done = threading.Event()
        self._cancelled = threading.Event()

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating for this request (e.g. its client went away); what was generated stays."""
        self._cancelled.set()

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        """The answer's text as it is generated, piece by piece; raises the generation's error, if any."""
        while True:
            piece = self._pieces.get(timeout=timeout)
            if piece is None:
                break
            yield piece
        if self.error is not None:
            raise self.error

    def result(self, timeout: float | None = None) -> str:
        """The whole answer, once generated."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"no answer within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.text

    # ---- called by the engine's worker
    def _emit(self, text: str) -> None:
        if text != self.text:
            self._pieces.put(text[len(self.text):])
            self.text = text

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if not self._done.is_set():
            self.finish_reason, self.error = reason, error
            self._pieces.put(None)
            self._done.set()


@dataclass
class _Batch:
    """The rows of one generation: each new token goes to its row's completion until the row ends."""

    completions: list[Completion]
    stop_ids: frozenset[int]
    decode: Callable[[list[int]], str]
    finished: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.finished = [False] * len(self.completions)

    def put(self, value: torch.Tensor) -> None:  # transformers' streamer protocol
        if value.dim() != 1:  # the prompt, handed over before the first step
            return
        for row, (completion, token) in enumerate(zip(self.completions, value.tolist())):
            if self.finished[row]:
                continue
            if completion._cancelled.is_set():
                self._end(row, "cancelled")
            elif token in self.stop_ids:
                self._end(row, "stop")
            else:
                completion.tokens.append(token)
                text = self.decode(completion.tokens)
                if not text.endswith("\ufffd"):  # a character cut between tokens waits for its end
                    completion._emit(text)
                if len(completion.tokens) >= completion.options.max_new_tokens:
                    self._end(row, "length")

    def end(self) -> None:
        for row in range(len(self.completions)):
            self._end(row, "length")

    def _end(self, row: int, reason: str) -> None:
        if not self.finished[row]:
            self.finished[row] = True
            completion = self.completions[row]
            completion._emit(self.decode(completion.tokens))
            completion._finish(reason)

    @property
    def all_finished(self) -> bool:
        return all(self.finished)


class _StopWhenAllFinished(StoppingCriteria):
    """A stopping criterion: the batch ends once every row has ended (its own limit, or cancelled)."""

    def __init__(self, batch: _Batch) -> None:
        self.batch = batch

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.batch.all_finished, dtype=torch.bool, device=input_ids.device)


class ChatEngine:
    """Queues, batches and streams chat requests to one model (see the module notes).

    ``model``: a model with processors attached (:func:`lavis.load_model`). ``max_batch_size``: the
    most requests generated together (1: batching off). ``batch_window_s``: how long the worker
    waits, after a request arrives, for others to join its batch. ``read_image_files``: whether an
    ``<img>path</img>`` without its picture in :meth:`submit`'s ``images`` is read from disk (False for
    a server, whose pictures all come with the request: then such a span is a ValueError).

    Every message's text is encoded as Qwen-VL's chat does (:func:`lavis.models.chat.encode_chat`):
    ``<|im_start|>``, ``<|im_end|>`` and ``<|endoftext|>`` written by a caller are plain text.
    """

    def __init__(self, model, max_batch_size: int = 8, batch_window_s: float = 0.01,
                 read_image_files: bool = True) -> None:
        if model.processors is None:
            raise ValueError("the model has no processors attached: load it with lavis.load_model")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = model.processors.tokenizer
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.read_image_files = read_image_files
        config = getattr(model.llm, "config", None)
        self.max_length: int | None = getattr(config, "max_position_embeddings", None)
        self._waiting: deque[Completion] = deque()
        self._arrived = threading.Condition()
        self._closed = False
        self.batch_sizes: list[int] = []  # of every batch generated (for benchmarks and tests)
        self._worker = threading.Thread(target=self._serve, name="lavis-chat-engine", daemon=True)
        self._worker.start()

    def submit(
        self,
        messages: list[dict[str, str]],
        options: SamplingOptions | None = None,
        images: Mapping[str, Image.Image] | None = None,
    ) -> Completion:
        """Queue one conversation (ChatML ``messages``, ``<img>path</img>`` where images go; ``images``:
        pictures in memory by the path their ``<img>`` names). Bad input fails here, before queueing:
        ValueError (text, length), FileNotFoundError (an image)."""
        options = options or SamplingOptions()
        input_ids, pixels = encode_chat(self.model, messages, images=images, read_files=self.read_image_files)
        if self.max_length is not None and len(input_ids) + options.max_new_tokens > self.max_length:
            raise ValueError(f"the conversation ({len(input_ids)} tokens) and max_new_tokens ({options.max_new_tokens}) "
                             f"exceed the model's {self.max_length} positions")
        completion = Completion(input_ids, pixels, options)
        with self._arrived:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._waiting.append(completion)
            self._arrived.notify()
        return completion

    def close(self) -> None:
        """Finish the batch in progress, cancel what waits, stop the worker."""
        with self._arrived:
            self._closed = True
            self._arrived.notify()
        self._worker.join(timeout=60)
        while self._waiting:
            self._waiting.popleft()._finish("cancelled")

    # ------------------------------------------------------------------ the worker

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._generate(batch)
            except Exception as err:  # noqa: BLE001 -- the callers get the error; the engine keeps serving
                log.exception("generation failed for a batch of %d", len(batch))
                for completion in batch:
                    completion._finish("error", err)

    def _next_batch(self) -> list[Completion] | None:
        """The oldest waiting request and those waiting with the same sampling settings (after
        ``batch_window_s``, so that requests arriving together share a batch); None once closed."""
        with self._arrived:
            while not self._waiting and not self._closed:
                self._arrived.wait()
            if self._closed:
                return None
            if self.max_batch_size > 1:
                deadline = time.perf_counter() + self.batch_window_s
                while len(self._waiting) < self.max_batch_size and (left := deadline - time.perf_counter()) > 0:
                    self._arrived.wait(left)
            first = self._waiting.popleft()
            batch = [first]
            for completion in list(self._waiting):
                if len(batch) == self.max_batch_size:
                    break
                if completion.options.batch_key == first.options.batch_key:
                    self._waiting.remove(completion)
                    batch.append(completion)
        for completion in batch:
            if completion._cancelled.is_set():
                completion._finish("cancelled")
        return [c for c in batch if not c.done]

    def _generate(self, completions: list[Completion]) -> None:
        if not completions:
            return
        options = completions[0].options
        tokenizer = self.tokenizer
        batch = _Batch(completions, frozenset(tokenizer.stop_ids), tokenizer.decode)
        input_ids, attention_mask = left_pad([c.input_ids for c in completions], tokenizer.pad_id)
        self.batch_sizes.append(len(completions))
        with torch.no_grad():
            self.model.generate(
                input_ids,
                attention_mask,
                cat_images([c.pixels for c in completions]),
                max_new_tokens=max(c.options.max_new_tokens for c in completions),
                do_sample=options.do_sample,
                temperature=options.temperature,
                top_p=options.top_p,
                stop_ids=tokenizer.stop_ids,
                pad_id=tokenizer.pad_id,
                suppress_ids=tokenizer.image_span_ids,
                streamer=batch,
                stopping_criteria=StoppingCriteriaList([_StopWhenAllFinished(batch)]),
            )
        batch.end()
