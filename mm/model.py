"""MultimodalModel: encode images -> adapt -> splice into the LLM's embedding stream -> LLM."""
from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mm.adapters.base import Adapter
from mm.checkpoint import save
from mm.config import ModelConfig
from mm.encoders.base import VisionEncoder
from mm.errors import MMError
from mm.fast_generate import greedy_generate, greedy_options
from mm.layouts import ImageTiler, Layout, TiledImage
from mm.parts import registry
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
from mm.registry import split_spec

Conversation = tuple[list[dict[str, Any]], list[Image.Image]]  # (messages, images in order of appearance)


def _not_in_lockstep(method):
    """Generation never runs in ``lockstep`` (no blank image, no idle expert), also on the model being trained
    (eval tasks during training); ZeRO-3 generation is refused anyway."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        saved, self.lockstep = self.lockstep, False
        try:
            return method(self, *args, **kwargs)
        finally:
            self.lockstep = saved

    return wrapper


class MultimodalModel(nn.Module):
    """A vision encoder, an adapter and a transformers causal LM, composed.

    Token contract: ``input_ids`` hold one ``image_token_id`` per image feature (placeholders already expanded
    to ``tokens_per_image`` per tile of the image's layout, with its newline separators); ``pixel_values``
    ``[I, 3, H, W]`` hold the tiles in order of appearance across the whole batch (with the ``fixed`` layout, one
    tile per image: the image). The features replace the placeholder embeddings in that order.
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
        self._lockstep = False
        self._blank: torch.Tensor | None = None  # blank_image(), made on first use

    # ----- properties -------------------------------------------------------------------------------------
    @property
    def tokens_per_image(self) -> int:
        return self.adapter.num_tokens

    @property
    def lockstep(self) -> bool:
        """Every pass calls every module, whatever the batch holds (the trainer turns it on; inference leaves it
        off): a batch without images still encodes one blank image, added with weight 0, and modality / top-k
        experts that no token goes to run on zero rows. Under ZeRO-3 each module call gathers the module's
        parameters with a collective and each trained parameter's gradient is reduced with one, so all ranks
        must call the same modules in the same order; a rank skipping the tower or an expert would hang them."""
        return self._lockstep

    @lockstep.setter
    def lockstep(self, on: bool) -> None:
        self._lockstep = on
        if self.moe is not None:
            self.moe.lockstep = on

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.llm.parameters()).dtype

    # ----- images -----------------------------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        """The image layout part of ``config.layout`` (``fixed``: one image, one tile)."""
        part = self.config.layout
        return registry("layout").entry(part.name).builder(split_spec(part.name)[1], part.options)

    @property
    def newline_id(self) -> int:
        """The separator after each row of tiles and between a thumbnail and its grid: the tokenizer's newline."""
        return self.tokenizer("\n", add_special_tokens=False)["input_ids"][-1]

    @property
    def image_tiler(self) -> ImageTiler:
        """The layout with this model's tile size and token ids: what the data loader needs (picklable)."""
        return ImageTiler(self.layout, self.encoder.image_size, self.tokens_per_image, self.image_token_id,
                          self.newline_id)

    def layout_images(self, images: list[Image.Image] | list[TiledImage]) -> list[TiledImage]:
        """One document's images laid out into encoder tiles, together within the layout's ``max_image_tokens``.
        Images already laid out are returned as they are."""
        return self.image_tiler.lay_out(images)

    def image_spans(self, images: list[Image.Image] | list[TiledImage]) -> list[list[int]]:
        """Per image, the ids its ``<image>`` marker expands to: ``tokens_per_image`` image ids per tile and the
        newline separators of its layout."""
        tiler = self.image_tiler
        return tiler.spans(tiler.lay_out(images))

    def preprocess(self, images: list[Image.Image] | list[TiledImage]) -> torch.Tensor:
        """One document's RGB PIL images (or their layouts) -> the pixel values of all their tiles
        ``[tiles, 3, H, W]`` in token order, with the encoder's own transform. ``fixed``: one tile per image."""
        tiles = ImageTiler.tiles(self.layout_images(images))
        return torch.stack([self.encoder.transform(tile) for tile in tiles])

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[I, 3, H, W]`` -> LLM-space features ``[I, tokens_per_image, D]``.

        A frozen tower (no parameter requires grad) runs under ``no_grad``, so no autograd graph of it is kept,
        and once per distinct image: identical images (the two sides of a DPO pair, an image repeated in a
        conversation) share one encoding. The adapter's gradients are unaffected."""
        pixels = pixel_values.to(self.device, next(self.encoder.parameters()).dtype)  # [I, 3, H, W]
        adapter_dtype = next(self.adapter.parameters()).dtype
        if any(p.requires_grad for p in self.encoder.parameters()):
            return self.adapter(self.encoder(pixels).to(adapter_dtype))  # [I, M, D]
        pixels, index = distinct_images(pixels)  # [U, 3, H, W], [I] (None: all distinct)
        with torch.no_grad():
            tokens = self.encoder(pixels)  # [U, N, Denc]
        features = self.adapter(tokens.to(adapter_dtype))  # [U, M, D]
        return features if index is None else features.index_select(0, index)  # [I, M, D]

    def blank_image(self) -> torch.Tensor:
        """One black image ``[1, 3, H, W]`` through the encoder's transform (made once)."""
        if self._blank is None:
            size = self.encoder.image_size
            self._blank = self.preprocess([Image.new("RGB", (size, size))])  # a plain attribute, not state
        return self._blank

    # ----- forward ----------------------------------------------------------------------------------------
    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None, image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text embeddings with image features scattered into the placeholder positions. ``[B, T, D]``.
        ``image_features`` ``[I, M, D]``: features already computed by ``encode_images`` (then no pixels).
        ``image_index`` ``[P]``: per placeholder, the row of the features ``[I * M, D]`` it takes (a layout that
        rearranges features, ``collate`` gives it); None: all of them in order.
        With ``lockstep`` (training), a batch without images encodes one blank image, added with weight 0."""
        is_image = input_ids == self.image_token_id  # [B, T]
        embeddings = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # [B, T, D]
        placeholders = int(is_image.sum())
        if image_features is not None:
            features = image_features
        elif pixel_values is None or len(pixel_values) == 0:
            features = None
            if self.lockstep:  # the vision path runs in every pass (see ``lockstep``)
                embeddings = embeddings + 0 * self.encode_images(self.blank_image()).sum()
        else:
            features = self.encode_images(pixel_values)  # [I, M, D]
        if features is not None and image_index is None and self.layout.rearranges_features:
            raise MMError(f"layout {self.config.layout.name!r} rearranges image features (arrangement llava_next): "
                          f"the batch needs image_index, which model.collate gives and this caller does not")
        feature_count = 0 if features is None else features.shape[0] * features.shape[1]
        images = 0 if features is None else features.shape[0]
        if features is not None and image_index is not None:
            features = features.flatten(0, 1).index_select(0, image_index.to(features.device))[None]  # [1, P, D]
            feature_count = len(image_index)
        if placeholders != feature_count:
            raise MMError(
                f"image placeholder tokens ({placeholders}) do not match image features ({feature_count}: "
                f"{images} images x {self.tokens_per_image} tokens"
                f"{'' if image_index is None else ', rearranged by image_index'})"
            )
        if features is None:
            return embeddings
        return embeddings.masked_scatter(is_image.unsqueeze(-1), features.to(embeddings.dtype))

    def routing(self, image_mask: torch.Tensor | None):
        """Context around exactly one call of the LLM (a forward, or a whole ``generate`` / greedy loop) in which
        modality experts see which positions are image tokens: ``image_mask`` ``[B, T]`` over the call's input
        sequence. Each pass of the call routes its own positions of it (tokens past ``T`` are generated text);
        see mm/moe/experts.py. Without experts this is a no-op."""
        return self.moe.route(image_mask) if self.moe is not None else contextlib.nullcontext()

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        **llm_kwargs: Any,
    ):
        """Run the LLM on spliced embeddings; returns the LLM's own output (``.logits``, ``.loss`` with labels)."""
        embeddings = self.embed(input_ids, pixel_values, image_index=image_index)
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
        self, messages: list[dict[str, Any]], chat: bool = True, add_generation_prompt: bool = True,
        images: list[Image.Image] | list[TiledImage] | None = None,
    ) -> tuple[list[int], list[int]]:
        """Render a conversation (chat template) or, with ``chat=False``, the user content as plain text;
        placeholders expanded. Returns ``(input_ids, labels)``. ``images``: the conversation's images (or their
        layouts), needed unless the layout gives every image one tile (``fixed``)."""
        if chat:
            ids, labels = render_chat(self.tokenizer, messages, add_generation_prompt)
        else:
            ids, labels = render_plain(self.tokenizer, "".join(content_text(m["content"]) for m in messages))
        if images is not None:
            return expand_images(ids, labels, self.image_token_id, spans=self.image_spans(images))
        if not self.layout.static:
            raise MMError(f"layout {self.config.layout.name!r} sizes each image's tokens by the image: "
                          f"pass the conversation's images to tokenize")
        return expand_images(ids, labels, self.image_token_id, self.tokens_per_image)

    def collate(self, conversations: list[Conversation], chat: bool = True) -> dict[str, torch.Tensor]:
        """Left-padded generation inputs for a batch of conversations; ``pixel_values`` ``[tiles, 3, H, W]`` holds
        every image's tiles, conversation after conversation, in token order; ``image_index`` ``[P]`` is there when
        the layout rearranges features (see ``embed``)."""
        rows, images = [], []
        for messages, conversation_images in conversations:
            expected = count_images(messages)
            if expected != len(conversation_images):
                raise MMError(f"the prompt has {expected} image markers but {len(conversation_images)} images")
            tiled = self.layout_images(conversation_images)  # each conversation within its own image budget
            rows.append(self.tokenize(messages, chat=chat, images=tiled)[0])
            images.extend(tiled)
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])  # [B, T]
        attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])  # [B, T]
        batch = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        if images:
            batch["pixel_values"] = self.preprocess(images).to(self.device)
            index = self.image_tiler.feature_index(images)
            if index is not None:
                batch["image_index"] = torch.tensor(index, device=self.device)
        return batch

    # ----- generation -------------------------------------------------------------------------------------
    @_not_in_lockstep
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
                image_index=batch.get("image_index"),
                max_new_tokens=options["max_new_tokens"],
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                streamer=streamer,
                compile=compile,
                stopping_criteria=options.get("stopping_criteria"),
            )
            return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        embeddings = self.embed(batch["input_ids"], batch.get("pixel_values"), image_index=batch.get("image_index"))
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
        save(self, directory)


def distinct_images(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The distinct images ``[U, 3, H, W]`` of ``pixels`` ``[I, 3, H, W]`` (first occurrences, in order) and,
    per image, the index ``[I]`` of its copy among them; None instead of the index when all are distinct.
    Exact: images whose pixel sums match are compared element by element."""
    count = pixels.shape[0]
    if count < 2:
        return pixels, None
    flat = pixels.flatten(1)  # [I, P]
    order = torch.arange(count, device=pixels.device)  # [I]
    _, group = torch.unique(flat.sum(1, dtype=torch.float32), return_inverse=True)  # [I] fingerprint groups
    first = torch.full((count,), count, device=pixels.device).scatter_reduce(0, group, order, "amin")  # [G]
    source = first[group]  # [I] the first image of each one's group
    later = (source != order).nonzero().squeeze(1)  # [L] images whose group holds an earlier one
    if not later.numel():
        return pixels, None
    differ = ~(flat[later] == flat[source[later]]).all(1)  # [L] same sum, other pixels: its own source
    source[later[differ]] = later[differ]
    keep = source == order  # [I]
    slot = keep.cumsum(0) - 1  # [I] position among the kept images
    return pixels[keep], slot[source]


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
