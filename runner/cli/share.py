"""`tunebook push` and `tunebook space`: a finished run as a hub model repo with its card, or as a Space."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import err, out

RunArg = Annotated[Path, typer.Argument(help="Run directory written by `tunebook train`.", show_default=False)]


def _show(folder: Path) -> None:
    from ..share.folder import human, listing

    files = listing(folder)
    for name, size in files:
        out.print(f"  {human(size):>12}  {name}", highlight=False, markup=False, soft_wrap=True)
    out.print(f"{len(files)} files, {human(sum(size for _, size in files))}", highlight=False, soft_wrap=True)


def push(
    run: RunArg,
    repo: Annotated[str, typer.Option(help="Hub repo to create or update: user/name.", show_default=False)],
    merged: Annotated[bool, typer.Option("--merged", help="Also upload the merged full model (merged/).")] = False,
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    license: Annotated[str | None, typer.Option(help="License id for the card's metadata, e.g. apache-2.0 "
                                                "(the base model's terms apply too).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Build the folder and the card; upload nothing.")] = False,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder to build (default: RUN/hub).")] = None,
) -> None:
    """Upload the run to a hub model repo (HF_ENDPOINT, default huggingface.co): the last stage's adapter,
    the GGUF(s) and Modelfile, optionally the merged model, the recipe, report and plots, and a model card
    written from the run (settings, perplexities, forgetting matrix, quality gate, curves, limitations)."""
    from ..run_dir import RunDir
    from ..share.push import build_repo_folder, upload

    folder = build_repo_folder(RunDir(run), repo, out_dir, merged=merged, license=license)
    out.print(f"{folder} (card: {folder / 'README.md'}):", highlight=False, soft_wrap=True)
    _show(folder)
    if dry_run:
        err.print(f"dry run: nothing uploaded; without --dry-run this folder goes to {repo}", highlight=False)
        return
    err.print(f"uploading to {repo} ...", highlight=False)
    out.print(f"pushed: {upload(folder, repo, private, f'tunebook push: run {RunDir(run).path.resolve().name}')}",
              highlight=False, soft_wrap=True)


def space(
    run: RunArg,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder to write (default: RUN/space).")] = None,
    quant: Annotated[str | None, typer.Option(help="Which GGUF of the run to serve (default q8_0).")] = None,
    model_repo: Annotated[str | None, typer.Option(help="Hub repo holding the GGUF (after `tunebook push`): the Space "
                                                   "downloads it at start instead of carrying it.")] = None,
    title: Annotated[str | None, typer.Option(help="The Space's title (default: the recipe name).")] = None,
) -> None:
    """Write a folder that deploys the run's chat as a Docker Space: Dockerfile, pinned requirements, the
    Chainlit chat and its config, the GGUF (or a pointer to it), README with the Space metadata."""
    from ..run_dir import RunDir
    from ..share.push import check_repo
    from ..share.space import PORT, build_space

    folder = build_space(RunDir(run), out_dir, quant, check_repo(model_repo) if model_repo else None, title)
    out.print(f"{folder}:", highlight=False, soft_wrap=True)
    _show(folder)
    err.print(f"run it here: cd {folder} && pip install -r requirements.txt && HOST=127.0.0.1 python start.py "
              f"(http://127.0.0.1:{PORT})\ndeploy it:   hf repos create USER/NAME --type space --sdk docker && "
              f"hf upload USER/NAME {folder} . --type space", highlight=False)
