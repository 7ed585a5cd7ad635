"""`tunebook gc`: delete what no stage version of a run needs (abandoned half-trained versions, checkpoints of
finished ones, leftovers of interrupted writes, kept gate answers of models that are gone); with --old-versions also
the versions the recipe no longer uses."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import out


def gc(
    run: Annotated[Path, typer.Argument(help="Run directory written by `tunebook train`.", show_default=False)],
    old_versions: Annotated[bool, typer.Option("--old-versions", help="Also delete finished stage versions the run's "
                                               "recipe does not use now (their results leave `tunebook compare`).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be deleted.")] = False,
) -> None:
    """Delete what no stage version needs; the versions the recipe uses, and (by default) every finished version,
    are kept whole."""
    from ..run_dir import RunDir

    folder = RunDir(run).require()
    names = [s.name for s in folder.load_recipe().stages]
    paths = folder.garbage(names, old_versions=old_versions)
    if not paths:
        out.print(f"nothing to delete in {folder}", highlight=False, soft_wrap=True)
        return
    sizes = {p: folder.size(p) for p in paths}
    for path in paths:
        out.print(f"{sizes[path] / 2**20:9.1f} MiB  {path}", highlight=False, soft_wrap=True)
    total = sum(sizes.values()) / 2**20
    if dry_run:
        out.print(f"would free {total:.1f} MiB ({len(paths)} item(s)); run without --dry-run to delete", highlight=False, soft_wrap=True)
        return
    folder.remove(paths)
    out.print(f"freed {total:.1f} MiB ({len(paths)} item(s))", highlight=False, soft_wrap=True)
