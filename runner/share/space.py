"""`tunebook space RUN --out DIR`: the run's chat as a folder that deploys as a Docker Space.

    README.md          the Space's metadata (sdk: docker, app_port) and what it serves
    Dockerfile         python:3.11-slim, the pinned requirements, `python start.py` on port 7860
    requirements.txt   the chat's packages and everything they need, pinned to the versions tested here
    start.py           downloads the GGUF when space.json points at a hub repo, then starts the chat
    space.json         the GGUF, the system prompt the run trained with, the title
    chat/              tunebook's Chainlit chat (app, engine, templates, Chainlit config), as `tunebook chat` runs it
    model/<name>.gguf  the model (linked, not copied), unless --model-repo names a repo that holds it

Pushed as a Space (`hf upload user/name DIR --repo-type space`), it runs exactly what runs here."""
from __future__ import annotations

import json
from importlib import metadata
from importlib.resources import files
from pathlib import Path

from ..errors import TunebookError
from ..run_dir import RunDir
from .folder import build

# What the chat imports (chat/engine.py: llama_cpp; chat/app.py: chainlit), and what start.py downloads with.
TOP_LEVEL = ("chainlit", "llama-cpp-python", "huggingface_hub")
PORT = 7860
MARKER = ("Dockerfile", "start.py", "space.json")


def pinned_requirements(roots=TOP_LEVEL) -> list[str]:
    """`name==version` for `roots` and everything they depend on, as installed here (markers evaluated for
    this interpreter: python 3.11 on Linux, as in the Space's image)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    extras_seen: dict[str, set[str]] = {}
    todo = [(name, frozenset()) for name in roots]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in pins and extras <= extras_seen[key]:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise TunebookError(f"{name} is not installed here, so its version cannot be pinned for the Space\n"
                                "    fix: run `make setup` (it installs everything tunebook needs)") from None
        pins[key] = f"{dist.metadata['Name']}=={dist.version}"
        extras_seen.setdefault(key, set()).update(extras)
        for line in dist.requires or []:
            requirement = Requirement(line)
            wanted = [{"extra": e} for e in extras_seen[key]] or [{"extra": ""}]
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in wanted):
                todo.append((requirement.name, frozenset(requirement.extras)))
    return sorted(pins.values(), key=str.lower)


def chat_files() -> dict[str, Path]:
    """tunebook's chat package as `tunebook chat` runs it, without what Chainlit writes at run time."""
    import chat

    root = Path(chat.__file__).resolve().parent
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        inside = path.relative_to(root)
        parts = inside.parts
        if not path.is_file() or "__pycache__" in parts or ".files" in parts or path.suffix == ".pyc":
            continue
        if parts[:3] == ("chainlit_home", ".chainlit", "translations") and path.name != "en-US.json":
            continue
        if len(parts) == 1 and path.suffix != ".py":
            continue
        found[f"chat/{inside}"] = path
    return found


def space_readme(title: str, gguf_name: str, run_name: str, model_repo: str | None) -> str:
    where = (f"downloaded at start from the model repo [{model_repo}](https://huggingface.co/{model_repo})"
             if model_repo else f"`model/{gguf_name}` in this Space")
    meta = {"title": title, "emoji": "🩺", "colorFrom": "green", "colorTo": "blue", "sdk": "docker",
            "app_port": PORT, "pinned": False, "short_description": f"Chat with {run_name} (llama.cpp on CPU)"[:60]}
    if model_repo:
        meta["models"] = [model_repo]
    header = "\n".join(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in meta.items())
    return (f"---\n{header}\n---\n\n# {title}\n\nThe chat of tunebook run `{run_name}`: the model {where}, served by "
            "llama.cpp on the Space's CPU in tunebook's Chainlit chat, with the system prompt the run was trained "
            "with (`space.json`).\n\nRun it anywhere: `pip install -r requirements.txt && python start.py` "
            f"(then http://127.0.0.1:{PORT}; `HOST` and `PORT` change where it listens), or build the Dockerfile.\n\n"
            "Answers can be wrong: this is a small fine-tuned model. It is no substitute for a professional.\n")


def build_space(run: RunDir, out: Path | None = None, quant: str | None = None, model_repo: str | None = None,
                title: str | None = None) -> Path:
    """Write the Space folder for the run's GGUF (default q8_0); returns the folder."""
    run = run.require()
    gguf = run.find_gguf(quant)
    name = run.load_recipe().name
    settings = {"model_file": gguf.name if model_repo else f"model/{gguf.name}", "model_repo": model_repo,
                "system_prompt": run.system_prompt(), "title": title or name, "sampling": run.chat_sampling() or None}
    template = files("runner.share") / "space_files"
    content: dict[str, Path | str] = {
        "README.md": space_readme(settings["title"], gguf.name, name, model_repo),
        "Dockerfile": template.joinpath("Dockerfile").read_text(encoding="utf-8"),
        "start.py": template.joinpath("start.py").read_text(encoding="utf-8"),
        "requirements.txt": "\n".join(pinned_requirements()) + "\n",
        "space.json": json.dumps({k: v for k, v in settings.items() if v is not None}, indent=2) + "\n",
        ".gitattributes": "*.gguf filter=lfs diff=lfs merge=lfs -text\n",
        **chat_files(),
    }
    if not model_repo:
        content[settings["model_file"]] = gguf
    return build(out or run.space_folder, content, MARKER)
