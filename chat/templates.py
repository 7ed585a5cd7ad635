"""The named chat templates (templates/*.jinja) and the tokens that frame a turn.

One source for everyone: training renders these files, the GGUF embeds the same text, and the chat
falls back to them for a GGUF without a template. Each file wraps an assistant reply and its end-of-turn
token in `{% generation %}...{% endgeneration %}` (what the model is trained to write, so it learns to
stop); renderers that do not know the tag (llama.cpp) get the same text without it.
"""
from __future__ import annotations

import re
from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent / "templates"
GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")

# The special tokens each named template writes; each must be one token of the model's vocabulary.
REQUIRED_TOKENS = {
    "llama-3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
}
# The token that ends an assistant turn under each named template.
END_OF_TURN = {"llama-3": "<|eot_id|>", "chatml": "<|im_end|>", "gemma": "<end_of_turn>"}
# End-of-turn tokens of common chat formats (the named ones first): a GGUF marks the first its vocabulary has.
END_OF_TURN_TOKENS = tuple(END_OF_TURN.values()) + ("<|end|>",)
# Text that ends a reply when it appears in generated text: end-of-turn markers, and the start of a next
# turn (a base model may write one itself).
TURN_MARKERS = END_OF_TURN_TOKENS + ("<start_of_turn>", "<|start_header_id|>", "<|im_start|>", "<|endoftext|>")
# The special token whose presence in a vocabulary picks a named format, in order of preference.
FORMAT_MARKERS = (("gemma", "<start_of_turn>"), ("llama-3", "<|eot_id|>"), ("chatml", "<|im_start|>"))


def template_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))


def template_text(name: str) -> str:
    """The named template as training uses it ({% generation %} markers included)."""
    return (TEMPLATE_DIR / f"{name}.jinja").read_text()


def has_generation_markers(template: str) -> bool:
    return bool(GENERATION_TAG.search(template))


def strip_generation_markers(template: str) -> str:
    """The same template without `{% generation %}` tags, for renderers that do not know them
    (llama.cpp, llama-cpp-python): the rendered text is identical."""
    return GENERATION_TAG.sub("", template)
