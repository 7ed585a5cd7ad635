"""The evaluation gate of a run: the recipe's evaluation set (`eval:`), written apart from its training data,
answered by the GGUF the chat serves (greedy and with the chat's sampler) and, greedy, by the base model and
the model after each earlier stage, so report.md shows what each stage did to behaviour. The reference
answers' perplexity is measured with each model too.

One file per model under runs/<name>/gate/ (runner/run_dir.py), each made again exactly when what it was
made from changed: the model, the evaluation set, the system prompt, the answering settings or the rules that
grade the answers. The models of earlier stages are exported only for this (runner/export/stage_gguf.py,
handed in by the pipeline as `stage_model`) and only when their file is not up to date. The base model's
answers are also kept once per machine (runner/measure/gate_cache.py): a new run on the same base reads them."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from eval.answer_checks import rules_identity
from eval.eval_set import EvalItem, EvalSetError, eval_set_digest, read_eval_set
from eval.gate import MODES, PARALLEL, answer_set, reference_perplexity, relabel, sampling_for

from .. import atomic
from ..data.templates import resolve_chat_template
from ..data.tokenize import tokenize_conversations
from ..errors import TunebookError
from ..recipe import Recipe
from ..run_dir import RunDir, content_identity, file_identity
from . import gate_cache

SERVED = "served"
BASE = "base"
GATE_SET = "evaluation set"  # plan_gate's row when the set cannot be read


def load_eval_set(recipe: Recipe) -> list[EvalItem]:
    path = recipe.local_path(recipe.eval.data)
    if path is None:
        raise TunebookError(f"eval.data: evaluation set {recipe.eval.data} not found\n"
                            "    fix: point eval.data at a JSON Lines file of questions")
    try:
        return read_eval_set(path)
    except EvalSetError as exc:
        raise TunebookError(str(exc)) from None


def reference_samples(recipe: Recipe, items: list[EvalItem], tokenizer, system_prompt: str | None) -> list[dict]:
    """Each question with its reference answer as the model's turn, tokenized with the training template; only
    the reference answer is scored."""
    template = resolve_chat_template(recipe.model.chat_template, tokenizer, base_dir=recipe.base_dir)
    conversations = [item.conversation(system_prompt) + [{"role": "assistant", "content": item.reference}]
                     for item in items]
    return tokenize_conversations(conversations, template, tokenizer, train_on="last_assistant",
                                  max_length=recipe.model.max_seq_length, truncation="truncate").examples


def chat_settings(recipe: Recipe) -> dict:
    """The recipe's `chat:` settings, which the served model's `chat` answers are drawn with."""
    return recipe.chat.overrides() if recipe.chat else {}


def gate_models(recipe: Recipe) -> list[str]:
    """The models answered greedy besides the served one: the base, then every stage but the last (the model
    after the last stage is the served GGUF)."""
    if not recipe.eval.stages:
        return []
    return [BASE] + [s.name for s in recipe.stages[:-1]]


def _common_inputs(recipe: Recipe, items: list[EvalItem], system_prompt: str | None, modes: tuple[str, ...]) -> dict:
    return {"eval_set": eval_set_digest(items), "system_prompt": system_prompt, "max_tokens": recipe.eval.max_tokens,
            "sampling": {mode: vars(sampling_for(mode, recipe.eval.seed, chat_settings(recipe))) for mode in modes},
            "parallel": PARALLEL, "rules": rules_identity()}


def stage_model_inputs(recipe: Recipe, run: RunDir, model: str, versions: dict[str, str] | None = None) -> dict:
    """What the model after stage `model` (or the base) is made of: the base, that stage's outcome and adapter,
    the template it answers with. `versions`: the stage version to read (by fingerprint) instead of the one the
    run links now."""
    name = recipe.stages[0].name if model == BASE else model
    stage = run.version(name, versions[name]) if versions and name in versions else run.stage(name)
    if model == BASE and stage.outcome() is None:  # the first stage trains again: the base answers with the
        stage = run.stage(name)                     # template its adapter writes, the same as the current one's
    outcome = stage.outcome()
    adapter = Path(outcome.adapter) if outcome and outcome.adapter else None
    export = recipe.export
    return {"base": recipe.model.base, "quant": export.quants[0] if export else "q8_0",
            **({"keep": export.keep} if export and export.keep else {}),
            "template": content_identity(adapter / "chat_template.jinja") if adapter else None,
            "after": None if model == BASE else [stage.identity(), file_identity(adapter) if adapter else None]}


REFERENCE = "reference_ppl"


def part_inputs(recipe: Recipe, inputs: dict, part: str) -> dict:
    """What one part of a model's gate is made from: one way of answering (`greedy`, `chat`) with its own
    sampling only, so a change of the chat's settings leaves the greedy answers kept; or the reference answers'
    perplexity, which no answering setting changes."""
    common = {k: v for k, v in inputs.items() if k != "sampling"}
    if part == REFERENCE:
        common = {k: v for k, v in common.items() if k not in ("max_tokens", "parallel", "rules")}
        return {**common, "part": part, "max_seq_length": recipe.model.max_seq_length,
                "chat_template": recipe.model.chat_template}
    return {**common, "part": part, "sampling": inputs["sampling"][part]}


def measure_part(gguf: Path, part: str, items: list[EvalItem], samples: list[dict], recipe: Recipe,
                 system_prompt: str | None, label: str, log=print) -> dict:
    """One way of answering of one GGUF (graded and summarized), or its reference answers' perplexity."""
    if part == REFERENCE:
        return reference_perplexity(gguf, samples)
    log(f"gate: {len(items)} evaluation questions answered by {label} ({part}, at most {recipe.eval.max_tokens} tokens)")
    return answer_set(gguf, items, system_prompt, part, seed=recipe.eval.seed, max_tokens=recipe.eval.max_tokens,
                      log=lambda m: log(f"gate: {m}"), chat=chat_settings(recipe))


def gate_run(recipe: Recipe, run: RunDir, served: Path, tokenizer, system_prompt: str | None,
             stage_model: Callable[[str], AbstractContextManager[Path]], log=print) -> dict[str, dict]:
    """{model: gate result} for the served GGUF and, when the recipe asks, the base and earlier stages; each
    read back when it is up to date, and each of its parts (a way of answering, the reference perplexity) read
    from the run's kept parts when it was made from the same inputs before."""
    items = load_eval_set(recipe)
    samples = None
    results = {}
    plan = [(SERVED, MODES)] + [(model, ("greedy",)) for model in gate_models(recipe)]
    quant = recipe.export.quants[0] if recipe.export else "q8_0"
    for model, modes in plan:
        target = run.gate_file(model)
        inputs = _common_inputs(recipe, items, system_prompt, modes)
        inputs["model"] = ([served.name, file_identity(served)] if model == SERVED
                           else stage_model_inputs(recipe, run, model))
        if run.fresh(target, inputs):
            log(f"gate of {model} is up to date ({target})")
            results[model] = json.loads(target.read_text())
            continue
        kept = gate_cache.cache_file(recipe, inputs) if model == BASE else None
        cached = gate_cache.read(kept)
        if cached is not None:
            log(f"gate of {model}: the same measurement was made on this machine before, reading it ({kept})")
            with run.making(target, inputs):
                atomic.write_text(target, json.dumps(cached, indent=2) + "\n")
            results[model] = cached
            continue
        start = time.perf_counter()
        label = {SERVED: "the served GGUF", BASE: "the base model"}.get(model, f"the model after {model}")
        part_inputs_of = {part: part_inputs(recipe, inputs, part) for part in (*modes, REFERENCE)}
        part_files = {part: run.gate_kept(made_of) for part, made_of in part_inputs_of.items()}
        parts = {part: (gate_cache.read(path) or {}).get("result") for part, path in part_files.items()}
        reused = [part for part in modes if parts[part] is not None]
        if reused:
            log(f"gate of {model}: {', '.join(reused)} answers were made from the same model and settings before, "
                f"reading them")
        with run.making(target, inputs):
            missing = [part for part, found in parts.items() if found is None]
            if missing:
                samples = samples if samples is not None else reference_samples(recipe, items, tokenizer, system_prompt)
                with (nullcontext(served) if model == SERVED else stage_model(model)) as gguf:
                    for part in missing:
                        parts[part] = measure_part(gguf, part, items, samples, recipe, system_prompt, label, log)
                        # with its inputs, so `tunebook gc` can tell when its model is gone
                        gate_cache.keep(part_files[part], {"inputs": part_inputs_of[part], "result": parts[part]})
            gguf_name = served.name if model == SERVED else run.gate_gguf(model, quant).name
            result = {"model": label, "gguf": gguf_name, "eval_set": Path(recipe.eval.data).name,
                      "questions": len(items), **parts, "seconds": round(time.perf_counter() - start, 1)}
            atomic.write_text(target, json.dumps(result, indent=2) + "\n")
        gate_cache.keep(kept, result)
        results[model] = result
    return results


def plan_gate(recipe: Recipe, run: RunDir, stages: dict[str, tuple[str, str]], served_made: bool) -> list[tuple[str, str, str]]:
    """(model, action, why) for each model the gate measures: what `tunebook train` would answer again.
    `stages`: each stage's planned action and version; `served_made`: whether the served GGUF is made again."""
    if recipe.eval is None or recipe.export is None:
        return []
    try:
        items = load_eval_set(recipe)
    except TunebookError as exc:
        return [(GATE_SET, "cannot tell", str(exc).splitlines()[0])]
    system_prompt = recipe.stages[-1].sources()[0].system_prompt
    served = run.gguf(recipe.name, recipe.export.quants[0])
    versions = {name: version for name, (_, version) in stages.items()}
    order = [s.name for s in recipe.stages]
    rows = []
    for model, modes in [(SERVED, MODES)] + [(m, ("greedy",)) for m in gate_models(recipe)]:
        upto = order if model == SERVED else [] if model == BASE else order[:order.index(model) + 1]
        trained = [n for n in upto if stages[n][0] != "reuse"]
        if trained or (model == SERVED and (served_made or not served.is_file())):
            why = f"stage {trained[-1]} {stages[trained[-1]][0]}s" if trained else "the served GGUF is made again"
            rows.append((model, "answer " + ", ".join(modes), why))
            continue
        inputs = _common_inputs(recipe, items, system_prompt, modes)
        inputs["model"] = ([served.name, file_identity(served)] if model == SERVED
                           else stage_model_inputs(recipe, run, model, versions))
        why = run.stale_because(run.gate_file(model), inputs)
        if why is None:
            rows.append((model, "reuse", "made from this model and these settings"))
        elif model == BASE and gate_cache.read(gate_cache.cache_file(recipe, inputs)) is not None:
            rows.append((model, "read", f"{why}; measured on this machine before ($TUNEBOOK_CACHE/gate)"))
        else:
            kept = [m for m in modes if run.gate_kept(part_inputs(recipe, inputs, m)).is_file()]
            todo = [m for m in modes if m not in kept]
            scored = run.gate_kept(part_inputs(recipe, inputs, REFERENCE)).is_file()
            action = ("answer " + ", ".join(todo) if todo else "read kept answers" if scored
                      else "score reference answers")
            rows.append((model, action, why + (f"; {', '.join(kept)} answers kept from before" if kept else "")))
    return rows


def read_gate(recipe: Recipe, run: RunDir) -> dict[str, dict]:
    """The gate files a run has, by model, in the report's order: base, earlier stages, served."""
    if recipe.eval is None:
        return {}
    order = [BASE] + [s.name for s in recipe.stages[:-1]] + [SERVED]
    gate = {m: json.loads(run.gate_file(m).read_text()) for m in order if run.gate_file(m).is_file()}
    try:
        items = load_eval_set(recipe) if gate else []
    except TunebookError:
        return gate  # the set is unreadable now: its labels as they were
    return {m: relabel(result, items) for m, result in gate.items()}
