"""The model card (README.md of a hub repo) written from a run: what the model is, how every stage was
trained, what was measured, and what it cannot be trusted with. The metadata at its top (base model, datasets,
model-index with the measured perplexities) is huggingface_hub's ModelCardData, the form the hub renders."""
from __future__ import annotations

import dataclasses
import json
import re
import struct
from pathlib import Path

from eval.report import comparison_table, forgetting_table, quantization_section, targets_table
from eval.numbers import number_text

from ..measure.report import run_rows
from .folder import human
from .summary import RunSummary

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(spec: str) -> str | None:
    """A model or dataset id on the hub, or None for a local path or a `package:` source."""
    return spec if HUB_ID.match(spec) and not Path(spec).exists() else None


def shown(spec: str) -> str:
    """A source as a reader should see it: hub ids and packages as written, a local path relative to the
    current folder (or its file name), never a path of this machine."""
    if spec.startswith("package:") or hub_id(spec):
        return spec
    path = Path(spec)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path.name


def shareable(summary: RunSummary, text: str) -> str:
    """`text` (the recipe, the report) with the recipe's paths on this machine shown as `shown` does."""
    recipe = summary.recipe
    specs = [recipe.model.base, recipe.output_dir] + [item.source for s in recipe.stages for item in s.sources()]
    for spec in sorted({s for s in specs if Path(s).is_absolute()}, key=len, reverse=True):
        text = text.replace(spec, shown(spec))
    return text


def shareable_recipe(summary: RunSummary) -> str:
    """recipe.yaml as uploaded: the resolved recipe, paths of this machine shortened."""
    return shareable(summary, summary.run.recipe_file.read_text())


def count_parameters(merged: Path) -> int | None:
    """Parameters of the merged model, from its safetensors headers (nothing is loaded)."""
    files = sorted(merged.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, tensor in header.items():
            if name != "__metadata__":
                n = 1
                for dim in tensor["shape"]:
                    n *= dim
                total += n
    return total


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} minutes" if seconds >= 90 else f"{seconds:.0f} seconds"


def metadata(summary: RunSummary, repo: str, license: str | None):
    """The card's YAML header: base model, datasets, tags, and model-index with the final model's perplexity
    on every stage's validation set (and the GGUF's, when it was checked)."""
    from huggingface_hub import EvalResult, ModelCardData

    recipe = summary.recipe
    final = summary.stages[-1].name if summary.stages else None
    results = []
    for stage in recipe.stages:
        ppl = (summary.forgetting or {}).get("ppl", {}).get(final, {}).get(stage.name)
        if ppl is None:
            done = next((s for s in summary.stages if s.name == stage.name), None)
            ppl = done.numbers().get("final_eval_ppl") if done and stage.name == final else None
        if ppl is not None:
            results.append(EvalResult(task_type="text-generation", task_name="Text generation",
                                      dataset_type=hub_id(stage.sources()[0].source) or shown(stage.sources()[0].source),
                                      dataset_name=f"{stage.name} validation set", dataset_split="validation",
                                      metric_type="perplexity", metric_value=round(ppl, 4),
                                      metric_name=f"perplexity after stage {final}"))
    if summary.quality:
        q = summary.quality
        source = recipe.stage(q["stage"]).sources()[0].source
        results.append(EvalResult(task_type="text-generation", task_name="Text generation",
                                  dataset_type=hub_id(source) or shown(source),
                                  dataset_name=f"{q['stage']} validation set", dataset_split="validation",
                                  metric_type="perplexity", metric_value=round(q["quantization"]["gguf_ppl"], 4),
                                  metric_name=f"perplexity of {q['gguf']} (llama.cpp)"))
    datasets = [d for d in dict.fromkeys(hub_id(i.source) for s in recipe.stages for i in s.sources()) if d]
    data = ModelCardData(base_model=hub_id(recipe.model.base), datasets=datasets or None, license=license,
                         library_name="peft", pipeline_tag="text-generation", model_name=repo.split("/")[-1],
                         tags=["tunebook", "lora", "text-generation"] + (["gguf"] if summary.exports else []),
                         eval_results=results or None)
    return data


def _files_table(files: list[str], summary: RunSummary) -> str:
    sizes = {e.path.name: e for e in summary.exports}
    described = []
    for name in files:
        if name in sizes:
            e = sizes[name]
            what = f"the model for llama.cpp / Ollama, {e.quant} ({human(e.bytes)}), chat template inside"
        elif name == "adapter_model.safetensors":
            what = f"the LoRA adapter after stage {summary.stages[-1].name} (PEFT), with its tokenizer and chat template"
        elif name.startswith("merged/"):
            if name != "merged/config.json":
                continue
            name, what = "merged/", "the base with the adapter merged in (transformers, safetensors)"
        elif name.startswith("Modelfile"):
            what = "Ollama Modelfile for the GGUF (`ollama create NAME -f " + name + "`)"
        elif name == "recipe.yaml":
            what = "the recipe that trained it, every default filled in"
        elif name == "report.md":
            what = "the run's report: the tables below, sample answers"
        elif name == "forgetting.json":
            what = "the forgetting matrix below, as measured"
        elif name == "quality.json":
            what = "the quality checks of the GGUF, with every held-out answer"
        elif name.startswith("lineage/"):
            if not name.endswith("/adapter_config.json"):
                continue
            name, what = name.rsplit("/", 1)[0] + "/", "an adapter merged into the base before the last one"
        else:
            continue
        described.append(f"| `{name}` | {what} |")
    return "| file | what it is |\n|---|---|\n" + "\n".join(described)


def _stage_table(summary: RunSummary) -> str:
    lines = ["| stage | starts from | data | format | steps | learning rate | batch × accumulation | packing | "
             "trained tokens | time | best val ppl |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for stage in summary.stages:
        cfg = summary.recipe.stage(stage.name)
        t, o = cfg.train, stage.outcome
        tokens = stage.numbers().get("tokens_seen")
        lines.append(f"| {stage.name} | {cfg.init} | `{' + '.join(shown(i.source) for i in cfg.sources())}` | {', '.join(dict.fromkeys(i.format for i in cfg.sources()))} | {o.steps} | "
                     f"{number_text(t.learning_rate)} | {t.micro_batch_size} × {t.gradient_accumulation_steps} | "
                     f"{'yes' if t.packing else 'no'} | {f'{tokens:,.0f}' if tokens else '–'} | "
                     f"{o.seconds / 60:.1f} min | {f'{o.best_eval_ppl:.3f}' if o.best_eval_ppl else '–'} |")
    return "\n".join(lines)


def _use(summary: RunSummary, repo: str, files: list[str]) -> str:
    """How to run what the repo holds: the GGUF in llama.cpp, the merged model or the adapter in transformers."""
    parts = []
    if summary.exports:
        gguf = summary.exports[0].path.name
        parts += ["```bash", f"hf download {repo} {gguf} --local-dir .",
                  f"llama-cli -m {gguf} -cnv          # or: tunebook chat {gguf}", "```"]
    lines = ["from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    if "merged/config.json" in files:
        lines += [f'model = AutoModelForCausalLM.from_pretrained("{repo}", subfolder="merged")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo}", subfolder="merged")']
    elif hub_id(summary.recipe.model.base):
        lines = ["from peft import PeftModel"] + lines + [
            f'base = AutoModelForCausalLM.from_pretrained("{summary.recipe.model.base}")',
            f'model = PeftModel.from_pretrained(base, "{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")  # with the chat template it was trained with']
    else:
        return "\n".join(parts + ["", f"The adapter applies to `{shown(summary.recipe.model.base)}`, a base that is not "
                                   "on the hub: use the GGUF, or a repo pushed with `--merged` (a transformers model "
                                   "in `merged/`)."]).strip()
    return "\n".join(parts + ["", "```python"] + lines + ["```"]).strip()


def limitations(summary: RunSummary) -> list[str]:
    """What a reader must know before trusting an answer, from what the run measured."""
    recipe = summary.recipe
    n = count_parameters(summary.run.merged)
    seconds = sum(s.outcome.seconds for s in summary.stages)
    steps = sum(s.outcome.steps for s in summary.stages)
    size = f"a {_count(n)}-parameter model" if n else "a small model"
    items = [f"This is {size} fine-tuned for {_duration(seconds)} ({steps} optimizer steps). Its answers can be "
             "fluent and still wrong on the facts: a small model trained briefly often is. Check anything that "
             "matters; the sample answers in `report.md` show what it gets wrong."]
    if summary.quality:
        g = summary.quality["generation"]
        items.append(f"{g['stopped']} of {g['questions']} held-out questions got a reply that stopped at end-of-turn "
                     f"within {g['max_tokens']} tokens" + ("; the others ran on." if g["stopped"] < g["questions"]
                                                           else ". Stopping is not being right."))
    items.append("Validation perplexity says how well it predicts held-out conversations like its training data, "
                 "not whether an answer is correct or safe.")
    items.append("It is no substitute for a professional: do not use it for medical or veterinary decisions, "
                 "medication doses, emergencies, or legal and financial advice.")
    prompts = [s.sources()[0].system_prompt for s in recipe.stages if s.sources()[0].system_prompt]
    if prompts:
        items.append(f"It was trained to answer under this system prompt; use it (the chat and the Space do): "
                     f"\"{prompts[-1].strip()}\"")
    missed = [what for what, _, met in summary.targets if not met]
    if missed:
        items.append("Targets of its recipe that this run did not meet: " + "; ".join(missed) + ".")
    items.append(f"It inherits the limitations, biases and licence terms of its base model "
                 f"(`{shown(recipe.model.base)}`).")
    return items


def model_card(summary: RunSummary, repo: str, files: list[str], license: str | None = None) -> str:
    """README.md for the hub repo `repo` holding `files` (paths inside the repo)."""
    recipe = summary.recipe
    base = shown(recipe.model.base)
    stages = ", ".join(f"`{s.name}`" for s in summary.stages)
    lora = recipe.lora
    parts = ["---", metadata(summary, repo, license).to_yaml().strip(), "---", "",
             f"# {repo.split('/')[-1]}", "",
             f"A LoRA fine-tune of `{base}` in {len(summary.stages)} stage(s) ({stages}), trained and measured by "
             f"tunebook recipe `{recipe.name}` (`{recipe.backend}` backend, seed {recipe.seed})"
             + (f", exported as {', '.join(e.quant for e in summary.exports)} GGUF" if summary.exports else "") + ".",
             "", "## Files", "", _files_table(files, summary), "", "## Use", "", _use(summary, repo, files), ""]
    parts += ["## Training", "",
              f"Base model: `{base}`. LoRA: r {lora.r}, alpha {number_text(lora.alpha)}, dropout "
              f"{number_text(lora.dropout)}, target modules {lora.target_modules if isinstance(lora.target_modules, str) else ', '.join(lora.target_modules)}"
              + (f", trained token rows {', '.join(f'`{t}`' for t in lora.trainable_tokens)}" if lora.trainable_tokens
                 else "") + ".", "", _stage_table(summary), "",
              "Every setting is in `recipe.yaml` (below); each stage starts from the one before it.", "",
              "## Results", "",
              "Validation loss is the token-weighted mean negative log-likelihood of the assistant tokens of each "
              "stage's held-out conversations; perplexity = exp(loss).", "",
              comparison_table([dataclasses.replace(row, model=shown(row.model)) for row in run_rows(summary.run)]),
              ""]
    if summary.forgetting:
        parts += ["### Forgetting matrix (validation perplexity)", "", forgetting_table(summary.forgetting), "",
                  "Each cell: the model of that row on that stage's validation set (in brackets: the change from "
                  "the row above).", ""]
    if summary.targets or summary.quality:
        parts += ["### Quality gate", ""]
        if summary.targets:
            parts += [targets_table(summary.targets), ""]
        if summary.quality:
            parts += [quantization_section(summary.quality["quantization"], summary.quality["stage"]), ""]
    if summary.exports:
        parts += ["### Export", "", summary.export_table(), ""]
    images = [name for name in files if name.endswith(".png")]
    if images:
        parts += ["### Curves", ""] + [f"![{Path(name).stem}]({name})\n" for name in images]
    parts += ["## Limitations", ""] + [f"- {item}" for item in limitations(summary)] + [""]
    parts += ["<details><summary>recipe.yaml</summary>", "", "```yaml", shareable_recipe(summary).rstrip(), "```",
              "", "</details>", ""]
    return "\n".join(parts)
