"""What `tunebook train` does with a run that exists: per stage reuse, resume or train, and why; per artifact
made from the stages (forgetting matrix, merged model, GGUF, quality checks, report) reuse, make or remake.

A stage version is named by its fingerprint (fingerprint.py): a version that finished is reused, one with a
checkpoint resumes, anything else trains. `tunebook plan` prints this; `select_versions` acts on it, pointing
each stage of the run at the version the recipe asks for. Old versions stay where they are.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import TunebookError
from ..launch import is_main_process
from ..recipe import Recipe
from ..recipe.resolved import resolved_yaml
from ..run_dir import RunDir
from .checkpoints import last_checkpoint, step_of
from .fingerprint import PREVIOUS, Fingerprint, stage_fingerprints, what_changed


@dataclass
class StageStep:
    name: str
    action: str              # reuse | resume | train
    why: str
    fingerprint: Fingerprint
    steps_done: int = 0      # optimizer steps already in this version (all of them when reused)


@dataclass
class ArtifactStep:
    label: str
    path: Path
    action: str              # reuse | make | remake
    why: str


def plan_stages(recipe: Recipe, run: RunDir, prints: dict[str, Fingerprint]) -> list[StageStep]:
    steps: list[StageStep] = []
    unversioned = unversioned_prints(run)
    for i, stage in enumerate(recipe.stages):
        fp = prints[stage.name]
        version = run.version(stage.name, fp.digest)
        outcome = version.outcome() if version.exists() else None
        current = run.current_version(stage.name)
        if unversioned.get(stage.name) == fp.digest:  # a stage from before versions that adoption will keep
            version, current = run.stage(stage.name), fp.digest
            outcome = version.outcome()
        if outcome is not None and outcome.done:
            why = "unchanged" if current == fp.digest else "this version was trained before; " + _why(
                recipe, run, i, fp, steps)
            steps.append(StageStep(stage.name, "reuse", why, fp, outcome.steps))
            continue
        checkpoint = _checkpoint(version.path)
        if checkpoint is not None:
            steps.append(StageStep(stage.name, "resume", f"from {checkpoint.name} of this version", fp,
                                   step_of(checkpoint)))
            continue
        steps.append(StageStep(stage.name, "train", _why(recipe, run, i, fp, steps), fp))
    return steps


def _checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint of a version, whichever backend wrote it."""
    found = [c for c in (last_checkpoint(d, remove_broken=False) for d in [folder / "checkpoints",
                                                                          *folder.glob("*/output")]) if c]
    return max(found, key=step_of) if found else None


def _why(recipe: Recipe, run: RunDir, i: int, fp: Fingerprint, earlier: list[StageStep]) -> str:
    """How this fingerprint differs from the version the run uses now: the keys, and the stage it starts from."""
    name = recipe.stages[i].name
    current = run.current_version(name)
    if current is None:
        return "trained before versions were kept" if run.unversioned_stages([name]) else "not trained yet"
    record = run.version(name, current).fingerprint() or {}
    before = record.get("inputs") or {}
    reasons = what_changed(before, fp.inputs, i)
    if before.get(PREVIOUS) != fp.inputs.get(PREVIOUS) and PREVIOUS in fp.inputs:
        previous = earlier[-1]
        reasons.append(f"stage {previous.name} {'retrains' if previous.action != 'reuse' else 'is another version'}")
    outcome = run.version(name, current).outcome()
    if not reasons and outcome is not None and outcome.status == "damaged":
        return outcome.error
    if not reasons and outcome is None:
        return "not finished, and no checkpoint to resume from"
    return "; ".join(reasons) or "another version of this stage"


def artifacts(recipe: Recipe, run: RunDir) -> list[tuple[str, Path, list[str]]]:
    """(label, path, the stages it is made from) of what `tunebook train` makes after the last stage, in order."""
    every = [s.name for s in recipe.stages]
    last = [recipe.stages[-1].name]  # its fingerprint carries the ones it starts from
    made: list[tuple[str, Path, list[str]]] = []
    if len(recipe.stages) > 1:
        made.append(("forgetting matrix", run.forgetting_file, every))
    if recipe.export is not None:
        made += [("merged model", run.merged, last)]
        made += [(f"GGUF ({quant})", run.gguf(recipe.name, quant), last) for quant in recipe.export.quants]
        made += [("quality checks", run.quality_file, last)]
    made.append(("report", run.report, every))
    return made


def plan_artifacts(recipe: Recipe, run: RunDir, stages: list[StageStep]) -> list[ArtifactStep]:
    """An artifact is remade when a stage it is made from trains or is another version than the one its record
    names (stage fingerprints appear in every record made from a stage); else reused, if its other inputs
    (data, export settings) are unchanged too."""
    by_name = {s.name: s for s in stages}
    out = []
    for label, path, made_from in artifacts(recipe, run):
        record = run.made_from(path)
        if not Path(path).exists() or record is None:
            out.append(ArtifactStep(label, path, "make", "not made yet" if not Path(path).exists()
                                    else "no record of what it was made from"))
            continue
        text = json.dumps(record)
        changed = [n for n in made_from if by_name[n].action != "reuse"]
        other = [n for n in made_from if n not in changed and by_name[n].fingerprint.digest not in text]
        edited = "recipe" in record and record["recipe"] != recipe_identity(recipe)  # what the report shows of it
        if changed or other or edited:
            why = "; ".join([f"stage {n} {by_name[n].action}s" for n in changed] +
                            [f"made from another version of stage {n}" for n in other] +
                            ["the recipe changed"] * edited)
            out.append(ArtifactStep(label, path, "remake", why))
        else:
            out.append(ArtifactStep(label, path, "reuse", "made from these stage versions"))
    return out


def recipe_identity(recipe: Recipe) -> str:
    """What the run's recipe.yaml will hold, as run_dir.content_identity names a file."""
    return hashlib.sha256(resolved_yaml(recipe.anchored()).encode()).hexdigest()[:16]


def select_versions(recipe: Recipe, run: RunDir, log=print) -> list[StageStep]:
    """Fingerprint every stage, point the run at those versions (recording new ones) and say what happens to
    each; the main process writes, the others only compute."""
    steps = plan_stages(recipe, run, stage_fingerprints(recipe))
    if not is_main_process():
        return steps
    for i, step in enumerate(steps):
        version = run.version(step.name, step.fingerprint.digest)
        run.use_version(step.name, step.fingerprint.digest)
        if version.fingerprint() is None:
            version.save_fingerprint(_record(recipe, i, step.fingerprint))
        log(f"stage {step.name}: {step.action}"
            + (f" ({step.steps_done} steps)" if step.action == "reuse" else "")
            + f", version {step.fingerprint.digest}: {step.why}")
    return steps


def _record(recipe: Recipe, index: int, fp: Fingerprint) -> dict:
    stage = recipe.stages[index]
    return {"stage": stage.name, "index": index, "fingerprint": fp.digest, "inputs": fp.inputs,
            "settings": {"backend": recipe.backend, "model": recipe.model.base, "lora": recipe.lora.model_dump(mode="json"),
                         **stage.model_dump(mode="json", include={"init", "data", "train"})}}


def _unversioned(run: RunDir) -> tuple[Recipe | None, list[str], dict[str, Fingerprint]]:
    """A run made before stage versions: its recipe (recipe.yaml, which that run could not change), its stage
    folders, and the fingerprints that recipe gives them."""
    if not run.is_run():
        return None, [], {}
    try:
        old = run.load_recipe()
    except TunebookError:
        return None, [], {}
    names = run.unversioned_stages([s.name for s in old.stages])
    if not names:
        return old, [], {}
    first = run.stage(names[0]).outcome()
    try:
        return old, names, stage_fingerprints(old, ranks=first.world_size if first else 1)
    except TunebookError:  # its data or base is gone: the folders are kept, as versions nothing matches
        return old, names, {}


def unversioned_prints(run: RunDir) -> dict[str, str]:
    """{stage: the fingerprint adoption gives it} for the stage folders of a run from before versions."""
    _, names, prints = _unversioned(run)
    return {n: prints[n].digest for n in names if n in prints}


def adopt_unversioned(run: RunDir, log=print) -> None:
    """Each stage folder of a run from before versions becomes the version its recorded recipe fingerprints to,
    so an upgrade retrains nothing."""
    old, names, prints = _unversioned(run)
    for name in names:
        index = [s.name for s in old.stages].index(name)
        fp = prints.get(name)
        version = fp.digest if fp else "unversioned"
        run.adopt(name, version, _record(old, index, fp) if fp else None)
        log(f"stage {name}: kept as version {version} ({run.version(name, version).path.name})")
