"""The OpenAI chat-completions wire format: parsing requests, shaping responses and error bodies."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from mm.prompt import IMAGE_TOKEN


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "code", "param"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def bad(message: str, code: str = "invalid_value", param: str | None = None) -> APIError:
    return APIError(400, message, code=code, param=param)


@dataclass
class ChatRequest:
    """A validated request; ``messages`` use OpenAI content parts, images still unresolved (``image_urls``)."""

    model: str
    messages: list[dict[str, Any]]  # mm convention: {"role", "content": [{"type": "image"} | {"type": "text"}]}
    image_urls: list[str] = field(default_factory=list)  # in order of appearance
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}", param=name)
    if not low <= value <= high:
        raise bad(f"'{name}' must be between {low} and {high}, got {value}", param=name)
    return value


def _content(role: str, content: Any, where: str, image_urls: list[str]) -> list[dict[str, Any]]:
    """OpenAI content (a string or a list of parts) -> mm content parts; image URLs collected in order."""
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if IMAGE_TOKEN in part["text"]:
                raise bad(f"{where}.content[{i}]: text may not contain the reserved marker {IMAGE_TOKEN!r}; "
                          "send images as image_url parts", param=f"{where}.content")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            if role != "user":
                raise bad(f"{where}: only user messages may carry images", param=f"{where}.content")
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise bad(f"{where}.content[{i}].image_url.url must be a non-empty string", param=f"{where}.content")
            image_urls.append(url)
            parts.append({"type": "image"})
        else:
            raise bad(f"{where}.content[{i}]: unsupported content part (expected type 'text' or 'image_url')",
                      param=f"{where}.content")
    return parts


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Validate a ``POST /v1/chat/completions`` body; raises APIError(400) naming the bad field."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("'model' is required and must be a string", code="missing_required_parameter", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", code="missing_required_parameter", param="messages")
    converted, image_urls = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object", param=where)
        role = {"developer": "system"}.get(message.get("role"), message.get("role"))
        if role not in ("system", "user", "assistant"):
            raise bad(f"{where}.role must be system, developer, user or assistant, got {message.get('role')!r}",
                      param=f"{where}.role")
        converted.append({"role": role, "content": _content(role, message.get("content"), where, image_urls)})
    if converted[-1]["role"] == "assistant":
        raise bad("the last message must not be an assistant message", param="messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    options = body.get("stream_options") or {}
    return ChatRequest(
        model=model,
        messages=converted,
        image_urls=image_urls,
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", None, 1, 1 << 30, integer=True),
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0)) or 1.0,
        n=_number(body, "n", 1, 1, 16, integer=True),
        stream=bool(body.get("stream", False)),
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
    )


# ----- responses ----------------------------------------------------------------------------------------------
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(cid: str, model: str, texts: list[str], reasons: list[str], prompt_tokens: int,
               completion_tokens: int) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
             "logprobs": None}
            for i, (text, reason) in enumerate(zip(texts, reasons))
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk(cid: str, model: str, created: int, choices: list[dict[str, Any]], extra: dict | None = None) -> str:
    """One server-sent event carrying a ``chat.completion.chunk``."""
    payload = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": choices, **(extra or {})}
    return f"data: {json.dumps(payload)}\n\n"
