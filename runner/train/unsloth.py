"""backend: unsloth. A stage trains in .venv-unsloth (unsloth patches transformers/peft/trl at import, and
pins versions of its own): FastLanguageModel loads the base (4-bit with `load_in_4bit`), get_peft_model puts
the LoRA adapter on it, and trl's SFTTrainer trains on the stage's samples exactly as tokenized here, so the
hf and unsloth backends see the same tokens, labels and validation set. unsloth_worker.py is what runs there.

unsloth's kernels need a CUDA GPU. Without one the recipe is refused before anything is loaded, unless it
says `allow_cpu_fallback: true`: then unsloth's own CPU path trains (stock transformers + peft, slowly)
and the log says so. Nothing here imports unsloth: the refusal works in the main environment.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from .. import atomic
from ..errors import TunebookError
from ..recipe import OPTIMIZERS, Recipe, StageConfig
from ..run_dir import StageDir, StageOutcome
from .protocol import StageJob
from .checkpoints import last_checkpoint, step_of
from .diverged import fail_stage, first_non_finite
from .external import check_single_process, env_tool, failed, merged_base, run_logged
from .metrics import FIELDS, MetricsLog, read_metrics

WORKER = Path(__file__).with_name("unsloth_worker.py")


def unsloth_python() -> Path:
    return env_tool("TUNEBOOK_UNSLOTH", ".venv-unsloth", "python", "env-unsloth")


def gpu_available() -> bool:
    """A CUDA GPU this process could use: torch says so, or nvidia-smi lists one (the main environment may
    hold a CPU-only torch while the unsloth environment has a CUDA one)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except ImportError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def refuse_without_gpu(recipe: Recipe) -> None:
    if recipe.allow_cpu_fallback or gpu_available():
        return
    raise TunebookError(
        "backend: unsloth needs a CUDA GPU (its kernels are GPU code), and this machine has none; nothing was "
        "loaded\n    fix: run this recipe on a GPU machine; here, use backend: hf (--set backend=hf) or axolotl; "
        "or set allow_cpu_fallback: true to train through unsloth's CPU path on purpose (much slower)")


def _job(recipe: Recipe, stage: StageConfig, stage_dir: StageDir, base: str, previous, tokenizer, gpu: bool) -> dict:
    work = stage_dir.work("unsloth")
    checkpoint = last_checkpoint(work / "checkpoints")
    t, lora = stage.train, recipe.lora
    return {
        "model": base, "max_seq_length": recipe.model.max_seq_length, "dtype": recipe.model.dtype,
        "load_in_4bit": recipe.model.load_in_4bit, "load_in_8bit": recipe.model.load_in_8bit,
        "trust_remote_code": recipe.model.trust_remote_code,
        "lora": {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "target_modules": lora.target_modules,
                 "use_rslora": lora.use_rslora},
        "continue_from": previous.adapter if stage.init == "continue" and previous else None,
        "seed": recipe.seed,
        "train": {**t.model_dump(mode="json"), "optim": OPTIMIZERS[t.optimizer]},
        "data": {"train": str(work / "train.jsonl"), "val": str(work / "val.jsonl")},
        "pad_id": tokenizer.pad_token_id, "chat_template": tokenizer.chat_template,
        "resume_from": str(checkpoint) if checkpoint else None,
        "out": {"adapter": str(work / "adapter"), "checkpoints": str(work / "checkpoints"),
                "metrics": str(stage_dir.metrics), "result": str(work / "result.json")},
        "metrics_fields": list(FIELDS),
        "gpu_expected": gpu,
    }


class UnslothBackend:
    name = "unsloth"

    def check(self, recipe: Recipe) -> None:
        refuse_without_gpu(recipe)  # first: it must not depend on anything else being there
        check_single_process(self.name)
        if recipe.lora.use_dora:
            raise TunebookError("lora.use_dora: unsloth trains plain LoRA only\n"
                                "    fix: set lora.use_dora: false, or backend: hf")
        packed = [s.name for s in recipe.stages if s.train.packing]
        if packed:
            raise TunebookError(f"stage(s) {', '.join(packed)} set train.packing, which backend: unsloth does not run "
                                "(its packing needs its own attention kernels)\n"
                                "    fix: set packing: false for these stages, or backend: hf")
        unsloth_python()  # the environment exists (else: run `make env-unsloth`)

    def run_stage(self, job: StageJob) -> StageOutcome:
        recipe, stage, stage_dir, previous, prepared, tokenizer, log, model_ref = job.recipe, job.stage, job.dir, \
            job.previous, job.data, job.tokenizer, job.log, job.model_ref
        if model_ref.endswith(".gguf"):
            raise TunebookError(f"model.base {recipe.model.base}: unsloth cannot load a GGUF file\n"
                                "    fix: use a model folder or hub id (a package: base is converted for it)")
        work = stage_dir.work(self.name)
        work.mkdir(parents=True, exist_ok=True)
        lineage = job.lineage
        base = merged_base(model_ref, recipe, lineage, work / "merged-base", log) if lineage else model_ref
        for name, rows in (("train", prepared.train), ("val", prepared.val)):
            atomic.write_text(work / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        gpu = gpu_available()
        spec = _job(recipe, stage, stage_dir, base, previous, tokenizer, gpu)
        MetricsLog(stage_dir.metrics).trim(step_of(Path(spec["resume_from"])) if spec["resume_from"] else -1)
        atomic.write_text(work / "job.json", json.dumps(spec, indent=2) + "\n")
        env = {**os.environ, "UNSLOTH_DISABLE_STATISTICS": "1", "PYTHONUNBUFFERED": "1"}
        if not recipe.allow_cpu_fallback:
            env["UNSLOTH_DISABLE_CPU_FALLBACK"] = "1"  # never a silent slow run, even if the GPU check was wrong
        else:
            log(f"stage {stage.name}: allow_cpu_fallback is set" + ("" if gpu else ": no GPU here, unsloth trains on "
                                                                        "the CPU (much slower)"))
        log(f"stage {stage.name}: unsloth in {unsloth_python().parent.parent} (log: {work / 'unsloth.log'})")
        def on_line(line: str) -> None:
            if line.startswith(("tunebook-unsloth:", "Unsloth", "Traceback")) or "Error" in line[:40]:
                log(line.rstrip().removeprefix("tunebook-unsloth: "))

        cmd = [str(unsloth_python()), "-P", str(WORKER), str(work / "job.json")]
        code = run_logged(cmd, env, work / "unsloth.log", on_line, stage.name)
        if code != 0:
            raise failed("unsloth", code, stage.name, work / "unsloth.log")
        result = json.loads((work / "result.json").read_text())
        hit = first_non_finite(read_metrics(stage_dir.metrics))
        if hit:
            raise fail_stage(stage_dir, lineage, self.name, *hit, result.get("device"))
        with atomic.atomic_dir(stage_dir.adapter) as tmp:
            for item in Path(spec["out"]["adapter"]).iterdir():
                shutil.copy2(item, tmp / item.name)
        metrics = MetricsLog(stage_dir.metrics)
        evals = [r for r in read_metrics(stage_dir.metrics) if r.get("eval_loss") is not None]
        best = min(evals, key=lambda r: r["eval_loss"]) if evals else None
        outcome = StageOutcome(stage.name, "done", str(stage_dir.adapter.resolve()), lineage, result["steps"],
                               best["step"] if best else None, best["eval_loss"] if best else None,
                               best.get("eval_ppl") if best else None, kept=stage.train.keep,
                               seconds=float(metrics.last("seconds")), world_size=1)
        stage_dir.save_outcome(outcome)
        log(f"stage {stage.name}: unsloth done in {outcome.steps} steps on {result['device']}"
            + (f", best eval ppl {outcome.best_eval_ppl:.3f} at step {outcome.best_step}" if best else "")
            + f"; peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB; adapter in {outcome.adapter}")
        return outcome


BACKEND = UnslothBackend()
