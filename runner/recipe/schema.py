"""The recipe schema: what a recipe may say, its defaults, and the checks between fields.

`load_recipe(path, overrides)` is the only way in: it reads the file and what it `extends`, applies
`--set` overrides, fills defaults and validates. Anything wrong becomes one RecipeError that lists
every problem with its file, line, column and fix. Key names follow axolotl where the meaning is the
same (micro_batch_size, gradient_accumulation_steps, num_epochs, eval_steps, ...).

A stage's `data:` is one source (a mapping) or a list of weighted items: sources, and replay of an earlier
stage's training split. A weight is a share of the stage's TRAINED tokens (tokens that carry a label), not of
samples; runner/data/mix.py builds the mix.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, PrivateAttr, Tag, ValidationError,
                      field_validator, model_validator)

from pydantic_core import PydanticCustomError

from ..errors import Problem, RecipeError
from .source import KeyPath, Located, load_located, path_str


class Strict(BaseModel):
    """Every section forbids unknown keys: a typo is an error, never a silently ignored setting."""

    model_config = ConfigDict(extra="forbid", populate_by_name=False)


def _no_bool(value: Any) -> Any:
    """YAML's `true` is no count (pydantic would read it as 1); 1e3 still is."""
    if isinstance(value, bool):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


PositiveInt = Annotated[int, BeforeValidator(_no_bool), Field(gt=0)]


class ModelConfig(Strict):
    base: str = Field(description="hub id | local dir | file.gguf | package:<python module>")
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    chat_template: str | None = Field(None, description="None: the tokenizer's own; a named template; or a .jinja path")
    max_seq_length: PositiveInt = 2048
    trust_remote_code: bool = False
    revision: str | None = None


class LoraConfig(Strict):
    r: PositiveInt = 16
    alpha: Annotated[float, Field(gt=0)] = 16
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: Literal["all-linear"] | Annotated[list[str], Field(min_length=1)] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    # tokens whose embedding rows (and tied LM-head rows) are trained too, e.g. a base model's turn markers
    trainable_tokens: list[str] = []


class FieldMap(Strict):
    """Column names for datasets that do not use the standard ones."""

    conversations: str | None = None  # sharegpt: list of turns ("conversations")
    messages: str | None = None       # messages: list of turns ("messages")
    role: str | None = None           # turn role key ("from" / "role")
    content: str | None = None        # turn text key ("value" / "content")
    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    prompt: str | None = None
    completion: str | None = None
    system: str | None = None


class DataConfig(Strict):
    source: str = Field(min_length=1,
                        description="hub dataset id | local .jsonl/.json/.parquet/.csv file or folder | package:<module>")
    format: Literal["auto", "sharegpt", "messages", "alpaca", "prompt_completion"] = "auto"
    fields: FieldMap = FieldMap()
    subset: str | None = None
    split: str = "train"
    val_size: float = 0.05
    max_samples: PositiveInt | None = None
    shuffle: bool = True
    system_prompt: str | None = None
    train_on: Literal["assistant", "all", "last_assistant"] = "assistant"
    on_bad_record: Literal["error", "skip"] = "error"
    truncation: Literal["truncate", "drop"] = "truncate"

    @field_validator("val_size")
    @classmethod
    def _val_size(cls, v: float) -> float:
        if v == 0 or 0 < v < 1 or (v >= 1 and float(v).is_integer()):
            return v
        raise ValueError("val_size must be a fraction in (0, 1), a whole count >= 1, or 0 for no validation set")


# Names become folder and file names (<stage>@<fingerprint>, <name>-q8_0.gguf): well under 255 bytes.
MAX_NAME = 128
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
Weight = Annotated[float, Field(ge=0, le=1)]


class SourceItem(DataConfig):
    """One source in a stage's `data:` list: everything a single source says, plus its share of the mix."""

    # the share of the stage's TRAINED tokens (assistant tokens that carry a label) that come from this
    # item; None: what the other items leave (at most one item may leave its weight out)
    weight: Weight | None = None
    name: Name | None = None  # how reports and validation columns call it (default: from `source`)


class ReplayItem(Strict):
    """Replay: samples drawn (seeded) from an earlier stage's TRAINING split, never its validation split."""

    stage: str = Field(description="the name of an earlier stage")
    weight: Weight | None = None
    name: Name | None = None  # default: replay-<stage>


def _item_kind(value: Any) -> str:
    return "replay-item" if isinstance(value, dict) and "stage" in value or isinstance(value, ReplayItem) \
        else "source-item"


def _data_kind(value: Any) -> str:
    return "data-list" if isinstance(value, list) else "data-mapping"


DataItem = Annotated[Union[Annotated[SourceItem, Tag("source-item")], Annotated[ReplayItem, Tag("replay-item")]],
                     Discriminator(_item_kind)]
DataSection = Annotated[Union[Annotated[DataConfig, Tag("data-mapping")],
                            Annotated[Annotated[list[DataItem], Field(min_length=1)], Tag("data-list")]],
                      Discriminator(_data_kind)]
UNION_TAGS = {"source-item", "replay-item", "data-list", "data-mapping"}  # pydantic puts them in error paths


def source_name(spec: str) -> str:
    """A source's default name: the file or folder stem, the package module, the hub id's last part; characters a
    name cannot hold (a space, an accent) become '-', and a source with nothing to name it by is called `data`."""
    spec = spec.removeprefix("package:").rstrip("/")
    name = Path(spec).stem if Path(spec).suffix else spec.rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name).lstrip("_.-") or "data"


# optimizer as a recipe names it -> transformers' `optim` (what the hf, axolotl and unsloth trainers are given)
OPTIMIZERS = {"adamw_torch": "adamw_torch", "adamw_torch_fused": "adamw_torch_fused", "adamw_8bit": "adamw_bnb_8bit",
              "paged_adamw_8bit": "paged_adamw_8bit", "adafactor": "adafactor", "sgd": "sgd"}
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


class TrainConfig(Strict):
    max_steps: PositiveInt | None = None
    num_epochs: Annotated[float, Field(gt=0)] | None = None
    learning_rate: Annotated[float, Field(gt=0)] = 2e-4
    # for lora.trainable_tokens' rows (None: learning_rate); AdamW moves each element about this much a step
    trainable_tokens_lr: Annotated[float, Field(gt=0)] | None = None
    lr_scheduler: Literal[SCHEDULERS] = "linear"  # type: ignore[valid-type]
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.0
    micro_batch_size: PositiveInt = 1
    eval_batch_size: PositiveInt | None = None
    gradient_accumulation_steps: PositiveInt = 1
    eval_steps: PositiveInt | None = None
    save_steps: PositiveInt | None = None
    logging_steps: PositiveInt = 10
    packing: bool = False  # off: batches of similar length (length-grouped sampler) instead of packed rows
    gradient_checkpointing: bool = False
    bf16: Literal["auto"] | bool = "auto"
    optimizer: Literal[tuple(OPTIMIZERS)] = "adamw_torch"  # type: ignore[valid-type]
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    max_grad_norm: Annotated[float, Field(ge=0)] = 1.0
    keep: Literal["best", "last"] = "last"

    @model_validator(mode="after")
    def _eval_within_run(self) -> "TrainConfig":
        """An eval_steps beyond max_steps means "evaluate at the end": the last step is always evaluated, so a
        run shortened with `--set ...max_steps=6` keeps its evaluation without a second override."""
        if self.eval_steps and self.max_steps and self.eval_steps > self.max_steps:
            self.eval_steps = self.max_steps
        return self


class StageConfig(Strict):
    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    init: Literal["continue", "merge", "fresh"] | None = Field(
        None, description="None: fresh for the first stage, continue for the others")
    data: DataSection  # one source (a mapping) or a list of sources and replay items, each with a weight
    train: TrainConfig = TrainConfig()

    def data_items(self) -> list[SourceItem | ReplayItem]:
        """The stage's data as a list with every weight and name filled in: one source is one item of weight 1.
        This list (model_dump) is the stage's data section as a whole, replay items included."""
        if not isinstance(self.data, list):
            return [SourceItem(**self.data.model_dump(), weight=1.0, name=source_name(self.data.source))]
        items = [item.model_copy() for item in self.data]
        rest = 1.0 - sum(item.weight or 0.0 for item in items)
        for item in items:
            if item.weight is None:
                item.weight = max(rest, 0.0)
            if item.name is None:
                item.name = source_name(item.source) if isinstance(item, SourceItem) else f"replay-{item.stage}"
        return items

    def sources(self) -> list[SourceItem]:
        """The items that read a source (not replay), in order."""
        return [item for item in self.data_items() if isinstance(item, SourceItem)]

    def val_columns(self) -> dict[str, str]:
        """{source name: validation column} for every source with a validation set. A stage with one
        validation set names its column after the stage; with several, `<stage>/<source name>`."""
        names = [item.name for item in self.sources() if item.val_size]
        return {n: self.name if len(names) == 1 else f"{self.name}/{n}" for n in names}


# GGUF types a recipe may export: the pure-Python writer's (runner/export/gguf_writer.py), then those llama.cpp's
# own quantizer makes from the writer's full-precision file (runner/export/llama_quant.py)
WRITER_QUANTS = ("q8_0", "f16", "bf16", "f32")
LLAMA_CPP_QUANTS = ("q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_m", "q5_0", "q4_0", "iq4_xs", "iq4_nl")
QUANTS = WRITER_QUANTS + LLAMA_CPP_QUANTS
# what export.embedding_type / export.output_type may keep a tensor at
TENSOR_TYPES = ("f32", "f16", "bf16", "q8_0")


class ExportConfig(Strict):
    # one type or a list; the first is the one `tunebook chat` and `tunebook eval --quant` use by default
    quantization: str | list[str] = "q8_0"
    # the token embedding (which is also the output head when the two are tied) and the output head, kept
    # at this type instead of the quantization's own choice; None: the type's own rule
    embedding_type: Literal[TENSOR_TYPES] | None = None  # type: ignore[valid-type]
    output_type: Literal[TENSOR_TYPES] | None = None  # type: ignore[valid-type]
    verify: bool = True

    @field_validator("quantization", mode="before")
    @classmethod
    def _quantization(cls, value: Any) -> Any:
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"expected a GGUF type or a list of them (e.g. [q8_0, q4_k_m]), got {_describe(value)}")
        for name in names:
            if name not in QUANTS:
                guess = did_you_mean(name, list(QUANTS))
                raise ValueError(f"'{name}' is not a GGUF type tunebook exports: "
                                 + (f"did you mean '{guess}'? " if guess else "") + "allowed: " + ", ".join(QUANTS))
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed twice: list each type once")
        return value

    @property
    def quants(self) -> list[str]:
        """The types to export, the served one first."""
        return [self.quantization] if isinstance(self.quantization, str) else list(self.quantization)

    @property
    def keep(self) -> dict[str, str]:
        """The per-tensor precision set: {"embedding": type, "output": type}, only the roles that are set."""
        return {role: t for role, t in (("embedding", self.embedding_type), ("output", self.output_type)) if t}


class EvalConfig(Strict):
    """The evaluation set the served model is measured on after the export (eval/gate.py): questions written
    apart from every stage's data, with what a good answer must and must not say (eval/eval_set.py)."""

    data: str = Field(description="a JSON Lines evaluation set (eval/eval_set.py); never a stage's training data")
    max_tokens: PositiveInt = 256  # longest answer; an answer that reaches it did not stop
    seed: int = 0                   # the chat sampler's seed: the same answers on every run
    stages: bool = True             # also answer (greedy) with the base model and the model after each stage


class ChatConfig(Strict):
    """How the served model answers unless a user says otherwise: `tunebook chat` and `tunebook serve` start with
    these settings, and the evaluation gate's `chat` answers are drawn with them, so the gate measures what a
    user meets. A key left out keeps the chat's own default (chat/engine.py CHAT_SAMPLING)."""

    temperature: Annotated[float, Field(ge=0, le=2)] | None = None  # 0: greedy (default 0.7)
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None        # default 0.9
    top_k: Annotated[int, Field(ge=0)] | None = None                # 0: off (default 40)
    min_p: Annotated[float, Field(ge=0, lt=1)] | None = None        # default 0.05
    repeat_penalty: Annotated[float, Field(gt=0)] | None = None     # over the last 64 tokens (default 1.1)

    def overrides(self) -> dict:
        """The settings this recipe sets, for chat.engine.Sampling."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class GateTargets(Strict):
    """The bar on the evaluation set (`eval:`), for the GGUF the chat serves; each target that is set is
    checked for its greedy answers and for its answers with the chat's sampler."""

    stop_rate_greedy: Annotated[float, Field(gt=0, le=1)] | None = None  # answers ending at end-of-turn, greedy
    stop_rate_chat: Annotated[float, Field(gt=0, le=1)] | None = None    # ... with the chat's sampler
    referral: Annotated[float, Field(ge=0, le=1)] | None = None   # share sending the owner to a vet, where expected
    warning: Annotated[float, Field(ge=0, le=1)] | None = None    # share warning of the danger, where expected
    forbidden: Annotated[int, Field(ge=0)] | None = None          # answers saying a forbidden phrase, at most
    echo: Annotated[int, Field(ge=0)] | None = None               # answers repeating the system prompt, at most
    loops: Annotated[int, Field(ge=0)] | None = None              # answers that fall into a loop, at most


class TargetsConfig(Strict):
    """The bar this recipe's run must reach; report.md checks every target that is set ("Targets")."""

    first_stage_beats_base: bool = False  # the first stage lowers its own validation ppl below the base model's
    last_stage_gain: Annotated[float, Field(gt=0, lt=1)] | None = None  # last stage's own val ppl falls >= this
    forgetting: Annotated[float, Field(ge=0)] | None = None  # earlier stages' val ppl rises <= this after the last
    gguf_ppl_within: Annotated[float, Field(gt=0)] | None = None  # the GGUF's ppl within this of the merged model's
    stop_rate: Annotated[float, Field(gt=0, le=1)] | None = None  # held-out answers stopping at end-of-turn
    first_token_s: Annotated[float, Field(gt=0)] | None = None  # first streamed token, seconds (chat engine)
    wall_minutes: Annotated[float, Field(gt=0)] | None = None  # the command that trains every stage
    gate: GateTargets | None = None  # the evaluation set (`eval:`) answered by the served GGUF


# experiment trackers a run reports to (runner/share/track.py); none is contacted unless listed
TRACKERS = ("tensorboard", "mlflow", "wandb")


class Recipe(Strict):
    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    backend: Literal["hf", "unsloth", "axolotl"] = "hf"
    report_to: list[Literal[TRACKERS]] = ["tensorboard"]  # type: ignore[valid-type]
    seed: int = 42
    output_dir: str = "runs"
    allow_cpu_fallback: bool = False
    model: ModelConfig
    lora: LoraConfig = LoraConfig()
    stages: Annotated[list[StageConfig], Field(min_length=1)]
    export: ExportConfig | None = None
    eval: EvalConfig | None = None
    chat: ChatConfig | None = None
    targets: TargetsConfig | None = None

    _path: Path | None = PrivateAttr(None)  # the recipe file; data paths may be relative to it
    _located: Any = PrivateAttr(None)  # where each key was written (source.Located), for errors found later

    @property
    def path(self) -> Path | None:
        """The recipe file this was read from (None when built in code)."""
        return self._path

    def read_from(self, path: Path | str | None) -> "Recipe":
        """Say which file this recipe was read from (relative paths in it are read from its folder)."""
        self._path = Path(path) if path is not None else None
        return self

    @property
    def base_dir(self) -> Path | None:
        """The recipe's folder: local data and model paths may be relative to it."""
        return self._path.parent if self._path is not None else None

    def anchored(self) -> "Recipe":
        """A copy whose local data and model paths are absolute, so a copy of the recipe saved elsewhere (the
        run directory's recipe.yaml, read later from another working directory) still finds them."""
        copy = self.model_copy(deep=True)

        def absolute(spec: str) -> str:
            found = self.local_path(spec)
            return str(found) if found is not None else spec

        copy.model.base = absolute(copy.model.base)
        for stage in copy.stages:
            for item in stage.data if isinstance(stage.data, list) else [stage.data]:
                if isinstance(item, DataConfig):
                    item.source = absolute(item.source)
        if copy.eval is not None:
            copy.eval.data = absolute(copy.eval.data)
        copy._located = self._located
        return copy.read_from(self._path)

    def where(self, *path: str | int) -> str:
        """`file:line:column: key.path` of a key of this recipe (just the key path when it is not known), for
        problems found after validation, e.g. while the data is mixed."""
        loc = self._located.locate(tuple(path)) if self._located is not None else None
        return f"{loc}: {path_str(path)}" if loc else path_str(path)

    def local_path(self, spec: str) -> Path | None:
        """A local file a recipe names, as the recipe finds it (relative paths from its folder); None when
        there is none (a hub id, a package)."""
        if spec.startswith("package:"):
            return None
        for candidate in (Path(spec).expanduser(), self.base_dir / spec if self.base_dir else None):
            if candidate is not None and candidate.exists():
                return candidate.resolve()
        return None

    def stage(self, name: str) -> StageConfig:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise RecipeError([Problem(None, "stages", f"no stage named {name!r}",
                                   "use one of: " + ", ".join(s.name for s in self.stages))])


# Names users bring from other tools (axolotl, TRL, HF) and what they are called here.
SYNONYMS = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "lora_target_modules": "target_modules", "target": "target_modules", "dora": "use_dora", "rslora": "use_rslora",
    "lr": "learning_rate", "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
    "grad_accum": "gradient_accumulation_steps", "gradient_accumulation": "gradient_accumulation_steps",
    "epochs": "num_epochs", "num_train_epochs": "num_epochs", "steps": "max_steps", "scheduler": "lr_scheduler",
    "optim": "optimizer", "sequence_len": "max_seq_length", "max_length": "max_seq_length",
    "base_model": "base", "model_name": "base", "path": "source", "dataset": "source", "type": "format",
    "val_set_size": "val_size", "eval_size": "val_size", "template": "chat_template",
    "sample_packing": "packing", "quant": "quantization", "quantize": "quantization",
}

SECTIONS: dict[str, type[BaseModel]] = {
    "": Recipe, "model": ModelConfig, "lora": LoraConfig, "stages.*": StageConfig, "stages.*.data": DataConfig,
    "stages.*.data.fields": FieldMap, "stages.*.train": TrainConfig, "export": ExportConfig, "eval": EvalConfig,
    "targets": TargetsConfig, "targets.gate": GateTargets,
    "train": TrainConfig, "data": DataConfig, "data.fields": FieldMap,
    "stages.*.data.*": SourceItem, "stages.*.data.*.fields": FieldMap,
}


def did_you_mean(word: str, choices: list[str]) -> str | None:
    """The closest allowed name: a known synonym first, then spelling similarity."""
    if SYNONYMS.get(word) in choices:
        return SYNONYMS[word]
    lowered = {c.lower(): c for c in choices}
    match = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    if match:
        return lowered[match[0]]
    prefixed = [c for c in choices if c.startswith(word) or word.startswith(c) and len(c) > 2]
    return prefixed[0] if len(prefixed) == 1 else None


def _section_of(path: KeyPath, located: Located | None = None) -> type[BaseModel] | None:
    pattern = ".".join("*" if isinstance(p, int) else str(p) for p in path)
    if pattern == "stages.*.data.*" and located is not None and _item_kind(_value_at(located.data, path)) == "replay-item":
        return ReplayItem
    return SECTIONS.get(pattern)


def _value_at(data: Any, path: KeyPath) -> Any:
    for key in path:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _allowed_values(expected: str) -> list[str]:
    return re.findall(r"'([^']*)'", expected)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _problem_from_error(err: dict, located: Located) -> Problem:
    """One pydantic error -> a Problem with location, a plain message and a fix."""
    path: KeyPath = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in {"literal['all-linear']",
                                                                                       "list[str]", "bool",
                                                                                       "literal['auto']",
                                                                                       *UNION_TAGS}))
    path = tuple(p for p in path if not (isinstance(p, str) and p.startswith(("constrained-", "function-"))))
    origin = located.origin(path)
    loc = located.locate(path)
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    shown = path_str(origin)
    if kind == "extra_forbidden":
        key = str(path[-1])
        section = _section_of(origin[:-1], located)
        choices = list(section.model_fields) if section else []
        guess = did_you_mean(key, choices)
        fix = f"did you mean '{guess}'?" if guess else ""
        if key == "weight" and section is DataConfig:
            fix = ("a weight belongs to an item of a `data:` list (several sources, or replay); a single source "
                   "is the whole stage")
        elif key == "source" and section is ReplayItem:
            fix = "an item either reads a `source:` or replays an earlier `stage:`, not both: make two items"
        if choices:
            fix += ("  " if fix else "") + f"(allowed here: {', '.join(choices)})"
        where = path_str(origin[:-1]) or "the top level"
        return Problem(loc, shown, f"unknown key '{key}' in {where}", fix.strip())
    if kind == "missing":
        return Problem(loc, shown, f"required key '{path[-1]}' is missing",
                       f"add `{path[-1]}:` under {path_str(origin[:-1]) or 'the top level'}")
    if kind in ("literal_error", "enum"):
        allowed = _allowed_values(ctx.get("expected", ""))
        guess = did_you_mean(str(value), allowed) if isinstance(value, str) else None
        fix = (f"did you mean '{guess}'? " if guess else "") + "allowed values: " + ", ".join(allowed)
        return Problem(loc, shown, f"{_describe(value)} is not an allowed value", fix)
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return Problem(loc, shown, f"{_describe(value)} is out of range", f"use a number {bounds[kind]} {limit}")
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return Problem(loc, shown, f"expected a whole number, got {_describe(value)}", "e.g. 16")
    if kind in ("float_parsing", "float_type"):
        return Problem(loc, shown, f"expected a number, got {_describe(value)}", "e.g. 2e-4 or 0.0002")
    if kind in ("bool_parsing", "bool_type"):
        return Problem(loc, shown, f"expected true or false, got {_describe(value)}", "use true or false")
    if kind in ("string_type", "string_too_short") and path and path[-1] == "source":
        return Problem(loc, shown, f"expected a data source, got {_describe(value)}",
                       "a local file or folder, a hub dataset id, or package:<module>")
    if kind in ("string_type", "string_too_short") and path and path[-1] == "base":
        return Problem(loc, shown, f"expected a base model, got {_describe(value)}",
                       "a local model folder, a .gguf file, a hub id or package:<module>")
    if kind == "string_too_long":
        return Problem(loc, shown, f"a name of {len(value)} characters is too long (at most {MAX_NAME})",
                       "shorten it: it names folders and files of the run")
    if kind in ("string_type", "string_too_short", "string_pattern_mismatch"):
        return Problem(loc, shown, f"expected a name (letters, digits, '-', '_', '.'), got {_describe(value)}",
                       "e.g. my-run")
    if kind in ("list_type", "too_short"):
        return Problem(loc, shown, f"expected a non-empty list, got {_describe(value)}", "write it as a YAML list")
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return Problem(loc, shown, f"expected a mapping of keys, got {_describe(value)}",
                       "indent the keys below this one")
    if kind == "value_error":
        return Problem(loc, shown, str(ctx.get("error", err["msg"])), "")
    return Problem(loc, shown, f"{err['msg']} (got {_describe(value)})", "")


def _dedupe(problems: list[Problem]) -> list[Problem]:
    """Union types report one error per alternative; keep one per path, the most useful first."""
    seen: dict[str, Problem] = {}
    for problem in problems:
        seen.setdefault(problem.path, problem)
    return list(seen.values())


def _apply_stage_defaults(located: Located) -> None:
    """Top-level `train:` and `data:` are defaults for every stage; a stage's own keys win."""
    data = located.data
    stages = data.get("stages")
    for section in ("train", "data"):
        defaults = data.pop(section, None)
        if defaults is None:
            continue
        if not isinstance(defaults, dict):
            raise RecipeError([Problem(located.locate((section,)), section,
                                       f"`{section}` (defaults for every stage) must be a mapping", "")])
        if not isinstance(stages, list):
            continue
        for i, stage in enumerate(stages):
            if not isinstance(stage, dict):
                continue
            own = stage.get(section)
            own = {} if own is None else own
            if section == "data" and isinstance(own, list):  # a data list: defaults for each source item
                for j, item in enumerate(own):
                    if isinstance(item, dict) and "stage" not in item:
                        own[j] = _with_defaults(located, defaults, item, ("stages", i, section, j), section)
                continue
            if not isinstance(own, dict):
                continue
            stage[section] = _with_defaults(located, defaults, own, ("stages", i, section), section)


def _with_defaults(located: Located, defaults: dict, own: dict, at: KeyPath, section: str) -> dict:
    merged = dict(defaults)
    merged.update(own)
    for key in defaults:
        if key not in own:
            located.aliases[at + (key,)] = (section, key)
    return merged


def cross_checks(recipe: Recipe, located: Located) -> list[Problem]:
    """Rules between fields that a type cannot say."""
    problems: list[Problem] = []

    def add(path: KeyPath, message: str, fix: str) -> None:
        problems.append(Problem(located.locate(path), path_str(located.origin(path)), message, fix))

    if recipe.model.load_in_4bit and recipe.model.load_in_8bit:
        add(("model", "load_in_8bit"), "load_in_4bit and load_in_8bit are both true", "choose one of them")
    seen: dict[str, int] = {}
    for i, stage in enumerate(recipe.stages):
        t = stage.train
        if (t.max_steps is None) == (t.num_epochs is None):
            both = t.max_steps is not None
            add(("stages", i, "train", "max_steps") if both else ("stages", i, "train"),
                "both max_steps and num_epochs are set" if both else "neither max_steps nor num_epochs is set",
                "keep exactly one of max_steps and num_epochs")
        if isinstance(stage.data, list):
            problems += data_list_checks(recipe, i, located)
        if t.eval_steps and not any(item.val_size for item in stage.sources()):
            add(("stages", i, "train", "eval_steps"), "eval_steps is set but the stage has no validation set (val_size 0)",
                "set data.val_size (e.g. 0.05) or remove eval_steps")
        if t.warmup_steps and t.warmup_ratio:
            add(("stages", i, "train", "warmup_ratio"), "both warmup_steps and warmup_ratio are set", "keep one of them")
        if i == 0 and stage.init in ("continue", "merge"):
            add(("stages", 0, "init"), f"the first stage cannot `{stage.init}`: there is no previous stage",
                "use `init: fresh` or remove `init` from the first stage")
        if stage.name in seen:
            add(("stages", i, "name"), f"stage name '{stage.name}' is used twice (also stage {seen[stage.name]})",
                "give every stage its own name")
        seen.setdefault(stage.name, i)
    if recipe.eval is not None:
        evaluated = recipe.local_path(recipe.eval.data)
        if evaluated is None:
            add(("eval", "data"), f"evaluation set {recipe.eval.data} not found",
                "point eval.data at a JSON Lines file of questions (relative paths are read from the recipe's folder)")
        for i, stage in enumerate(recipe.stages):
            if evaluated is not None and any(recipe.local_path(item.source) == evaluated for item in stage.sources()):
                add(("eval", "data"), f"the evaluation set is stage {stage.name}'s training data: a model is never "
                    "judged on what it was trained on", "write the evaluation questions in a file of their own")
        if recipe.export is None:
            add(("eval",), "eval is set but the recipe has no export: the evaluation set is answered by the GGUF",
                "add `export: {quantization: q8_0}` or remove eval")
    if recipe.targets is not None and recipe.targets.gate is not None and recipe.eval is None:
        add(("targets", "gate"), "targets.gate is set but the recipe has no evaluation set", "add `eval: {data: ...}`")
    return problems


WEIGHT_SLACK = 1e-6  # weights that add up to 1 within this (0.1 + 0.2 + 0.7 in floating point)


def data_list_checks(recipe: Recipe, i: int, located: Located) -> list[Problem]:
    """A stage's `data:` list: the first item is a source, replay names an earlier stage, names are unique,
    weights are > 0 and add up to 1 (one item may leave its weight out: it gets the rest)."""
    problems: list[Problem] = []
    stage = recipe.stages[i]

    def add(path: KeyPath, message: str, fix: str) -> None:
        problems.append(Problem(located.locate(path), path_str(located.origin(path)), message, fix))

    at = ("stages", i, "data")
    items = stage.data
    if not isinstance(items[0], SourceItem):
        add(at + (0,), "the first item of a data list must read a `source:` (it sets the size of the mix: all of "
                       "its training split, once per epoch)", "put the stage's own source first, replay after it")
    earlier = [s.name for s in recipe.stages[:i]]
    for j, item in enumerate(items):
        if isinstance(item, ReplayItem) and item.stage not in earlier:
            what = "this stage itself" if item.stage == stage.name else f"no earlier stage named '{item.stage}'"
            add(at + (j, "stage"), f"replay draws from an earlier stage's training split: {what}",
                f"use one of: {', '.join(earlier)}" if earlier else "the first stage has nothing to replay: remove it")
        if item.weight == 0:
            add(at + (j, "weight"), "weight 0 trains nothing from this item",
                "remove the item (a stage without it is the 0 point of a sweep), or give it a share in (0, 1]")
    missing = [j for j, item in enumerate(items) if item.weight is None]
    given = sum(item.weight or 0.0 for item in items)
    if len(missing) > 1:
        add(at + (missing[1],), f"{len(missing)} items leave out their weight; at most one may (it gets the rest)",
            "give every item but one a `weight:` (a share of the stage's trained tokens)")
    elif missing and given >= 1 - WEIGHT_SLACK:
        add(at + (missing[0],), f"the other items' weights already add up to {given:g}: nothing is left for this one",
            "lower the other weights so that they add up to less than 1")
    elif not missing and abs(given - 1) > WEIGHT_SLACK:
        add(at, f"the weights add up to {given:g}, not 1",
            "make them add up to 1 (each is a share of the stage's trained tokens), or leave out one item's weight: "
            "it gets what the others leave")
    seen: dict[str, int] = {}
    for j, item in enumerate(stage.data_items()):
        if item.name in seen:
            add(at + (j,), f"two items of this stage are named '{item.name}' (also item {seen[item.name]})",
                "give one of them its own `name:` (reports and validation columns use it)")
        seen.setdefault(item.name, j)
    return problems


def validate(located: Located, default_name: str, path: Path | None = None) -> Recipe:
    """Merged data -> Recipe (read from `path`), or a RecipeError listing every problem."""
    _apply_stage_defaults(located)
    located.data.setdefault("name", default_name)
    try:
        recipe = Recipe.model_validate(located.data)
    except ValidationError as exc:
        problems = [_problem_from_error(e, located) for e in exc.errors(include_url=False)]
        raise RecipeError(_dedupe(problems)) from None
    recipe.read_from(path)
    problems = cross_checks(recipe, located)
    if problems:
        raise RecipeError(problems)
    for i, stage in enumerate(recipe.stages):
        if stage.init is None:
            stage.init = "fresh" if i == 0 else "continue"
    recipe._located = located
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, merge, override and validate a recipe file."""
    return load_recipe_located(path, overrides)[0]


def load_recipe_located(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Recipe, Located]:
    """load_recipe, and where each key came from (for checks made after validation, e.g. the preflight)."""
    path = Path(path)
    located = load_located(path, overrides)
    return validate(located, default_name=path.stem, path=path), located


def is_defaults_file(path: str | Path) -> bool:
    """A file with no `stages` anywhere in its `extends` chain holds defaults for recipes to extend."""
    return "stages" not in load_located(Path(path)).data


def check_defaults_file(path: str | Path) -> None:
    """A defaults file is a partial recipe: unknown keys and bad values are errors, missing keys are not."""
    located = load_located(Path(path))
    data = dict(located.data)
    errors: list[dict] = []
    for section, model in (("train", TrainConfig), ("data", DataConfig)):
        if section in data:
            try:
                model.model_validate(data.pop(section))
            except ValidationError as exc:
                errors += [{**e, "loc": (section,) + tuple(e["loc"])} for e in exc.errors(include_url=False)]
    try:
        Recipe.model_validate(data)
    except ValidationError as exc:
        errors += exc.errors(include_url=False)
    errors = [e for e in errors if e["type"] != "missing"]
    if errors:
        raise RecipeError(_dedupe([_problem_from_error(e, located) for e in errors]))
