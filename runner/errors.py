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


# What the system says when a file cannot be written, and what the user can do about it.
_WRITE_ERRORS = {28: ("the disk is full", "free space (`tunebook gc RUN` removes what no version needs) or set "
                      "output_dir on a larger disk"),
                 122: ("the disk quota is used up", "free space or set output_dir elsewhere"),
                 27: ("a file grew past the size limit (`ulimit -f`)", "raise the limit (`ulimit -f unlimited`)"),
                 30: ("the file system is read-only", "set output_dir to a folder you can write to"),
                 13: ("permission denied", "set output_dir to a folder you can write to, or fix its permissions"),
                 1: ("operation not permitted", "set output_dir to a folder you can write to, or fix its permissions")}


def write_failure(exc: BaseException) -> TunebookError | None:
    """A failed write (a full disk, a read-only folder, a file size limit) as the user's error, whichever
    library raised it: an OSError, or the Rust and C++ libraries' own exceptions that carry "os error N" or cut a
    file short. None for anything else (a bug keeps its traceback)."""
    import errno as errnos
    import re

    for e in _chain(exc):
        text = str(e)
        if isinstance(e, OSError) and e.errno:
            code = e.errno
        elif found := re.search(r"os error (\d+)", text):
            code = int(found.group(1))
        else:
            code = 28 if "No space left on device" in text else None
        if code in _WRITE_ERRORS:
            what, fix = _WRITE_ERRORS[code]
            where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
            verb = "cannot access" if code in (1, 13) else "cannot write"  # permissions: a read may be the one
            return TunebookError(f"{verb}{where}: {what} [{errnos.errorcode.get(code, code)}]\n    fix: {fix}; "
                                 "then run the same command again: what was finished is kept")
        if "unexpected pos" in text and "inline_container" in text:  # torch.save cut short
            return TunebookError("cannot write a checkpoint whole: the disk is full or a file size limit was hit\n"
                                 "    fix: free space or raise the limit; then run the same command again: what was "
                                 "finished is kept")
    return None


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
