"""Dataset shapes -> conversations: a list of {"role": system|user|assistant|tool, "content": str}, an
assistant turn that calls tools also carrying "tool_calls" (the Hugging Face chat format).

Formats: sharegpt (`conversations` of from/value), messages (role/content), alpaca
(instruction/input/output) and prompt/completion. `format: auto` looks at the records and says what
it chose. `data.fields` renames columns for datasets that use other names.

A conversation must be: an optional system turn, then user and assistant turns alternating, ending
with an assistant turn; an assistant turn may call tools ("tool_calls", an OpenAI "function_call", or a
ShareGPT `function_call` turn) and is then answered by tool turns (roles tool, function, observation,
ipython) before the assistant goes on. Two repairs are made and counted (as FastChat does for ShareGPT):
a leading assistant turn (a conversation split mid-way) and trailing turns left without a reply are
dropped. Anything else that does not alternate, and empty conversations, are counted and skipped.
Whether tool turns can be trained depends on the chat template (runner/data/render.py, tool_turn_problem).
"""
from __future__ import annotations

import json
from collections import Counter

from ..errors import TunebookError, describe
from ..recipe import FieldMap

FORMATS = ("sharegpt", "messages", "alpaca", "prompt_completion")

ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "assistant": "assistant", "model": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
    "function_call": "assistant",  # ShareGPT function-calling sets: the value is the call, as JSON
}
TOOL_CALL_ROLES = ("function_call",)


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
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):  # [{"type": "text", "text": ...}]
        value = "".join(str(p.get("text", "")) for p in value if p.get("type", "text") == "text")
    if not isinstance(value, str):
        raise BadRecord(f"{what} is not text (it is {describe(value)})")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON's "\ud800" escapes: half of a UTF-16 pair, no character
            raise BadRecord(f"{what} holds half of a UTF-16 character pair ({value[exc.start]!r} at character "
                            f"{exc.start + 1})") from None
    return value


def _turns(value, fields: FieldMap, role_keys: tuple[str, ...], content_keys: tuple[str, ...], what: str) -> list[dict]:
    if not isinstance(value, list):
        raise BadRecord(f"'{what}' is not a list of turns (it is {describe(value)})")
    role_keys = (fields.role,) if fields.role else role_keys
    content_keys = (fields.content,) if fields.content else content_keys
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise BadRecord(f"turn {i} of '{what}' is not a mapping of role and text (it is {describe(turn)})")
        role_key = next((k for k in role_keys if k in turn), None)
        content_key = next((k for k in content_keys if k in turn), None)
        calls = _tool_calls(turn, f"turn {i} of '{what}'")
        if role_key is None or (content_key is None and not calls):
            missing = f"'{role_keys[0]}'" if role_key is None else f"'{content_keys[0]}'"
            raise BadRecord(f"turn {i} of '{what}' has no {missing} (its keys: {', '.join(map(str, turn))})")
        raw_role = str(turn[role_key]).strip().lower()
        if raw_role not in ROLE_ALIASES:
            raise BadRecord(f"turn {i} of '{what}' has unknown role '{str(turn[role_key])[:40]}' "
                            f"(known: {', '.join(ROLE_ALIASES)})")
        content = _text(turn.get(content_key), f"turn {i} content")
        if raw_role in TOOL_CALL_ROLES:  # the whole value is the call
            calls, content = _calls_from_text(content, f"turn {i} of '{what}'"), ""
        turns.append({"role": ROLE_ALIASES[raw_role], "content": content, **({"tool_calls": calls} if calls else {})})
    return turns


def _arguments(value):
    """Tool-call arguments as a mapping when they are JSON text of one (chat templates write them with tojson)."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            return value
        return parsed if isinstance(parsed, dict) else value
    return value


def _call(call, where: str) -> dict:
    """One tool call as {"type": "function", "function": {"name", "arguments"}}."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
        raise BadRecord(f"{where} has a tool call without a function name")
    return {"type": "function", "function": {"name": fn["name"], "arguments": _arguments(fn.get("arguments", {}))}}


def _tool_calls(turn: dict, where: str) -> list[dict]:
    """The tool calls of a turn: "tool_calls" (a list), or an OpenAI-style "function_call" (one)."""
    calls = turn.get("tool_calls")
    if calls is None and turn.get("function_call") is not None:
        calls = [turn["function_call"]]
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise BadRecord(f"{where}: tool_calls is not a list (it is {describe(calls)})")
    return [_call(c, where) for c in calls]


def _calls_from_text(text: str, where: str) -> list[dict]:
    """A ShareGPT `function_call` value: one call, or a list of them, as JSON text."""
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        raise BadRecord(f"{where} is a function call that is not JSON ({text[:40]!r})") from None
    return [_call(c, where) for c in (parsed if isinstance(parsed, list) else [parsed])]


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


def has_tool_turns(conversation: list[dict]) -> bool:
    return any(t["role"] == "tool" or t.get("tool_calls") for t in conversation)


def _alternates(turns: list[dict]) -> bool:
    """user, then the assistant (calling tools, answered by tool turns, any number of times), repeated;
    the conversation ends with the assistant."""
    expect = "user"
    for turn in turns:
        role = turn["role"]
        if expect == "user" and role == "user":
            expect = "assistant"
        elif expect == "assistant" and role == "assistant":
            expect = "tool" if turn.get("tool_calls") else "user"
        elif expect == "tool" and role == "tool":
            expect = "tool or assistant"
        elif expect == "tool or assistant" and role in ("tool", "assistant"):
            expect = ("tool" if turn.get("tool_calls") else "user") if role == "assistant" else expect
        else:
            return False
    return expect in ("user", "tool")  # ends with a reply, or with a call whose results are not in the data


def normalize(turns: list[dict], system_prompt: str | None, issues: Counter) -> list[dict] | None:
    """A trainable conversation, or None (with the reason counted in `issues`)."""
    system = [t["content"].strip() for t in turns[:1] if t["role"] == "system"]
    rest = turns[len(system):]
    if not any(t["content"].strip() or t.get("tool_calls") for t in rest):
        issues["empty"] += 1
        return None
    if any(not t["content"].strip() and not t.get("tool_calls") for t in rest):
        issues["empty_turn"] += 1
        return None
    repairs = []
    if rest and rest[0]["role"] == "assistant":
        rest = rest[1:]
        while rest and rest[0]["role"] in ("tool", "assistant"):  # the rest of that reply
            rest = rest[1:]
        repairs.append("leading_assistant_dropped")
    if rest and rest[-1]["role"] in ("user", "tool"):
        while rest and rest[-1]["role"] in ("user", "tool"):
            rest = rest[:-1]
        repairs.append("trailing_user_dropped")
    if not rest:
        issues["empty"] += 1
        return None
    if not _alternates(rest):
        issues["non_alternating"] += 1
        return None
    issues.update(repairs)  # counted only for conversations that are kept
    system_text = "\n\n".join(s for s in [(system_prompt or "").strip(), *system] if s)
    return ([{"role": "system", "content": system_text}] if system_text else []) + rest
