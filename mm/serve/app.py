"""The FastAPI app: OpenAI-compatible ``/v1/chat/completions`` and ``/v1/models``, ``/health``, the web demo."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from mm.errors import MMError
from mm.prompt import IMAGE_TOKEN
from mm.serve.engine import Engine, Job, QueueFull
from mm.serve.images import load_images
from mm.serve.protocol import (APIError, RequestRules, bad, chunk, completion, completion_id, parse_chat_request, show,
                               usage)
from mm.serve.remote import RemotePolicy

log = logging.getLogger("mm.serve")
access_log = logging.getLogger("mm.serve.access")


class AccessLog:
    """One line per request on ``mm.serve.access`` once its response has ended (a stream at its last byte):
    client, method, path (no query, no body), status, duration. A request that ended without a response (the
    client left) logs status ``-``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status: list = ["-"]

        async def observe(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        except BaseException:
            if status[0] == "-":
                status[0] = 500
            raise
        finally:
            client = scope.get("client") or ("-", 0)
            access_log.info('%s:%s "%s %s" %s %.1f ms', client[0], client[1], scope["method"], scope["path"],
                            status[0], (time.perf_counter() - start) * 1000)


def _default_access_handler() -> None:
    """Access lines to stderr unless the process configured the logger (or the root logger) itself."""
    if access_log.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False


@dataclass
class ServeSettings:
    model_name: str
    api_key: str | None = None
    max_batch: int = 8  # rows (requests x n) generated together
    max_queue: int = 64  # requests waiting for the model; more get 429
    batch_wait: float = 0.005  # seconds the worker waits for more requests before starting a batch
    max_images: int = 4  # per request
    max_image_bytes: int = 20 * 2**20  # per image, encoded
    max_pixels: int = 64_000_000  # decoded pixels of all of a request's images together
    max_messages: int = 256  # per request
    default_max_tokens: int = 256  # when a request sets no max_tokens
    allow_remote_images: bool = False  # fetch http(s) image URLs (public addresses only)
    allow_remote_addresses: tuple[str, ...] = ()  # ADDR[:PORT] or networks fetched from even when not public
    remote_deadline: float = 10.0  # seconds per remote image, redirects included
    ui: bool = False  # serve the web demo at /
    compile: bool = False  # torch.compile greedy decoding, compiled before the server starts
    model_path: str | None = None  # the served directory; /health and the demo show its name, never the path

    @property
    def max_body_bytes(self) -> int:
        return self.max_images * self.max_image_bytes * 4 // 3 + 2**20


def _error(exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    if exc.status == 413:  # the body may be unread: close rather than drain it
        headers["Connection"] = "close"
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def context_length(model) -> int:
    return int(getattr(model.llm.config, "max_position_embeddings", 0) or model.tokenizer.model_max_length)


def special_tokens(tokenizer) -> tuple[str, ...]:
    """Strings that tokenise to control tokens (turn markers, ``<image>``): client text may not contain them."""
    added = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    return tuple(sorted({IMAGE_TOKEN, *tokenizer.all_special_tokens, *added}))


def longest_token(tokenizer) -> int:
    """Characters of the longest vocabulary entry: a text over ``context x this`` characters cannot fit."""
    return max(len(token) for token in tokenizer.get_vocab())


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) once it passes ``limit`` bytes: by its Content-Length, or while it streams in."""
    too_large = APIError(413, f"request body over {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for piece in request.stream():  # chunked bodies declare no length
        body += piece
        if len(body) > limit:
            raise too_large
    return bytes(body)


def create_app(model, settings: ServeSettings) -> FastAPI:
    """An app serving ``model``; its engine thread starts now and stops when the app shuts down."""
    engine = Engine(model, settings.max_batch, settings.max_queue, settings.batch_wait, settings.compile)
    limit = context_length(model)
    max_chars = limit * longest_token(model.tokenizer)
    rules = RequestRules(reserved=special_tokens(model.tokenizer), max_n=min(16, settings.max_batch),
                         max_messages=settings.max_messages)
    remote = (RemotePolicy(settings.allow_remote_addresses, settings.remote_deadline)
              if settings.allow_remote_images else None)
    keep_side = max(1024, 2 * model.encoder.image_size)  # decoded images wait for the model at most this big

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(engine.close)

    app = FastAPI(title="mm serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    directory = Path(settings.model_path).resolve().name if settings.model_path else None

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return _error(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return _error(APIError(exc.status_code, str(exc.detail), code=kind))

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):  # the detail goes to the log, not to the client
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(APIError(500, "internal server error", type="server_error"))

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if settings.api_key and request.url.path.startswith("/v1"):
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip(), settings.api_key):
                return _error(APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                       code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "model_dir": directory, "max_batch": engine.max_batch,
                "max_queue": engine.max_queue, **engine.snapshot()}

    def model_card():
        return {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "mm", "root": directory}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name != settings.model_name:
            raise APIError(404, f"model {name!r} not found", code="model_not_found", param="model")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse_chat_request(await read_body(request, settings.max_body_bytes), rules)
        if req.model != settings.model_name:
            raise APIError(404, f"model {show(req.model)} not found; this server serves {settings.model_name!r}",
                           code="model_not_found", param="model")
        if len(req.image_urls) > settings.max_images:
            raise bad(f"{len(req.image_urls)} images in one request; this server accepts at most "
                      f"{settings.max_images}", code="too_many_images", param="messages")
        if req.text_chars > max_chars:  # before tokenising: a 95 MB text once took the server down
            raise bad(f"the messages hold {req.text_chars} characters of text, more than this model's context of "
                      f"{limit} tokens can take", code="context_length_exceeded", param="messages")
        # the images first: a tiling layout (mm.layouts) gives each image a token count that depends on its size
        images = await load_images(req.image_urls, settings.max_image_bytes, settings.max_pixels, keep_side, remote)
        try:
            laid_out = await run_in_threadpool(model.layout_images, images) if images else []
            prompt_tokens = len((await run_in_threadpool(model.tokenize, req.messages, True, True, laid_out))[0])
        except MMError as exc:
            raise bad(str(exc), param="messages") from None
        except TemplateError as exc:  # e.g. "roles must alternate user/assistant"
            raise bad(f"the model's chat template refused these messages: {exc}", param="messages") from None
        max_tokens = req.max_tokens or max(1, min(settings.default_max_tokens, limit - prompt_tokens))
        if prompt_tokens + max_tokens > limit:
            raise bad(f"this model's context is {limit} tokens; the messages take {prompt_tokens} (images included) "
                      f"and max_tokens asks for {max_tokens} more", code="context_length_exceeded", param="messages")

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening any more
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(conversation=(req.messages, images), max_tokens=max_tokens, emit=emit, n=req.n,
                  temperature=req.temperature, top_p=req.top_p, prompt_tokens=prompt_tokens)
        try:
            engine.submit(job)
        except QueueFull as exc:
            raise APIError(429, str(exc), code="queue_full", type="rate_limit_error") from None
        cid = completion_id()
        if req.stream:
            return StreamingResponse(_stream(job, events, cid, settings.model_name, req.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _collect(request, job, events, cid, settings.model_name)

    if settings.ui:
        page = resources.files("mm.serve").joinpath("static/index.html").read_text()

        @app.get("/", response_class=HTMLResponse)
        async def index():
            return page

    _default_access_handler()
    app.add_middleware(AccessLog)  # outermost of ours: it times the whole request, refusals included
    return app


async def _stream(job: Job, events: asyncio.Queue, cid: str, model_name: str, include_usage: bool):
    """Server-sent events, token by token; leaving early (a client disconnect) cancels the job's rows."""
    created = int(time.time())
    try:
        yield chunk(cid, model_name, created, [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
            for i in range(job.n)
        ])
        finished = tokens = 0
        while finished < job.n:
            event = await events.get()
            if event[0] == "delta":
                choice = {"index": event[1], "delta": {"content": event[2]}, "finish_reason": None, "logprobs": None}
            elif event[0] == "finish":
                finished += 1
                tokens += event[3]
                choice = {"index": event[1], "delta": {}, "finish_reason": event[2], "logprobs": None}
            else:
                yield "data: " + json.dumps(APIError(500, event[1], type="server_error").body()) + "\n\n"
                return
            yield chunk(cid, model_name, created, [choice])
        if include_usage:
            yield chunk(cid, model_name, created, [], {"usage": usage(job.prompt_tokens, tokens)})
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()


async def _collect(request: Request, job: Job, events: asyncio.Queue, cid: str, model_name: str) -> JSONResponse:
    texts, reasons = [""] * job.n, ["length"] * job.n
    finished = tokens = 0
    try:
        while finished < job.n:
            try:
                event = await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)
                continue
            if event[0] == "delta":
                texts[event[1]] += event[2]
            elif event[0] == "finish":
                reasons[event[1]] = event[2]
                finished += 1
                tokens += event[3]
            else:
                raise APIError(500, event[1], type="server_error")
    finally:
        job.cancelled.set()
    return JSONResponse(completion(cid, model_name, texts, reasons, job.prompt_tokens, tokens))
