"""Multiple choice by likelihood: the log-probability of each option's tokens given the prompt, no generation.

All options of all questions in a batch run in one forward: rows ``prompt + option`` right-padded, the images of a
question encoded once and spliced into each of its rows, logits kept only for the option span.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from mm.errors import MMError

Question = tuple[list[dict[str, Any]], list[Image.Image], list[str]]  # (prompt messages, images, options)


@torch.no_grad()
def option_logprobs(model, questions: list[Question], chat: bool = True, reduce: str = "sum") -> list[list[float]]:
    """Per question, per option: the summed (``reduce="sum"``) or mean (``"mean"``) log-prob of the option tokens."""
    if reduce not in ("sum", "mean"):
        raise MMError(f"option score {reduce!r} must be 'sum' or 'mean'")
    tokenizer = model.tokenizer
    rows: list[tuple[list[int], int, int]] = []  # (ids, option start, question index)
    tiles: list[torch.Tensor] = []  # per question: its images' tiles [n_q, 3, H, W] in token order
    orders: list[list[int] | None] = []  # per question with images: the feature rows its image tokens take
    for q, (messages, images, options) in enumerate(questions):
        laid_out = model.layout_images(images) if images else []
        prompt, _ = model.tokenize(messages, chat=chat, add_generation_prompt=True, images=laid_out)
        for option in options:
            option_ids = tokenizer(option, add_special_tokens=False)["input_ids"]
            if not option_ids:
                raise MMError(f"option {option!r} is empty after tokenisation")
            rows.append((prompt + option_ids, len(prompt), q))
        if laid_out:
            tiles.append(model.preprocess(laid_out))
            orders.append(model.image_tiler.feature_index(laid_out))  # None: all, in order
    width = max(len(ids) for ids, _, _ in rows)
    pad = tokenizer.pad_token_id
    device = model.device
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _, _ in rows], device=device)  # [R, T]
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in rows], device=device)

    is_image = input_ids == model.image_token_id  # [R, T]
    embeddings = model.llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # [R, T, D]
    if tiles:
        features = model.encode_images(torch.cat(tiles).to(device))  # [tiles, M, D], once per question
        per_question, start = [], 0
        counts, order = iter(len(t) for t in tiles), iter(orders)
        for messages, images, _ in questions:
            count, index = (next(counts), next(order)) if images else (0, None)
            mine = features[start : start + count].flatten(0, 1)  # [n_q * M, D]
            per_question.append(mine if index is None else mine[torch.tensor(index, device=mine.device)])
            start += count
        spliced = torch.cat([per_question[q] for _, _, q in rows])  # [R * n_q * M, D] in row order
        if spliced.shape[0] != int(is_image.sum()):
            raise MMError(f"image placeholder tokens ({int(is_image.sum())}) do not match image features "
                          f"({spliced.shape[0]})")
        embeddings = embeddings.masked_scatter(is_image.unsqueeze(-1), spliced.to(embeddings.dtype))

    first = min(start for _, start, _ in rows)  # logits needed from position first-1 on
    keep = width - first + 1
    with model.routing(is_image):
        logits = model.llm(inputs_embeds=embeddings, attention_mask=attention_mask, logits_to_keep=keep).logits
    offset = width - logits.shape[1]  # logits[:, j] predicts token offset + j + 1
    logprobs = F.log_softmax(logits.float(), dim=-1)  # [R, keep, V]
    scores: list[list[float]] = [[] for _ in questions]
    for r, (ids, start, q) in enumerate(rows):
        targets = torch.tensor(ids[start:], device=device)  # [L]
        positions = torch.arange(start - 1, len(ids) - 1, device=device) - offset
        values = logprobs[r, positions].gather(-1, targets[:, None]).squeeze(-1)  # [L]
        scores[q].append(float(values.sum() if reduce == "sum" else values.mean()))
    return scores
