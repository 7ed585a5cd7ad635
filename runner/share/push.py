"""`tunebook push RUN --repo user/name`: a run as a hub model repo. The folder is built first (runs/<name>/hub/
by default: the last stage's adapter at the top, the GGUF(s) and Modelfile, optionally the merged model, the
recipe, report and plots, and the model card as README.md), then uploaded in one commit with huggingface_hub.
`--dry-run` stops after the folder. The hub is whatever HF_ENDPOINT names (huggingface.co by default)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import TunebookError
from ..run_dir import RunDir
from .card import hub_id, model_card, shareable, shareable_recipe, shown
from .folder import build
from .summary import RunSummary, read_summary

REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
MARKER = ("README.md", "recipe.yaml")  # a folder holding these is a previous build


def check_repo(repo: str) -> str:
    if not REPO.match(repo) or len(repo.split("/")[1]) > 96:
        raise TunebookError(f"--repo {repo!r}: not a hub repo id\n    fix: write it as user/name (letters, digits, "
                            "'-', '_', '.'), e.g. --repo alice/vetai-270m")
    return repo


def repo_files(summary: RunSummary, merged: bool) -> dict[str, Path | str]:
    """{path in the repo: local file (or text)} for everything but the card."""
    run = summary.run
    if not summary.finished:
        raise TunebookError(f"{run} has unfinished stages: there is no final model to push yet\n"
                            f"    fix: finish training first (tunebook train {run.recipe_file})")
    outcome = summary.stages[-1].outcome
    files: dict[str, Path | str] = {}
    for item in sorted(Path(outcome.adapter).iterdir()):
        if item.is_file() and item.name != "README.md":  # peft's own placeholder card
            files[item.name] = item
    files["adapter_config.json"] = adapter_config(summary, Path(outcome.adapter) / "adapter_config.json")
    for i, adapter in enumerate(outcome.lineage, 1):
        for item in sorted(Path(adapter).iterdir()):
            if item.is_file() and item.name != "README.md":
                files[f"lineage/{i}-{Path(adapter).parent.name}/{item.name}"] = item
    if merged:
        if not (run.merged / "config.json").is_file():
            raise TunebookError(f"--merged: {run} has no merged model\n    fix: run `tunebook export {run}` first")
        files.update({f"merged/{p.name}": p for p in sorted(run.merged.iterdir()) if p.is_file()})
    for path in run.ggufs() + run.modelfiles():
        files[path.name] = path
    for path in [run.forgetting_file, run.quality_file] + run.images():
        if path.is_file():
            files[path.name] = path
    if run.report.is_file():
        files[run.report.name] = shareable(summary, run.report.read_text())
    files["recipe.yaml"] = shareable_recipe(summary)
    return files


def adapter_config(summary: RunSummary, path: Path) -> str:
    """The adapter's config naming its base as others can find it (a hub id), not by a path of this machine."""
    config = json.loads(path.read_text())
    base = summary.recipe.model.base
    config["base_model_name_or_path"] = hub_id(base) or shown(base)
    return json.dumps(config, indent=2) + "\n"


def build_repo_folder(run: RunDir, repo: str, out: Path | None = None, merged: bool = False,
                      license: str | None = None) -> Path:
    """The folder that becomes the repo: its files and README.md (the model card)."""
    summary = read_summary(run.require())
    files = repo_files(summary, merged)
    files["README.md"] = model_card(summary, check_repo(repo), sorted(files), license)
    return build(out or run.hub_folder, files, MARKER)


def upload(folder: Path, repo: str, private: bool, message: str) -> str:
    """One commit of the whole folder to `repo` (made when missing); returns the commit's URL."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        raise TunebookError("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: huggingface_hub will not upload\n"
                            "    fix: unset it for this command (or use --dry-run)")
    if not get_token():
        raise TunebookError(f"no hub token: cannot upload to {constants.ENDPOINT}\n"
                            "    fix: `hf auth login`, or set HF_TOKEN to a token with write access")
    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=folder, repo_id=repo, commit_message=message)
    except (HfHubHTTPError, OSError) as exc:
        raise TunebookError(f"upload to {constants.ENDPOINT}/{repo} failed: {exc}\n"
                            f"    the folder is ready in {folder}: fix the cause and run the command again") from None
    return str(getattr(commit, "commit_url", commit))
