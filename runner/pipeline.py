"""A recipe's stages in order, in one run directory: finished stages are skipped, an unfinished one
resumes from its last checkpoint, and everything that can fail cheaply fails before training starts."""
from __future__ import annotations

import gc
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

from . import atomic
from .errors import TunebookError
from .recipe import Recipe
from .resolved import resolved_yaml
from .train import StageOutcome, run_stage


class Interrupted(TunebookError):
    exit_code = 130


def _main_first():
    """Rank 0 first (data cache, model conversion), then the other ranks read what it wrote."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        return PartialState().main_process_first()
    return nullcontext()


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def anchored(recipe: Recipe) -> Recipe:
    """A copy whose local data and model paths are absolute, so the run directory's recipe.yaml works from
    anywhere (`tunebook eval`/`export` read it later, from another directory)."""
    base_dir = recipe._path.parent if recipe._path else None
    copy = recipe.model_copy(deep=True)

    def absolute(spec: str) -> str:
        if spec.startswith("package:"):
            return spec
        for candidate in (Path(spec).expanduser(), base_dir / spec if base_dir else None):
            if candidate is not None and candidate.exists():
                return str(candidate.resolve())
        return spec

    copy.model.base = absolute(copy.model.base)
    for stage in copy.stages:
        stage.data.source = absolute(stage.data.source)
    copy._path = recipe._path
    return copy


def prepare_run_dir(recipe: Recipe) -> Path:
    """Create the run directory (or check an existing one belongs to this recipe) and record the recipe."""
    run_dir = recipe.run_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise TunebookError(f"output_dir: cannot write to {run_dir} ({exc.strerror})\n"
                            "    fix: set output_dir to a folder you can write to (--set output_dir=...)") from None
    recipe = anchored(recipe)
    resolved = resolved_yaml(recipe)
    previous = run_dir / "recipe.yaml"
    started = any((run_dir / s.name).exists() for s in recipe.stages)
    if previous.is_file() and started and previous.read_text() != resolved:
        raise TunebookError(f"{run_dir} holds a run of a different version of recipe '{recipe.name}'; resuming it "
                            "with other settings would mix two experiments\n"
                            f"    fix: give this run its own name (--set name={recipe.name}-2) or delete {run_dir}")
    if _is_main():
        atomic.write_text(previous, resolved)
        atomic.write_text(run_dir / "recipe.resolved.yaml", resolved_yaml(recipe, provenance=True))
    return run_dir


def train_recipe(recipe: Recipe, only_stage: str | None = None, log=print) -> list[StageOutcome]:
    """Run the recipe's stages (or one of them) and return their outcomes."""
    from transformers import set_seed

    started = time.time()

    from .backends import get_backend
    from .base_model import load_tokenizer
    from .data import make_collator, pack_examples, prepare_stage, recipe_dir
    from .model import (build_stage_model, check_fits, check_quantization, load_base, model_source, resolve_dtype,
                        trainable_token_ids)

    if only_stage is not None:
        recipe.stage(only_stage)  # a clear error for an unknown name
    backend = get_backend(recipe.backend)  # None: hf, trained below; axolotl/unsloth run in their own environments
    if backend is not None:
        backend.check(recipe)  # e.g. unsloth without a GPU: refused before anything is loaded
    check_quantization(recipe.model)
    run_dir = prepare_run_dir(recipe)
    with _main_first():
        model_ref = model_source(recipe.model, recipe_dir(recipe), log)
    dtype = resolve_dtype(recipe.model)
    check_fits(model_ref, recipe.model, dtype)
    tokenizer = load_tokenizer(recipe.model, base_dir=recipe_dir(recipe))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    token_ids = trainable_token_ids(recipe.lora, tokenizer)

    outcomes: dict[str, StageOutcome] = {}
    todo = []
    for i, stage in enumerate(recipe.stages):
        done = StageOutcome.load(run_dir / stage.name)
        if done and done.status == "done":
            outcomes[stage.name] = done
            continue
        if only_stage and stage.name != only_stage:
            continue
        if i > 0 and stage.init != "fresh" and recipe.stages[i - 1].name not in outcomes and \
                (only_stage or not todo):
            raise TunebookError(f"stage {stage.name} starts from stage {recipe.stages[i - 1].name}, which has not "
                                f"finished\n    fix: train it first (tunebook train RECIPE --stage "
                                f"{recipe.stages[i - 1].name}) or run all stages")
        todo.append(stage)

    # Data first, for every stage: a dataset with no trainable token fails before any training. Finished
    # stages come from the cache; their validation sets feed the forgetting matrix.
    prepared = {}
    for stage in recipe.stages:
        if stage in todo or only_stage is None:
            with _main_first():
                prepared[stage.name] = prepare_stage(recipe, stage, tokenizer, log=log)

    autocast_bf16 = str(dtype).endswith("bfloat16") if recipe.stages[0].train.bf16 == "auto" else False
    for stage in todo:
        i = recipe.stages.index(stage)
        previous = outcomes.get(recipe.stages[i - 1].name) if i > 0 else None
        if backend is not None:
            outcomes[stage.name] = backend.run_stage(recipe, stage, run_dir / stage.name, model_ref, previous,
                                                     prepared[stage.name], tokenizer, log=log)
            continue
        t = stage.train
        bf16 = autocast_bf16 if t.bf16 == "auto" else bool(t.bf16)
        log(f"stage {stage.name}: init {stage.init}, base {recipe.model.base}, dtype {str(dtype).split('.')[-1]}"
            f"{' + bf16 autocast' if bf16 else ''}")
        set_seed(recipe.seed)  # the new adapter's initial weights are part of the experiment
        base = load_base(model_ref, recipe.model, dtype)
        model, lineage = build_stage_model(
            base, stage.init, recipe.lora, Path(previous.adapter) if previous else None,
            [Path(p) for p in previous.lineage] if previous else [],
            quantized=recipe.model.load_in_4bit or recipe.model.load_in_8bit,
            gradient_checkpointing=t.gradient_checkpointing, token_ids=token_ids)
        collator = make_collator(tokenizer, t.packing, recipe.model.max_seq_length)
        data = prepared[stage.name]
        if t.packing:  # whole rows packed ahead (best-fit decreasing): fuller rows than packing each batch
            data = type(data)(pack_examples(data.train, recipe.model.max_seq_length), data.val, data.report)
            log(f"stage {stage.name}: packed {len(prepared[stage.name].train)} samples into {len(data.train)} rows")
        outcome = run_stage(recipe, stage, run_dir / stage.name, model, tokenizer, data, collator,
                            [str(p) for p in lineage], bf16, log=log)
        del model, base
        gc.collect()
        if outcome.status == "interrupted":
            raise Interrupted(f"interrupted at step {outcome.steps} of stage {stage.name}; a checkpoint is saved\n"
                              "    to resume: run the same command again")
        outcomes[stage.name] = outcome
        log(f"stage {stage.name}: done in {outcome.steps} steps"
            + (f", best eval ppl {outcome.best_eval_ppl:.3f} at step {outcome.best_step}" if outcome.best_eval_ppl else "")
            + f"; adapter in {outcome.adapter}")
    if only_stage is None and all(s.name in outcomes for s in recipe.stages) and _is_main():
        finish_run(recipe, run_dir, model_ref, dtype, tokenizer, prepared, log,
                   wall_start=started if len(todo) == len(recipe.stages) else None)
    return [outcomes[s.name] for s in recipe.stages if s.name in outcomes]


def finish_run(recipe: Recipe, run_dir: Path, model_ref: str, dtype, tokenizer, prepared: dict, log=print,
               wall_start: float | None = None) -> None:
    """After the last stage: the forgetting matrix (several stages), the export and its quality checks (when the
    recipe asks), the report; each skipped when a previous run left it up to date. `wall_start`: when this
    command started, if it trained every stage (the report then gives the run's wall time)."""
    from eval.report import write_run_report

    from . import quality
    from .forgetting import forgetting_matrix

    if len(recipe.stages) > 1 and not (run_dir / "forgetting.json").is_file():
        forgetting_matrix(recipe, run_dir, model_ref, dtype, {k: v.val for k, v in prepared.items()},
                          tokenizer.pad_token_id, log=log)
    if recipe.export is not None:
        gguf = export_once(recipe, run_dir, log)
        last = recipe.stages[-1]
        if prepared[last.name].val:
            quality.check_export(run_dir, gguf, last.name, prepared[last.name].val, tokenizer,
                                 last.data.system_prompt, log=log)
    if wall_start is not None:
        atomic.write_text(run_dir / "wall.json", json.dumps({"wall_s": round(time.time() - wall_start, 1)}) + "\n")
    report = run_dir / "report.md"
    inputs = [run_dir / n for n in ("forgetting.json", "quality.json", "wall.json")] + \
        [run_dir / s.name / "stage.json" for s in recipe.stages]
    if report.is_file() and all(not p.is_file() or p.stat().st_mtime <= report.stat().st_mtime for p in inputs):
        log(f"report is up to date: {report}")
        return
    report = write_run_report(run_dir, sections=quality.report_sections(recipe, run_dir))
    log(f"report: {report}")


def export_once(recipe: Recipe, run_dir: Path, log=print) -> Path:
    """The run's GGUF: exported and verified, unless this run already holds one made from its final adapter."""
    from .export import export_run, final_outcome, gguf_path
    from .quality import gguf_key

    out = gguf_path(recipe, run_dir, recipe.export.quantization)
    stamp = run_dir / "export.json"
    adapter = (Path(final_outcome(recipe, run_dir).adapter) / "adapter_config.json").stat().st_mtime
    if out.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == {"gguf": gguf_key(out),
                                                                               "adapter_mtime": adapter}:
        log(f"export is up to date: {out}")
        return out
    out = export_run(run_dir, log=log)
    atomic.write_text(stamp, json.dumps({"gguf": gguf_key(out), "adapter_mtime": adapter}) + "\n")
    return out
