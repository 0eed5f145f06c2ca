"""MultimodalModel: encode images -> adapt -> splice into the LLM's embedding stream -> LLM."""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mm.adapters.base import Adapter
from mm.config import ModelConfig
from mm.encoders.base import VisionEncoder
from mm.errors import MMError
from mm.fast_generate import greedy_generate, greedy_options
from mm.prompt import (
    IGNORE,
    add_image_token,
    content_text,
    count_images,
    expand_images,
    render_chat,
    render_plain,
    user_message,
)

Conversation = tuple[list[dict[str, Any]], list[Image.Image]]  # (messages, images in order of appearance)


class MultimodalModel(nn.Module):
    """A vision encoder, an adapter and a transformers causal LM, composed.

    Token contract: ``input_ids`` hold one ``image_token_id`` per image feature (placeholders already expanded
    to ``tokens_per_image`` each); ``pixel_values`` ``[I, 3, H, W]`` hold the images in order of appearance
    across the whole batch. The features replace the placeholder embeddings in that order.
    """

    def __init__(
        self,
        config: ModelConfig,
        encoder: VisionEncoder,
        adapter: Adapter,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
    ):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.adapter = adapter
        self.llm = llm
        self.tokenizer = tokenizer
        self.image_token_id = add_image_token(tokenizer)
        self.moe = None  # set by mm.moe.attach_experts; routes image tokens to visual experts

    # ----- properties -------------------------------------------------------------------------------------
    @property
    def tokens_per_image(self) -> int:
        return self.adapter.num_tokens

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.llm.parameters()).dtype

    # ----- images -----------------------------------------------------------------------------------------
    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> pixel values ``[I, 3, H, W]`` with the encoder's own transform."""
        return torch.stack([self.encoder.transform(image) for image in images])

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[I, 3, H, W]`` -> LLM-space features ``[I, tokens_per_image, D]``."""
        encoder_dtype = next(self.encoder.parameters()).dtype
        tokens = self.encoder(pixel_values.to(self.device, encoder_dtype))  # [I, N, Denc]
        return self.adapter(tokens.to(next(self.adapter.parameters()).dtype))  # [I, M, D]

    # ----- forward ----------------------------------------------------------------------------------------
    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text embeddings with image features scattered into the placeholder positions. ``[B, T, D]``.
        ``image_features`` ``[I, M, D]``: features already computed by ``encode_images`` (then no pixels)."""
        is_image = input_ids == self.image_token_id  # [B, T]
        embeddings = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # [B, T, D]
        placeholders = int(is_image.sum())
        if image_features is not None:
            features = image_features
        elif pixel_values is None or len(pixel_values) == 0:
            features = None
        else:
            features = self.encode_images(pixel_values)  # [I, M, D]
        feature_count = 0 if features is None else features.shape[0] * features.shape[1]
        if placeholders != feature_count:
            raise MMError(
                f"image placeholder tokens ({placeholders}) do not match image features ({feature_count}: "
                f"{0 if features is None else features.shape[0]} images x {self.tokens_per_image} tokens)"
            )
        if features is None:
            return embeddings
        return embeddings.masked_scatter(is_image.unsqueeze(-1), features.to(embeddings.dtype))

    def routing(self, image_mask: torch.Tensor | None):
        """Context in which the LLM's layers see which positions are image tokens (for modality experts)."""
        return self.moe.route(image_mask) if self.moe is not None else contextlib.nullcontext()

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **llm_kwargs: Any,
    ):
        """Run the LLM on spliced embeddings; returns the LLM's own output (``.logits``, ``.loss`` with labels)."""
        embeddings = self.embed(input_ids, pixel_values)
        with self.routing(input_ids == self.image_token_id):
            return self.llm(
                inputs_embeds=embeddings,
                attention_mask=attention_mask,
                position_ids=position_ids,
                labels=labels,
                **llm_kwargs,
            )

    # ----- prompts ----------------------------------------------------------------------------------------
    def tokenize(
        self, messages: list[dict[str, Any]], chat: bool = True, add_generation_prompt: bool = True
    ) -> tuple[list[int], list[int]]:
        """Render a conversation (chat template) or, with ``chat=False``, the user content as plain text;
        placeholders expanded. Returns ``(input_ids, labels)``."""
        if chat:
            ids, labels = render_chat(self.tokenizer, messages, add_generation_prompt)
        else:
            ids, labels = render_plain(self.tokenizer, "".join(content_text(m["content"]) for m in messages))
        return expand_images(ids, labels, self.image_token_id, self.tokens_per_image)

    def collate(self, conversations: list[Conversation], chat: bool = True) -> dict[str, torch.Tensor]:
        """Left-padded generation inputs for a batch of conversations."""
        rows, images = [], []
        for messages, conversation_images in conversations:
            expected = count_images(messages)
            if expected != len(conversation_images):
                raise MMError(f"the prompt has {expected} image markers but {len(conversation_images)} images")
            rows.append(self.tokenize(messages, chat=chat)[0])
            images.extend(conversation_images)
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])  # [B, T]
        attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])  # [B, T]
        batch = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        if images:
            batch["pixel_values"] = self.preprocess(images).to(self.device)
        return batch

    # ----- generation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_batch(
        self, conversations: list[Conversation], chat: bool = True, streamer=None, compile: bool = False,
        **generation: Any,
    ) -> list[str]:
        """Answer each conversation through transformers' ``generate`` (KV cache, sampling, beams, streaming).

        ``generation`` takes ``generate``'s keywords (``max_new_tokens``, ``temperature``, ``top_p``,
        ``num_beams``, ``num_return_sequences``...); temperature 0 or absent means greedy. Plain greedy requests
        take ``mm.fast_generate`` (static KV cache, images encoded once; ``compile``: torch.compile'd, worth its
        minute of compilation over many calls); the rest go through ``generate``.
        Returns ``len(conversations) * num_return_sequences`` strings.
        """
        batch = self.collate(conversations, chat=chat)
        options = sampling_options(**generation)
        if greedy_options(generation):  # plain greedy: the lean static-cache loop, same tokens as generate
            new_tokens = greedy_generate(
                self,
                batch["input_ids"],
                batch["attention_mask"],
                batch.get("pixel_values"),
                max_new_tokens=options["max_new_tokens"],
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                streamer=streamer,
                compile=compile,
                stopping_criteria=options.get("stopping_criteria"),
            )
            return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        embeddings = self.embed(batch["input_ids"], batch.get("pixel_values"))
        with self.routing(batch["input_ids"] == self.image_token_id):
            output = self.llm.generate(
                inputs_embeds=embeddings,
                attention_mask=batch["attention_mask"],
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                streamer=streamer,
                **options,
            )
        return self.tokenizer.batch_decode(output, skip_special_tokens=True)

    def generate(
        self,
        images: list[Image.Image] | None = None,
        prompt: str = "",
        messages: list[dict[str, Any]] | None = None,
        chat: bool = True,
        streamer=None,
        **generation: Any,
    ) -> str:
        """One answer. Either ``prompt`` (images go first unless it places them with ``<image>``) or full
        ``messages``; ``chat=False`` continues the plain text instead of using the chat template."""
        images = list(images or [])
        if messages is None:
            messages = [user_message(prompt, len(images))]
        return self.generate_batch([(messages, images)], chat=chat, streamer=streamer, **generation)[0]

    def save(self, directory) -> None:
        from mm.checkpoint import save

        save(self, directory)


def sampling_options(
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_beams: int = 1,
    **rest: Any,
) -> dict[str, Any]:
    """Map user-facing sampling flags onto ``generate`` keywords (temperature 0 = greedy)."""
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, **rest}
    if temperature and temperature > 0:
        options.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        options.update(do_sample=False)
    return options


__all__ = ["MultimodalModel", "Conversation", "IGNORE", "sampling_options"]
