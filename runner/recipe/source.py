"""Recipe files as plain data that remembers where every key came from.

A recipe is read as a stack of layers: the file, the files it `extends` (deep-merged: mappings merge,
lists replace, the child wins) and the command line's `--set` overrides. Each layer keeps the line and
column of its keys, so an error found later, after merging and validation, still names the file and
line the user has to edit.
"""
from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, ReusedAnchorWarning, YAMLError

from ..errors import Loc, Problem, RecipeError, describe, foreign_encoding, reencode_fix
from .yaml_limits import check_yaml_bounds

KeyPath = tuple[str | int, ...]


def path_str(path: KeyPath) -> str:
    """`('stages', 0, 'train', 'learning_rate')` -> `stages.0.train.learning_rate` (the --set spelling)."""
    return ".".join(str(p) for p in path)


@dataclass
class Layer:
    """One source of recipe data: a file (with key locations) or the set of `--set` overrides."""

    name: str
    data: dict
    locs: dict[KeyPath, Loc] = field(default_factory=dict)
    owned: dict[KeyPath, Loc] | None = None  # for --set: exact paths this layer owns, with their text

    def locate(self, path: KeyPath) -> Loc | None | bool:
        """The location of `path` if this layer decides its value; False if it says nothing about it."""
        if self.owned is not None:
            for owned_path, loc in self.owned.items():
                if path[: len(owned_path)] == owned_path:
                    return loc
            return False
        node: Any = self.data
        inside_list = False  # lists replace: below a list of this layer, this layer decides everything
        for depth, key in enumerate(path):
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, dict):
                return self._nearest(path[:depth]) if inside_list else False
            elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
                inside_list = True
                node = node[key]
            else:  # a list without that item, or a scalar that replaced what lies below it
                return self._nearest(path[:depth])
        return self._nearest(path)

    def _nearest(self, path: KeyPath) -> Loc | None:
        for cut in range(len(path), -1, -1):
            if path[:cut] in self.locs:
                return self.locs[path[:cut]]
        return None


class Located:
    """The merged recipe data plus a way to find where any key path came from."""

    def __init__(self, data: dict, layers: list[Layer], aliases: dict[KeyPath, KeyPath] | None = None):
        self.data = data
        self.layers = layers  # most derived first: --set, the recipe, its parent, ...
        self.aliases = aliases or {}

    def origin(self, path: KeyPath) -> KeyPath:
        """The path a value was written at (stage keys may come from the top-level defaults)."""
        for cut in range(len(path), 0, -1):
            if path[:cut] in self.aliases:
                return self.aliases[path[:cut]] + path[cut:]
        return path

    def locate(self, path: KeyPath) -> Loc | None:
        path = self.origin(path)
        for layer in self.layers:
            found = layer.locate(path)
            if found is not False:
                return found
        # a key that none of the layers has (e.g. a missing required key): point at its parent
        return self.locate(path[:-1]) if path else None


# ---------------------------------------------------------------------------------------------- reading

def _yaml() -> YAML:
    # Round-trip mode keeps key positions and builds only plain data (no Python objects): safe to load.
    y = YAML(typ="rt")
    y.allow_duplicate_keys = False
    return y


def _plain(node: Any, path: KeyPath, locs: dict[KeyPath, Loc], source: str) -> Any:
    """ruamel's round-trip nodes -> plain dict/list/scalars, recording 1-based key positions."""
    if isinstance(node, CommentedMap):
        out = {}
        for key in node:
            if not isinstance(key, (str, int, float, bool)) or key is None:
                line, col = node.lc.key(key)
                raise RecipeError([Problem(Loc(source, line + 1, col + 1), path_str(path),
                                           f"a key must be a plain name, not {describe(_plain_value(key))}",
                                           "write keys as plain names (key: value)")])
            try:
                place = node.lc.key(key)
            except KeyError:
                place = None
            # a key merged in by `<<:` has no place of its own: the mapping's
            line, col = place if place is not None else (node.lc.line, node.lc.col)
            locs[path + (str(key),)] = Loc(source, line + 1, col + 1)
            out[str(key)] = _plain(node[key], path + (str(key),), locs, source)
        return out
    if isinstance(node, CommentedSeq):
        out_list = []
        for i, item in enumerate(node):
            line, col = node.lc.item(i)
            locs[path + (i,)] = Loc(source, line + 1, col + 1)
            out_list.append(_plain(item, path + (i,), locs, source))
        return out_list
    if node is None or isinstance(node, bool):
        return node
    if isinstance(node, int):
        # ruamel's ScalarBoolean is an int subclass
        return bool(node) if type(node).__name__ == "ScalarBoolean" else int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    if isinstance(node, (datetime, date)):
        return node.isoformat()
    raise RecipeError([Problem(locs.get(path) or Loc(source), path_str(path),
                               f"{describe(_plain_value(node))} is not a recipe value",
                               "use plain text, numbers, true/false, lists and mappings")])


def _plain_value(node: Any) -> Any:
    """A round-trip node as the plain kind it stands for (for messages only)."""
    if isinstance(node, CommentedMap):
        return {}
    if isinstance(node, (CommentedSeq, tuple)):
        return []
    return node


def _read_text(path: Path, source: str) -> str:
    """The file as text: UTF-8, with or without a byte-order mark; UTF-16/32 and other bytes are errors."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError([Problem(Loc(source), "", "file not found",
                                   "check the path (relative paths are relative to the current directory)")]) from None
    except IsADirectoryError:
        raise RecipeError([Problem(Loc(source), "", "is a folder, not a recipe file", "name a .yaml file")]) from None
    except OSError as exc:
        raise RecipeError([Problem(Loc(source), "", f"cannot read the file ({exc.strerror})", "")]) from None
    encoding = foreign_encoding(raw[:64])
    if encoding:
        raise RecipeError([Problem(Loc(source), "", f"the file is {encoding} text", reencode_fix(encoding))])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise RecipeError([Problem(Loc(source, line, column), "", f"the file is not UTF-8 text (byte "
                                   f"0x{raw[exc.start]:02x})", "save it as UTF-8")]) from None


DIGITS_FIX = "no setting needs a number that long: check for a pasted or repeated value"


def too_long(exc: ValueError) -> str:
    """Python's refusal to read a number of thousands of digits, said plainly (other ValueErrors as they are)."""
    found = re.search(r"value has (\d+) digits", str(exc))
    return f"a number of {int(found.group(1)):,} digits is too long to read" if found else str(exc)


def read_yaml(path: Path, source: str | None = None) -> tuple[dict, dict[KeyPath, Loc]]:
    """Read one YAML mapping with its key locations. Syntax errors become RecipeErrors with a position."""
    source = source or str(path)
    text = _read_text(path, source)
    check_yaml_bounds(text, source)  # before anything is built: bounded time and memory whatever the text
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ReusedAnchorWarning)  # YAML allows it: the later anchor wins
            node = _yaml().load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        loc = Loc(source, mark.line + 1, mark.column + 1) if mark else Loc(source)
        what = " ".join(str(s) for s in (exc.context, exc.problem) if s)
        if "duplicate" in what:
            fix = "remove one of the two entries"
        else:
            fix = "fix the YAML syntax (indentation, a missing ':' or an unclosed quote or bracket)"
        raise RecipeError([Problem(loc, "", f"YAML error: {what}", fix)])
    except YAMLError as exc:
        raise RecipeError([Problem(Loc(source), "", f"YAML error: {exc}", "fix the YAML syntax")])
    except ValueError as exc:  # Python's own bound on the digits of a number
        raise RecipeError([Problem(Loc(source), "", too_long(exc), DIGITS_FIX)])
    if node is None:
        raise RecipeError([Problem(Loc(source), "", "the file is empty", "a recipe is a YAML mapping (key: value)")])
    if not isinstance(node, CommentedMap):
        raise RecipeError([Problem(Loc(source, 1, 1), "", f"expected a mapping of keys, got {describe(_plain_value(node))}",
                                   "a recipe is a YAML mapping (key: value)")])
    locs: dict[KeyPath, Loc] = {(): Loc(source, 1, 1)}
    return _plain(node, (), locs, source), locs


def deep_merge(parent: Any, child: Any) -> Any:
    """Mappings merge key by key, everything else (lists included) is replaced; the child wins."""
    if isinstance(parent, dict) and isinstance(child, dict):
        out = dict(parent)
        for key, value in child.items():
            out[key] = deep_merge(parent[key], value) if key in parent else copy.deepcopy(value)
        return out
    return copy.deepcopy(child)


def load_layers(path: Path, _chain: tuple[Path, ...] = ()) -> list[Layer]:
    """The file and, through `extends`, its ancestors: most derived first. A cycle is an error."""
    try:
        resolved = path.resolve()
    except (RuntimeError, OSError) as exc:  # a symbolic link that points back at itself
        raise RecipeError([Problem(Loc(str(path)), "", f"cannot follow the path ({exc})",
                                   "point at the recipe file itself, not a link that loops")]) from None
    if resolved in _chain:
        cycle = " -> ".join(str(p) for p in _chain + (resolved,))
        raise RecipeError([Problem(Loc(str(path)), "extends", f"`extends` forms a cycle: {cycle}",
                                   "remove the `extends` that points back to a file already in the chain")])
    data, locs = read_yaml(path)
    layers = [Layer(str(path), data, locs)]
    parent = data.pop("extends", None)
    if parent is None:
        return layers
    if not isinstance(parent, str) or not parent.strip():
        raise RecipeError([Problem(locs.get(("extends",)), "extends", "`extends` must be a path to a recipe file",
                                   "e.g. `extends: defaults/lora-sft.yaml` (relative to this file)")])
    parent_path = Path(parent).expanduser()
    if not parent_path.is_absolute():
        parent_path = path.parent / parent_path
    if parent_path.is_dir():
        raise RecipeError([Problem(locs.get(("extends",)), "extends", f"`extends` names a folder: {parent_path}",
                                   "name a recipe file in it, e.g. `extends: defaults/lora-sft.yaml`")])
    if not parent_path.is_file():
        what = "something that is not a file" if parent_path.exists() else "a missing file"
        raise RecipeError([Problem(locs.get(("extends",)), "extends", f"`extends` names {what}: {parent_path}",
                                   "the path is relative to the file that contains `extends`")])
    return layers + load_layers(parent_path, _chain + (resolved,))


# ---------------------------------------------------------------------------------------------- --set

def parse_set(expr: str) -> tuple[KeyPath, Any]:
    """`stages.0.train.learning_rate=1e-4` -> (('stages', 0, 'train', 'learning_rate'), 0.0001).
    The value is read as YAML, so numbers, booleans, lists and mappings all work."""
    loc = Loc(f"--set {expr}")
    if "=" not in expr:
        raise RecipeError([Problem(loc, "", "an override needs the form KEY.PATH=VALUE",
                                   "e.g. --set stages.0.train.learning_rate=1e-4")])
    key, _, raw = expr.partition("=")
    parts = [p.strip() for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise RecipeError([Problem(loc, key, "empty key in the override path",
                                   "separate keys with single dots, e.g. lora.r=16")])
    path = tuple(int(p) if p.isdigit() else p for p in parts)
    try:
        check_yaml_bounds(raw, loc.source)
        value = _plain(_yaml().load(raw), path, {}, loc.source) if raw.strip() else None
    except (MarkedYAMLError, YAMLError) as exc:
        raise RecipeError([Problem(loc, key, f"cannot read the value: {exc}",
                                   "quote strings that contain ':' or '#'")])
    except ValueError as exc:  # Python's own bound on the digits of a number
        raise RecipeError([Problem(loc, key, f"cannot read the value: {too_long(exc)}", DIGITS_FIX)])
    return path, value


def apply_set(data: dict, path: KeyPath, value: Any, loc: Loc) -> None:
    """Put `value` at `path`, creating mappings on the way; list items must already exist."""
    node: Any = data
    for depth, key in enumerate(path[:-1]):
        nxt = path[depth + 1]
        if isinstance(node, list):
            if not isinstance(key, int) or not 0 <= key < len(node):
                raise RecipeError([Problem(loc, path_str(path[: depth + 1]),
                                           f"there is no item {key} in `{path_str(path[:depth])}` "
                                           f"(it has {len(node)}: 0..{len(node) - 1})",
                                           "use an index that exists")])
            node = node[key]
            continue
        if not isinstance(node, dict):
            raise RecipeError([Problem(loc, path_str(path[:depth]), "is not a mapping, it cannot hold keys",
                                       "override the value itself")])
        if isinstance(key, int):
            raise RecipeError([Problem(loc, path_str(path[: depth + 1]), f"`{path_str(path[:depth])}` is not a list",
                                       "use a key name here")])
        if key not in node or node[key] is None:
            node[key] = [] if isinstance(nxt, int) else {}
        node = node[key]
    last = path[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or not 0 <= last < len(node):
            raise RecipeError([Problem(loc, path_str(path), f"there is no item {last} in `{path_str(path[:-1])}`",
                                       "use an index that exists")])
        node[last] = value
    elif isinstance(node, dict) and not isinstance(last, int):
        node[last] = value
    else:
        raise RecipeError([Problem(loc, path_str(path), "cannot be set here", "check the key path")])


def load_located(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> Located:
    """Read a recipe with its ancestors, merge them, apply overrides; keep every key's origin."""
    layers = load_layers(path)
    data: dict = {}
    for layer in reversed(layers):
        data = deep_merge(data, layer.data)
    owned: dict[KeyPath, Loc] = {}
    for expr in overrides:
        key_path, value = parse_set(expr)
        loc = Loc(f"--set {expr}")
        apply_set(data, key_path, value, loc)
        owned[key_path] = loc
    if owned:
        layers = [Layer("--set", {}, owned=owned)] + layers
    return Located(data, layers)
