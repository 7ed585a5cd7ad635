"""Chat templates: which one a recipe means, and which token ends an assistant turn.

Training, the saved adapter, the exported GGUF and the chat app must all use the same template text,
so everything goes through `resolve_chat_template`. The project's named templates (templates/*.jinja)
wrap each assistant reply and its end-of-turn token in `{% generation %}...{% endgeneration %}`: that
span is exactly what the model is trained to write, so it also learns to stop.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path

from .errors import TunebookError

TEMPLATE_DIR = Path(__file__).parent / "templates"
GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")

# The special tokens each named template writes; each must be one token in the model's vocabulary,
# otherwise the turn markers would be split into pieces and never learned as markers.
REQUIRED_TOKENS = {
    "llama-3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "gemma": ["<start_of_turn>", "<end_of_turn>"],
}
END_OF_TURN = {"llama-3": "<|eot_id|>", "chatml": "<|im_end|>", "gemma": "<end_of_turn>"}

PROBE_REPLY = "tunebook-probe-reply"


def template_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))


def has_generation_markers(template: str) -> bool:
    return bool(GENERATION_TAG.search(template))


def strip_generation_markers(template: str) -> str:
    """The same template without `{% generation %}` tags, for renderers that do not know them
    (llama.cpp, llama-cpp-python): the rendered text is identical."""
    return GENERATION_TAG.sub("", template)


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _is_single_token(tokenizer, text: str) -> bool:
    return len(tokenizer.encode(text, add_special_tokens=False)) == 1


def _check_tokens(name: str, tokenizer) -> None:
    missing = [t for t in REQUIRED_TOKENS.get(name, []) if not _is_single_token(tokenizer, t)]
    if missing:
        fits = [n for n, toks in REQUIRED_TOKENS.items() if all(_is_single_token(tokenizer, t) for t in toks)]
        fix = (f"use a template this tokenizer has the tokens for: {', '.join(fits)}" if fits
               else "use the tokenizer's own template (remove model.chat_template) or a .jinja file written for it")
        raise TunebookError(
            f"chat template '{name}' needs the special token(s) {', '.join(missing)}, which tokenizer "
            f"{_tokenizer_name(tokenizer)} does not have as single tokens\n    fix: {fix}")


def _find_file(name: str, base_dir: Path | None) -> Path | None:
    candidates = [Path(name)]
    if base_dir is not None and not Path(name).is_absolute():
        candidates.append(base_dir / name)
    return next((p for p in candidates if p.is_file()), None)


def resolve_chat_template(name_or_path: str | None, tokenizer, *, base_dir: Path | None = None) -> str:
    """The template text for `model.chat_template`: None -> the tokenizer's own; a project name
    (llama-3, chatml, gemma); or a .jinja file (relative to the current directory, then `base_dir`)."""
    names = template_names()
    if name_or_path is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):
            own = own.get("default")
        if not own:
            raise TunebookError(
                f"tokenizer {_tokenizer_name(tokenizer)} has no chat template of its own\n"
                f"    fix: set model.chat_template to one of {', '.join(names)} or a .jinja file")
        return own
    if name_or_path in names:
        _check_tokens(name_or_path, tokenizer)
        return (TEMPLATE_DIR / f"{name_or_path}.jinja").read_text()
    path = _find_file(name_or_path, base_dir)
    if path is not None:
        return path.read_text()
    if name_or_path.endswith(".jinja") or "/" in name_or_path:
        where = str(Path(name_or_path).resolve()) + (f" or {base_dir / name_or_path}" if base_dir else "")
        raise TunebookError(f"chat template file not found: {where}\n"
                            f"    fix: check the path, or use a named template: {', '.join(names)}")
    guess = difflib.get_close_matches(name_or_path, names, n=1)
    raise TunebookError(f"unknown chat template '{name_or_path}'\n"
                        f"    fix: {f'did you mean {guess[0]!r}? ' if guess else ''}use one of {', '.join(names)}, "
                        "a .jinja file, or remove it to use the tokenizer's own")


def end_of_turn_token(template_name_or_text: str, tokenizer) -> str:
    """The token that ends an assistant turn under this template (what generation stops on).

    Found by rendering a one-exchange probe and reading what follows the reply; the tokenizer's EOS
    when that is not a single token."""
    if template_name_or_text in END_OF_TURN:
        return END_OF_TURN[template_name_or_text]
    from .data_render import render_text

    if template_name_or_text.endswith(".jinja") and Path(template_name_or_text).is_file():
        template_name_or_text = Path(template_name_or_text).read_text()

    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE_REPLY}]
    text = render_text(template_name_or_text, probe, tokenizer)
    after = text[text.rfind(PROBE_REPLY) + len(PROBE_REPLY):].strip()
    for candidate in (after, after.split()[0] if after.split() else ""):
        if candidate and _is_single_token(tokenizer, candidate):
            return candidate
    return tokenizer.eos_token
