"""The OpenAI-compatible API through the official ``openai`` client: plain, streamed, n>1, batched."""
from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest

import mm
from mm.images import open_image

from serve_helpers import MODEL, data_url, image_bytes, image_message, serving


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with serving(tiny_model_dir, max_batch=8, batch_wait=0.3) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local_model(tiny_model_dir):
    return mm.load(tiny_model_dir)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["max_batch"] == 8


def test_chat_with_image_matches_local_generation(client, local_model):
    raw = image_bytes("blue")
    messages = [image_message("what color is it?", data_url(raw))]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, n=2)
    mm_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is it?"}]}]
    expected = local_model.generate(images=[open_image(raw)], messages=mm_messages, max_new_tokens=8)
    assert [c.index for c in response.choices] == [0, 1]
    assert [c.message.content for c in response.choices] == [expected, expected]  # greedy: both choices agree
    assert all(c.finish_reason in ("stop", "length") for c in response.choices)
    prompt = len(local_model.tokenize(mm_messages)[0])
    assert response.usage.prompt_tokens == prompt and prompt > local_model.tokens_per_image
    assert 0 < response.usage.completion_tokens <= 16


def test_stream_token_by_token_equals_plain_answer(client):
    messages = [image_message("describe the picture", data_url(image_bytes("green")))]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert "".join(pieces) == plain.choices[0].message.content
    assert len([p for p in pieces if p]) > 1  # arrived in several events, not at once
    assert reasons == [plain.choices[0].finish_reason]
    assert usage.completion_tokens == plain.usage.completion_tokens


def test_stream_with_n_2_sampling(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=1.0, n=2, stream=True
    )
    finished = {}
    for chunk in stream:
        for choice in chunk.choices:
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert sorted(finished) == [0, 1]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(client, server):
    prompts = ["count the shapes", "what color", "hello", "where is the circle"]
    ask = lambda p: client.chat.completions.create(  # noqa: E731
        model=MODEL, messages=[image_message(p, data_url(image_bytes("yellow")))], max_tokens=6, temperature=0
    ).choices[0].message.content
    alone = [ask(p) for p in prompts]
    before = httpx.get(server + "/health").json()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    after = httpx.get(server + "/health").json()
    assert together == alone
    assert after["largest_batch"] >= 2
    assert after["batches"] - before["batches"] < len(prompts)  # fewer model calls than requests
    assert after["running"] == 0 and after["queued"] == 0


def test_mixed_sampling_settings_run_concurrently(client):
    def ask(temperature):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=temperature
        ).choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        reasons = list(pool.map(ask, [0, 0.8, 0, 1.2]))
    assert all(r in ("stop", "length") for r in reasons)
