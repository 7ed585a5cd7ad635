"""Which chat template a recipe means (`model.chat_template`), checked against the tokenizer.

Training, the saved adapter, the exported GGUF and the chat app must all use the same template text,
so everything goes through `resolve_chat_template`. The named templates are chat/templates/*.jinja.
"""
from __future__ import annotations

import difflib
from pathlib import Path

from chat.templates import REQUIRED_TOKENS, template_names, template_text

from ..errors import TunebookError


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
        return template_text(name_or_path)
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
