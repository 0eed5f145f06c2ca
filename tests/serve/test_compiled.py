"""``mm serve --compile``: greedy decoding compiled before the server starts answers exactly as eager decoding,
for one request and for a batch of several (the dynamic-size graphs)."""
from __future__ import annotations

import concurrent.futures

import openai

import mm
from mm.images import open_image

from serve_helpers import MODEL, data_url, image_bytes, image_message, serving


def test_compiled_server_answers_like_eager_generation(tiny_model_dir):
    local = mm.load(tiny_model_dir)
    colors = ["red", "green", "blue"]
    expected = [local.generate(images=[open_image(image_bytes(c))], max_new_tokens=6, messages=[
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"is it {c}?"}]}]) for c in colors]
    with serving(tiny_model_dir, max_batch=4, batch_wait=0.3, compile=True) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(color):
            messages = [image_message(f"is it {color}?", data_url(image_bytes(color)))]
            return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)

        alone = ask("red").choices[0].message.content
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # arrive together: one batch of three rows
            together = [r.choices[0].message.content for r in pool.map(ask, colors)]
    assert alone == expected[0]
    assert together == expected
