"""Conversation -> the exact text the model sees, plus where each assistant reply sits in it.

With `{% generation %}` markers the template itself says which characters are the model's to write.
Without them (a tokenizer's own template) the spans come from rendering each prefix of the
conversation: the reply is what the template adds after the generation prompt, end-of-turn included.
"""
from __future__ import annotations

from pathlib import Path

from transformers.utils.chat_template_utils import render_jinja_template

from chat.templates import END_OF_TURN, has_generation_markers

from ..errors import TunebookError

Span = tuple[int, int]


def _special_tokens(tokenizer) -> dict[str, str]:
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    return {n: (getattr(tokenizer, n, None) or "") for n in names}


def _render(template: str, messages: list[dict], tokenizer, add_generation_prompt: bool,
            with_spans: bool) -> tuple[str, list[Span]]:
    try:
        texts, spans = render_jinja_template(
            conversations=[messages], chat_template=template, return_assistant_tokens_mask=with_spans,
            add_generation_prompt=add_generation_prompt, **_special_tokens(tokenizer))
    except TunebookError:
        raise
    except Exception as exc:  # jinja errors, raise_exception() inside a template
        raise TunebookError(f"the chat template failed on a conversation: {exc}\n"
                            "    fix: check the template, or use a named one (llama-3, chatml, gemma)") from None
    return texts[0], (spans[0] if with_spans else [])


def render_text(template: str, messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> str:
    """The rendered conversation (what `apply_chat_template(tokenize=False)` gives)."""
    return _render(template, messages, tokenizer, add_generation_prompt, with_spans=False)[0]


def render_with_spans(template: str, messages: list[dict], tokenizer) -> tuple[str, list[Span]]:
    """Text and one (start, end) character span per assistant turn, end-of-turn token included."""
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    if has_generation_markers(template):
        text, spans = _render(template, messages, tokenizer, False, with_spans=True)
        if len(spans) != n_assistant:
            raise TunebookError(
                f"the chat template marks {len(spans)} {{% generation %}} span(s) for {n_assistant} assistant "
                "turn(s)\n    fix: wrap exactly each assistant reply (and its end-of-turn token) in "
                "{% generation %}...{% endgeneration %}")
        return text, [tuple(s) for s in spans]
    return _spans_by_prefix(template, messages, tokenizer)


def _spans_by_prefix(template: str, messages: list[dict], tokenizer) -> tuple[str, list[Span]]:
    full = render_text(template, messages, tokenizer)
    spans: list[Span] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_text(template, messages[:i], tokenizer, add_generation_prompt=True)
        upto = render_text(template, messages[: i + 1], tokenizer)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise TunebookError(
                "the tokenizer's chat template has no {% generation %} markers, and rendering a conversation "
                "turn by turn does not give prefixes of the whole, so the assistant replies cannot be located\n"
                "    fix: set model.chat_template to a named template (llama-3, chatml, gemma) or a .jinja file "
                "with {% generation %} markers")
        spans.append((len(prompt), len(upto)))
    return full, spans


PROBE_REPLY = "tunebook-probe-reply"


def end_of_turn_token(template_name_or_text: str, tokenizer) -> str:
    """The token that ends an assistant turn under this template (what generation stops on).

    Found by rendering a one-exchange probe and reading what follows the reply; the tokenizer's EOS
    when that is not a single token."""
    if template_name_or_text in END_OF_TURN:
        return END_OF_TURN[template_name_or_text]
    if template_name_or_text.endswith(".jinja") and Path(template_name_or_text).is_file():
        template_name_or_text = Path(template_name_or_text).read_text()

    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE_REPLY}]
    text = render_text(template_name_or_text, probe, tokenizer)
    after = text[text.rfind(PROBE_REPLY) + len(PROBE_REPLY):].strip()
    for candidate in (after, after.split()[0] if after.split() else ""):
        if candidate and len(tokenizer.encode(candidate, add_special_tokens=False)) == 1:
            return candidate
    return tokenizer.eos_token


TOOL_PROBE = [
    {"role": "user", "content": "tunebook-probe-question"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "tunebook_probe_tool", "arguments": {"probe": "tunebook-probe-arg"}}}]},
    {"role": "tool", "content": "tunebook-probe-result"},
    {"role": "assistant", "content": "tunebook-probe-answer"},
]
TOOL_FIX = ("use a chat template that writes tool calls and tool results (the model's own when it has one, e.g. "
            "Qwen 2.5 or Llama 3.1: remove model.chat_template; or a .jinja file), set data.on_bad_record: skip to "
            "leave these conversations out, or rewrite them as plain user/assistant turns before training")


def tool_turn_problem(template: str, tokenizer) -> str | None:
    """Why conversations with tool calls cannot be trained with `template`, or None when they can: the
    template must write the call and the result, and the result must fall outside the trained spans (a
    tool's output is the model's input, never its target; TRL's assistant-only loss does the same)."""
    try:
        text, spans = render_with_spans(template, TOOL_PROBE, tokenizer)
    except TunebookError as exc:
        return f"the chat template fails on them ({str(exc).splitlines()[0]})"
    missing = [what for what, probe in (("tool calls", "tunebook_probe_tool"), ("tool results", "tunebook-probe-result"))
               if probe not in text]
    if missing:
        return f"the chat template does not write {' or '.join(missing)}"
    result = text.index("tunebook-probe-result")
    if any(start <= result < end for start, end in spans):
        return "the chat template puts tool results inside the assistant's trained text"
    return None
