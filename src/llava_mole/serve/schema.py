"""Request models and response bodies of the OpenAI-compatible chat API.

Requests are validated with pydantic; unknown fields are ignored (OpenAI clients send fields
this server has no use for). Two extra request fields ask for routing: ``return_routing``
(each answer token's expert per MoLE layer) and ``return_prompt_routing`` (also every prompt
and image token). Errors are :class:`APIError`, rendered as OpenAI's
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llava_mole.eval.decoding import Generation, TokenInfo

__all__ = [
    "APIError",
    "ChatRequest",
    "Message",
    "completion_body",
    "error_body",
    "parse_request",
]


class APIError(Exception):
    """An error answered with an HTTP status and OpenAI's error body.

    Attributes:
        status: HTTP status code.
        message: Human-readable message.
        type: OpenAI error type (``invalid_request_error``, ``server_error``, ...).
        param: The request field at fault, or None.
        code: Machine-readable code, or None.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    """One chat message; ``developer`` is read as ``system``."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    """``POST /v1/chat/completions`` body (the fields this server uses)."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    return_routing: bool = False
    return_prompt_routing: bool = False

    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings as a tuple (at most 4, none empty)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop: up to 4 non-empty strings", param="stop")
        return tuple(stops)


def parse_request(data: Any) -> ChatRequest:
    """Validates a decoded JSON body; a problem is a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if not isinstance(part, int))
        where = where.split(".")[0] if where else None
        location = ".".join(str(part) for part in first["loc"])
        raise APIError(400, f"{location}: {first['msg']}", param=where) from None
    if request.n != 1:
        raise APIError(400, "n: only n=1 is supported", param="n")
    return request


# ---------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def token_json(token: TokenInfo, kind: bool = False) -> dict[str, Any]:
    """One token of a routing record."""
    out: dict[str, Any] = {"id": token.id, "text": token.text, "experts": token.experts}
    if kind:
        out["kind"] = token.kind
    return out


def expert_share(tokens: list[TokenInfo], num_blocks: int, num_experts: int) -> list[list[float]]:
    """Per MoLE layer, the share of `tokens` that went to each expert."""
    share = [[0.0] * num_experts for _ in range(num_blocks)]
    routed = [t.experts for t in tokens if t.experts]
    for experts in routed:
        for block, expert in enumerate(experts):
            share[block][expert] += 1.0 / len(routed)
    return share


def routing_json(
    generation: Generation, num_blocks: int, num_experts: int, prompt: bool
) -> dict[str, Any]:
    """The ``routing`` record of a choice: answer tokens, expert shares, prompt tokens."""
    tokens = generation.tokens or []
    out: dict[str, Any] = {
        "layers": list(range(num_blocks)),
        "num_experts": num_experts,
        "tokens": [token_json(t) for t in tokens],
        "share": expert_share(tokens, num_blocks, num_experts),
    }
    if prompt:
        out["prompt"] = [token_json(t, kind=True) for t in generation.prompt_tokens or []]
    return out


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_reason(reason: str) -> str:
    """OpenAI's finish reason (a row ended because its client left reads as ``stop``)."""
    return "length" if reason == "length" else "stop"


def completion_body(
    model: str,
    generation: Generation,
    prompt_tokens: int,
    routing: dict[str, Any] | None,
) -> dict[str, Any]:
    """A ``chat.completion`` response."""
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": generation.text},
        "finish_reason": finish_reason(generation.finish_reason),
        "logprobs": None,
    }
    if routing is not None:
        choice["routing"] = routing
    return {
        "id": new_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage_json(prompt_tokens, generation.completion_tokens),
    }


def chunk_body(
    chunk_id: str, model: str, created: int, choice: dict[str, Any] | None, usage: Any = None
) -> dict[str, Any]:
    """A ``chat.completion.chunk`` of a stream (``choice`` None: the usage-only chunk)."""
    body: dict[str, Any] = {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [] if choice is None else [choice],
    }
    if usage is not None:
        body["usage"] = usage
    return body
