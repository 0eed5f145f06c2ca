"""Bounded queue (429), client disconnects free their slot, remote images, and the ``mm serve`` command."""
from __future__ import annotations

import functools
import http.server
import json
import re
import socket
import subprocess
import sys
import threading

import httpx
import openai
import pytest
import torch

import mm.cli
from serve_helpers import MODEL, image_bytes, image_message, serving, wait_for

# Greedy on the tiny model runs this text-only prompt for well over 1500 tokens without an end-of-turn,
# which takes seconds on a CPU: a request only ends early if the server cancels it.
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "count"}], "max_tokens": 1500, "temperature": 0,
        "stream": True}


def health(url):
    return httpx.get(url + "/health", timeout=30).json()


def first_content(lines):
    """Read SSE lines until the first content delta (so the request is generating)."""
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            choices = json.loads(line[6:])["choices"]
            if choices and choices[0]["delta"].get("content"):
                return choices[0]["delta"]["content"]
    raise AssertionError("stream ended before any content")


def test_queue_full_gets_429_and_server_recovers(tiny_model_dir):
    with serving(tiny_model_dir, max_batch=1, max_queue=1, batch_wait=0) as url, \
            httpx.Client(timeout=60) as a, httpx.Client(timeout=60) as b:
        with a.stream("POST", url + "/v1/chat/completions", json=LONG) as running:
            running_lines = running.iter_lines()  # keep a reference: a collected iterator closes the stream
            first_content(running_lines)
            with b.stream("POST", url + "/v1/chat/completions", json=LONG) as queued:
                assert queued.status_code == 200
                wait_for(lambda: health(url)["queued"] == 1, what="the second request to queue")
                rejected = httpx.post(url + "/v1/chat/completions", json={**LONG, "stream": False}, timeout=60)
                assert rejected.status_code == 429
                assert rejected.json()["error"] == {
                    "message": rejected.json()["error"]["message"], "type": "rate_limit_error",
                    "code": "queue_full", "param": None}
                with pytest.raises(openai.RateLimitError):
                    openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(
                        model=MODEL, messages=LONG["messages"], max_tokens=2)
        wait_for(lambda: (h := health(url))["running"] == 0 and h["queued"] == 0, what="the slots to free")
        stats = health(url)
        assert stats["rejected"] == 2 and stats["cancelled"] == 2
        ok = httpx.post(url + "/v1/chat/completions", timeout=120,
                        json={"model": MODEL, "messages": [image_message("hi")], "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_disconnect_mid_stream_frees_the_slot(tiny_model_dir):
    with serving(tiny_model_dir, max_batch=4, batch_wait=0) as url:
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", url + "/v1/chat/completions", json=LONG) as response:
                lines = response.iter_lines()
                first_content(lines)
                first_content(lines)
                assert health(url)["running"] == 1
            # leaving the block closes the connection mid-stream
        wait_for(lambda: health(url)["running"] == 0, what="the cancelled request to leave the batch")
        stats = health(url)
        assert stats["cancelled"] == 1 and stats["completed"] == 0
        assert stats["generated_tokens"] < LONG["max_tokens"] // 2  # stopped early, not run to max_tokens
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=3)
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert health(url)["completed"] == 1


@pytest.fixture()
def image_site(tmp_path):
    (tmp_path / "red.png").write_bytes(image_bytes("red"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()


def test_remote_images_when_allowed(tiny_model_dir, image_site):
    with serving(tiny_model_dir, allow_remote_images=True,
                 allow_remote_addresses=(image_site.removeprefix("http://"),)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        answer = client.chat.completions.create(
            model=MODEL, messages=[image_message("what?", image_site + "/red.png")], max_tokens=3)
        assert answer.usage.prompt_tokens > 16  # the image's tokens are in the prompt
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=[image_message("?", image_site + "/none.png")])
        assert caught.value.code == "image_fetch_failed"


def test_cli_bad_flags_exit_2(tiny_model_dir, tmp_path, capsys):
    assert mm.cli.main(["serve", "--model", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert mm.cli.main(["serve", "--model", str(tiny_model_dir), "--max-batch", "0"]) == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert mm.cli.main(["serve", "--model", str(tiny_model_dir), "--port", str(port)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("mm: error: ") for line in lines), lines
    assert "cannot listen" in lines[2] and "--max-batch" in lines[1]


@pytest.mark.slow
def test_mm_serve_command_serves(tiny_model_dir):
    process = subprocess.Popen(
        [sys.executable, "-m", "mm.cli", "serve", "--model", str(tiny_model_dir), "--port", "0", "--ui"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = process.stdout.readline()
        match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", banner)
        assert match, banner
        base = match.group(1)
        name = tiny_model_dir.resolve().name
        models = wait_for(lambda: _get(base + "/v1/models"), what="the server")
        assert [m["id"] for m in models.json()["data"]] == [name]
        assert "<html" in httpx.get(base + "/").text
    finally:
        process.terminate()
        process.wait(timeout=30)


def _get(url):
    try:
        return httpx.get(url, timeout=5)
    except httpx.TransportError:
        return None


def test_a_disconnect_seen_only_by_the_stopping_criterion_counts_as_cancelled(tiny_model):
    """The race CI met: the client leaves after its row's last token was added, so only the stopping criterion
    sees it and ``generate`` ends through ``streamer.end()``; the row is still finished as cancelled."""
    from mm.serve.engine import BatchRows, FanOutStreamer, Job

    events, done = [], []
    job = Job(conversation=None, max_tokens=100, emit=events.append)
    rows = BatchRows([job], tiny_model.tokenizer, lambda j, reason: done.append(reason))
    streamer = FanOutStreamer(rows)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt
    streamer.put(torch.tensor([5]))
    job.cancelled.set()
    streamer.end()
    assert done == ["cancelled"] and events[-1] == ("finish", 0, "cancelled", 1)
