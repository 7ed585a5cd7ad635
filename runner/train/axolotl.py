"""backend: axolotl. Each stage of a recipe becomes an axolotl config; `axolotl train` runs it in its own
environment (.venv-axolotl: axolotl pins transformers/peft/trl versions of its own), and what it logged
comes back as the stage's metrics.jsonl, adapter/ and stage.json.

Two ways to give axolotl a stage's data:
- `tunebook export-config` (for people who run axolotl themselves) points axolotl at the source: a hub
  dataset id or an absolute local path, `type: chat_template`, the field mappings of the recipe's format.
  What axolotl cannot read that way (a `package:` source, alpaca or prompt/completion records, a system
  prompt, training on the last reply only) is an error that names the fix: `--data-dir`.
- With a data folder (`--data-dir`, and always when tunebook runs axolotl itself), tunebook writes the
  stage's conversations exactly as it reads them (format, system prompt, shuffle, max_samples) as JSON
  Lines, split into train.jsonl and val.jsonl with the same split as the hf backend, so both backends
  train and validate on the same conversations.
- A stage whose `data:` is a list of weighted items (several sources, replay of an earlier stage) has no
  axolotl equivalent (axolotl concatenates its datasets, without weights): tunebook writes its training mix,
  pre-mixed exactly as the hf backend trains it, and every source's validation conversations.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from chat.templates import END_OF_TURN, template_names, template_text

from .. import atomic
from ..errors import TunebookError
from ..recipe import OPTIMIZERS, Recipe, StageConfig
from ..model.load import resolve_dtype, trainable_token_ids
from ..run_dir import RunDir, StageOutcome
from .protocol import StageJob
from .checkpoints import step_of
from .diverged import fail_stage, first_non_finite
from .external import check_single_process, env_tool, failed, merged_base, run_logged
from .metrics import FIELDS, MetricsLog

GPU_KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
# sample packing isolates packed samples only with an attention backend that reads the restarting position ids:
# with sdpa axolotl drops the attention mask and transformers builds a block-diagonal causal mask (the same
# mechanism tunebook's own packing uses, runner/data/pack.py); left unset, packed samples attend to each other.
PACKING_ATTENTION = "sdpa"
PLUGIN_DIR = Path(__file__).with_name("axolotl_plugin")   # put on axolotl's PYTHONPATH for a tunebook run
PLUGIN = "tunebook_axolotl.TunebookPlugin"
DTYPES = {"bfloat16": {"bf16": True, "fp16": False}, "float16": {"bf16": False, "fp16": True},
          "float32": {"bf16": False, "fp16": False}}
DS_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
TRAINING_FLAG = "training"  # per-turn key in the files tunebook writes (train_on: last_assistant)


@dataclass
class StageFiles:
    """A stage's conversations written for axolotl: {"messages": [{"role", "content"(, "training")}]} per line.
    With `val`, train/val are tunebook's own split; without, axolotl splits `train` by `val_set_size`."""

    train: Path
    val: Path | None = None
    val_set_size: float = 0.0
    per_turn_flags: bool = False  # turns carry TRAINING_FLAG (train_on: last_assistant)
    rows: int = 0                 # conversations in train (+ val)


class Unexpressible(TunebookError):
    """A stage's data an axolotl config cannot read from its source (tunebook writes it out instead)."""


def axolotl_exe() -> Path:
    return env_tool("TUNEBOOK_AXOLOTL", ".venv-axolotl", "axolotl", "env-axolotl")


def axolotl_python() -> Path:
    """The Python of the axolotl environment (beside its `axolotl` executable)."""
    python = axolotl_exe().parent / "python"
    if not python.exists():
        raise TunebookError(f"no python beside {axolotl_exe()}\n    fix: run `make env-axolotl`")
    return python


# ---------------------------------------------------------------------------------------------- translation

def _local_path(spec: str, base_dir: Path | None) -> Path | None:
    for candidate in (Path(spec).expanduser(), base_dir / spec if base_dir else None):
        if candidate is not None and candidate.exists():
            return candidate.resolve()
    return None


def _unsupported(stage: StageConfig, what: str) -> Unexpressible:
    return Unexpressible(
        f"stage {stage.name}: {what}, which an axolotl config cannot express when axolotl reads the source itself\n"
        "    fix: tunebook writes the stage's conversations (as it reads them) as JSON Lines and points the config "
        "at them: `tunebook export-config` does it on its own, --data-dir DIR chooses where")


def template_keys(recipe: Recipe) -> dict:
    """chat_template (+ chat_template_jinja, eot_tokens): the same template text the hf backend trains with."""
    name = recipe.model.chat_template
    if name is None:
        return {"chat_template": "tokenizer_default"}
    if name in template_names():
        keys = {"chat_template": "jinja", "chat_template_jinja": template_text(name)}
        if name in END_OF_TURN:
            keys["eot_tokens"] = [END_OF_TURN[name]]
        return keys
    path = _local_path(name, recipe.base_dir)
    if path is None or not path.is_file():
        raise TunebookError(f"model.chat_template: file not found: {name}\n"
                            f"    fix: check the path, or use a named template: {', '.join(template_names())}")
    return {"chat_template": "jinja", "chat_template_jinja": path.read_text()}


def _train_on_keys(train_on: str) -> dict:
    if train_on == "all":
        return {"roles_to_train": ["system", "user", "assistant"], "train_on_eos": "all", "train_on_eot": "all"}
    return {"roles_to_train": ["assistant"], "train_on_eos": "turn", "train_on_eot": "turn"}


def _detect_local_format(stage: StageConfig, cfg, path: Path | None) -> str:
    from ..data.formats import detect_format
    from ..data.sources import BadRecords, open_source

    if path is None:
        raise _unsupported(stage, "data.format is auto and the source is not a local file to look at")
    rows = [r.row for r in open_source(str(path), None).read(BadRecords("skip")).records[:50]]
    return detect_format(rows, cfg.fields)[0]


def _train_on(stage: StageConfig) -> str:
    """The stage's train_on as axolotl's roles see it: the one its sources share; assistant and last_assistant
    together are written as per-turn flags."""
    values = {item.train_on for item in stage.sources()}
    if "all" in values and len(values) > 1:
        raise TunebookError(f"stage {stage.name}: its sources train on different parts ({', '.join(sorted(values))}), "
                            "which one axolotl dataset of pre-mixed conversations cannot say\n"
                            "    fix: give the sources the same data.train_on, or use backend: hf")
    return "all" if "all" in values else "last_assistant" if "last_assistant" in values else "assistant"


def mixes(stage: StageConfig) -> bool:
    """Whether the stage's data is a weighted mix (several items), which tunebook pre-mixes for axolotl."""
    return len(stage.data_items()) > 1


def source_dataset(recipe: Recipe, stage: StageConfig) -> tuple[dict, float]:
    """(axolotl dataset entry reading the stage's source itself, val_set_size)."""
    if mixes(stage):
        raise _unsupported(stage, f"its data mixes {len(stage.data_items())} items by weight (axolotl concatenates "
                                  "datasets, without weights, and cannot draw from another stage's training split)")
    cfg = stage.sources()[0]
    if cfg.source.startswith("package:"):
        raise _unsupported(stage, f"data.source is {cfg.source} (data inside a Python package)")
    local = _local_path(cfg.source, recipe.base_dir)
    fmt = cfg.format if cfg.format != "auto" else _detect_local_format(stage, cfg, local)
    if fmt not in ("sharegpt", "messages"):
        raise _unsupported(stage, f"data.format is {fmt} (axolotl's own {fmt} prompt format is not a chat template)")
    if cfg.system_prompt:
        raise _unsupported(stage, "data.system_prompt is set (axolotl has no per-dataset system prompt)")
    if cfg.train_on == "last_assistant":
        raise _unsupported(stage, "data.train_on is last_assistant")
    if cfg.val_size == 1:
        raise _unsupported(stage, "data.val_size is 1 (one sample; axolotl reads val_set_size 1 as 100%)")
    if cfg.max_samples:
        raise _unsupported(stage, f"data.max_samples is {cfg.max_samples} (axolotl has no row limit per dataset)")
    f = cfg.fields
    sharegpt = fmt == "sharegpt"
    entry: dict = {"path": str(local) if local else cfg.source}
    if local is not None and local.is_file():
        entry["ds_type"] = DS_TYPES.get(local.suffix, "json")
    if cfg.subset:
        entry["name"] = cfg.subset
    entry["split"] = cfg.split
    entry.update({
        "type": "chat_template",
        "field_messages": (f.conversations if sharegpt else f.messages) or ("conversations" if sharegpt else "messages"),
        "message_property_mappings": {"role": f.role or ("from" if sharegpt else "role"),
                                      "content": f.content or ("value" if sharegpt else "content")},
        **_train_on_keys(cfg.train_on),
    })
    return entry, float(cfg.val_size)


def files_dataset(files: Path, stage: StageConfig, per_turn_flags: bool) -> dict:
    entry = {"path": str(files), "ds_type": "json", "split": "train", "type": "chat_template",
             "field_messages": "messages", "message_property_mappings": {"role": "role", "content": "content"},
             **_train_on_keys(_train_on(stage))}
    if per_turn_flags:
        entry["message_field_training"] = TRAINING_FLAG
    return entry


def stage_output_dir(recipe: Recipe, stage: StageConfig) -> Path:
    """Where an exported config makes axolotl write a stage (its final adapter lands in this folder)."""
    return RunDir.of(recipe).stage(stage.name).work("axolotl") / "output"


def precision_keys(model_dtype: str, bf16) -> dict:
    """axolotl's bf16/fp16 keys for the model's dtype ("auto" or a torch dtype name) and train.bf16. axolotl loads
    the model in the dtype these keys imply, and `bf16: auto` without a CUDA GPU means float16 (where Gemma 3,
    for one, overflows to NaN): a tunebook run passes the dtype it resolved, so axolotl never guesses. (`bf16: true`
    on a CPU needs the trainer's use_cpu, which tunebook's plugin sets: axolotl_plugin/.)"""
    if bf16 == "auto":
        return dict(DTYPES.get(model_dtype, {"bf16": "auto"}))
    return {"bf16": bool(bf16), "fp16": False}


def axolotl_config(recipe: Recipe, stage: StageConfig, *, files: StageFiles | None = None,
                   base_model: str | None = None, lora_model_dir: str | None = None,
                   output_dir: Path | None = None, cpu: bool = False, dtype: str | None = None,
                   token_ids: list[int] | None = None) -> dict:
    """One stage of a recipe as an axolotl config (a dict ready for YAML).

    files: the stage's conversations written by tunebook (else the config reads data.source itself).
    base_model / lora_model_dir / output_dir: what a tunebook run uses; an export derives them from the recipe.
    cpu: GPU-only LoRA kernels off. dtype: the torch dtype `model.dtype: auto` resolved to (a tunebook run).
    token_ids: the ids of lora.trainable_tokens (their embedding rows are trained, at train.trainable_tokens_lr)."""
    model, lora, t = recipe.model, recipe.lora, stage.train
    i = recipe.stages.index(stage)
    if base_model is None:
        if model.base.startswith("package:") or model.base.endswith(".gguf"):
            raise TunebookError(f"model.base {model.base}: axolotl loads hub ids and model folders only\n"
                                "    fix: set model.base to a folder saved with save_pretrained, or a hub id")
        local = _local_path(model.base, recipe.base_dir)
        base_model = str(local) if local else model.base
    if lora_model_dir is None and i > 0 and stage.init == "continue":
        lora_model_dir = str(stage_output_dir(recipe, recipe.stages[i - 1]))
    output_dir = output_dir or stage_output_dir(recipe, stage)

    cfg: dict = {"base_model": base_model}
    if model.revision:
        cfg["revision_of_model"] = model.revision
    if model.trust_remote_code:
        cfg["trust_remote_code"] = True
    cfg["adapter"] = "qlora" if model.load_in_4bit else "lora"
    if model.load_in_4bit:
        cfg["load_in_4bit"] = True
    if model.load_in_8bit:
        cfg["load_in_8bit"] = True
    if lora_model_dir:
        cfg["lora_model_dir"] = lora_model_dir
    cfg.update({"lora_r": lora.r, "lora_alpha": int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha,
                "lora_dropout": lora.dropout})
    if lora.target_modules == "all-linear":
        cfg["lora_target_linear"] = True
    else:
        cfg["lora_target_modules"] = list(lora.target_modules)
    if lora.use_dora:
        cfg["peft_use_dora"] = True
    if lora.use_rslora:
        cfg["peft_use_rslora"] = True
    if lora.trainable_tokens:
        if not token_ids:
            raise TunebookError("lora.trainable_tokens: their token ids are needed for an axolotl config\n"
                                "    fix: pass token_ids (export_configs reads them from the tokenizer)")
        cfg["peft_trainable_token_indices"] = list(token_ids)
        if t.trainable_tokens_lr:  # axolotl's embedding group (no weight decay) holds the trained rows
            cfg["embedding_lr"] = t.trainable_tokens_lr

    cfg.update(template_keys(recipe))
    if files is not None:
        cfg["datasets"] = [files_dataset(files.train, stage, files.per_turn_flags)]
        if files.val is not None:
            cfg["test_datasets"] = [files_dataset(files.val, stage, files.per_turn_flags)]
        cfg["val_set_size"] = 0.0 if files.val is not None else files.val_set_size
    else:
        entry, val = source_dataset(recipe, stage)
        cfg["datasets"] = [entry]
        cfg["val_set_size"] = val
    sources = stage.sources()
    cfg["shuffle_merged_datasets"] = sources[0].shuffle
    cfg["sequence_len"] = model.max_seq_length
    # what is left over-long in the written files comes from a source that truncates
    cfg["excess_length_strategy"] = "truncate" if any(s.truncation == "truncate" for s in sources) else "drop"
    cfg["sample_packing"] = t.packing
    if t.packing:
        cfg["eval_sample_packing"] = False
        cfg["attn_implementation"] = PACKING_ATTENTION

    if t.max_steps is not None:
        cfg["max_steps"] = t.max_steps
    else:
        cfg["num_epochs"] = t.num_epochs
    cfg.update({"micro_batch_size": t.micro_batch_size, "gradient_accumulation_steps": t.gradient_accumulation_steps})
    if t.eval_batch_size:
        cfg["eval_batch_size"] = t.eval_batch_size
    cfg.update({"learning_rate": t.learning_rate, "lr_scheduler": t.lr_scheduler, "optimizer": OPTIMIZERS[t.optimizer],
                "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm})
    if t.warmup_ratio:
        cfg["warmup_ratio"] = t.warmup_ratio
    else:
        cfg["warmup_steps"] = t.warmup_steps
    if t.eval_steps:
        cfg["eval_steps"] = t.eval_steps
    save_steps = t.save_steps
    if t.keep == "best" and t.eval_steps:
        # the best evaluated adapter is the one kept: save at every evaluation, load the best at the end
        if not save_steps or save_steps % t.eval_steps:
            save_steps = t.eval_steps
        cfg.update({"load_best_model_at_end": True, "metric_for_best_model": "eval_loss", "greater_is_better": False})
    if save_steps:
        cfg["save_steps"] = save_steps
    cfg["save_total_limit"] = 2
    cfg["logging_steps"] = t.logging_steps
    if t.gradient_checkpointing:
        cfg["gradient_checkpointing"] = True

    cfg.update(precision_keys(model.dtype if model.dtype != "auto" else (dtype or "auto"), t.bf16))
    cfg["seed"] = recipe.seed
    cfg["output_dir"] = str(output_dir)
    cfg["dataset_prepared_path"] = str(Path(output_dir).parent / "prepared")
    if cpu:
        cfg.update({k: False for k in GPU_KERNELS})
    return cfg


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def config_yaml(cfg: dict, header: str = "") -> str:
    """The config as YAML (multi-line strings as readable blocks), with `header` as leading comments."""
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    return comment + yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)


# --------------------------------------------------------------------------------------------------- data

def _flagged(conv: list[dict], last_only: bool = True) -> list[dict]:
    """train_on as per-turn flags: only the last assistant turn is trained (last_assistant), or every one."""
    last = max(i for i, turn in enumerate(conv) if turn["role"] == "assistant")
    return [{**turn, TRAINING_FLAG: i == last if last_only else turn["role"] == "assistant"}
            for i, turn in enumerate(conv)]


def write_stage_files(recipe: Recipe, stage: StageConfig, folder: Path, tokenizer=None, log=print) -> StageFiles:
    """The stage's conversations as JSON Lines in `folder` (written atomically): train.jsonl and val.jsonl
    split as the hf backend splits them when a tokenizer is given, else one <stage>.jsonl for axolotl to split.
    A mixed stage (several items) is written as its training mix, which needs the tokenizer."""
    from ..data.conversations import stage_conversations

    convs = stage_conversations(recipe, stage, tokenizer)
    train, val = convs.train, convs.val
    sources = stage.sources()
    flags = _train_on(stage) == "last_assistant"
    last_only = [getattr(item, "train_on", "assistant") == "last_assistant" for item in stage.data_items()]

    def lines(convs, items):
        return "".join(json.dumps({"messages": _flagged(c, last_only[j]) if flags else c}, ensure_ascii=False) + "\n"
                       for c, j in zip(convs, items))

    folder = Path(folder).resolve()
    if tokenizer is None:
        path = folder / f"{stage.name}.jsonl"
        atomic.write_text(path, lines(train, convs.train_items))
        size = sources[0].val_size
        log(f"stage {stage.name}: {len(train):,} conversations written to {path}")
        return StageFiles(path, None, 1 / len(train) if size == 1 and train else size, flags, len(train))
    atomic.write_text(folder / "train.jsonl", lines(train, convs.train_items))
    if val:
        atomic.write_text(folder / "val.jsonl", lines(val, convs.val_items))
    log(f"stage {stage.name}: {len(train):,} training and {len(val):,} validation conversations written to {folder}")
    return StageFiles(folder / "train.jsonl", folder / "val.jsonl" if val else None, 0.0, flags, len(train) + len(val))


def export_configs(recipe: Recipe, stage_name: str | None = None, data_dir: Path | None = None,
                   log=print) -> dict[str, str]:
    """`tunebook export-config --to axolotl`: {stage name: config YAML} for one stage or all of them.

    A stage whose data axolotl can read itself points at its source; otherwise (or for every stage with
    data_dir) its conversations are written as JSON Lines (to data_dir, default the run directory) first."""
    stages = [recipe.stage(stage_name)] if stage_name else recipe.stages
    for stage in stages:
        i = recipe.stages.index(stage)
        if any(s.init == "merge" for s in recipe.stages[1:i + 1]):
            raise TunebookError(
                f"stage {stage.name} starts from a base with an earlier adapter merged in (init: merge), which an "
                "axolotl config cannot say\n    fix: train the earlier stage, merge it (`axolotl merge-lora` or "
                "`tunebook export`), set model.base to the merged folder and use init: fresh; or run the recipe with "
                "`tunebook train` and backend: axolotl, which merges for you")
    if recipe.model.base.endswith(".gguf"):
        raise TunebookError(f"model.base {recipe.model.base}: axolotl cannot load a GGUF file\n"
                            "    fix: set model.base to a folder saved with save_pretrained, or a hub id")
    base_model = None
    if recipe.model.base.startswith("package:"):
        from ..model.load import model_source

        log(f"model.base is {recipe.model.base}: using its converted model folder (converted once, then cached)")
        base_model = model_source(recipe.model, recipe.base_dir, log)
    token_ids = None
    if recipe.lora.trainable_tokens:
        from ..model.base import load_tokenizer
        from ..model.load import trainable_token_ids

        token_ids = trainable_token_ids(recipe.lora, load_tokenizer(recipe.model, base_dir=recipe.base_dir))
    out = {}
    tokenizer = None
    for stage in stages:
        files = None
        if mixes(stage) and tokenizer is None:  # weights count trained tokens: the mix needs the tokenizer
            from ..model.base import load_tokenizer

            tokenizer = load_tokenizer(recipe.model, base_dir=recipe.base_dir)
        stage_tokenizer = tokenizer if mixes(stage) else None
        if data_dir is None:
            try:
                source_dataset(recipe, stage)
            except Unexpressible as why:
                log(str(why).split("\n")[0] + ": writing its conversations as JSON Lines")
                files = write_stage_files(recipe, stage, stage_output_dir(recipe, stage).parent / "data",
                                          stage_tokenizer, log=log)
        else:
            files = write_stage_files(recipe, stage, Path(data_dir) / stage.name, stage_tokenizer, log=log)
        cfg = axolotl_config(recipe, stage, files=files, base_model=base_model, token_ids=token_ids)
        i = recipe.stages.index(stage)
        header = [f"axolotl config for stage '{stage.name}' ({i + 1} of {len(recipe.stages)}) of tunebook recipe "
                  f"'{recipe.name}'", "written by `tunebook export-config --to axolotl`; run: axolotl train FILE"]
        if mixes(stage):
            parts = ", ".join(f"{item.name} {item.weight:g}" for item in stage.data_items())
            header.append(f"pre-mixed by tunebook (axolotl has no dataset weights): {parts} of the trained tokens, "
                          f"in {files.train}")
        if cfg.get("lora_model_dir"):
            header.append(f"lora_model_dir is stage '{recipe.stages[i - 1].name}''s output_dir: train that one first")
        out[stage.name] = config_yaml(cfg, "\n".join(header))
    return out


# --------------------------------------------------------------------------------------------- validation

VALIDATE = """
import json, sys, yaml
from pydantic import ValidationError
from axolotl.utils.config import validate_config
from axolotl.utils.dict import DictDefault
for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        cfg = DictDefault(yaml.safe_load(f))
    try:
        validated = validate_config(cfg)
    except (ValidationError, ValueError) as exc:
        print("INVALID " + json.dumps([path, str(exc)]), flush=True)
        sys.exit(3)
    print("VALID " + json.dumps(dict(validated), default=str), flush=True)
"""


def validate(*config_paths: Path, timeout: int = 300) -> list[dict]:
    """Check config files with axolotl's own `validate_config` (axolotl.utils.config), run in the axolotl
    environment (one process for all). Returns the validated configs (axolotl's defaults filled in); raises
    TunebookError with axolotl's message for the first invalid one."""
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1"}
    res = subprocess.run([str(axolotl_python()), "-c", VALIDATE, *map(str, config_paths)], capture_output=True,
                         text=True, timeout=timeout, env=env)
    lines = [line for line in res.stdout.splitlines() if line.startswith(("VALID ", "INVALID "))]
    valid = [json.loads(line[len("VALID "):]) for line in lines if line.startswith("VALID ")]
    if res.returncode == 0 and len(valid) == len(config_paths):
        return valid
    if lines and lines[-1].startswith("INVALID "):
        path, message = json.loads(lines[-1][len("INVALID "):])
    else:
        path, message = config_paths[len(valid)], (res.stderr or res.stdout)[-3000:]
    raise TunebookError(f"axolotl's validate_config rejects {path}:\n{message}\n"
                        "    fix: this is a gap in tunebook's translation; please report it with the recipe")


# ------------------------------------------------------------------------------------------------ training

METRIC_LINE = re.compile(r"\{'(loss|eval_loss)':")
PLUGIN_LINE = "tunebook-axolotl:"


@dataclass
class AxolotlRun:
    """What tunebook learned from one `axolotl train` process's output."""

    code: int
    seconds: dict[str, list[float]]          # wall-clock seconds of each printed train/eval line
    non_finite: dict | None = None           # {"step", "metric", "value"}: the plugin stopped training there
    plugin_active: bool = False


def metrics_rows(log_history: list[dict], seconds: dict[str, list[float]] | None = None) -> list[dict]:
    """axolotl's trainer log_history -> metrics.jsonl rows (runner/metrics.FIELDS).

    The evaluation axolotl always runs before the first step (step 0) is left out: the hf backend has none,
    and a stage's best row must be an adapter this stage trained. `seconds` holds the wall-clock time at
    which each train/eval line was printed, in order; rows logged by an earlier (resumed) process get none."""
    seconds = seconds or {}
    when: dict[int, float] = {}
    for kind, key in (("train", "loss"), ("eval", "eval_loss")):
        entries = [e for e in log_history if key in e]
        times = seconds.get(kind, [])[-len(entries):] if entries else []
        for entry, t in zip(entries[len(entries) - len(times):], times):  # the newest rows are this process's
            when[id(entry)] = t
    rows, tokens = [], None
    for entry in log_history:
        if "tokens/trainable" in entry:
            tokens = int(entry["tokens/trainable"])
        if "loss" in entry:
            row = {"step": entry.get("step"), "epoch": entry.get("epoch"), "loss": entry["loss"],
                   "learning_rate": entry.get("learning_rate"), "grad_norm": entry.get("grad_norm")}
        elif "eval_loss" in entry and entry.get("step", 0) > 0:
            loss = entry["eval_loss"]
            row = {"step": entry["step"], "epoch": entry.get("epoch"), "eval_loss": loss,
                   "eval_ppl": math.exp(loss) if loss < 700 else math.inf}
        else:
            continue
        if tokens is not None:
            row["tokens_seen"] = tokens
        if id(entry) in when:
            row["seconds"] = round(when[id(entry)], 3)
        rows.append({k: row[k] for k in FIELDS if row.get(k) is not None})
    return rows


def read_trainer_state(output_dir: Path) -> dict:
    """trainer_state.json at the end of training (written by tunebook's plugin), else the newest checkpoint's."""
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=step_of)
    for path in [output_dir / "trainer_state.json"] + [c / "trainer_state.json" for c in reversed(checkpoints)]:
        if path.is_file():
            return json.loads(path.read_text())
    raise TunebookError(f"axolotl finished but left no trainer_state.json under {output_dir}\n"
                        "    fix: check the axolotl log beside it (axolotl.log)")


ADAPTER_SKIP = {"config.json", "debug.log", "README.md", "training_args.bin"}


def _copy_adapter(output_dir: Path, adapter_dir: Path) -> None:
    if not (output_dir / "adapter_config.json").is_file():
        raise TunebookError(f"axolotl finished but saved no adapter in {output_dir}\n"
                            "    fix: check the axolotl log beside it (axolotl.log)")
    with atomic.atomic_dir(adapter_dir) as tmp:
        for item in output_dir.iterdir():
            if item.is_file() and item.name not in ADAPTER_SKIP:
                shutil.copy2(item, tmp / item.name)


def _run_axolotl(config_path: Path, log_path: Path, stage: str, log) -> AxolotlRun:
    """`axolotl train CONFIG --launcher python` with tunebook's plugin on its path, its output kept in log_path;
    train/eval log lines are passed on to `log`."""
    path = os.pathsep.join(p for p in (str(PLUGIN_DIR), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    cmd = [str(axolotl_exe()), "train", str(config_path), "--launcher", "python"]
    run = AxolotlRun(0, {"train": [], "eval": []})
    start = [time.perf_counter()]

    def on_line(line: str) -> None:
        if "Starting trainer" in line:
            start[0] = time.perf_counter()
        found = METRIC_LINE.search(line)
        if PLUGIN_LINE in line:  # possibly after a progress bar's carriage return
            said = line[line.index(PLUGIN_LINE) + len(PLUGIN_LINE):].strip()
            run.plugin_active = True
            if said.startswith("non-finite "):
                run.non_finite = json.loads(said[len("non-finite "):])
        elif found:
            run.seconds["train" if found.group(1) == "loss" else "eval"].append(time.perf_counter() - start[0])
            log("axolotl: " + line[found.start():].strip())
        elif "[ERROR]" in line or line.startswith(("Traceback", "RuntimeError", "ValueError")):
            log("axolotl: " + line.rstrip())

    run.code = run_logged(cmd, env, log_path, on_line, stage)
    return run


class AxolotlBackend:
    name = "axolotl"

    def check(self, recipe: Recipe) -> None:
        check_single_process(self.name)
        axolotl_exe()  # the environment exists (else: run `make env-axolotl`)
        if recipe.model.base.endswith(".gguf"):
            raise TunebookError(f"model.base {recipe.model.base}: axolotl cannot load a GGUF file\n"
                                "    fix: use a model folder or hub id (a package: base is converted for it), "
                                "or backend: hf")
        import torch

        if recipe.model.dtype == "float16" and not torch.cuda.is_available():
            raise TunebookError("model.dtype float16 on a machine without a GPU: axolotl would train and evaluate in "
                                "float16 mixed precision, which the trainer runs only on a GPU (and in which Gemma 3 "
                                "overflows to NaN)\n    fix: set model.dtype: auto (bfloat16 where the CPU has it, else "
                                "float32), bfloat16 or float32")

    def run_stage(self, job: StageJob) -> StageOutcome:
        import torch

        recipe, stage, stage_dir, previous, tokenizer, log = job.recipe, job.stage, job.dir, job.previous, \
            job.tokenizer, job.log
        work = stage_dir.work(self.name)
        work.mkdir(parents=True, exist_ok=True)
        i = recipe.stages.index(stage)
        lineage = job.lineage
        base = merged_base(job.model_ref, recipe, lineage, work / "merged-base", log) if lineage else job.model_ref
        files = write_stage_files(recipe, stage, work / "data", tokenizer, log)
        dtype = str(resolve_dtype(recipe.model)).split(".")[-1]
        cfg = axolotl_config(recipe, stage, files=files, base_model=base,
                             lora_model_dir=previous.adapter if stage.init == "continue" and previous else None,
                             output_dir=(work / "output").resolve(), cpu=not torch.cuda.is_available(), dtype=dtype,
                             token_ids=trainable_token_ids(recipe.lora, tokenizer))
        cfg["auto_resume_from_checkpoints"] = True  # a rerun after an interruption resumes
        cfg["plugins"] = [PLUGIN]  # logs like the hf backend, stops at the first NaN (axolotl_plugin/)
        if not stage.train.save_steps and not cfg.get("save_steps"):
            cfg["save_steps"] = stage.train.max_steps or 10**9  # one checkpoint at the end: its trainer_state.json
        if files.rows < 10_000:
            cfg["dataset_num_proc"] = 1  # worker processes cost more than they save on small data (~5 s a dataset)
        if tokenizer.pad_token:
            cfg["special_tokens"] = {"pad_token": tokenizer.pad_token}
        config_path = work / "config.yaml"
        atomic.write_text(config_path, config_yaml(cfg, f"stage {stage.name} of recipe {recipe.name} "
                                                        f"(stage {i + 1} of {len(recipe.stages)}), run by tunebook"))
        precision = ("bf16" if cfg.get("bf16") is True else "fp16" if cfg.get("fp16") is True else "float32")
        log(f"stage {stage.name}: axolotl trains in {precision} (model.dtype {recipe.model.dtype} is {dtype} here, "
            "as on the hf backend)")
        if stage.train.packing:
            log(f"stage {stage.name}: packing: axolotl's sample packing with attn_implementation {PACKING_ATTENTION}: "
                "no attention mask, position ids restart at every sample, so packed samples never attend to each other")
        log(f"stage {stage.name}: axolotl train {config_path} --launcher python (log: {work / 'axolotl.log'})")
        output, metrics = work / "output", MetricsLog(stage_dir.metrics)
        (output / "trainer_state.json").unlink(missing_ok=True)  # the plugin writes it when this training ends
        run = _run_axolotl(config_path, work / "axolotl.log", stage.name, log)
        if run.non_finite:  # the plugin stopped training at the first NaN; keep what axolotl logged, then fail
            if (output / "trainer_state.json").is_file():
                self._write_metrics(metrics, read_trainer_state(output)["log_history"], run.seconds)
            hit = run.non_finite
            raise fail_stage(stage_dir, lineage, self.name, hit["step"], hit["metric"], float(hit["value"]), precision)
        if run.code != 0:
            raise failed("axolotl", run.code, stage.name, work / "axolotl.log")
        if not run.plugin_active:
            log(f"stage {stage.name}: warning: tunebook's axolotl plugin did not load (see {work / 'axolotl.log'}): "
                "no first-step loss row, and a NaN loss would not stop training")
        state = read_trainer_state(output)
        rows = self._write_metrics(metrics, state["log_history"], run.seconds)
        hit = first_non_finite(state["log_history"])  # the evaluation before training (step 0) included
        if hit:
            raise fail_stage(stage_dir, lineage, self.name, *hit, precision)
        _copy_adapter(work / "output", stage_dir.adapter)
        evals = [r for r in rows if "eval_loss" in r]
        best = min(evals, key=lambda r: r["eval_loss"]) if evals else None
        outcome = StageOutcome(stage.name, "done", str(stage_dir.adapter.resolve()), lineage,
                               int(state.get("global_step", 0)), best["step"] if best else None,
                               best["eval_loss"] if best else None, best["eval_ppl"] if best else None,
                               kept=stage.train.keep, seconds=float(metrics.last("seconds")), world_size=1)
        stage_dir.save_outcome(outcome)
        log(f"stage {stage.name}: axolotl done in {outcome.steps} steps"
            + (f", best eval ppl {outcome.best_eval_ppl:.3f} at step {outcome.best_step}" if best else "")
            + f"; adapter in {outcome.adapter}")
        return outcome

    @staticmethod
    def _write_metrics(metrics: MetricsLog, log_history: list[dict], seconds: dict) -> list[dict]:
        rows = metrics_rows(log_history, seconds)
        metrics.trim(-1)
        for row in rows:
            metrics.append(row)
        return rows


BACKEND = AxolotlBackend()
