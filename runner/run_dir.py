"""The run directory, `runs/<name>/`: the interface between every step, and the one module that knows it.

Training writes it, and eval, export, compare, report and chat read it; none of them spells a path under
it. It holds three things:

- the layout: `RunDir` (the run) and `StageDir` (one stage), one attribute per file or folder;
- the stage outcome (`stage.json`): what a finished or interrupted stage leaves for the next one;
- the freshness rule: an artifact (the forgetting matrix, the merged model, a GGUF, the quality checks,
  the report) is up to date exactly when the inputs recorded beside it, in `made-from.json`, equal its
  inputs now. `RunDir.fresh`, `RunDir.making` and `RunDir.stale_because` are the whole rule.

    runs/<name>/recipe.yaml, recipe.resolved.yaml   the recipe as trained (+ package versions, git commit)
    runs/<name>/<stage>/                            adapter/, checkpoints/, metrics.jsonl, stage.json, ...
    runs/<name>/forgetting.json                     every stage's validation set scored after every stage
    runs/<name>/merged/                             the final model, adapters merged in (safetensors)
    runs/<name>/<name>-<quant>.gguf                 the exported model, its chat template inside
    runs/<name>/quality.json, wall.json             checks of the served model; wall time of a full run
    runs/<name>/report.md, *.png                    the report and its curves
    runs/<name>/made-from.json                      what each artifact above was made from
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import atomic
from .errors import TunebookError

RECIPE = "recipe.yaml"
GGUF_SUFFIX = ".gguf"
ROOT = Path("runs")                # where recipes put their runs by default (output_dir)
COMPARE_DIR = ROOT / "compare"     # where `tunebook compare` writes by default


# --------------------------------------------------------------------------------------------- stages

@dataclass
class StageOutcome:
    """What a finished (or interrupted, or failed) stage leaves for the next one; saved as <stage>/stage.json.
    Only a `done` stage is started from; a failed one says why in `error`."""

    name: str
    status: str                      # done | interrupted | failed
    adapter: str | None              # the adapter the next stage and export use
    lineage: list[str] = field(default_factory=list)  # adapters merged into the base before `adapter`
    steps: int = 0
    best_step: int | None = None
    best_eval_loss: float | None = None
    best_eval_ppl: float | None = None
    kept: str = "last"
    seconds: float = 0.0
    world_size: int = 1
    error: str | None = None         # why a failed stage failed

    @property
    def done(self) -> bool:
        return self.status == "done"

    def lineage_after(self, init: str) -> list[str]:
        """The lineage of the stage that starts from this one with `init` (fresh | continue | merge): the
        adapters merged into its base. The one rule every backend follows."""
        if init == "fresh":
            return []
        return list(self.lineage) + ([self.adapter] if init == "merge" and self.adapter else [])


class StageDir:
    """runs/<name>/<stage>/: one stage's files."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = self.path.name

    adapter = property(lambda self: self.path / "adapter")             # peft adapter + tokenizer + template
    best_adapter = property(lambda self: self.path / "best-adapter")   # the best evaluated one (keep: best)
    checkpoints = property(lambda self: self.path / "checkpoints")     # trainer checkpoints (resume)
    metrics = property(lambda self: self.path / "metrics.jsonl")
    tensorboard = property(lambda self: self.path / "tensorboard")
    outcome_file = property(lambda self: self.path / "stage.json")

    def work(self, backend: str) -> Path:
        """Where another trainer (axolotl, unsloth) keeps its own files for this stage."""
        return self.path / backend

    def exists(self) -> bool:
        return self.path.exists()

    def outcome(self) -> StageOutcome | None:
        """The saved outcome; adapter paths stored relative to the run directory are made absolute."""
        if not self.outcome_file.is_file():
            return None
        try:
            outcome = StageOutcome(**json.loads(self.outcome_file.read_text()))
        except (ValueError, TypeError) as exc:
            raise TunebookError(f"{self.outcome_file} is not a stage outcome tunebook can read ({exc})\n"
                                f"    fix: delete it and rerun `tunebook train` to retrain stage {self.name}") from None
        run = self.path.resolve().parent
        outcome.adapter = _located(outcome.adapter, run)
        outcome.lineage = [_located(p, run) for p in outcome.lineage]
        return outcome

    def save_outcome(self, outcome: StageOutcome) -> None:
        """Adapter paths inside the run directory are stored relative to it: a moved or copied run still
        finds them, from any working directory. Strict JSON: a NaN or infinite number is refused (ValueError),
        so a stage whose numbers are not finite is saved as failed, without them (runner/train/diverged.py)."""
        run = self.path.resolve().parent
        data = asdict(outcome)
        data["adapter"] = _portable(outcome.adapter, run)
        data["lineage"] = [_portable(p, run) for p in outcome.lineage]
        atomic.write_text(self.outcome_file, json.dumps(data, indent=2, allow_nan=False) + "\n")

    def identity(self) -> str | None:
        """A digest of stage.json: changes whenever the stage is trained again."""
        return _digest(self.outcome_file)


def _portable(path: str | None, run: Path) -> str | None:
    if path is None:
        return None
    absolute = Path(path).resolve()
    return str(absolute.relative_to(run)) if absolute.is_relative_to(run) else str(absolute)


def _located(path: str | None, run: Path) -> str | None:
    """Relative to the run directory; stage.json files written relative to the working directory still load."""
    if path is None or Path(path).is_absolute():
        return path
    inside = run / path
    return str(inside) if inside.exists() or not Path(path).exists() else str(Path(path).resolve())


# ------------------------------------------------------------------------------------------------ run

class RunDir:
    """runs/<name>/: the run's files, its stages, and the freshness of what was made from them."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    @classmethod
    def of(cls, recipe) -> "RunDir":
        return cls(Path(recipe.output_dir) / recipe.name)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    recipe_file = property(lambda self: self.path / RECIPE)                # the recipe, resolved
    resolved_file = property(lambda self: self.path / "recipe.resolved.yaml")  # + provenance
    forgetting_file = property(lambda self: self.path / "forgetting.json")
    merged = property(lambda self: self.path / "merged")
    quality_file = property(lambda self: self.path / "quality.json")
    wall_file = property(lambda self: self.path / "wall.json")
    report = property(lambda self: self.path / "report.md")
    ledger = property(lambda self: self.path / "made-from.json")

    def stage(self, name: str) -> StageDir:
        return StageDir(self.path / name)

    def gguf(self, name: str, quant: str) -> Path:
        """The exported model of recipe `name` in type `quant`."""
        return self.path / f"{name}-{quant}{GGUF_SUFFIX}"

    def image(self, filename: str) -> Path:
        """A plot of the report."""
        return self.path / filename

    def is_run(self) -> bool:
        return self.recipe_file.is_file()

    def require(self) -> "RunDir":
        if not self.is_run():
            raise TunebookError(f"{self.path} is not a tunebook run directory (no {RECIPE})\n"
                                "    fix: pass the folder `tunebook train` wrote, e.g. runs/<name>")
        return self

    def load_recipe(self):
        """The recipe this run was trained with."""
        from .recipe import load_recipe

        return load_recipe(self.require().recipe_file)

    def final_outcome(self, recipe) -> StageOutcome:
        """The last stage's outcome; an error when it has not finished."""
        last = recipe.stages[-1].name
        outcome = self.stage(last).outcome()
        if outcome is None or not outcome.done:
            raise TunebookError(f"stage {last} of {self.path} has not finished, there is nothing to export yet\n"
                                f"    fix: finish training first (tunebook train {self.recipe_file})")
        return outcome

    # -------------------------------------------------------------------------------- what chat serves

    def find_gguf(self, quant: str | None = None) -> Path:
        """The GGUF to serve or score: `<name>-<quant>.gguf` (default q8_0), else another export of the run."""
        name = self.path.resolve().name
        candidates = [self.gguf(name, quant or "q8_0")]
        if quant is None:
            candidates += sorted(self.path.glob(f"*-q8_0{GGUF_SUFFIX}")) + sorted(self.path.glob(f"*{GGUF_SUFFIX}"))
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise TunebookError(f"no {quant + ' ' if quant else ''}.gguf file in {self.path}: export the run first "
                            f"(it writes {name}-{quant or 'q8_0'}{GGUF_SUFFIX} there), or pass the path of a .gguf file")

    def system_prompt(self) -> str | None:
        """The system prompt the run trained with: its last stage's `data.system_prompt` that is set."""
        from ruamel.yaml import YAML, YAMLError

        if not self.resolved_file.is_file():
            return None
        try:
            recipe = YAML(typ="safe").load(self.resolved_file.read_text(encoding="utf-8")) or {}
        except (OSError, YAMLError) as exc:
            raise TunebookError(f"cannot read {self.resolved_file}: {exc}") from None
        prompts = [((stage or {}).get("data") or {}).get("system_prompt") for stage in recipe.get("stages") or []
                   if isinstance(stage, dict)]
        prompts = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
        return prompts[-1] if prompts else None

    # ------------------------------------------------------------------------------ freshness

    def _records(self) -> dict:
        try:
            return json.loads(self.ledger.read_text()) if self.ledger.is_file() else {}
        except ValueError:
            return {}  # a damaged ledger: everything is remade

    def _key(self, artifact: Path) -> str:
        return str(Path(artifact).resolve().relative_to(self.path.resolve()))

    def made_from(self, artifact: Path) -> dict | None:
        """The inputs recorded for an artifact, None when it has none (never made, or being remade)."""
        return self._records().get(self._key(artifact))

    def fresh(self, artifact: Path, inputs: dict) -> bool:
        """The rule: the artifact exists and was made from exactly these inputs."""
        return Path(artifact).exists() and self.made_from(artifact) == _canonical(inputs)

    def stale_because(self, artifact: Path, inputs: dict) -> str | None:
        """Why an artifact must be made (again), in words; None when it is up to date."""
        if not Path(artifact).exists():
            return "not made yet"
        recorded = self.made_from(artifact)
        if recorded is None:
            return "no record of what it was made from"
        inputs = _canonical(inputs)
        changed = sorted(k for k in set(recorded) | set(inputs) if recorded.get(k) != inputs.get(k))
        return "changed: " + ", ".join(changed) if changed else None

    @contextmanager
    def making(self, artifact: Path, inputs: dict):
        """Make an artifact: its old record is dropped first (a failure in between leaves it stale, never
        wrongly fresh), the new one written after the body finished."""
        self._write_record(self._key(artifact), None)
        yield
        self._write_record(self._key(artifact), _canonical(inputs))

    def _write_record(self, key: str, inputs: dict | None) -> None:
        records = self._records()
        if inputs is None:
            if key not in records:
                return
            records.pop(key)
        else:
            records[key] = inputs
        atomic.write_text(self.ledger, json.dumps(records, indent=1, sort_keys=True) + "\n")


def _canonical(inputs: dict) -> dict:
    return json.loads(json.dumps(inputs, sort_keys=True, default=str))


def _digest(path: Path) -> str | None:
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def file_identity(path: Path) -> str | None:
    """Cheap identity of a (possibly large) file, or of a folder's files: sizes and modification times;
    None when missing. Rewriting a file changes it; reading does not."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    if path.is_dir():
        parts = sorted(f"{p.relative_to(path)}:{file_identity(p)}" for p in path.rglob("*") if p.is_file())
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return None


def content_identity(path: Path) -> str | None:
    """Identity of a small file by its content; None when missing."""
    return _digest(Path(path))


def newest_run_with_gguf(root: Path = ROOT) -> RunDir:
    """The most recently exported run under `root` (what `tunebook chat` serves without an argument)."""
    runs = sorted((p.parent for p in root.glob(f"*/*{GGUF_SUFFIX}")), key=lambda p: p.stat().st_mtime, reverse=True)
    if not runs:
        raise TunebookError(f"no exported model under {root}/\n"
                            "    fix: pass a run directory or a .gguf file, or train and export first (make demo)")
    return RunDir(runs[0])
