"""A recipe's stages in order, in one run directory, each handed to its backend; then what is made from them.

Each stage is a version named by its fingerprint (runner/train/rerun.py): a finished version is reused, an
unfinished one resumes from its last checkpoint, a new one trains beside the old ones; everything that can fail
cheaply (the recipe, the base model, the data) fails before any training starts. After the last stage the
forgetting matrix, the export, the quality checks, the evaluation gate and the report are made, each only when
it is not up to date (runner/run_dir.py's freshness rule), and the trackers the recipe lists get what is new
(runner/share).
"""
from __future__ import annotations

import json
import os
import time


from . import atomic
from .errors import Interrupted, TunebookError
from .recipe import Recipe
from .recipe.resolved import resolved_yaml
from .run_dir import RunDir, StageOutcome
from .train.rerun import adopt_unversioned, select_versions
from .launch import is_main_process, main_process_first, part


def open_run_dir(recipe: Recipe) -> RunDir:
    """The run directory, made and checked writable; nothing in it is written yet."""
    run = RunDir.of(recipe)
    try:
        run.path.mkdir(parents=True, exist_ok=True)
        probe = run.path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise TunebookError(f"output_dir: cannot write to {run.path} ({exc.strerror})\n"
                            "    fix: set output_dir to a folder you can write to (--set output_dir=...)") from None
    return run


def record_recipe(recipe: Recipe, run: RunDir, log=print) -> None:
    """Record the recipe (an edited one too: its stages are new versions), once everything that can fail
    cheaply has passed: a rerun that fails on its data or its base leaves the run as the last good one made it."""
    anchored = recipe.anchored()
    resolved = resolved_yaml(anchored)
    if is_main_process():
        adopt_unversioned(run, log)  # stage folders from before versions, while recipe.yaml still describes them
        atomic.write_text(run.recipe_file, resolved)
        atomic.write_text(run.resolved_file, resolved_yaml(anchored, provenance=True))


def stages_to_train(recipe: Recipe, run: RunDir, only_stage: str | None) -> tuple[dict[str, StageOutcome], list]:
    """(outcomes of finished stages, stages to train in order). A stage that starts from an unfinished one
    that is not trained now is an error."""
    done: dict[str, StageOutcome] = {}
    todo = []
    for i, stage in enumerate(recipe.stages):
        outcome = run.stage(stage.name).outcome()
        if outcome and outcome.done:
            done[stage.name] = outcome
            continue
        if only_stage and stage.name != only_stage:
            continue
        previous = recipe.stages[i - 1].name if i > 0 else None
        if previous and stage.init != "fresh" and previous not in done and (only_stage or not todo):
            raise TunebookError(f"stage {stage.name} starts from stage {previous}, which has not finished\n"
                                f"    fix: train it first (tunebook train RECIPE --stage {previous}) or run all stages")
        todo.append(stage)
    return done, todo


def train_recipe(recipe: Recipe, only_stage: str | None = None, log=print, export: bool = True) -> list[StageOutcome]:
    """Run the recipe's stages (or one of them), then make what is made from them (without the export and its
    checks when `export` is false); return the outcomes."""
    from .measure.gate import load_eval_set
    from .model.load import check_quantization
    from .share.track import check_trackers
    from .train.backends import get_backend

    started = time.time()
    if only_stage is not None:
        recipe.stage(only_stage)  # a clear error for an unknown name
    backend = get_backend(recipe.backend)
    backend.check(recipe)  # e.g. unsloth without a GPU: refused before anything is loaded
    if is_main_process():
        check_trackers(recipe)  # an unreachable tracker fails now, not after the training
    check_quantization(recipe.model)
    if export and recipe.eval is not None and recipe.export is not None:
        load_eval_set(recipe)  # a bad line of the evaluation set fails now, not after the training and the export
    run = open_run_dir(recipe)
    with run.locked(is_main_process()):  # one `tunebook train` at a time in a run directory
        return _train_in(recipe, run, only_stage, log, export, backend, started)


def _train_in(recipe: Recipe, run: RunDir, only_stage: str | None, log, export: bool, backend,
              started: float) -> list[StageOutcome]:
    from .data.prepare import prepare_stage
    from .model.base import load_tokenizer
    from .model.load import check_fits, model_source, resolve_dtype, trainable_token_ids
    from .share.track import track
    from .train.protocol import StageJob

    with main_process_first():
        model_ref = model_source(recipe.model, recipe.base_dir, log)
    check_fits(model_ref, recipe.model, resolve_dtype(recipe.model))
    tokenizer = load_tokenizer(recipe.model, base_dir=recipe.base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    trainable_token_ids(recipe.lora, tokenizer)  # a misspelled token fails now, not after the base is loaded

    # Data first, for every stage: a dataset with no trainable token fails before any training, and before the
    # run records this recipe. Finished stages come from the cache; their validation sets feed the forgetting
    # matrix.
    prepared = {}
    for stage in recipe.stages:
        if only_stage is None or stage.name == only_stage:
            with main_process_first():
                prepared[stage.name] = prepare_stage(recipe, stage, tokenizer, log=log)
    record_recipe(recipe, run, log)
    with main_process_first():
        select_versions(recipe, run, log)  # each stage's fingerprint: reuse, resume or train
    outcomes, todo = stages_to_train(recipe, run, only_stage)

    for stage in todo:
        i = recipe.stages.index(stage)
        previous = outcomes.get(recipe.stages[i - 1].name) if i > 0 and stage.init != "fresh" else None
        outcome = backend.run_stage(StageJob(recipe, stage, run.stage(stage.name), model_ref, previous,
                                             prepared[stage.name], tokenizer, log))
        if not outcome.done:
            part()
            raise Interrupted(f"interrupted at step {outcome.steps} of stage {stage.name}; a checkpoint is saved\n"
                              "    to resume: run the same command again")
        outcomes[stage.name] = outcome
        log(f"stage {stage.name}: done in {outcome.steps} steps"
            + (f", best eval ppl {outcome.best_eval_ppl:.3f} at step {outcome.best_step}" if outcome.best_eval_ppl else "")
            + f"; adapter in {outcome.adapter}")
        if is_main_process():
            try:
                track(recipe, run, log, stage=stage.name)
            except TunebookError as exc:  # the run goes on; the end of the run sends it again
                log(f"warning: {exc}")
    part()  # from here on the main process works alone
    if only_stage is None and all(s.name in outcomes for s in recipe.stages) and is_main_process():
        finish_run(recipe, run, model_ref, tokenizer, prepared, log, wall_start=started,
                   trained=[s.name for s in todo], export=export)
    return [outcomes[s.name] for s in recipe.stages if s.name in outcomes]


def finish_run(recipe: Recipe, run: RunDir, model_ref: str, tokenizer, prepared: dict, log=print,
               wall_start: float | None = None, trained: list[str] | None = None, export: bool = True) -> None:
    """After the last stage: the forgetting matrix (several stages), the export and its quality checks (when the
    recipe asks and `export`), the evaluation gate (when it names an evaluation set), the report; each made only
    when it is not up to date. `wall_start`: when this command started, and `trained`, the stages it trained (the
    report gives its wall time)."""
    from .measure.forgetting import forgetting_matrix
    from .measure.quality import check_exports
    from .measure.report import write_run_report
    from .share.track import track

    if len(recipe.stages) > 1:
        val_sets = {column: samples for data in prepared.values() for column, samples in data.val_sets.items()}
        forgetting_matrix(recipe, run, model_ref, val_sets, tokenizer.pad_token_id, log=log)
    if recipe.export is not None and export:
        from .export.to_gguf import export_types

        ggufs = export_types(run, log=log)  # each type the recipe lists; only those not up to date are made
        last = recipe.stages[-1]
        if prepared[last.name].val:
            check_exports(run, ggufs, last.name, prepared[last.name].val, tokenizer, last.sources()[0].system_prompt,
                          log=log)
        if recipe.eval is not None:
            from .export.stage_gguf import stage_gguf
            from .measure.gate import gate_run

            gate_run(recipe, run, next(iter(ggufs.values())), tokenizer, last.sources()[0].system_prompt,
                     lambda model: stage_gguf(recipe, run, model, log=log), log=log)
    if wall_start is not None and trained:
        atomic.write_text(run.wall_file, json.dumps({"wall_s": round(time.time() - wall_start, 1),
                                                     "trained": trained or []}) + "\n")
    write_run_report(recipe, run, log=log)
    track(recipe, run, log)
