"""OpenAI's shapes: the chat completion request's models, an answer's usage and finish reason, and
:class:`APIError`, an error answered as ``{"error": {"message", "type", "code", "param"}}``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from lavis.serving.engine import Completion


class APIError(Exception):
    """An error answered in OpenAI's shape with HTTP ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None  # accepted, not used: every picture is resized to the encoder's size


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(BaseModel):
    url: str


class VideoPart(BaseModel):
    """A video (vLLM's and Qwen2-VL's servers' form): a ``data:video/…;base64,`` URL, a path or ``file://`` URL."""

    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request; fields this server does not use are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # one model is served, whatever the name
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None


def usage(completion: Completion) -> dict[str, int]:
    """OpenAI's token counts of an answer (the prompt's include the picture tokens)."""
    prompt, generated = completion.prompt_tokens, len(completion.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def finish_reason(completion: Completion, stopped: bool) -> str:
    """OpenAI's ``length`` when the token limit cut the answer, else ``stop``."""
    return "length" if completion.finish_reason == "length" and not stopped else "stop"
