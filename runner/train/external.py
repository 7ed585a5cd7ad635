"""What the trainers that run in their own environment share (axolotl, unsloth): finding their executable,
running their process with its log kept, turning a failure into a clear error, and the merged base they
start from when an earlier stage merged its adapter."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Callable

from .. import atomic
from ..errors import Interrupted, TunebookError
from ..model.base import load_tokenizer
from ..model.load import load_base, resolve_dtype
from ..recipe import Recipe

REPO = Path(__file__).resolve().parents[2]


def check_single_process(name: str) -> None:
    """axolotl and unsloth start their own training process: under `accelerate launch` every rank would."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TunebookError(f"backend: {name} runs its own training process and cannot run under a multi-process "
                            "launch\n    fix: run `tunebook train` directly (no accelerate launch/torchrun), or "
                            "use backend: hf for several ranks")


def run_logged(cmd: list[str], env: dict, log_path: Path, on_line: Callable[[str], None], stage: str) -> int:
    """Run a backend's process, keeping its whole output in log_path and handing each line to on_line.
    Ctrl-C reaches the child too (same process group): wait for it to stop on its own (it may be saving),
    then report the interruption; a rerun of the same command resumes from the last checkpoint."""
    with open(log_path, "w", encoding="utf-8") as keep, \
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1,
                             errors="replace") as proc:
        try:
            for line in proc.stdout:  # text mode: carriage returns (progress bars) arrive as line ends
                keep.write(line)
                on_line(line)
        except KeyboardInterrupt:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise Interrupted(f"interrupted in stage {stage}; checkpoints are kept\n"
                              "    to resume: run the same command again") from None
    return proc.returncode


def failed(what: str, code: int, stage: str, log_path: Path) -> TunebookError:
    """The error for a backend process that stopped with a non-zero status: the end of its log, and where it is."""
    tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-25:])
    error = Interrupted if code in (130, -2) else TunebookError
    return error(f"{what} stopped with exit status {code} in stage {stage}; the end of its log ({log_path}):\n"
                 f"{tail}\n    fix: see the log; rerunning the same command resumes from the last checkpoint")


def env_tool(env_var: str, venv: str, tool: str, make_target: str) -> Path:
    """An executable in a backend's own environment: $env_var if set, else <repo>/<venv>/bin/<tool>
    (or ./<venv>/bin/<tool>). A clear error naming the set-up command when there is none."""
    override = os.environ.get(env_var)
    if override:
        path = Path(override).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise TunebookError(f"{env_var}={override} is not an executable file\n"
                                f"    fix: point {env_var} at {venv}/bin/{tool} of an environment made by "
                                f"`make {make_target}`, or unset it")
        return path
    for root in (REPO, Path.cwd()):
        path = root / venv / "bin" / tool
        if path.is_file():
            return path
    raise TunebookError(f"this backend runs in its own environment, and there is none at {REPO / venv}\n"
                        f"    fix: run `make {make_target}` in {REPO} (or set {env_var} to the {tool} executable "
                        "of an environment you made)")


def merged_base(model_ref: str, recipe: Recipe, lineage: list[str], folder: Path, log=print) -> str:
    """The base with the adapters of earlier `init: merge` stages merged in, saved once as a model folder
    (axolotl and unsloth, unlike the hf backend, load their base from a folder: the merge happens here)."""
    import torch
    from peft import PeftModel

    marker = folder / "merged-from.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"base": model_ref, "lineage": lineage}:
        return str(folder)
    log(f"merging {len(lineage)} adapter(s) into the base for the next stage ({folder})")
    cfg = recipe.model.model_copy(update={"load_in_4bit": False, "load_in_8bit": False})
    dtype = resolve_dtype(cfg) if cfg.dtype != "auto" else torch.float32
    model = load_base(model_ref, cfg, dtype, for_training=False)
    for adapter in lineage:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tokenizer = load_tokenizer(recipe.model, base_dir=recipe.base_dir)
    with atomic.atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "merged-from.json").write_text(json.dumps({"base": model_ref, "lineage": lineage}))
    return str(folder)
