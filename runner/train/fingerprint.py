"""A stage's fingerprint: a digest of everything that decides the weights its training produces. The same
fingerprint means the same result, so a rerun after an edit reuses every stage whose fingerprint is unchanged
and trains the others (runner/train/rerun.py); everything made from a stage records its fingerprint.

What is in, and what is left out (this docstring is the one place it is written down):

IN   backend, seed, ranks (the world size: a factor of the effective batch);
     model.*: every key, with `base` known by what it is (a package by its installed version, a local folder
       or .gguf file by its files' sizes and modification times, a hub id as written with its revision), `dtype`
       by what `auto` resolves to on this machine, and a chat template file by its text;
     lora.*: every key;
     the stage's `init`, its `data` section as a whole (every key; every source in it by its content: the
       sha256 of its files, or the hub dataset's fingerprint; its path does not count) and every `train` key
       except those below;
     the previous stage's fingerprint, when `init` is continue or merge.
OUT  name, output_dir, allow_cpu_fallback, export.*, targets.*, report_to and the stage's name (where results go and
     what is done with them, not what is trained); train.logging_steps, train.save_steps, train.eval_batch_size
     and train.gradient_checkpointing (how training is watched, saved and computed, not what it computes);
     train.eval_steps, unless train.keep is `best` (then the evaluations choose the adapter kept);
     package versions and the git commit (recorded in recipe.resolved.yaml; an upgrade does not retrain).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from chat.templates import template_names
from eval.numbers import number_text

from ..data.sources import open_source
from ..launch import world_size
from ..model.base import resolve_base
from ..model.load import resolve_dtype
from ..model.package import package_version
from ..recipe import Recipe
from ..run_dir import file_identity

TRAIN_OUT = ("logging_steps", "save_steps", "eval_batch_size", "gradient_checkpointing")
PREVIOUS = "previous"  # the input that chains a stage to the one it starts from
STAGE_KEYS = ("init", "data", "train")  # inputs named after the stage's own keys (stages.<i>.<key>)


@dataclass(frozen=True)
class Fingerprint:
    digest: str    # 16 hex digits: the stage version's name
    inputs: dict   # flat: "train.learning_rate" -> 3e-05, ...; what `tunebook plan` compares


def stage_fingerprints(recipe: Recipe, ranks: int | None = None) -> dict[str, Fingerprint]:
    """{stage name: its fingerprint}, in stage order."""
    common = {"backend": recipe.backend, "seed": recipe.seed, "ranks": ranks or world_size(),
              **_flat("model", _model(recipe)), **_flat("lora", recipe.lora.model_dump(mode="json"))}
    prints: dict[str, Fingerprint] = {}
    previous: Fingerprint | None = None
    for stage in recipe.stages:
        section = stage.model_dump(mode="json")  # `data` whatever its shape: one source, or a list of them
        train = section["train"]
        for key in TRAIN_OUT + (() if stage.train.keep == "best" else ("eval_steps",)):
            train.pop(key)
        inputs = {**common, "init": stage.init, **_flat("data", data_identity(section["data"], recipe)),
                  **_flat("train", train)}
        if stage.init in ("continue", "merge") and previous is not None:
            inputs[PREVIOUS] = previous.digest
        previous = prints[stage.name] = Fingerprint(_digest(inputs), inputs)
    return prints


def data_identity(data, recipe: Recipe, _seen: tuple[str, ...] = ()):
    """A stage's data section with every source replaced by its content identity. Walks the section whole, so a
    list of sources is more content to digest, and an item naming another stage stands for that stage's data."""
    if isinstance(data, list):
        return [data_identity(item, recipe, _seen) for item in data]
    if not isinstance(data, dict):
        return data
    out = {k: data_identity(v, recipe, _seen) for k, v in data.items()}
    if isinstance(data.get("source"), str):
        out["source"] = source_identity(data["source"], recipe.base_dir, data.get("subset"), data.get("split") or "train")
    other = data.get("stage")
    if isinstance(other, str) and other not in _seen and any(s.name == other for s in recipe.stages):
        out["stage"] = {"name": other, "data": data_identity(recipe.stage(other).model_dump(mode="json")["data"], recipe,
                                                             _seen + (other,))}
    return out


def source_identity(spec: str, recipe_dir: Path | None, subset: str | None = None, split: str = "train") -> str:
    """A data source by its content: the sha256 of its files (with their names inside a folder or package), or a
    hub dataset's own fingerprint. Moving or touching a file changes nothing; editing it does."""
    source = open_source(spec, recipe_dir, subset=subset, split=split)
    if source.kind != "files":
        return source.fingerprint()
    digest = hashlib.sha256()
    for path in source.files:
        digest.update(f"{source.name(path) if source.display_root else ''}\0{file_sha256(path)}\0".encode())
    return "sha256:" + digest.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    st = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _model(recipe: Recipe) -> dict:
    model = recipe.model.model_dump(mode="json")
    ref = resolve_base(recipe.model, base_dir=recipe.base_dir)
    if ref.kind == "package":
        model["base"] = f"{ref.spec}=={package_version(ref.spec.split(':', 1)[1].strip())}"
    elif ref.kind in ("local", "gguf"):
        model["base"] = f"files:{file_identity(ref.path)}"
    model["dtype"] = str(resolve_dtype(recipe.model)).removeprefix("torch.")
    template = recipe.model.chat_template
    if template is not None and template not in template_names():
        found = [p for p in (Path(template), recipe.base_dir / template if recipe.base_dir else None) if p and p.is_file()]
        model["chat_template"] = f"sha256:{file_sha256(found[0])[:16]}" if found else template
    return model


def _flat(prefix: str, value) -> dict:
    """{"data": {"source": x}} -> {"data.source": x}; list items by index, as `--set` spells them."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flat(f"{prefix}.{key}", item).items()}
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        return {k: v for i, item in enumerate(value) for k, v in _flat(f"{prefix}.{i}", item).items()}
    return {prefix: value}


def _digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def what_changed(before: dict, after: dict, index: int) -> list[str]:
    """The inputs that differ, as `stages.1.train.learning_rate: 3e-5 -> 1e-4` (the previous stage's fingerprint
    is left to the caller, who knows that stage's name)."""
    changed = []
    for key in sorted(set(before) | set(after)):
        if key == PREVIOUS or before.get(key) == after.get(key):
            continue
        shown = f"stages.{index}.{key}" if key.split(".")[0] in STAGE_KEYS else key
        changed.append(f"{shown}: {_shown(before.get(key, '(unset)'))} -> {_shown(after.get(key, '(unset)'))}")
    return changed


def _shown(value) -> str:
    if isinstance(value, float):
        return number_text(value)
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."
