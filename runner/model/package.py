"""Base models shipped inside Python packages (`base: package:<module>`), for machines with no hub.

A package either holds a Hugging Face model folder or can `assemble()` a GGUF file. A GGUF is loaded
once by transformers (dequantized, ~30 s) and saved as a cached safetensors copy with its tokenizer,
so every later run loads it like any local model folder.
"""
from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from importlib import metadata
from importlib.resources import files
from pathlib import Path

from ..cache import cache_root
from ..errors import TunebookError

PREFIX = "package:"
READY = "tunebook-ready"  # written last: a folder without it is an interrupted conversion


def _import(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise TunebookError(f"base model package '{module_name}' is not installed ({exc})\n"
                            f"    fix: pip install the package that provides the module, or check the name after "
                            f"'{PREFIX}'") from None


def package_version(module_name: str) -> str:
    dist = module_name.replace("_", "-")
    for name in (dist, module_name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def materialize(spec: str, log=print) -> Path:
    """`package:<module>` -> a local model folder (safetensors + tokenizer), converting once and caching."""
    module_name = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    module = _import(module_name)
    inside = Path(str(files(module_name)))
    for candidate in (inside, inside / "model"):
        if (candidate / "config.json").is_file():
            return candidate
    if not hasattr(module, "assemble"):
        raise TunebookError(f"package '{module_name}' holds no model folder (config.json) and no assemble() for a GGUF\n"
                            "    fix: use a hub id or a local model folder as model.base")
    target = cache_root() / "models" / f"{module_name}-{package_version(module_name)}"
    if (target / READY).is_file():
        return target
    log(f"converting the GGUF of package '{module_name}' to a cached safetensors copy in {target} (once)")
    return _convert_gguf(module, target)


def _convert_gguf(module, target: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    gguf_path = Path(module.assemble(output_path=cache_root() / "gguf" / getattr(module, "MODEL_NAME", "model.gguf")))
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # The weights are dequantized already: save them as a plain float32 model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        (work / READY).write_text(str(gguf_path) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target
