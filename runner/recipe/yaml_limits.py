"""Bounds on a recipe's YAML before it is built: size, nesting depth, values after alias expansion, tags.

A recipe is user-supplied text. YAML aliases can make a few hundred bytes stand for billions of values
("billion laughs"), and deep nesting makes recursive readers run out of stack; both must fail fast with
the file and line. The document is checked as a stream of parse events from libyaml (C: linear time,
constant stack), counting every value an alias stands for without expanding it, before the round-trip
reader (which keeps key positions) builds anything.
"""
from __future__ import annotations

import yaml

from ..errors import Loc, Problem, RecipeError

MAX_BYTES = 256 * 1024   # ~100x the largest shipped recipe
MAX_DEPTH = 32           # recipes nest ~5 levels
MAX_VALUES = 10_000      # values after alias expansion; a recipe has ~100

_Parser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _error(source: str, mark, message: str, fix: str) -> RecipeError:
    loc = Loc(source, mark.line + 1, mark.column + 1) if mark is not None else Loc(source)
    return RecipeError([Problem(loc, "", message, fix)])


def check_yaml_bounds(text: str, source: str) -> None:
    """Raise a located RecipeError if `text` is too large, nests too deep, expands past MAX_VALUES
    values through aliases, or carries a tag; YAML syntax errors found on the way are reported too."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise _error(source, None, f"the file is {size / 1024:,.0f} KiB; a recipe is at most {MAX_BYTES // 1024} KiB",
                     "a recipe holds settings, not data: put data in its own file and name it in data.source")
    sizes: dict[str, int] = {}       # anchor -> values it stands for
    stack: list[list] = [[None, 0]]  # open collections: [anchor, values in it so far (itself included)]
    total = 0
    try:
        for event in yaml.parse(text, Loader=_Parser):
            if getattr(event, "tag", None) is not None and not isinstance(event, yaml.DocumentStartEvent):
                tag = event.tag.replace("tag:yaml.org,2002:", "!!")
                raise _error(source, event.start_mark, f"YAML tags are not supported (found {tag})",
                             "remove the tag; write plain values (quote a value to make it text)")
            if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                anchor, inside = stack.pop()
                if anchor:
                    sizes[anchor] = inside
                stack[-1][1] += inside
                continue
            if isinstance(event, yaml.AliasEvent):
                added = _alias_size(event, sizes, stack, source)
            elif isinstance(event, yaml.ScalarEvent):
                added = 1
                if event.anchor:
                    sizes[event.anchor] = 1
            elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                stack.append([event.anchor, 0])
                if len(stack) - 1 > MAX_DEPTH:
                    raise _error(source, event.start_mark, f"the document nests deeper than {MAX_DEPTH} levels",
                                 "a recipe nests a few levels (stages -> data -> fields); flatten the structure")
                added = 1  # the collection itself; what it holds is counted as it comes
            else:
                continue
            stack[-1][1] += added
            total += added
            if total > MAX_VALUES:
                raise _error(source, event.start_mark,
                             f"the document stands for more than {MAX_VALUES:,} values once its aliases are "
                             "expanded (aliases nested inside aliases?)",
                             "write the values out, or use an alias only for a small block")
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = " ".join(str(s) for s in (exc.context, exc.problem) if s)
        if "nesting depth" in what:
            raise _error(source, mark, "the document nests too deep", "a recipe nests a few levels; flatten it") from None
        raise _error(source, mark, f"YAML error: {what}",
                     "fix the YAML syntax (indentation, a missing ':' or an unclosed quote or bracket)") from None
    except yaml.YAMLError as exc:
        raise _error(source, None, f"YAML error: {exc}", "fix the YAML syntax") from None


def _alias_size(event, sizes: dict[str, int], stack: list[list], source: str) -> int:
    """How many values an alias stands for; a loop or an unknown anchor is an error."""
    if any(frame[0] == event.anchor for frame in stack):
        raise _error(source, event.start_mark, f"alias *{event.anchor} is inside the value it names (a loop)",
                     "a value cannot contain itself; write it out")
    if event.anchor not in sizes:
        raise _error(source, event.start_mark, f"alias *{event.anchor} names no anchor (&{event.anchor}) defined "
                     "before it", "define the anchor first, or write the value")
    return sizes[event.anchor]
