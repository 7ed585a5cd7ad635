"""Load a base model for a stage and put the stage's LoRA adapter on it.

The three stage inits:
- fresh:    base + a new adapter;
- continue: base + the previous stage's adapter, trainable (the adapter keeps learning);
- merge:    base with the previous adapters merged in + a new adapter.
`lineage` (the adapters merged into the base before this stage's adapter) is saved with every stage,
so export can rebuild the exact model; runner/run_dir.py's StageOutcome.lineage_after is the rule.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..errors import TunebookError
from ..launch import local_rank, shards_parameters
from ..recipe import LoraConfig, ModelConfig
from ..recipe.profile import LaunchError, sharding_problem
from .base import resolve_base
from .fast_head import add_fast_lm_head
from .package import materialize


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16: bf16 matmuls run natively (and much faster than fp32 with AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))


def float32_note(cfg: ModelConfig) -> str:
    """Why `dtype: auto` trains in float32 here, when it does: a user who sees a long ETA learns that the CPU sets
    it, and that numbers measured on a CPU with bf16 are not reproduced exactly."""
    if cfg.dtype != "auto" or torch.cuda.is_available() or cpu_has_bf16():
        return ""
    return ("this CPU has neither AVX512-BF16 nor AMX-BF16, so training runs in float32: several times slower than "
            "on a CPU with them, and not the same model as theirs: bf16 and float32 round differently (README, Quickstart)")


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_device() -> torch.device:
    """Where this process puts a model it loads: its own GPU under a launch of several processes."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(cfg: ModelConfig) -> torch.dtype:
    """`dtype: auto` -> bf16 where the hardware runs it natively, else fp16 on GPU, fp32 on CPU."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def model_source(cfg: ModelConfig, base_dir: Path | None = None, log=print) -> str:
    """The base as something `from_pretrained` takes (a local folder, a .gguf file or a hub id), converting a
    packaged GGUF once. Fails early and clearly: a missing path, a folder that is no model, an unreachable hub."""
    ref = resolve_base(cfg, base_dir=base_dir)
    if ref.kind == "package":
        return str(materialize(ref.spec, log))
    if ref.kind == "gguf":
        return str(ref.path)
    if ref.kind == "local":
        if not (ref.path / "config.json").is_file():
            raise TunebookError(f"model.base: {ref.path} is not a model folder (no config.json)\n"
                                "    fix: point base at a folder saved with save_pretrained, a .gguf file, or a hub id")
        return str(ref.path)
    return _check_hub(ref.spec, ref.revision)


def _check_hub(repo_id: str, revision: str | None) -> str:
    """A hub id is usable if it is in the local cache or the hub answers; say which fix applies if not."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=["config.json"])
        return repo_id
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    if offline:
        raise TunebookError(f"model.base: '{repo_id}' is not in the local hub cache and HF_HUB_OFFLINE is set\n"
                            f"    fix: download it where there is network (`hf download {repo_id}`) and copy the "
                            "cache, or set model.base to a local folder or a package:<module>")
    try:
        snapshot_download(repo_id, revision=revision, allow_patterns=["config.json"], etag_timeout=10)
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise TunebookError(f"model.base: cannot fetch '{repo_id}' from the hub ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]})\n    fix: check the id and your network or token "
                            "(gated models need `hf auth login`), or use a local folder") from None
    return repo_id


def estimate_bytes(model_ref: str, cfg: ModelConfig, dtype: torch.dtype) -> tuple[int, int]:
    """(parameter count, bytes the frozen weights take) from the config alone, without loading weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_ref.endswith(".gguf"):
        size = Path(model_ref).stat().st_size
        return size, size * 4  # dequantized to fp32
    config = AutoConfig.from_pretrained(model_ref, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    n = sum(p.numel() for p in empty.parameters())
    per_param = 0.55 if cfg.load_in_4bit else 1.0 if cfg.load_in_8bit else torch.finfo(dtype).bits / 8
    return n, int(n * per_param)


def check_fits(model_ref: str, cfg: ModelConfig, dtype: torch.dtype) -> None:
    """Refuse, before loading, a model whose weights alone would not fit in the memory available."""
    import psutil

    n, need = estimate_bytes(model_ref, cfg, dtype)
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        where = "GPU memory"
    else:
        free = psutil.virtual_memory().available
        where = "RAM"
    # weights + ~30% for activations, adapter and optimizer state on a LoRA run
    if need * 1.3 > free:
        raise TunebookError(
            f"model.base: {model_ref} ({n / 1e9:.2f}B parameters) needs about {need * 1.3 / 2**30:.1f} GiB of {where} "
            f"for training, {free / 2**30:.1f} GiB is available\n"
            "    fix: set model.load_in_4bit: true, pick a smaller base, or use a machine with more memory")


def check_quantization(cfg: ModelConfig) -> None:
    """4-bit/8-bit loading needs bitsandbytes, and 8-bit weights cannot be sharded: say so before anything is
    loaded."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return
    problem = sharding_problem(cfg, shards_parameters())
    if problem:
        raise LaunchError([problem])
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        key = "load_in_4bit" if cfg.load_in_4bit else "load_in_8bit"
        raise TunebookError(f"model.{key} needs bitsandbytes, which is not installed\n"
                            f"    fix: pip install bitsandbytes, or set {key}: false") from None


def load_base(model_ref: str, cfg: ModelConfig, dtype: torch.dtype, for_training: bool = True):
    """The frozen base model, in `dtype` or quantized (4-bit nf4 / 8-bit) through bitsandbytes.

    Under a launch that shards parameters (FSDP, DeepSpeed ZeRO-3) the 4-bit weights are stored in the compute
    dtype (`bnb_4bit_quant_storage`), the dtype of every other parameter, so they can be split like them; with
    FSDP the model stays where it was loaded (accelerate places each process's shard)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if model_ref.endswith(".gguf"):
        path = Path(model_ref)
        model_ref, kwargs["gguf_file"] = str(path.parent), path.name
    if cfg.load_in_4bit or cfg.load_in_8bit:
        check_quantization(cfg)
        from transformers import BitsAndBytesConfig

        if cfg.load_in_4bit:
            compute = dtype if dtype != torch.float16 or torch.cuda.is_available() else torch.float32
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute if shards_parameters() else torch.uint8)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": load_device()}
    model = AutoModelForCausalLM.from_pretrained(model_ref, **kwargs)
    if not (cfg.load_in_4bit or cfg.load_in_8bit) and shards_parameters() != "fsdp":
        model.to(load_device())
    model.config.use_cache = False
    add_fast_lm_head(model)  # perplexity (and training) score only label-bearing positions through the LM head
    return model


def trainable_token_ids(cfg: LoraConfig, tokenizer) -> list[int]:
    """The ids of lora.trainable_tokens; each must be one token of the tokenizer's vocabulary."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in cfg.trainable_tokens if t not in vocab]
    if missing:
        raise TunebookError(f"lora.trainable_tokens: {', '.join(missing)} is not a token of the tokenizer\n"
                            "    fix: list tokens exactly as the vocabulary spells them, e.g. <end_of_turn>")
    return [vocab[t] for t in cfg.trainable_tokens]


def lora_config(cfg: LoraConfig, token_ids: list[int] | None = None):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
        use_dora=cfg.use_dora, use_rslora=cfg.use_rslora, bias="none", task_type="CAUSAL_LM",
        trainable_token_indices=token_ids or None)


def build_stage_model(base_model, init: str, lora: LoraConfig, previous_adapter: Path | None, lineage: list[Path],
                      quantized: bool, gradient_checkpointing: bool, token_ids: list[int] | None = None):
    """Put this stage's trainable adapter on the base, following `init`. `lineage`: the adapters merged into
    the base first (run_dir.StageOutcome.lineage_after says which). `token_ids`: tokens whose embedding rows a
    new adapter trains too (lora.trainable_tokens)."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        base_model = prepare_model_for_kbit_training(base_model, use_gradient_checkpointing=gradient_checkpointing)
    for adapter in lineage:
        base_model = PeftModel.from_pretrained(base_model, str(adapter)).merge_and_unload()
    if init == "continue":
        return PeftModel.from_pretrained(base_model, str(previous_adapter), is_trainable=True)
    return get_peft_model(base_model, lora_config(lora, token_ids))
