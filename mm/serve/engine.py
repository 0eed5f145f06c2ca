"""The batching engine: one worker thread owns the model and runs waiting requests together.

Requests wait in a bounded queue (full -> ``QueueFull``, the HTTP layer answers 429). The worker takes the
oldest request, then every waiting request with the same sampling settings, up to ``max_batch`` rows (a request
with ``n`` choices is ``n`` rows), and runs them in one ``MultimodalModel.generate_batch`` call. A
``FanOutStreamer`` receives the ``[B]`` new tokens of each decoding step and sends each row's text to its own
request; ``RowStopper`` ends a row when its request's ``max_tokens`` is reached or its client went away, and
the whole batch stops once every row has ended.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from mm.model import Conversation

Event = tuple  # ("delta", index, text) | ("finish", index, reason, tokens) | ("error", message)
log = logging.getLogger("mm.serve")


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests already."""


@dataclass(eq=False)
class Job:
    """One chat request: ``n`` rows of the same conversation with the same sampling settings."""

    conversation: Conversation
    max_tokens: int
    emit: Callable[[Event], None]  # thread-safe: hands an event to the request's handler
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    prompt_tokens: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def sampling_key(self) -> tuple[float, float]:
        """Requests with equal keys can share a ``generate`` call."""
        return (0.0, 1.0) if self.temperature <= 0 else (self.temperature, self.top_p)


class BatchRows:
    """Per-row bookkeeping of one running batch, shared by the streamer and the stopping criterion."""

    def __init__(self, jobs: list[Job], tokenizer, on_job_done: Callable[[Job, str], None]):
        self.rows = [(job, index) for job in jobs for index in range(job.n)]  # row -> (job, choice index)
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.tokens: list[list[int]] = [[] for _ in self.rows]
        self.sent: list[str] = ["" for _ in self.rows]
        self.finished = [False] * len(self.rows)
        self.remaining = {job: job.n for job in jobs}
        self.on_job_done = on_job_done
        self.generated = 0

    def should_stop(self, row: int, generated: int) -> bool:
        job, _ = self.rows[row]
        return self.finished[row] or job.cancelled.is_set() or generated >= job.max_tokens

    def _text(self, row: int) -> str:
        return self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)

    def add(self, row: int, token: int) -> None:
        if self.finished[row]:
            return
        job, index = self.rows[row]
        if job.cancelled.is_set():
            return self.finish(row, "cancelled")
        if token == self.eos:
            return self.finish(row, "stop")
        self.tokens[row].append(token)
        self.generated += 1
        text = self._text(row)
        if not text.endswith("\ufffd"):  # hold back a partial UTF-8 character until it completes
            delta, self.sent[row] = text[len(self.sent[row]) :], text
            if delta:
                job.emit(("delta", index, delta))
        if len(self.tokens[row]) >= job.max_tokens:
            self.finish(row, "length")

    def finish(self, row: int, reason: str) -> None:
        if self.finished[row]:
            return
        self.finished[row] = True
        job, index = self.rows[row]
        text = self._text(row)
        if text != self.sent[row] and text.startswith(self.sent[row]):
            job.emit(("delta", index, text[len(self.sent[row]) :]))
        self.remaining[job] -= 1
        if self.remaining[job] == 0:  # bookkeeping first, so /health agrees with what the client just got
            self.on_job_done(job, reason)
        job.emit(("finish", index, reason, len(self.tokens[row])))

    def finish_all(self, reason: str) -> None:
        """Finish every open row with ``reason``; a row whose client left is finished as ``cancelled`` (the
        stopping criterion may see the disconnect after the row's last token was already added)."""
        for row, (job, _) in enumerate(self.rows):
            self.finish(row, "cancelled" if job.cancelled.is_set() else reason)


class FanOutStreamer(BaseStreamer):
    """A transformers streamer for batches: each ``put`` after the prompt carries ``[B]`` new tokens."""

    def __init__(self, rows: BatchRows):
        self.rows = rows
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first puts the prompt ids (empty when it starts from embeddings)
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            self.rows.add(row, int(token))

    def end(self) -> None:
        self.rows.finish_all("length")


class RowStopper(StoppingCriteria):
    """Per-row stop: the request's ``max_tokens`` reached, or its client disconnected."""

    def __init__(self, rows: BatchRows):
        self.rows = rows
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.start is None:  # first call comes after the first new token
            self.start = input_ids.shape[1] - 1
        generated = input_ids.shape[1] - self.start
        done = [self.rows.should_stop(row, generated) for row in range(len(self.rows.rows))]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Engine:
    """Owns the model on one worker thread; ``submit`` jobs from any thread."""

    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, batch_wait: float = 0.005,
                 compile: bool = False):
        self.model = model
        self.compile = compile
        if compile:
            self.warm_up()
        self.max_batch = max(1, max_batch)
        self.max_queue = max(1, max_queue)
        self.batch_wait = batch_wait
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._current: BatchRows | None = None  # the running batch
        self.stats: dict[str, Any] = dict(
            running=0, completed=0, cancelled=0, rejected=0, batches=0, largest_batch=0, generated_tokens=0
        )
        self._thread = threading.Thread(target=self._loop, name="mm-serve-engine", daemon=True)
        self._thread.start()

    def warm_up(self) -> None:
        """Compile the greedy path before serving: one row, then two rows of another length (the recompilation
        with dynamic sizes), so no request waits for the compiler."""
        from PIL import Image

        size = getattr(self.model.encoder, "image_size", 224)
        image = Image.new("RGB", (size, size), (127, 127, 127))

        def ask(text: str) -> Conversation:
            return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}], [image]

        self.model.generate_batch([ask("hi")], max_new_tokens=2, compile=True)
        self.model.generate_batch([ask("hello there"), ask("a longer question about it")], max_new_tokens=3,
                                  compile=True)

    # ----- submitting ---------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:  # drop requests whose clients left before refusing
                for gone in [j for j in self._waiting if j.cancelled.is_set()]:
                    self._waiting.remove(gone)
                    self.stats["cancelled"] += 1
            if len(self._waiting) >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(f"the server queue is full ({self.max_queue} waiting requests); retry later")
            self._waiting.append(job)
            self._cond.notify()

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            live = self._current.generated if self._current is not None else 0
            return {"queued": len(self._waiting), **self.stats,
                    "generated_tokens": self.stats["generated_tokens"] + live}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for job in self._waiting:
                job.emit(("error", "the server is shutting down"))
            self._waiting.clear()
            if self._current is not None:  # stop the running batch at its next step
                for job, _ in self._current.rows:
                    job.cancelled.set()
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # ----- the worker ---------------------------------------------------------------------------------------
    def _take_batch(self) -> list[Job]:
        """Block for the oldest live job, then add compatible waiting ones up to ``max_batch`` rows."""
        with self._cond:
            while True:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return []
                first = self._waiting.popleft()
                if first.cancelled.is_set():
                    self.stats["cancelled"] += 1
                    continue
                break
            batch, rows = [first], first.n
            deadline = time.monotonic() + self.batch_wait
            while rows < self.max_batch:
                for job in list(self._waiting):
                    if job.cancelled.is_set():
                        self._waiting.remove(job)
                        self.stats["cancelled"] += 1
                    elif job.sampling_key == first.sampling_key and rows + job.n <= self.max_batch:
                        self._waiting.remove(job)
                        batch.append(job)
                        rows += job.n
                left = deadline - time.monotonic()
                if rows >= self.max_batch or left <= 0 or self._closed:
                    break
                self._cond.wait(timeout=left)
            self.stats["running"] = len(batch)
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], rows)
            return batch

    def _job_done(self, job: Job, reason: str) -> None:
        with self._cond:
            self.stats["running"] -= 1
            self.stats["cancelled" if reason == "cancelled" else "completed"] += 1

    def _loop(self) -> None:
        while True:
            jobs = self._take_batch()
            if not jobs:
                return
            rows = BatchRows(jobs, self.model.tokenizer, self._job_done)
            with self._cond:
                self._current = rows
            try:
                self.model.generate_batch(
                    [job.conversation for job in jobs for _ in range(job.n)],
                    streamer=FanOutStreamer(rows),
                    stopping_criteria=StoppingCriteriaList([RowStopper(rows)]),
                    max_new_tokens=max(job.max_tokens for job in jobs),
                    temperature=jobs[0].temperature,
                    top_p=jobs[0].top_p,
                    compile=self.compile,
                )
            except Exception:  # noqa: BLE001 - the batch's requests learn of it, the log why; the server lives on
                log.exception("generation failed for a batch of %d requests", len(jobs))
                for job in jobs:
                    job.emit(("error", "generation failed (the server log has the details)"))
                rows.finished = [True] * len(rows.rows)  # the error ends them; no finish events follow
                with self._cond:
                    self.stats["running"] = 0
            finally:
                rows.finish_all("length")  # no-op unless generate returned without calling end()
                with self._cond:
                    self.stats["generated_tokens"] += rows.generated
                    self._current = None
