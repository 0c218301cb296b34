"""An answer as generated: the text cut at a stop string, the generation cancelled when the text ends
early or the client goes away, and OpenAI's server-sent ``chat.completion.chunk`` events."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from lavis.serving.api.schema import APIError, finish_reason, usage
from lavis.serving.engine import Completion

log = logging.getLogger(__name__)


class StopMatcher:
    """Cuts streamed text before the first ``stop`` string: :meth:`feed` returns what can be sent and
    holds back a tail that may be the start of a stop string; ``hit`` once one is found."""

    def __init__(self, stop: list[str]) -> None:
        self.stop = stop
        self.pending = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        if self.hit:
            return ""
        text = self.pending + piece
        starts = [i for s in self.stop if (i := text.find(s)) >= 0]
        if starts:
            self.hit, self.pending = True, ""
            return text[: min(starts)]
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - held:]
        return text[: len(text) - held]

    def flush(self) -> str:
        """What is held back, once the text has ended without a stop string."""
        rest, self.pending = self.pending, ""
        return rest


async def next_in_thread(pieces: Any) -> str | None:
    """The next of a blocking iterator's items, waited for in a worker thread (None at its end)."""
    return await anyio.to_thread.run_sync(next, pieces, None, abandon_on_cancel=True)


async def answer_pieces(completion: Completion, stop: StopMatcher) -> AsyncIterator[str]:
    """The answer's text as generated, cut at a stop string; the generation is cancelled when the
    text ends early (a stop string) or the consumer goes away (a streaming client disconnected)."""
    pieces = completion.stream()
    try:
        while not stop.hit and (piece := await next_in_thread(pieces)) is not None:
            if text := stop.feed(piece):
                yield text
        if rest := stop.flush():
            yield rest
    finally:
        if not completion.done:
            completion.cancel()
            log.debug("completion cancelled after %d tokens (%s)", len(completion.tokens),
                      "stop string" if stop.hit else "client went away")


def sse(data: Mapping[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


@dataclass(frozen=True)
class ChunkMaker:
    """``chat.completion.chunk`` objects of one streamed answer."""

    id: str
    created: int
    model: str

    def __call__(self, delta: dict[str, str], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


async def stream_events(completion: Completion, stop: StopMatcher, chunk: ChunkMaker,
                        include_usage: bool) -> AsyncIterator[str]:
    """An answer as OpenAI's server-sent events: a role delta, content deltas, a chunk with the finish
    reason (then one with the usage, when asked), ``[DONE]``; a failed generation ends with an error event."""
    extra = {"usage": None} if include_usage else {}
    yield sse(chunk({"role": "assistant", "content": ""}, **extra))
    try:
        async for text in answer_pieces(completion, stop):
            yield sse(chunk({"content": text}, **extra))
    except Exception as err:  # noqa: BLE001 -- the generation's own error, logged by the engine
        yield sse(APIError(500, f"generation failed: {err}", type="server_error").body())
        return
    yield sse(chunk({}, finish_reason(completion, stop.hit), **extra))
    if include_usage:
        yield sse({**chunk({}), "choices": [], "usage": usage(completion)})
    yield sse("[DONE]")
    log_answer(chunk.id, completion, stop)


def log_answer(answer_id: str, completion: Completion, stop: StopMatcher) -> None:
    log.debug("%s: %d prompt + %d completion tokens, finish %s, %.2f s after submission", answer_id,
              completion.prompt_tokens, len(completion.tokens), finish_reason(completion, stop.hit),
              time.perf_counter() - completion.submitted)
