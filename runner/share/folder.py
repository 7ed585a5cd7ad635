"""A folder `tunebook push` or `tunebook space` builds whole: files linked (not copied) where the disk allows,
written under a temporary name and swapped in, and never over a folder that tunebook did not make."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .. import atomic
from ..errors import TunebookError


def place(source: Path, target: Path) -> None:
    """`target` holds `source`'s bytes: a hard link when both are on one disk (a GGUF is not copied twice)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def build(out: Path, files: dict[str, Path | str], marker: tuple[str, ...]) -> Path:
    """Write `files` ({path inside: local file, or text}) as the folder `out`, replacing a previous build. A
    folder that is not empty and lacks the `marker` files of a previous build is refused, not replaced."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not all((out / name).exists() for name in marker):
        raise TunebookError(f"{out} is not empty and is not a folder tunebook built\n"
                            "    fix: pass --out with a new or empty folder, or delete this one")
    with atomic.atomic_dir(out) as tmp:
        for name, content in files.items():
            target = tmp / name
            if isinstance(content, Path):
                place(content, target)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(content, encoding="utf-8")
    return out


def listing(out: Path) -> list[tuple[str, int]]:
    """(path inside, size in bytes) of every file of a built folder."""
    return [(str(p.relative_to(out)), p.stat().st_size) for p in sorted(out.rglob("*")) if p.is_file()]


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)
