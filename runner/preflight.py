"""What `tunebook validate` and `tunebook plan` check beyond the schema, before any model is loaded, so a
recipe that cannot run fails in a second instead of after the model has loaded:

- local files and folders exist (model.base, every stage's data.source) and `package:` modules import;
- model.chat_template names a known template, or a .jinja file that exists and parses;
- the output folder can be written, and its disk has room for what the run writes (an estimate:
  checkpoints, adapters, the merged model, the GGUF; and a packaged base converted once into the cache);
- hub ids (model.base, data.source) exist, checked only when the hub answers; otherwise it says so.

Problems carry the recipe's file, line and column; notes say what was estimated or left unchecked.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .errors import Problem, TunebookError
from .recipe import Recipe
from .recipe.source import KeyPath, Located, path_str
from .run_dir import RunDir

HUB_HOST = "huggingface.co"
HUB_TIMEOUT_S = 3.0
# bytes per weight in the GGUF (Q8_0: 32 int8 weights and one fp16 scale per block)
GGUF_BYTES = {"q8_0": 34 / 32, "f16": 2.0, "f32": 4.0}
MERGE_FP32_MAX_PARAMS = 2_000_000_000  # runner/export/merge.py merges in float32 up to this size, bf16 above
CHECKPOINTS_KEPT = 2                   # the trainer's save_total_limit (runner/train/hf_trainer.py)
HEADROOM = 1.1                         # 10% over the estimate


@dataclass
class Preflight:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def preflight(recipe: Recipe, located: Located, hub_unreachable=None) -> Preflight:
    """Every check above; `hub_unreachable()` says why the hub cannot be asked, or None when it answers
    (default: try to reach it)."""
    result = Preflight()
    base = recipe.base_dir
    hub_ids: list[tuple[KeyPath, str, str]] = []  # (key path, id, "model" | "dataset")

    def problem(path: KeyPath, exc: TunebookError | str) -> None:
        message, _, fix = str(exc).partition("\n    fix: ")
        result.problems.append(Problem(located.locate(path), path_str(located.origin(path)), message, fix))

    model_ref = _check_base(recipe, ("model", "base"), problem, hub_ids)
    _check_template(recipe.model.chat_template, base, problem)
    for i, stage in enumerate(recipe.stages):
        from .data.sources import open_source

        listed = isinstance(stage.data, list)
        for j, item in enumerate(stage.data_items()):
            if not hasattr(item, "source"):  # a replay item reads an earlier stage's data
                continue
            path = ("stages", i, "data", j, "source") if listed else ("stages", i, "data", "source")
            try:
                source = open_source(item.source, base, subset=item.subset, split=item.split)
            except TunebookError as exc:
                problem(path, exc)
                continue
            if source.kind == "hub":
                hub_ids.append((path, item.source, "dataset"))
    _check_eval_set(recipe, problem)
    _check_hub(hub_ids, problem, result.notes, hub_unreachable or unreachable)
    _check_output(recipe, model_ref, problem, result.notes)
    return result


def _check_eval_set(recipe: Recipe, problem) -> None:
    """Every line of the evaluation set read now: a bad one fails here, not after the training and the export."""
    from eval.eval_set import EvalSetError, read_eval_set

    path = recipe.local_path(recipe.eval.data) if recipe.eval is not None else None
    if path is None:  # no eval:, or a missing file (the schema's error)
        return
    try:
        read_eval_set(path)
    except EvalSetError as exc:
        problem(("eval", "data"), str(exc))


# ------------------------------------------------------------------------------------------- model, template

def _check_base(recipe: Recipe, path: KeyPath, problem, hub_ids: list) -> Path | None:
    """The base's local file or folder (None for a hub id or a failed check)."""
    from .model.base import resolve_base

    try:
        ref = resolve_base(recipe.model, base_dir=recipe.base_dir)
    except TunebookError as exc:
        problem(path, exc)
        return None
    if ref.kind == "hub":
        hub_ids.append((path, ref.spec, "model"))
        return None
    if ref.kind == "local" and not (ref.path / "config.json").is_file():
        problem(path, f"{ref.path} is not a model folder (no config.json)\n    fix: point base at a folder saved "
                      "with save_pretrained, a .gguf file, or a hub id")
        return None
    if ref.kind == "package":
        ready = ref.converted if ref.converted is not None and (ref.converted / "config.json").is_file() else None
        return ready or (ref.path if ref.path is not None and ref.path.is_file() else None)
    return ref.path


def _check_template(name: str | None, base_dir: Path | None, problem) -> None:
    import difflib

    from chat.templates import strip_generation_markers, template_names

    if name is None or name in template_names():
        return
    path = ("model", "chat_template")
    candidates = [Path(name).expanduser()] + ([base_dir / name] if base_dir and not Path(name).is_absolute() else [])
    found = next((p for p in candidates if p.is_file()), None)
    names = ", ".join(template_names())
    if found is None:
        guess = difflib.get_close_matches(name, template_names(), n=1)
        if name.endswith(".jinja") or "/" in name:
            problem(path, f"chat template file not found: {name}\n    fix: check the path (relative to the current "
                          f"directory or the recipe's folder), or use a named template: {names}")
        else:
            problem(path, f"unknown chat template '{name}'\n    fix: {f'did you mean {guess[0]!r}? ' if guess else ''}"
                          f"use one of {names}, a .jinja file, or remove it to use the tokenizer's own")
        return
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        text = found.read_text(encoding="utf-8")
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(strip_generation_markers(text))
    except jinja2.TemplateSyntaxError as exc:
        problem(path, f"{found}:{exc.lineno}: the chat template does not parse ({exc.message})\n"
                      "    fix: correct the Jinja syntax at that line")
    except (OSError, UnicodeDecodeError) as exc:
        problem(path, f"cannot read the chat template {found} ({exc})\n    fix: save it as UTF-8 text")


# ------------------------------------------------------------------------------------------------------ hub

def unreachable() -> str | None:
    """Why the hub cannot be asked (HF_HUB_OFFLINE, or no answer within HUB_TIMEOUT_S); None when it answers."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
        return "HF_HUB_OFFLINE is set"

    def connect() -> bool:
        try:
            socket.create_connection((HUB_HOST, 443), timeout=HUB_TIMEOUT_S).close()
            return True
        except OSError:
            return False

    pool = ThreadPoolExecutor(max_workers=1)  # name resolution has no timeout of its own
    try:
        answered = pool.submit(connect).result(timeout=HUB_TIMEOUT_S + 1)
    except TimeoutError:
        answered = False
    finally:
        pool.shutdown(wait=False)
    return None if answered else f"no answer from {HUB_HOST} within {HUB_TIMEOUT_S:.0f} s"


def _check_hub(ids: list, problem, notes: list[str], hub_unreachable) -> None:
    if not ids:
        return
    why = hub_unreachable()
    if why:
        listed = ", ".join(f"{path_str(p)} '{name}'" for p, name, _ in ids)
        notes.append(f"hub ids not checked ({why}): {listed}")
        return
    from huggingface_hub import HfApi

    api = HfApi()
    for path, name, kind in ids:
        try:
            exists = api.repo_exists(name, repo_type=kind)
        except Exception as exc:  # the hub answered oddly: say so, do not fail the recipe on it
            notes.append(f"hub check of {path_str(path)} '{name}' failed: {type(exc).__name__}")
            continue
        if not exists:
            problem(path, f"no {kind} '{name}' on the hub (or it is private)\n    fix: check the id; a gated or private "
                          "repository needs `hf auth login`")


# --------------------------------------------------------------------------------------------- output, disk

def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_output(recipe: Recipe, model_ref: Path | None, problem, notes: list[str]) -> None:
    out = RunDir.of(recipe).path
    too_long = next((part for part in out.parts if len(os.fsencode(part)) > 255), None)
    if too_long is not None:
        problem(("output_dir",), f"cannot write {out}: a folder name of {len(os.fsencode(too_long))} bytes is longer "
                                 "than file systems allow (255)\n    fix: set output_dir to a shorter path")
        return
    parent = _existing_parent(out)
    if not parent.is_dir():
        problem(("output_dir",), f"cannot write {out}: {parent} is a file\n    fix: set output_dir to a folder")
        return
    if not os.access(parent, os.W_OK | os.X_OK):
        problem(("output_dir",), f"cannot write to {parent} (permission denied)\n    fix: set output_dir to a "
                                 "folder you can write to (--set output_dir=...)")
        return
    shape = _model_shape(model_ref) if model_ref is not None else None
    if shape is None:
        notes.append("disk: not estimated (the base model's size is not known before it is downloaded or converted)")
        return
    need = [(parent, _run_bytes(recipe, shape), str(out))]
    if recipe.model.base.startswith("package:") and model_ref.suffix == ".gguf":  # converted once, into the cache
        from .cache import cache_root

        need.append((_existing_parent(cache_root()), shape["params"] * 4, "the converted base in the cache"))
    for device in {os.stat(where).st_dev for where, _, _ in need}:
        here = [(where, nbytes, what) for where, nbytes, what in need if os.stat(where).st_dev == device]
        total, free = sum(n for _, n, _ in here), shutil.disk_usage(here[0][0]).free
        line = f"disk: ~{_size(total)} to write ({', '.join(what for _, _, what in here)}), {_size(free)} free"
        if total * HEADROOM > free:
            problem(("output_dir",), f"{line}: not enough room\n    fix: free space, or set output_dir to another disk")
        else:
            notes.append(line)


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _run_bytes(recipe: Recipe, shape: dict) -> int:
    """What a run writes: per stage its checkpoints (adapter + Adam's two moments) and adapters, then the
    merged model and the GGUF when the recipe exports."""
    adapter = _adapter_params(recipe, shape) * 4
    total = 0
    for stage in recipe.stages:
        checkpoints = CHECKPOINTS_KEPT if stage.train.save_steps else 1
        total += checkpoints * 3 * adapter + adapter * (2 if stage.train.keep == "best" else 1)
    if recipe.export is not None:
        n = shape["params"]
        total += n * (4 if n <= MERGE_FP32_MAX_PARAMS else 2) + n * GGUF_BYTES[recipe.export.quantization]
    return int(total)


LORA_SHAPES = {  # module -> (in, out) in terms of the model's sizes
    "q_proj": ("hidden", "q"), "k_proj": ("hidden", "kv"), "v_proj": ("hidden", "kv"), "o_proj": ("q", "hidden"),
    "gate_proj": ("hidden", "ffn"), "up_proj": ("hidden", "ffn"), "down_proj": ("ffn", "hidden"),
}


def _adapter_params(recipe: Recipe, shape: dict) -> int:
    targets = LORA_SHAPES if recipe.lora.target_modules == "all-linear" else \
        {m: LORA_SHAPES[m] for m in recipe.lora.target_modules if m in LORA_SHAPES}
    per_layer = sum(shape[a] + shape[b] for a, b in targets.values()) * recipe.lora.r
    return per_layer * shape["layers"] + len(recipe.lora.trainable_tokens) * shape["hidden"]


def _model_shape(ref: Path) -> dict | None:
    """Parameter count and layer sizes from a model folder (config.json, safetensors headers) or a GGUF
    (its metadata), without loading a weight; None when they cannot be read."""
    try:
        return _gguf_shape(ref) if ref.suffix == ".gguf" else _folder_shape(ref)
    except (OSError, ValueError, KeyError, struct.error, TypeError):
        return None


def _folder_shape(folder: Path) -> dict | None:
    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config", config)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    params = 0
    for f in files:
        with f.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        params += sum(_numel(t["shape"]) for name, t in header.items() if name != "__metadata__")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return {"params": params, "layers": config["num_hidden_layers"], "hidden": config["hidden_size"],
            "ffn": config["intermediate_size"], "q": heads * head_dim,
            "kv": config.get("num_key_value_heads", heads) * head_dim}


# GGUF value types -> struct format (8: string, 9: array)
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _gguf_shape(path: Path) -> dict | None:
    """The header of a GGUF file read directly (gguf.GGUFReader builds a view per vocabulary string:
    ~25 s for Gemma 3's 262k tokens; this skips them in well under a second)."""
    with path.open("rb") as f:
        def read(fmt: str):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(read("<Q")).decode("utf-8", "replace")

        def value(kind: int):
            if kind in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[kind])
            if kind == 8:
                return string()
            if kind == 9:
                item, count = read("<I"), read("<Q")
                if item in _GGUF_SCALARS:  # skipped, not read: only scalars are needed here
                    f.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
                else:
                    for _ in range(count):
                        value(item)
                return None
            raise ValueError(f"unknown GGUF value type {kind}")

        if f.read(4) != b"GGUF":
            return None
        read("<I")
        n_tensors, n_kv = read("<Q"), read("<Q")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(read("<I"))
        params = 0
        for _ in range(n_tensors):
            string()
            dims = [read("<Q") for _ in range(read("<I"))]
            read("<I"), read("<Q")
            params += _numel(dims)
    arch = meta["general.architecture"]
    hidden, heads = meta[f"{arch}.embedding_length"], meta[f"{arch}.attention.head_count"]
    head_dim = meta.get(f"{arch}.attention.key_length") or hidden // heads
    return {"params": params, "layers": meta[f"{arch}.block_count"], "hidden": hidden,
            "ffn": meta[f"{arch}.feed_forward_length"], "q": heads * head_dim,
            "kv": (meta.get(f"{arch}.attention.head_count_kv") or heads) * head_dim}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
