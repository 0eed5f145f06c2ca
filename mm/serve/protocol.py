"""The OpenAI chat-completions wire format: parsing requests, shaping responses and error bodies."""
from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from functools import cached_property
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


MIN_TEMPERATURE = 1e-3  # below this, sampling is greedy decoding (and 1e-300 would overflow the logits to NaN)
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON can carry lone surrogates ("\\ud800"); no tokenizer takes them


def show(value: Any, limit: int = 40) -> str:
    """A short rendering of a client's value for an error message (never echo a megabyte back)."""
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class RequestRules:
    """What a request may contain, beyond the wire format: set by the server from its model and flags."""

    reserved: tuple[str, ...] = (IMAGE_TOKEN,)  # strings text may not contain: the tokenizer's special tokens
    max_n: int = 16  # choices per request (the server's --max-batch, at most 16)
    max_messages: int = 256  # render_chat's cost grows with the square of the number of turns

    @cached_property
    def reserved_pattern(self) -> re.Pattern:
        tokens = sorted({token for token in self.reserved if token}, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, tokens)) if tokens else "(?!)")


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
    text_chars: int = 0  # characters of text over all messages, to bound the prompt before tokenising it


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {show(value)}", param=name)
    if not low <= value <= high:  # NaN fails this too
        raise bad(f"'{name}' must be between {low} and {high}, got {show(value)}", param=name)
    return value


def _flag(body: dict, name: str, where: str | None = None) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad(f"'{where or name}' must be true or false, got {show(value)}", param=where or name)
    return bool(value)


def _content(role: str, content: Any, where: str, image_urls: list[str], reserved: re.Pattern) -> list[dict[str, Any]]:
    """OpenAI content (a string or a list of parts) -> mm content parts; image URLs collected in order."""
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text = part["text"]
            if _SURROGATE.search(text):
                raise bad(f"{where}.content[{i}]: text is not valid Unicode (a lone surrogate)",
                          param=f"{where}.content")
            if found := reserved.search(text):  # a special token typed in text would forge turns or images
                raise bad(f"{where}.content[{i}]: text may not contain the model's special token {found.group()!r}"
                          + ("; send images as image_url parts" if found.group() == IMAGE_TOKEN else ""),
                          param=f"{where}.content")
            parts.append({"type": "text", "text": text})
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


def parse_chat_request(raw: bytes, rules: RequestRules = RequestRules()) -> ChatRequest:
    """Validate a ``POST /v1/chat/completions`` body; raises APIError(400) naming the bad field."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise bad("the request body is nested too deeply", code="invalid_json") from None
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
    if len(messages) > rules.max_messages:
        raise bad(f"{len(messages)} messages in one request; this server accepts at most {rules.max_messages}",
                  param="messages")
    converted, image_urls, reserved = [], [], rules.reserved_pattern
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object", param=where)
        role = message.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise bad(f"{where}.role must be system, developer, user or assistant, got {show(message.get('role'))}",
                      param=f"{where}.role")
        converted.append({"role": role, "content": _content(role, message.get("content"), where, image_urls, reserved)})
    if converted[-1]["role"] == "assistant":
        raise bad("the last message must not be an assistant message", param="messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad(f"'stream_options' must be an object, got {show(options)}", param="stream_options")
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    return ChatRequest(
        model=model,
        messages=converted,
        image_urls=image_urls,
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", None, 1, 1 << 30, integer=True),
        temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0)) or 1.0,
        n=_number(body, "n", 1, 1, rules.max_n, integer=True),
        stream=_flag(body, "stream"),
        include_usage=_flag(options or {}, "include_usage", "stream_options.include_usage"),
        text_chars=sum(len(part["text"]) for m in converted for part in m["content"] if part["type"] == "text"),
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
