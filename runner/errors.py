"""Errors a user sees. Each one says where, what is wrong, and how to fix it; the CLI prints them
without a traceback and exits with status 2."""
from __future__ import annotations

from dataclasses import dataclass, field


class TunebookError(Exception):
    """A problem the user can fix (bad input, missing file, wrong setting). Exit status 2."""

    exit_code = 2


class Interrupted(TunebookError):
    """Ctrl-C (or a backend process stopped by it): what was saved is kept, rerunning resumes. Exit status 130."""

    exit_code = 130


class GGUFExportError(TunebookError):
    """A model folder that cannot be written as GGUF; the message says what and how to fix it."""

    def __init__(self, what: str, fix: str):
        super().__init__(f"{what}\n    fix: {fix}")


@dataclass(frozen=True)
class Loc:
    """Where a value came from: a file with a 1-based line and column, or a command-line `--set`."""

    source: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        if self.line is None:
            return self.source
        return f"{self.source}:{self.line}:{self.column}"


@dataclass
class Problem:
    """One thing wrong with a recipe: its location, the key path, what is wrong and the fix."""

    loc: Loc | None
    path: str
    message: str
    fix: str = ""

    def render(self) -> str:
        where = f"{self.loc}: " if self.loc else ""
        key = f"{self.path}: " if self.path else ""
        text = f"{where}{key}{self.message}"
        if self.fix:
            text += f"\n    fix: {self.fix}"
        return text


@dataclass(eq=False)
class RecipeError(TunebookError):
    """A recipe that cannot be used. Carries every problem found, not just the first."""

    problems: list[Problem] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.problems.sort(key=lambda p: (p.loc.source, p.loc.line or 0, p.loc.column or 0) if p.loc else ("", 0, 0))
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.problems)
        head = "invalid recipe" if n == 1 else f"invalid recipe ({n} problems)"
        return head + ":\n" + "\n".join("  " + p.render().replace("\n", "\n  ") for p in self.problems)

    def __str__(self) -> str:
        return self.render()


def describe(value: object) -> str:
    """What a value is, in the words of the file it came from, never a Python class name:
    'a list', 'a mapping', 'a number', 'text', 'true/false', 'null'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, (bytes, bytearray)):
        return "binary data"
    return "a value of an unsupported kind"


# Byte-order marks of encodings a text reader here refuses (UTF-8 with or without a BOM is read).
_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32 (little-endian)"), (b"\x00\x00\xfe\xff", "UTF-32 (big-endian)"),
         (b"\xff\xfe", "UTF-16 (little-endian)"), (b"\xfe\xff", "UTF-16 (big-endian)"))


_BY_ZEROS = {(False, True, True, True): "UTF-32 (little-endian)", (True, True, True, False): "UTF-32 (big-endian)",
             (False, True, False, True): "UTF-16 (little-endian)", (True, False, True, False): "UTF-16 (big-endian)"}


def foreign_encoding(head: bytes) -> str | None:
    """The name of a UTF-16/32 encoding that `head` (a file's first bytes) is written in, by its byte-order
    mark or, without one, by the zero bytes every ASCII character of it carries; None for UTF-8 and others."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            return name
    zeros = tuple(b == 0 for b in head[:4])  # the zero bytes around an ASCII character
    if len(head) >= 8 and head[:64].count(0) >= len(head[:64]) // 2:
        return _BY_ZEROS.get(zeros)
    return None


def reencode_fix(encoding: str) -> str:
    """How to save a UTF-16/32 file as UTF-8."""
    code = encoding.split(" ")[0] + ("LE" if "little" in encoding else "BE")
    return f"save it as UTF-8 (your editor's 'Save with encoding', or `iconv -f {code} -t UTF-8 FILE > NEW`)"
