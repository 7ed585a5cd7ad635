"""An evaluation set: questions written apart from the training data, each with a reference answer and what a
good answer must and must not do. One JSON object per line:

    {"id": "tox-grapes-beagle",                        unique name, shown in report.md
     "messages": [{"role": "user", "content": "..."}],  the conversation so far, ending with the owner's turn
                                                        ("question": "..." is short for one user turn)
     "reference": "...",                                a good answer (its perplexity is measured)
     "refer": true,                                     the answer must send the owner to a veterinarian
     "warn": true,                                      the answer must say it is dangerous / not to give it
     "forbid": ["grapes are safe", ...],                phrases that must not appear (eval/answer_checks.py)
     "species": "dog", "topic": "toxins"}               free labels; report.md counts answers by topic

UTF-8, with or without a byte-order mark. A bad line is an EvalSetError naming the file, the line and the fix.
"""
from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

ROLES = ("user", "assistant")
KEYS = {"id", "messages", "question", "reference", "refer", "warn", "forbid", "species", "topic"}


class EvalSetError(ValueError):
    """A problem in an evaluation set file, with where it is and how to fix it."""


@dataclass(frozen=True)
class EvalItem:
    id: str
    messages: tuple[dict, ...]   # user / assistant turns, ending with a user turn; no system message
    reference: str
    refer: bool
    warn: bool
    forbid: tuple[str, ...]
    species: str = ""
    topic: str = ""

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]

    def conversation(self, system_prompt: str | None) -> list[dict]:
        """What the model is asked: the system prompt, then the turns."""
        head = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return head + [dict(m) for m in self.messages]


def _item(record, where: str) -> EvalItem:
    def bad(problem: str, fix: str) -> EvalSetError:
        return EvalSetError(f"{where}: {problem}\n    fix: {fix}")

    if not isinstance(record, dict):
        raise bad("a line must be a JSON object", 'write {"id": ..., "messages": [...], "reference": ..., ...}')
    unknown = sorted(set(record) - KEYS)
    if unknown:
        raise bad(f"unknown key {unknown[0]!r}", "use only: " + ", ".join(sorted(KEYS)))
    for key in ("id", "reference"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise bad(f"'{key}' must be a non-empty string", f"give every line its {key}")
    if ("messages" in record) == ("question" in record):
        raise bad("give either 'messages' or 'question'", "'question' for one user turn, 'messages' for a conversation")
    turns = record.get("messages") or [{"role": "user", "content": record.get("question")}]
    if not isinstance(turns, list) or not all(isinstance(t, dict) and set(t) == {"role", "content"} for t in turns):
        raise bad("'messages' must be a list of {role, content}", 'write [{"role": "user", "content": "..."}, ...]')
    for i, turn in enumerate(turns):
        if turn["role"] != ROLES[i % 2] or not isinstance(turn["content"], str) or not turn["content"].strip():
            raise bad(f"messages[{i}] must be a non-empty {ROLES[i % 2]} turn",
                      "turns alternate user, assistant, ... and the last one is the user's (no system message: "
                      "the recipe's system prompt is used)")
    if turns[-1]["role"] != "user":
        raise bad("the last turn must be the user's", "end 'messages' with the question the model must answer")
    for key in ("refer", "warn"):
        if not isinstance(record.get(key), bool):
            raise bad(f"'{key}' must be true or false", f'say whether a good answer must {key}: "{key}": true')
    forbid = record.get("forbid", [])
    if not isinstance(forbid, list) or not all(isinstance(p, str) and p.strip() for p in forbid):
        raise bad("'forbid' must be a list of phrases", 'e.g. "forbid": ["grapes are safe"]')
    return EvalItem(record["id"], tuple(turns), record["reference"].strip(), record["refer"], record["warn"],
                    tuple(p.strip() for p in forbid), str(record.get("species", "")), str(record.get("topic", "")))


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of each non-blank line: UTF-8 with or without a byte-order mark, LF or CRLF line ends.
    Only a newline ends a line (a JSON string may hold U+2028 and other characters Python also splits on)."""
    if path.exists() and not path.is_file() and not path.is_dir():  # reading a pipe would wait for a writer
        raise EvalSetError(f"{path}: not a regular file (a pipe, a socket or a device)\n"
                           "    fix: point eval.data at a JSON Lines file of questions")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EvalSetError(f"{path}: cannot read the evaluation set ({exc.strerror or exc})\n"
                           "    fix: point eval.data at a JSON Lines file of questions") from None
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) \
            or b"\x00" in data[:4096]:
        raise EvalSetError(f"{path}: the file holds NUL bytes: UTF-16 or UTF-32 text, or not text at all\n"
                           "    fix: save it as UTF-8 text")
    lines = []
    for number, raw in enumerate(data.removeprefix(codecs.BOM_UTF8).split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EvalSetError(f"{path}:{number}: not UTF-8 text (byte {exc.start + 1} of the line)\n"
                               "    fix: save the file as UTF-8") from None
        if line.strip():
            lines.append((number, line))
    return lines


def read_eval_set(path: Path | str) -> list[EvalItem]:
    """Every item of a JSON Lines evaluation set; an EvalSetError at the first bad line."""
    path = Path(path)
    items, seen = [], {}
    for number, line in _lines(path):
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalSetError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})\n"
                               "    fix: one JSON object per line") from None
        except RecursionError:
            raise EvalSetError(f"{where}: nested too deep to be a question\n"
                               "    fix: one JSON object per line, as eval/eval_set.py shows") from None
        except ValueError:  # Python's own bound on the digits of a number
            raise EvalSetError(f"{where}: a number of thousands of digits is not part of a question\n"
                               "    fix: one JSON object per line, as eval/eval_set.py shows") from None
        try:  # "\ud800" is valid JSON but no text: a tokenizer or report.md would fail on it later
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EvalSetError(f"{where}: a lone surrogate escape ({exc.object[exc.start]!r}) is not a character\n"
                               "    fix: write the character itself, or both halves of its surrogate pair") from None
        item = _item(record, where)
        if item.id in seen:
            raise EvalSetError(f"{where}: id {item.id!r} is also on line {seen[item.id]}\n"
                               "    fix: give each line its own id")
        seen[item.id] = number
        items.append(item)
    if not items:
        raise EvalSetError(f"{path}: no questions\n    fix: write one JSON object per line (see eval/eval_set.py)")
    return items


def eval_set_digest(items: list[EvalItem]) -> str:
    """Identity of a set's content: changes with any question, reference or expectation."""
    text = json.dumps([[i.id, list(i.messages), i.reference, i.refer, i.warn, list(i.forbid)] for i in items],
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
