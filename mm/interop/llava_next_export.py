"""Export an mm model with the ``anyres`` layout to transformers LLaVA-NeXT (``LlavaNextForConditionalGeneration``
+ ``LlavaNextProcessor``), with the same logits.

The tower, projector and LLM map as for LLaVA (``mm.interop.llava_export``). What LLaVA-NeXT adds:
- ``image_grid_pinpoints``: the layout's grids times the tile size, as ``[height, width]`` (transformers' order),
  in the layout's order (both pick the first of equally good grids).
- the token stream: the layout's ``llava_next`` arrangement is LlavaNext's ``pack_image_features`` (base image,
  then the grid's unpadded patch rows). mm ends each row with the tokenizer's newline token; LlavaNext puts an
  ``<image>`` token there whose feature is the learned ``image_newline``, exported as the LLM's embedding of that
  newline token. So the processor's ``input_ids`` equal mm's except at those positions, and the logits are equal.
- the image processor: ``LlavaNextImageProcessor`` with the encoder processor's normalisation, bicubic
  resampling (what the layout resizes with) and the tile as ``crop_size``, so its ``pixel_values`` (per image:
  base, then tiles) are mm's tiles.
"""
from __future__ import annotations

from pathlib import Path

from mm.errors import MMError
from mm.interop.llava_export import (
    check_exportable,
    export_target,
    llava_config,
    llava_processor,
    with_weights,
    write_export,
)

BICUBIC = 3  # PIL's code, as image processor configs store it

# the encoder processor's settings a LlavaNextImageProcessor takes over (sizes are set from the tile size)
_KEPT = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def _check(model) -> None:
    check_exportable(model)
    if export_target(model.config) != "llava_next":
        raise MMError(f"layout {model.config.layout.name!r} exports to LLaVA (export_llava), not LlavaNext")
    grid = model.encoder.grid
    if model.tokens_per_image != grid[0] * grid[1]:
        raise MMError(f"model is not exportable to LlavaNext: the adapter gives {model.tokens_per_image} tokens "
                      f"per tile, not the tower's {grid[0]}x{grid[1]} patches")


def grid_pinpoints(model) -> list[list[int]]:
    """The layout's ``[cols, rows]`` grids as transformers' ``image_grid_pinpoints`` ``[height, width]``."""
    size = model.encoder.image_size
    return [[rows * size, cols * size] for cols, rows in model.layout.grids]


def to_llava_next(model):
    """A ``LlavaNextForConditionalGeneration`` sharing ``model``'s tensors; ``image_newline`` is the LLM's
    embedding of the newline token that ends each row of patches in mm's stream."""
    from torch import nn
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    _check(model)
    config = llava_config(model, LlavaNextConfig, image_grid_pinpoints=grid_pinpoints(model))
    llava = with_weights(model, LlavaNextForConditionalGeneration, config)
    newline = model.llm.get_input_embeddings().weight[model.newline_id].detach().clone()  # [D]
    llava.model.image_newline = nn.Parameter(newline.to(model.dtype), requires_grad=False)
    return llava


def llava_next_image_processor(model):
    """The ``LlavaNextImageProcessor`` that cuts images as the model's layout does."""
    from transformers import LlavaNextImageProcessor

    size = model.encoder.image_size
    settings = model.encoder.processor.to_dict()
    return LlavaNextImageProcessor(
        **{key: settings[key] for key in _KEPT if key in settings},
        do_resize=True, size={"height": size, "width": size}, resample=BICUBIC,
        do_center_crop=False, crop_size={"height": size, "width": size},
        do_pad=True, image_grid_pinpoints=grid_pinpoints(model),
    )


def llava_next_processor(model):
    """A ``LlavaNextProcessor`` expanding ``<image>`` to the model's image tokens (newline positions included)."""
    from transformers import LlavaNextProcessor

    return llava_processor(model, LlavaNextProcessor, llava_next_image_processor(model))


def export_llava_next(model, out: str | Path, max_shard_size: str | int = "4GB") -> Path:
    """Write ``model`` as a transformers LLaVA-NeXT directory (the files of ``save_pretrained``, the 4.x
    conventions of ``export_llava``, every file mode 0644)."""
    _check(model)
    return write_export(to_llava_next(model), llava_next_processor(model), out, max_shard_size)
