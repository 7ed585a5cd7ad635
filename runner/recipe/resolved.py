"""The resolved recipe as YAML: every default filled in, optionally with the provenance of a run
(package versions, git commit), so a run directory says exactly what produced it."""
from __future__ import annotations

import io
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from ruamel.yaml import YAML

from eval.numbers import number_text

from .schema import Recipe

PACKAGES = ("tunebook", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "gguf",
            "llama-cpp-python", "chainlit")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit of the checkout (with '-dirty' when it has changes), or None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _represent_float(representer, value: float):
    if value != value or value in (float("inf"), float("-inf")):
        return representer.represent_float(value)
    if value.is_integer() and abs(value) < 1e15:
        return representer.represent_int(int(value))
    text = number_text(value)
    if "e" in text and "." not in text:  # YAML 1.1 readers need a dot in the mantissa
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def resolved_yaml(recipe: Recipe, provenance: bool = False) -> str:
    data = recipe.model_dump(mode="json")
    if provenance:
        data["provenance"] = {"packages": package_versions(), "git_commit": git_commit(Path(__file__).parent)}
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.sort_base_mapping_type_on_output = False
    yaml.representer.add_representer(float, _represent_float)
    buf = io.StringIO()
    yaml.dump(data, buf)
    return buf.getvalue()
