"""What Ollama does with a Modelfile, for tests that cannot run Ollama here.

- `parse_modelfile`: Ollama's Modelfile parser (parser/parser.go, `ParseFile`), the same state machine:
  commands, `#` comments, values that are bare, "quoted" or \"\"\"triple-quoted\"\"\" across lines.
- `render_go`: the subset of Go's text/template that chat templates use: text, {{ }} actions with `{{-` / `-}}`
  trimming, `range` (with `$i, $m :=`), `if` / `else if` / `else`, `end`, variables (`:=`, `=`, `$`),
  fields (`.Role`, `$m.Content`, `$.System`), string and number literals, and the functions `eq`, `ne`,
  `and`, `or`, `not`, `len`. Anything else is an error, not a guess.
- `ollama_messages`: the template data Ollama builds for a chat request (server/routes.go, template.go):
  the Modelfile's SYSTEM prepended when the conversation has no system message, consecutive messages of one
  role merged with a blank line (`collate`), `.System` the system messages joined.
"""
from __future__ import annotations

import re

# --- the Modelfile parser -------------------------------------------------------------------------------

COMMANDS = {"from", "license", "template", "system", "adapter", "renderer", "parser", "parameter", "message",
            "requires"}


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """[(command, argument)]: ("model", path) for FROM, (parameter name, value) for PARAMETER."""
    NIL, NAME, VALUE, PARAMETER, COMMENT = range(5)
    state, buf, name, out = NIL, "", "", []
    for r in text:
        space, newline = r in " \t", r in "\r\n"
        if state == NIL:
            nxt, keep = (COMMENT, None) if r == "#" else (NIL, None) if space or newline else (NAME, r)
        elif state == NAME:
            if r.isalpha():
                nxt, keep = NAME, r
            elif space:
                nxt, keep = VALUE, None
            else:
                raise ValueError(f"invalid command near {buf!r}")
        elif state == VALUE:
            nxt, keep = (NIL, r) if space or newline else (VALUE, r)
        elif state == PARAMETER:
            if r.isalnum() or r == "_":
                nxt, keep = PARAMETER, r
            elif space:
                nxt, keep = VALUE, None
            else:
                raise ValueError("unexpected end of a PARAMETER name")
        else:  # COMMENT
            nxt, keep = (NIL, None) if newline else (COMMENT, None)
        if nxt != state:
            if state == NAME:
                command = buf.lower()
                if command not in COMMANDS:
                    raise ValueError(f"unknown command {buf!r}")
                name = "model" if command == "from" else command
                if command == "parameter":
                    nxt = PARAMETER
            elif state == PARAMETER:
                name = buf
            elif state == VALUE:
                value, ok = _unquote(buf.strip())
                if not ok or space:
                    buf += r
                    continue
                out.append((name, value))
            buf, state = "", nxt
        if keep is not None and keep.isprintable():
            buf += keep
    if state == VALUE:
        value, ok = _unquote(buf.strip())
        if not ok:
            raise ValueError("unexpected end of file inside a quoted value")
        out.append((name, value))
    elif state not in (NIL, COMMENT):
        raise ValueError("unexpected end of file")
    return out


# --- Ollama's template data -----------------------------------------------------------------------------

def ollama_messages(messages: list[dict], modelfile_system: str | None) -> dict:
    """The data Ollama's chat endpoint renders its template with."""
    msgs = [dict(m) for m in messages]
    if modelfile_system and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": modelfile_system})
    system, collated = [], []
    for m in msgs:
        if m["role"] == "system":
            system.append(m["content"])
        if collated and collated[-1]["role"] == m["role"] and m["role"] != "tool":
            collated[-1]["content"] += "\n\n" + m["content"]
        else:
            collated.append(m)
    return {"System": "\n\n".join(system), "Messages": [{"Role": m["role"], "Content": m["content"]} for m in collated]}


# --- Go's text/template, the subset chat templates use --------------------------------------------------

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|:=|=|,|[^\s(),]+)')


def _tokenize_template(src: str) -> list[tuple[str, str]]:
    parts, pos = [], 0
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        parts.append(("text", text))
        parts.append(("action", m.group(2).strip()))
        pos = m.end()
        if m.group(3):
            rest = src[pos:]
            pos += len(rest) - len(rest.lstrip(" \t\r\n"))
    parts.append(("text", src[pos:]))
    return parts


def _parse(parts: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list, int, str | None]:
    """Nodes until an action whose keyword is in `stop`; returns (nodes, index after it, that action)."""
    nodes = []
    while i < len(parts):
        kind, body = parts[i]
        i += 1
        if kind == "text":
            if body:
                nodes.append(("text", body))
            continue
        word = body.split(None, 1)[0] if body else ""
        if word in stop:
            return nodes, i, body
        if word == "if":
            branches, otherwise = [], []
            cond = body[2:].strip()
            while True:
                inner, i, ended = _parse(parts, i, ("else", "end"))
                branches.append((cond, inner))
                if ended == "end":
                    break
                rest = ended[4:].strip()
                if rest.startswith("if "):
                    cond = rest[3:].strip()
                    continue
                otherwise, i, ended = _parse(parts, i, ("end",))
                break
            nodes.append(("if", branches, otherwise))
        elif word == "range":
            spec = body[5:].strip()
            names = []
            if ":=" in spec:
                left, spec = spec.split(":=", 1)
                names = [n.strip() for n in left.split(",")]
            inner, i, _ = _parse(parts, i, ("end",))
            nodes.append(("range", names, spec.strip(), inner))
        elif word in ("end", "else"):
            raise ValueError(f"unexpected {{{{ {body} }}}}")
        else:
            nodes.append(("action", body))
    if stop:
        raise ValueError(f"missing {{{{ {stop[-1]} }}}}")
    return nodes, i, None


def _truthy(v) -> bool:
    return bool(v) if not isinstance(v, (int, float)) or isinstance(v, bool) else v != 0


class _Scope:
    def __init__(self, root):
        self.frames = [{"$": root}]

    def lookup(self, name):
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise ValueError(f"undefined variable {name}")

    def assign(self, name, value):
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise ValueError(f"assignment to undeclared variable {name}")


def _field(value, path: list[str]):
    for key in path:
        if not isinstance(value, dict) or key not in value:
            raise ValueError(f"no field {key!r}")
        value = value[key]
    return value


_FUNCS = {"eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not _truthy(a),
          "len": len}


def _eval(tokens: list[str], dot, scope: _Scope):
    """A pipeline without `|`: a function call, or one operand."""
    def operand(pos):
        tok = tokens[pos]
        if tok == "(":
            depth, end = 0, pos
            while True:
                depth += {"(": 1, ")": -1}.get(tokens[end], 0)
                if depth == 0:
                    break
                end += 1
            return _eval(tokens[pos + 1:end], dot, scope), end + 1
        if tok.startswith('"'):
            return bytes(tok[1:-1], "utf-8").decode("unicode_escape"), pos + 1
        if re.fullmatch(r"-?\d+", tok):
            return int(tok), pos + 1
        if tok.startswith("$"):
            name, *path = tok.split(".")
            return _field(scope.lookup(name), path), pos + 1
        if tok.startswith("."):
            return (_field(dot, tok[1:].split(".")) if tok != "." else dot), pos + 1
        raise ValueError(f"unsupported operand {tok!r}")

    head = tokens[0]
    if head in ("and", "or"):
        pos, value = 1, None
        while pos < len(tokens):
            value, pos = operand(pos)
            if _truthy(value) != (head == "and"):
                return value
        return value
    if head in _FUNCS:
        args, pos = [], 1
        while pos < len(tokens):
            value, pos = operand(pos)
            args.append(value)
        return _FUNCS[head](*args)
    value, pos = operand(0)
    if pos != len(tokens):
        raise ValueError(f"unsupported pipeline {' '.join(tokens)!r}")
    return value


def _run(nodes, dot, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "action":
            tokens = _TOKEN.findall(node[1])
            if len(tokens) > 2 and tokens[0].startswith("$") and tokens[1] in (":=", "="):
                value = _eval(tokens[2:], dot, scope)
                if tokens[1] == ":=":
                    scope.frames[-1][tokens[0]] = value
                else:
                    scope.assign(tokens[0], value)
                continue
            value = _eval(tokens, dot, scope)
            out.append("" if value is None else str(value))
        elif kind == "if":
            for cond, inner in node[1]:
                if _truthy(_eval(_TOKEN.findall(cond), dot, scope)):
                    scope.frames.append({})
                    _run(inner, dot, scope, out)
                    scope.frames.pop()
                    break
            else:
                scope.frames.append({})
                _run(node[2], dot, scope, out)
                scope.frames.pop()
        elif kind == "range":
            names, spec, inner = node[1], node[2], node[3]
            for index, item in enumerate(_eval(_TOKEN.findall(spec), dot, scope) or []):
                frame = {}
                if len(names) == 2:
                    frame[names[0]], frame[names[1]] = index, item
                elif len(names) == 1:
                    frame[names[0]] = item
                scope.frames.append(frame)
                _run(inner, item, scope, out)
                scope.frames.pop()


def render_go(template: str, data: dict) -> str:
    nodes, _, _ = _parse(_tokenize_template(template), 0, ())
    out: list[str] = []
    _run(nodes, data, _Scope(data), out)
    return "".join(out)
