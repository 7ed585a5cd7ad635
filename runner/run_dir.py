"""The run directory, `runs/<name>/`: the interface between every step, and the one module that knows it.

Training writes it, and eval, export, compare, report and chat read it; none of them spells a path under
it. It holds three things:

- the layout: `RunDir` (the run) and `StageDir` (one stage), one attribute per file or folder;
- the stage outcome (`stage.json`): what a finished or interrupted stage leaves for the next one;
- stage versions: one folder per fingerprint, `<stage>@<fingerprint>/`, and `<stage>`, a link to the one the
  recipe uses now. An edit never overwrites a stage: it trains a new version beside the old one;
- the freshness rule: an artifact (the forgetting matrix, the merged model, a GGUF, the quality checks,
  the report) is up to date exactly when the inputs recorded beside it, in `made-from.json`, equal its
  inputs now. `RunDir.fresh`, `RunDir.making` and `RunDir.stale_because` are the whole rule.

    runs/<name>/recipe.yaml, recipe.resolved.yaml   the recipe as trained (+ package versions, git commit)
    runs/<name>/<stage>@<fingerprint>/              one version of a stage: fingerprint.json, adapter/,
                                                    checkpoints/, metrics.jsonl, stage.json, ...
    runs/<name>/<stage> -> <stage>@<fingerprint>    the version the run's recipe uses now
    runs/<name>/forgetting.json                     every stage's validation set scored after every stage
    runs/<name>/merged/                             the final model, adapters merged in (safetensors)
    runs/<name>/<name>-<quant>.gguf                 an exported model, its chat template inside (one per type)
    runs/<name>/<name>-<quant>.Modelfile            the same model for Ollama (`ollama create NAME -f ...`)
    runs/<name>/quality.json, wall.json             checks of the served model; wall time of the last training
    runs/<name>/quality-<quant>.json                the same checks of another exported type
    runs/<name>/gate/<model>.json                   the evaluation set answered by the served GGUF, the base
                                                    model and the model after each stage (eval/gate.py)
    runs/<name>/gate/kept/<digest>.json             each way of answering of each model measured, by its inputs
    runs/<name>/report.md, *.png                    the report and its curves
    runs/<name>/tensorboard/                        the run's own numbers as TensorBoard events (report_to)
    runs/<name>/trackers/                           what was sent to each experiment tracker, and where
    runs/<name>/hub/, space/                        what `tunebook push` uploads; the Space `tunebook space` writes
    runs/<name>/made-from.json                      what each artifact above was made from
    runs/<name>/sweep/                              `tunebook sweep`'s comparison of variants
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import atomic
from .errors import TunebookError

RECIPE = "recipe.yaml"
GGUF_SUFFIX = ".gguf"
ROOT = Path("runs")                # where recipes put their runs by default (output_dir)
COMPARE_DIR = ROOT / "compare"     # where `tunebook compare` writes by default
VERSION_MARK = "@"                 # <stage>@<fingerprint>: a character no stage name may contain


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


def whole_safetensors(path: Path) -> bool:
    """The safetensors library opens it: its header parses and the file holds every byte the header promises
    (a file cut short by a full disk or a kill does not)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt"):
            return True
    except Exception:  # noqa: BLE001 - SafetensorError, OSError: not whole, whatever the reason
        return False


def whole_adapter(folder: Path) -> bool:
    """A saved adapter a stage can start from: its config, and its weights whole."""
    weights = folder / "adapter_model.safetensors"
    return (folder / "adapter_config.json").is_file() and (
        whole_safetensors(weights) if weights.is_file() else (folder / "adapter_model.bin").is_file())


class StageDir:
    """One stage's files: runs/<name>/<stage>@<fingerprint>/ (a version), or runs/<name>/<stage> (the link to
    the current version, or the stage folder of a run made before versions)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = self.path.name.split(VERSION_MARK)[0]

    adapter = property(lambda self: self.path / "adapter")             # peft adapter + tokenizer + template
    best_adapter = property(lambda self: self.path / "best-adapter")   # the best evaluated one (keep: best)
    checkpoints = property(lambda self: self.path / "checkpoints")     # trainer checkpoints (resume)
    metrics = property(lambda self: self.path / "metrics.jsonl")
    tensorboard = property(lambda self: self.path / "tensorboard")
    outcome_file = property(lambda self: self.path / "stage.json")
    fingerprint_file = property(lambda self: self.path / "fingerprint.json")  # what decided this version

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
            why = exc if isinstance(exc, ValueError) else "fields missing or unknown"
            raise TunebookError(f"{self.outcome_file} is not a stage outcome tunebook can read ({why})\n"
                                f"    fix: delete it and rerun `tunebook train` to retrain stage {self.name}") from None
        run = self.path.resolve().parent
        outcome.adapter = _located(outcome.adapter, run)
        outcome.lineage = [_located(p, run) for p in outcome.lineage]
        if outcome.done and not (outcome.adapter and whole_adapter(Path(outcome.adapter))):
            # deleted or cut short since (a full disk, a hand edit): not a stage anything may start from
            outcome.status = "damaged"
            outcome.error = f"its adapter {outcome.adapter} is missing or damaged"
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

    @property
    def version(self) -> str | None:
        """The fingerprint of the version this folder (or link) holds; None for a stage without versions."""
        real = self.path.resolve().name if self.path.is_symlink() else self.path.name
        return real.split(VERSION_MARK, 1)[1] if VERSION_MARK in real else None

    def fingerprint(self) -> dict | None:
        """The saved record of this version: {"fingerprint", "stage", "created", "inputs", "settings"}."""
        try:
            record = json.loads(self.fingerprint_file.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None  # a damaged file is no record

    def save_fingerprint(self, record: dict) -> None:
        atomic.write_text(self.fingerprint_file, json.dumps({**record, "created": time.time()}, indent=1,
                                                            sort_keys=True, default=str) + "\n")

    def identity(self) -> str | None:
        """What every artifact made from this stage records: its fingerprint (the same inputs give the same
        weights); a digest of stage.json for a stage trained before fingerprints."""
        record = self.fingerprint()
        if record and record.get("fingerprint") and self.outcome_file.is_file():
            return record["fingerprint"]
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
    sweep_dir = property(lambda self: self.path / "sweep")                # `tunebook sweep`'s comparison
    ledger = property(lambda self: self.path / "made-from.json")
    tensorboard = property(lambda self: self.path / "tensorboard")     # run-level events (stages have their own)
    trackers = property(lambda self: self.path / "trackers")           # tracker records; W&B's local files
    hub_folder = property(lambda self: self.path / "hub")              # `tunebook push` builds the upload here
    space_folder = property(lambda self: self.path / "space")          # `tunebook space` writes here by default

    gate_dir = property(lambda self: self.path / "gate")
    gate_kept_dir = property(lambda self: self.path / "gate" / "kept")  # every gate part measured, by its inputs

    def gate_file(self, model: str) -> Path:
        """The gate's answers and numbers for one model: `served` (the GGUF the chat serves), `base`, or a
        stage's name (the model after that stage)."""
        return self.gate_dir / f"{model}.json"

    def gate_kept(self, inputs: dict) -> Path:
        """One part of a model's gate (one way of answering, or the reference answers' perplexity), kept by what
        it was made from: a rerun or a sweep that comes back to the same model and settings reads it instead of
        answering again."""
        key = hashlib.sha256(json.dumps(_canonical(inputs), sort_keys=True).encode()).hexdigest()[:24]
        return self.gate_kept_dir / f"{key}.json"

    def gate_gguf(self, model: str, quant: str) -> Path:
        """A stage's model exported only to be measured by the gate; removed once measured."""
        return self.gate_dir / f"{model}-{quant}{GGUF_SUFFIX}"

    def gate_quantize_source(self, model: str) -> Path:
        """The full-precision GGUF llama.cpp quantizes that model from, when the served type is llama.cpp's."""
        return self.gate_dir / f".{model}{GGUF_SUFFIX}.quantize-source"

    def gate_merged(self, model: str) -> Path:
        """Where that model is merged before its export; removed with it."""
        return self.gate_dir / f"{model}-merged"

    def stage(self, name: str) -> StageDir:
        """The version of stage `name` the run uses now (through the link)."""
        return StageDir(self.path / name)

    # ------------------------------------------------------------------------------ stage versions

    def version(self, name: str, fingerprint: str) -> StageDir:
        """One version of a stage, by fingerprint: runs/<name>/<stage>@<fingerprint>/."""
        return StageDir(self.path / f"{name}{VERSION_MARK}{fingerprint}")

    def versions(self, name: str) -> list[StageDir]:
        """Every version of a stage kept in the run, oldest first."""
        found = [StageDir(p) for p in self.path.glob(f"{name}{VERSION_MARK}*") if p.is_dir() and not p.is_symlink()]
        return sorted(found, key=lambda v: ((v.fingerprint() or {}).get("created") or 0, v.path.name))

    def current_version(self, name: str) -> str | None:
        link = self.path / name
        return StageDir(link).version if link.is_symlink() else None

    def use_version(self, name: str, fingerprint: str) -> StageDir:
        """Point runs/<name>/<stage> at a version (made if new), atomically; nothing of any version is touched."""
        version = self.version(name, fingerprint)
        version.path.mkdir(parents=True, exist_ok=True)
        link = self.path / name
        if link.is_symlink() and os.readlink(link) == version.path.name:
            return version
        if link.exists() and not link.is_symlink():
            raise TunebookError(f"{link} is a folder, not the link to a stage version\n"
                                f"    fix: move it away (tunebook keeps stage versions in {name}{VERSION_MARK}<fingerprint>)")
        tmp = self.path / f".{name}.link-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(version.path.name, tmp)
        os.replace(tmp, link)
        return version

    def unversioned_stages(self, names: list[str]) -> list[str]:
        """Stages of a run made before versions: a plain folder where the link belongs."""
        return [n for n in names if (self.path / n).is_dir() and not (self.path / n).is_symlink()]

    def adopt(self, name: str, version: str, record: dict | None) -> StageDir:
        """Make a stage folder from before versions the version `version` of that stage: moved to
        <stage>@<version>, linked, its stage.json rewritten so its paths name the moved folder."""
        folder = self.path / name
        target = self.version(name, version)
        if target.exists():
            raise TunebookError(f"{folder} and {target.path} both exist (a run copied without its links?)\n"
                                f"    fix: move {folder} out of the run; {name} is then linked to {target.path.name}")
        outcome = StageDir(folder).outcome()
        old, new = str(folder.resolve()), str(target.path.resolve())
        os.replace(folder, target.path)
        self.use_version(name, version)
        if outcome is not None:
            outcome.adapter = outcome.adapter and outcome.adapter.replace(old, new, 1)
            outcome.lineage = [p.replace(old, new, 1) for p in outcome.lineage]
            target.save_outcome(outcome)
        if record is not None:
            target.save_fingerprint(record)
        return target

    @contextmanager
    def locked(self, hold: bool = True):
        """This run directory for one writer: a second `tunebook train` of it (another terminal, a sweep beside
        it) is refused at once instead of interleaving its checkpoints and metrics with the first's. `hold`
        false (the other processes of a launch) takes no lock. The lock goes with the process: a killed run
        leaves none behind."""
        if not hold:
            yield self
            return
        import fcntl

        handle = open(self.path / ".lock", "a+", encoding="utf-8")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise TunebookError(f"{self.path} is in use by another tunebook train ({holder})\n"
                                    "    fix: wait for it to end, or train into another run (--set name=... or "
                                    "--set output_dir=...)") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
            yield self
        finally:
            handle.close()

    def garbage(self, stages: list[str], old_versions: bool = False) -> list[Path]:
        """What no version needs: versions neither finished nor current (abandoned mid-training), the
        checkpoints and best-adapter copies of finished versions (kept for resuming only), leftovers of
        interrupted writes, kept gate answers of models that are gone; with `old_versions`, also finished
        versions the recipe no longer uses (and their kept gate answers)."""
        found: list[Path] = []
        for name in stages:
            current = self.current_version(name)
            for version in self.versions(name):
                outcome = version.outcome()
                if version.version == current:
                    pass
                elif outcome is None or not outcome.done or old_versions:
                    found.append(version.path)
                    continue
                if outcome is not None and outcome.done:
                    found += [p for p in (version.checkpoints, version.best_adapter) if p.exists()]
                    found += [p for p in version.path.glob("*/output/checkpoint-*")]  # another backend's
        for folder in (self.path, self.gate_dir):
            found += [p for p in folder.glob("*") if _leftover(p.name)] if folder.is_dir() else []
        found += self._stale_gate_parts(set(found))
        return found

    def _stale_gate_parts(self, going: set[Path]) -> list[Path]:
        """Kept gate answers whose model can never be measured again: a served GGUF rewritten since (its
        identity is in the part's inputs), or a stage version that is gone or `going`."""
        versions = {p.name.split(VERSION_MARK, 1)[1] for p in self.path.glob(f"*{VERSION_MARK}*")
                    if p.is_dir() and not p.is_symlink() and p not in going}
        stale = []
        for part in sorted(self.gate_kept_dir.glob("*.json")):
            try:
                model = json.loads(part.read_text())["inputs"]["model"]
            except (OSError, ValueError, KeyError, TypeError):
                stale.append(part)  # unreadable: it would be measured again anyway
                continue
            if isinstance(model, list):  # the served GGUF: [file name, identity]
                alive = file_identity(self.path / model[0]) == model[1]
            else:  # a stage's model (`after`: [stage fingerprint, adapter]) or the base (`after`: None)
                after = model.get("after") if isinstance(model, dict) else None
                alive = not after or after[0] in versions
            if not alive:
                stale.append(part)
        return stale

    @staticmethod
    def size(path: Path) -> int:
        """Bytes in a file or folder (links not followed)."""
        path = Path(path)
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())

    def remove(self, paths: list[Path]) -> None:
        """Delete paths inside the run; never a link to a version, never anything outside the run."""
        root = self.path.resolve()
        for path in map(Path, paths):
            if path.is_symlink() or not path.resolve().is_relative_to(root) or path.resolve() == root:
                raise TunebookError(f"refusing to delete {path}: not a folder of run {self.path}")
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def gguf(self, name: str, quant: str) -> Path:
        """The exported model of recipe `name` in type `quant`."""
        return self.path / f"{name}-{quant}{GGUF_SUFFIX}"

    def modelfile(self, name: str, quant: str) -> Path:
        """The Ollama Modelfile of that exported model, beside it."""
        return self.path / f"{name}-{quant}.Modelfile"

    def quantize_source(self, name: str, dtype: str) -> Path:
        """The full-precision GGUF llama.cpp's quantizer reads while it makes the llama.cpp types (then deleted)."""
        return self.path / f".{name}-{dtype}{GGUF_SUFFIX}.quantize-source"

    def quality_of(self, quant: str | None = None) -> Path:
        """The checks of an exported GGUF: quality.json for the one the chat serves (None), quality-<quant>.json
        for another type."""
        return self.quality_file if quant is None else self.path / f"quality-{quant}.json"

    def image(self, filename: str) -> Path:
        """A plot of the report."""
        return self.path / filename

    def images(self) -> list[Path]:
        """The report's plots."""
        return sorted(self.path.glob("*.png"))

    def ggufs(self) -> list[Path]:
        """Every exported model of the run (one per type)."""
        return sorted(self.path.glob(f"*{GGUF_SUFFIX}"))

    def modelfiles(self) -> list[Path]:
        """Ollama Modelfiles written beside the exported models."""
        return sorted(p for p in self.path.glob("Modelfile*") if p.is_file())

    def tracker_record(self, tracker: str, item: str) -> Path:
        """What was sent to `tracker` for `item` (a stage's name, "run" or "summary"), and where it went."""
        return self.trackers / f"{tracker}-{item}.json"

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
        if outcome is not None and outcome.status == "damaged":
            raise TunebookError(f"stage {last} of {self.path}: {outcome.error}\n"
                                f"    fix: train it again (tunebook train {self.recipe_file})")
        if outcome is None or not outcome.done:
            raise TunebookError(f"stage {last} of {self.path} has not finished, there is nothing to export yet\n"
                                f"    fix: finish training first (tunebook train {self.recipe_file})")
        return outcome

    # -------------------------------------------------------------------------------- what chat serves

    def find_gguf(self, quant: str | None = None) -> Path:
        """The GGUF to serve or score: `<name>-<quant>.gguf` (default: the recipe's first export type, else
        q8_0), else another export of the run."""
        name = self.path.resolve().name
        types = self.export_quants()
        served = types[0]
        candidates = [self.gguf(name, quant or served)]
        if quant is None:  # then the recipe's other types, in its order, then any export of the run
            candidates += [self.gguf(name, q) for q in types[1:]] + sorted(self.path.glob(f"*-{served}{GGUF_SUFFIX}"))
            candidates += sorted(self.path.glob(f"*{GGUF_SUFFIX}"))
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        others = sorted(p.name for p in self.path.glob(f"*{GGUF_SUFFIX}"))
        if not others and not self.is_run():
            raise TunebookError(f"{self.path} is not a run directory and holds no .gguf file\n"
                                "    fix: pass a run directory (runs/<name>) or the path of a .gguf file")
        raise TunebookError(f"no {quant + ' ' if quant else ''}.gguf file in {self.path}"
                            + (f" (it has {', '.join(others)})" if others else "") + "\n"
                            f"    fix: export it first (tunebook export {self.path} --quant {quant or served}), "
                            "or pass the path of a .gguf file")

    def export_quants(self) -> list[str]:
        """The GGUF types the run's recipe exports (export.quantization), the served one first; [q8_0] when it
        says none."""
        export = (self._resolved() or {}).get("export") or {}
        quants = export.get("quantization") if isinstance(export, dict) else None
        quants = [quants] if isinstance(quants, str) else quants if isinstance(quants, list) else []
        return [q for q in quants if isinstance(q, str)] or ["q8_0"]

    def served_quant(self) -> str:
        """The GGUF type the chat serves by default: the first of the recipe's export.quantization."""
        return self.export_quants()[0]

    def system_prompt(self) -> str | None:
        """The system prompt the run trained with: its last stage's `data.system_prompt` that is set."""
        recipe = self._resolved()
        if recipe is None:
            return None
        def first_source(data):  # a data list: its first item reads the stage's own source
            return (data[0] if data and isinstance(data[0], dict) else {}) if isinstance(data, list) else data or {}

        prompts = [first_source((stage or {}).get("data")).get("system_prompt") for stage in recipe.get("stages") or []
                   if isinstance(stage, dict)]
        prompts = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
        return prompts[-1] if prompts else None

    def chat_sampling(self) -> dict:
        """The recipe's `chat:` settings that are set: `tunebook chat` and `serve` start with them."""
        chat = (self._resolved() or {}).get("chat")
        return {k: v for k, v in chat.items() if v is not None} if isinstance(chat, dict) else {}

    def _resolved(self) -> dict | None:
        """recipe.resolved.yaml as plain data (no validation: chat reads it without the schema)."""
        from ruamel.yaml import YAML, YAMLError

        if not self.resolved_file.is_file():
            return None
        try:
            data = YAML(typ="safe").load(self.resolved_file.read_text(encoding="utf-8")) or {}
        except (OSError, YAMLError) as exc:
            raise TunebookError(f"cannot read {self.resolved_file}: {exc}") from None
        return data if isinstance(data, dict) else {}

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
        wrongly fresh), the new one written after the body finished. A failure that never touched the artifact
        gives the old record back: what was made before is still there and still what it was made from."""
        key = self._key(artifact)
        old, before = self._records().get(key), _file_state(artifact)
        self._write_record(key, None)
        try:
            yield
        except BaseException:
            if old is not None and before is not None and _file_state(artifact) == before:
                self._write_record(key, old)
            raise
        self._write_record(key, _canonical(inputs))

    def _write_record(self, key: str, inputs: dict | None) -> None:
        records = self._records()
        if inputs is None:
            if key not in records:
                return
            records.pop(key)
        else:
            records[key] = inputs
        atomic.write_text(self.ledger, json.dumps(records, indent=1, sort_keys=True) + "\n")


def _file_state(path: Path) -> tuple[int, int, int] | None:
    """What tells a changed artifact apart: inode (atomic writes replace it), size, modification time."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _leftover(name: str) -> bool:
    """A temporary name left by an interrupted atomic write or link switch (runner/atomic.py, use_version), a
    GGUF write (export/gguf_writer.py, llama_quant.py) or a quantization's source (quantize_source)."""
    return bool(re.fullmatch(r"\..+\.(link-\d+|old-\d+|[A-Za-z0-9_]{8})|\.write-test-\d+|.+\.tmp-\d+|"
                             r"\..+\.quantize-source", name))


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
