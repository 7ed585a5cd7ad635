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
