"""A saved Hugging Face model folder -> one GGUF file, in pure Python on PyPI `gguf`.

No llama.cpp build is needed, and self-trained tokenizers work (llama.cpp's converter refuses them).
llama.cpp's `convert_hf_to_gguf.py` is the reference for names and layouts: Llama q/k weights are
permuted to llama.cpp's rotary layout, Gemma norms are stored +1, Llama 3.1/3.2 rope scaling becomes a
`rope_freqs` tensor. Tensors are streamed one at a time (peak memory near one tensor, not one model),
and the file appears under its name only when it is complete.
"""
from __future__ import annotations

import logging
import math
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType

from ..console import progress
from ..errors import GGUFExportError
from ..recipe import LLAMA_CPP_QUANTS, TENSOR_TYPES, WRITER_QUANTS
from .gguf_vocab import write_vocab

log = logging.getLogger(__name__)

# every type this writer makes (export.quantization) -> (general.file_type, type of 2-D weights)
_TYPES = {
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, QT.Q8_0),
    "f16": (LlamaFileType.MOSTLY_F16, QT.F16),
    "bf16": (LlamaFileType.MOSTLY_BF16, QT.BF16),
    "f32": (LlamaFileType.ALL_F32, QT.F32),
}
QUANTS = {name: _TYPES[name] for name in WRITER_QUANTS}
# what a tensor may be kept at (export.embedding_type / export.output_type) -> its GGUF type
TENSOR_QTYPES = {name: _TYPES[name][1] for name in TENSOR_TYPES}
EMBEDDING, OUTPUT = "token_embd.weight", "output.weight"


@dataclass
class Arch:
    """What differs between architectures: the GGUF name, tensor layout changes and hyperparameters."""

    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's rotary layout for q/k rows (Llama only)
    norm_shift: float  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp by w
    write_hparams: Callable[[gguf.GGUFWriter, object], None]
    skip_lm_head: bool = False


@dataclass
class TensorPlan:
    """One output tensor: decided from names and shapes before any data is read."""

    name: str
    shape: tuple[int, ...]
    qtype: QT
    load: Callable[[], np.ndarray]  # float32, already in llama.cpp's layout
    hf_name: str | None = None  # None for tensors made here (rope_freqs)


def write_gguf(model_dir, out_path, quant: str = "q8_0", metadata: dict | None = None,
               chat_template: str | None = None, keep: dict[str, str] | None = None) -> Path:
    """Write `model_dir` (safetensors + config.json + tokenizer) as a GGUF file at `out_path`.

    `metadata` adds provenance under `general.*` (`name`, `base_model`, `recipe`, ...);
    `chat_template` overrides the tokenizer's own; `keep` ({"embedding": "f16", "output": ...}) stores
    those tensors at that type instead of `quant`'s (see `kept_types`). Returns the path written.
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    if quant not in QUANTS:
        made_by = " (llama.cpp's quantizer makes it from this writer's file: tunebook export)" \
            if quant in LLAMA_CPP_QUANTS else ""
        raise GGUFExportError(f"this writer does not make GGUF type {quant!r}{made_by}", f"use one of {', '.join(QUANTS)}")
    file_type, weight_type = QUANTS[quant]
    config = load_config(model_dir)
    arch = arch_for(config)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f"{out_path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    try:
        with ExitStack() as stack:
            plans = plan_tensors(model_dir, config, arch, weight_type, stack, keep)
            write_general(writer, model_dir, metadata or {})
            arch.write_hparams(writer, config)
            writer.add_file_type(file_type)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            write_vocab(writer, model_dir, config.vocab_size, chat_template)
            for p in plans:
                writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), tensor_nbytes(p), raw_dtype=p.qtype)
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with progress(f"writing {out_path.name}", sum(tensor_nbytes(p) for p in plans) / 2**20, "MiB") as bar:
                for p in plans:
                    writer.write_tensor_data(gguf.quants.quantize(p.load(), p.qtype))
                    bar.advance(tensor_nbytes(p) / 2**20)
            for f in writer.fout or []:
                f.flush()
                os.fsync(f.fileno())
        writer.close()
        os.replace(tmp, out_path)
        _fsync_dir(out_path.parent)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def load_config(model_dir: Path):
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        if (model_dir / "adapter_config.json").is_file():
            raise GGUFExportError(f"{model_dir} holds a LoRA adapter, not a full model",
                                  "merge the adapter into its base first (tunebook export does this)")
        raise GGUFExportError(f"{model_dir} has no config.json", "point at a folder written by save_pretrained")
    return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)


def arch_for(config) -> Arch:
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHS:
            return ARCHS[name]
    raise GGUFExportError(
        f"architecture {names or config.model_type!r} has no GGUF writer here",
        f"supported: {', '.join(ARCHS)}; for a multimodal Gemma 3, save its text model "
        "(Gemma3ForCausalLM) first",
    )


# --- tensors ----------------------------------------------------------------------------------------

def plan_tensors(model_dir: Path, config, arch: Arch, weight_type: QT, stack: ExitStack,
                 keep: dict[str, str] | None = None) -> list[TensorPlan]:
    """Every output tensor with its GGUF name, shape and type, in writing order. Reads no weights.
    `keep`: the embedding / output head at another type (`kept_types`)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("model*.safetensors"))  # model.safetensors or model-00001-of-00002...
    if not files:
        raise GGUFExportError(f"no model*.safetensors in {model_dir}",
                              "save the model with save_pretrained(..., safe_serialization=True)")
    n_layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(arch.gguf_arch, n_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plans = [TensorPlan(name, data.shape, QT.F32, lambda data=data: data)
             for name, data in extra_tensors(arch, config).items()]
    for path in files:
        handle = stack.enter_context(safe_open(path, framework="pt"))
        for hf_name in handle.keys():
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            if hf_name == "lm_head.weight" and (tied or arch.skip_lm_head):
                continue
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise GGUFExportError(
                    f"tensor {hf_name!r} in {path.name} has no GGUF name for {config.model_type}",
                    "export a plain causal-LM checkpoint (merged, not quantized, no extra heads)",
                )
            shape = tuple(handle.get_slice(hf_name).get_shape())
            qtype = tensor_type(name, shape, weight_type)
            load = _loader(handle, hf_name, config, arch)
            plans.append(TensorPlan(name, shape, qtype, load, hf_name))
    for name, qtype in kept_types([p.name for p in plans], keep).items():
        for p in plans:
            if p.name == name:
                p.qtype = tensor_type(name, p.shape, qtype)
    return plans


def tensor_type(name: str, shape: tuple[int, ...], weight_type: QT) -> QT:
    """llama.cpp's rules: 1-D tensors, norms and biases stay F32; a row Q8_0 cannot block becomes F16."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return QT.F32
    if weight_type == QT.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[QT.Q8_0][0] != 0:
        return QT.F16
    return weight_type


def kept_types(names: list[str], keep: dict[str, str] | None) -> dict[str, QT]:
    """GGUF tensor name -> type for export.embedding_type ("embedding") and export.output_type ("output").

    A model whose output head is tied to its embedding (Gemma) stores one tensor, token_embd.weight, that is
    both: either key sets it, and the two may not disagree."""
    keep = {role: t for role, t in (keep or {}).items() if t}
    for role, t in keep.items():
        if role not in ("embedding", "output") or t not in TENSOR_QTYPES:
            raise GGUFExportError(f"cannot keep the {role} tensor at {t!r}",
                                  f"use export.embedding_type / export.output_type with one of {', '.join(TENSOR_QTYPES)}")
    if OUTPUT not in names:  # tied: the embedding is the output head too
        if len(set(keep.values())) > 1:
            raise GGUFExportError(
                f"export.embedding_type is {keep['embedding']} but export.output_type is {keep['output']}, and this "
                "model's output head is its embedding (one tensor, tied)", "set one of the two, or both the same")
        chosen = keep.get("embedding") or keep.get("output")
        return {EMBEDDING: TENSOR_QTYPES[chosen]} if chosen and EMBEDDING in names else {}
    roles = {"embedding": EMBEDDING, "output": OUTPUT}
    return {roles[role]: TENSOR_QTYPES[t] for role, t in keep.items() if roles[role] in names}


def tensor_nbytes(p: TensorPlan) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[p.qtype]
    return math.prod(p.shape[:-1]) * (p.shape[-1] // block) * type_size


def _loader(handle, hf_name: str, config, arch: Arch) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        return to_gguf_layout(handle.get_tensor(hf_name).to(torch.float32), hf_name, config, arch).numpy()

    return load


def to_gguf_layout(w: torch.Tensor, hf_name: str, config, arch: Arch) -> torch.Tensor:
    """A Hugging Face tensor as llama.cpp expects it (q/k rows permuted, Gemma norms +1)."""
    if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        w = permute_qk(w, config.num_attention_heads)
    elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        w = permute_qk(w, config.num_key_value_heads)
    if arch.norm_shift and hf_name.endswith("norm.weight"):
        w = w + arch.norm_shift
    return w


def from_gguf_layout(w: torch.Tensor, hf_name: str, config, arch: Arch) -> torch.Tensor:
    """The inverse of `to_gguf_layout`, as transformers' GGUF loader computes it."""
    if arch.norm_shift and hf_name.endswith("norm.weight"):
        w = w - arch.norm_shift
    if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        w = unpermute_qk(w, config.num_attention_heads)
    elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        w = unpermute_qk(w, config.num_key_value_heads)
    return w


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotates q/k halves ([x0..x63 | x64..x127]); llama.cpp rotates pairs (x0,x1), (x2,x3), ..."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def extra_tensors(arch: Arch, config) -> dict[str, np.ndarray]:
    """Llama 3.1/3.2 rope scaling lives in a `rope_freqs` tensor of per-frequency divisors."""
    rope = rope_parameters(config)
    if arch.gguf_arch != gguf.MODEL_ARCH.LLAMA or rope.get("rope_type") != "llama3":
        return {}
    dim = _head_dim(config)
    freqs = 1.0 / (rope.get("rope_theta", 10000.0) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": np.array(factors, dtype=np.float32)}


# --- metadata ---------------------------------------------------------------------------------------

def write_general(writer: gguf.GGUFWriter, model_dir: Path, metadata: dict) -> None:
    """Provenance: name and base model, plus whatever the caller adds (recipe, stage, ...)."""
    meta = dict(metadata)
    name = str(meta.pop("name", None) or model_dir.resolve().name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_basename(str(meta.pop("basename", None) or name))
    base = meta.pop("base_model", None)
    if base:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, str(base))
    for key, value in meta.items():
        key = key if "." in key else f"general.{key}"
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_int64(key, value)
        elif isinstance(value, float):
            writer.add_float64(key, value)
        elif isinstance(value, (list, tuple)):
            writer.add_array(key, [str(v) for v in value])
        elif value is not None:
            writer.add_string(key, str(value))


def rope_parameters(config) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope = dict(rope.get("full_attention", rope))
    if "rope_theta" not in rope and getattr(config, "rope_theta", None) is not None:
        rope["rope_theta"] = config.rope_theta
    return rope


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _common_hparams(w: gguf.GGUFWriter, c) -> None:
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(_head_dim(c))
    w.add_value_length(_head_dim(c))
    w.add_vocab_size(c.vocab_size)
    rope = rope_parameters(c)
    w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope_type not in ("default", "llama3"):  # llama3 is the rope_freqs tensor
        raise GGUFExportError(f"rope scaling {rope_type!r} has no GGUF form here",
                              "use a model with default, linear, yarn or llama3 rope scaling")


def _llama_hparams(w: gguf.GGUFWriter, c) -> None:
    _common_hparams(w, c)
    w.add_rope_dimension_count(_head_dim(c))


def _gemma3_hparams(w: gguf.GGUFWriter, c) -> None:
    _common_hparams(w, c)
    # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 62-layer 27B.
    expected = c.hidden_size // c.num_attention_heads if c.num_hidden_layers == 62 else _head_dim(c)
    if c.query_pre_attn_scalar != expected:
        raise GGUFExportError(
            f"query_pre_attn_scalar={c.query_pre_attn_scalar} but llama.cpp scales Gemma 3 queries by "
            f"1/sqrt({expected}); its logits would differ from the model's",
            f"set query_pre_attn_scalar={expected} in config.json (every released Gemma 3 does)",
        )
    rope = getattr(c, "rope_parameters", None) or {}
    if "sliding_attention" in rope:
        w.add_rope_freq_base_swa(rope["sliding_attention"].get("rope_theta", 10000.0))
    layer_types = list(getattr(c, "layer_types", None) or [])
    if getattr(c, "sliding_window", None) and "sliding_attention" in layer_types:
        w.add_sliding_window(c.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
    if getattr(c, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if getattr(c, "attn_logit_softcapping", None):
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)


ARCHS = {
    "LlamaForCausalLM": Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True, norm_shift=0.0, write_hparams=_llama_hparams),
    "Gemma3ForCausalLM": Arch(gguf.MODEL_ARCH.GEMMA3, permute_qk=False, norm_shift=1.0,
                              write_hparams=_gemma3_hparams, skip_lm_head=True),
    "Qwen2ForCausalLM": Arch(gguf.MODEL_ARCH.QWEN2, permute_qk=False, norm_shift=0.0, write_hparams=_llama_hparams),
    "Qwen3ForCausalLM": Arch(gguf.MODEL_ARCH.QWEN3, permute_qk=False, norm_shift=0.0, write_hparams=_llama_hparams),
}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
