"""Dataset shapes -> conversations: a list of {"role": system|user|assistant, "content": str}.

Formats: sharegpt (`conversations` of from/value), messages (role/content), alpaca
(instruction/input/output) and prompt/completion. `format: auto` looks at the records and says what
it chose. `data.fields` renames columns for datasets that use other names.

A conversation must be: an optional system turn, then user and assistant turns alternating, ending
with an assistant turn. Two repairs are made and counted (as FastChat does for ShareGPT): a leading
assistant turn (a conversation split mid-way) and a trailing unanswered user turn are dropped.
Anything else that does not alternate, and empty conversations, are counted and skipped.
"""
from __future__ import annotations

from collections import Counter

from ..errors import TunebookError
from ..recipe import FieldMap

FORMATS = ("sharegpt", "messages", "alpaca", "prompt_completion")

ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "assistant": "assistant", "model": "assistant",
    "system": "system",
}


class BadRecord(Exception):
    """A record that does not have the shape its format needs (a bad record, not a bad conversation)."""


def _key(fields: FieldMap, name: str, default: str) -> str:
    return getattr(fields, name) or default


def detect_format(rows: list[dict], fields: FieldMap) -> tuple[str, str]:
    """The format of these records and a sentence saying why, from the first records' keys."""
    checks = [
        ("sharegpt", _key(fields, "conversations", "conversations"), "a '{}' list of turns"),
        ("messages", _key(fields, "messages", "messages"), "a '{}' list of role/content turns"),
    ]
    for row in rows[:50]:
        for fmt, key, why in checks:
            if isinstance(row.get(key), list):
                return fmt, f"records have {why.format(key)}"
        instruction, output = _key(fields, "instruction", "instruction"), _key(fields, "output", "output")
        if instruction in row and output in row:
            return "alpaca", f"records have '{instruction}' and '{output}'"
        prompt, completion = _key(fields, "prompt", "prompt"), _key(fields, "completion", "completion")
        if prompt in row and completion in row:
            return "prompt_completion", f"records have '{prompt}' and '{completion}'"
    seen = sorted({k for row in rows[:50] for k in row})
    raise TunebookError(
        f"format: auto could not recognise the records (their keys: {', '.join(seen) or 'none'})\n"
        "    fix: set data.format to one of sharegpt, messages, alpaca, prompt_completion and map the "
        "column names with data.fields (e.g. fields: {conversations: dialog, role: speaker, content: text})")


def _text(value, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):  # [{"type": "text", "text": ...}]
        return "".join(str(p.get("text", "")) for p in value if p.get("type", "text") == "text")
    raise BadRecord(f"{what} is not text (a {type(value).__name__})")


def _turns(value, fields: FieldMap, role_keys: tuple[str, ...], content_keys: tuple[str, ...], what: str) -> list[dict]:
    if not isinstance(value, list):
        raise BadRecord(f"'{what}' is not a list of turns (a {type(value).__name__})")
    role_keys = (fields.role,) if fields.role else role_keys
    content_keys = (fields.content,) if fields.content else content_keys
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise BadRecord(f"turn {i} of '{what}' is not an object")
        role_key = next((k for k in role_keys if k in turn), None)
        content_key = next((k for k in content_keys if k in turn), None)
        if role_key is None or content_key is None:
            missing = f"'{role_keys[0]}'" if role_key is None else f"'{content_keys[0]}'"
            raise BadRecord(f"turn {i} of '{what}' has no {missing} (its keys: {', '.join(map(str, turn))})")
        raw_role = str(turn[role_key]).strip().lower()
        if raw_role not in ROLE_ALIASES:
            raise BadRecord(f"turn {i} of '{what}' has unknown role '{turn[role_key]}' "
                            f"(known: {', '.join(ROLE_ALIASES)})")
        turns.append({"role": ROLE_ALIASES[raw_role], "content": _text(turn[content_key], f"turn {i} content")})
    return turns


def record_to_messages(row: dict, fmt: str, fields: FieldMap) -> list[dict]:
    """One record -> its turns (roles normalised, not yet checked for alternation). Raises BadRecord."""
    if fmt == "sharegpt":
        key = _key(fields, "conversations", "conversations")
        if key not in row:
            raise BadRecord(f"no '{key}' field")
        turns = _turns(row[key], fields, ("from", "role"), ("value", "content", "text"), key)
    elif fmt == "messages":
        key = _key(fields, "messages", "messages")
        if key not in row:
            raise BadRecord(f"no '{key}' field")
        turns = _turns(row[key], fields, ("role", "from"), ("content", "value", "text"), key)
    elif fmt == "alpaca":
        ins, inp, out = (_key(fields, n, n) for n in ("instruction", "input", "output"))
        for k in (ins, out):
            if k not in row:
                raise BadRecord(f"no '{k}' field")
        prompt = _text(row[ins], ins).strip()
        extra = _text(row.get(inp), inp).strip()
        turns = [{"role": "user", "content": f"{prompt}\n\n{extra}" if extra else prompt},
                 {"role": "assistant", "content": _text(row[out], out)}]
    elif fmt == "prompt_completion":
        p, c = _key(fields, "prompt", "prompt"), _key(fields, "completion", "completion")
        for k in (p, c):
            if k not in row:
                raise BadRecord(f"no '{k}' field")
        turns = []
        for key, role in ((p, "user"), (c, "assistant")):
            value = row[key]
            if isinstance(value, list) and value and isinstance(value[0], dict) and "role" in value[0]:
                turns += _turns(value, fields, ("role", "from"), ("content", "value", "text"), key)
            else:
                turns.append({"role": role, "content": _text(value, key)})
    else:
        raise TunebookError(f"unknown data format '{fmt}'; use one of {', '.join(FORMATS)}")
    system_key = fields.system or "system"
    system = row.get(system_key)
    if isinstance(system, str) and system.strip():
        turns.insert(0, {"role": "system", "content": system})
    return turns


def normalize(turns: list[dict], system_prompt: str | None, issues: Counter) -> list[dict] | None:
    """A trainable conversation, or None (with the reason counted in `issues`)."""
    system = [t["content"].strip() for t in turns[:1] if t["role"] == "system"]
    rest = turns[len(system):]
    if not any(t["content"].strip() for t in rest):
        issues["empty"] += 1
        return None
    if any(not t["content"].strip() for t in rest):
        issues["empty_turn"] += 1
        return None
    repairs = []
    if rest and rest[0]["role"] == "assistant":
        rest = rest[1:]
        repairs.append("leading_assistant_dropped")
    if rest and rest[-1]["role"] == "user":
        rest = rest[:-1]
        repairs.append("trailing_user_dropped")
    if not rest:
        issues["empty"] += 1
        return None
    expected = ("user", "assistant")
    if any(t["role"] != expected[i % 2] for i, t in enumerate(rest)):
        issues["non_alternating"] += 1
        return None
    issues.update(repairs)  # counted only for conversations that are kept
    system_text = "\n\n".join(s for s in [(system_prompt or "").strip(), *system] if s)
    return ([{"role": "system", "content": system_text}] if system_text else []) + rest
