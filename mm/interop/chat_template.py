"""A processor chat template that accepts transformers' content parts on top of a string-content template.

mm renders a conversation by flattening each message's content parts to text with one ``<image>`` marker per
image part, then applying the tokenizer's own chat template. ``LlavaProcessor.apply_chat_template`` passes
the parts unflattened, so the exported template first does the same flattening in Jinja (string content is
left alone), then runs the tokenizer's template unchanged: both paths render the same text.
"""
from __future__ import annotations

from mm.prompt import IMAGE_TOKEN

# No whitespace control: nothing here emits text, and the wrapped template's leading whitespace must survive.
_FLATTEN = (
    "{% set mm_ns = namespace(flat=[]) %}"
    "{% for mm_m in messages %}"
    "{% if mm_m['content'] is string %}{% set mm_ns.flat = mm_ns.flat + [mm_m] %}"
    "{% else %}{% set mm_t = namespace(text='') %}"
    "{% for mm_p in mm_m['content'] %}"
    "{% if mm_p['type'] == 'image' %}{% set mm_t.text = mm_t.text + '" + IMAGE_TOKEN + "' %}"
    "{% elif mm_p['type'] == 'text' %}{% set mm_t.text = mm_t.text + mm_p['text'] %}{% endif %}"
    "{% endfor %}"
    "{% set mm_ns.flat = mm_ns.flat + [{'role': mm_m['role'], 'content': mm_t.text}] %}"
    "{% endif %}{% endfor %}"
    "{% set messages = mm_ns.flat %}"
)


def with_content_parts(template: str) -> str:
    """``template`` (string content) preceded by the content-part flattening; idempotent."""
    return template if template.startswith(_FLATTEN) else _FLATTEN + template
