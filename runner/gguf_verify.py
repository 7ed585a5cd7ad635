"""Check that a GGUF file computes what the model it came from computes.

Two independent readers run the same probe tokens:
  * transformers loads the GGUF back (`gguf_file=`) and must match the Hugging Face model whose weights
    were rounded exactly as the file stores them (Q8_0/F16), so any layout, permute or norm-shift error
    shows, and quantization error does not hide it;
  * llama.cpp (llama-cpp-python, where it imports) must match the Hugging Face model as trained, within
    a per-quantization tolerance: this also checks the metadata (heads, rope, sliding window, scales),
    which transformers takes from the model's own config.json.
"""
from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

import gguf
import numpy as np
import torch

from .errors import TunebookError
from .gguf import GGUFExportError, QUANTS, _rope, arch_for, from_gguf_layout, load_config, plan_tensors
from .gguf_vocab import load_tokenizer

# backend -> quant -> (max |Δlogit| as a fraction of the largest |logit|, argmax agreement required).
# Measured on Gemma 3 270M (229 probe tokens): llama.cpp f32 0.1% / 100%, f16 0.14% / 100%, q8_0 4.7% /
# 96.9%; the Q4_K_M file it ships as gets 7.6% / 96.9% against its own exact dequantization. llama.cpp
# rounds activations (KV cache to f16, and to 8 bits against Q8_0 weights), so argmax flips only where
# two logits nearly tie; a missing rotary permute gives over 100%.
THRESHOLDS = {
    # against Hugging Face with the file's rounding: the same numbers through the same code
    "transformers": {"f32": (1e-5, 0.99), "f16": (1e-5, 0.99), "q8_0": (1e-5, 0.99)},
    # against Hugging Face as trained
    "llama.cpp": {"f32": (0.01, 0.98), "f16": (0.02, 0.98), "q8_0": (0.12, 0.90)},
}

DEFAULT_PROBE = (
    "A six-year-old Labrador came in after eating half a bar of dark chocolate (about 50 g) two hours "
    "earlier. Theobromine is toxic to dogs at roughly 20 mg/kg; signs include vomiting, restlessness, "
    "a fast heart rate and, at higher doses, seizures. The vet induced vomiting, gave activated "
    "charcoal, and kept the dog on IV fluids overnight.\n\n"
    "Q: How often should an adult cat be vaccinated?\nA: Core vaccines every 1-3 years, depending on "
    "the vaccine and local risk; ask about FeLV for cats that go outdoors.\n\n"
    "def dose_mg(weight_kg: float, mg_per_kg: float = 2.5) -> float:\n"
    "    return round(weight_kg * mg_per_kg, 1)  # e.g. dose_mg(12.4) == 31.0\n\n"
    "Temperatures: 38.3–39.2 °C is normal for dogs; above 41 °C is an emergency! Don't wait — call."
)


class GGUFVerifyError(TunebookError):
    """The GGUF does not reproduce its model within the thresholds for its quantization."""


def verify_gguf(model_dir, gguf_path, quant: str, probe_text: str | None = None,
                max_tokens: int = 256, n_threads: int | None = None) -> dict:
    """Compare logits on a probe text; return numbers per backend, raise GGUFVerifyError when off.

    Result: {"quant", "n_tokens", "config_mismatches", "transformers": {...}, "llama.cpp": {...}} where
    each backend has max_abs_diff, rel_max_diff, mean_abs_diff, argmax_agreement, thresholds and ok
    (or `skipped`: why llama.cpp could not run); llama.cpp also has tokenizer_match.
    """
    model_dir, gguf_path = Path(model_dir), Path(gguf_path)
    if quant not in QUANTS:
        raise GGUFExportError(f"unknown GGUF quantization {quant!r}", f"use one of {', '.join(QUANTS)}")
    tok = load_tokenizer(model_dir)
    text = probe_text or DEFAULT_PROBE
    ids = tok(text, add_special_tokens=True)["input_ids"][:max_tokens]
    result: dict = {"quant": quant, "n_tokens": len(ids), "config_mismatches": config_mismatches(model_dir, gguf_path)}

    hf, rounded = hf_logits(model_dir, ids, rounded_to=quant)
    result["transformers"] = _judge(compare(rounded, transformers_logits(model_dir, gguf_path, ids)),
                                    THRESHOLDS["transformers"][quant])
    skip = llama_cpp_skip_reason()
    if skip:
        result["llama.cpp"] = {"skipped": skip}
    else:
        got, cpp_ids = llama_cpp_logits(gguf_path, ids, text, n_threads or _threads())
        row = _judge(compare(hf, got), THRESHOLDS["llama.cpp"][quant])
        hf_text_ids = tok(text, add_special_tokens=False)["input_ids"]
        row["tokenizer_match"] = cpp_ids == hf_text_ids
        result["llama.cpp"] = row

    problems = _problems(result)
    if problems:
        raise GGUFVerifyError(
            f"{gguf_path} does not reproduce {model_dir} ({quant}):\n  " + "\n  ".join(problems)
            + "\n    fix: do not ship this file; re-export, and report the numbers above if it persists"
        )
    return result


def _problems(result: dict) -> list[str]:
    problems = [f"{k}: {v}" for k, v in result["config_mismatches"].items()]
    for backend in ("transformers", "llama.cpp"):
        row = result[backend]
        if not row.get("skipped") and not row["ok"]:
            limits = row["thresholds"]
            problems.append(
                f"{backend}: max |Δlogit| {row['max_abs_diff']:.4g} = {row['rel_max_diff']:.2%} of the largest "
                f"logit (allowed {limits['rel_max_diff']:.2%}), argmax agreement {row['argmax_agreement']:.1%} "
                f"(required {limits['argmax_agreement']:.0%})")
    if result["llama.cpp"].get("tokenizer_match") is False:
        problems.append("llama.cpp tokenizes the probe text differently from the model's tokenizer")
    return problems


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    return {
        "max_abs_diff": float(diff.max()),
        "rel_max_diff": float(diff.max() / max(float(np.abs(ref).max()), 1e-12)),
        "mean_abs_diff": float(diff.mean()),
        "argmax_agreement": float(np.mean(ref.argmax(-1) == got.argmax(-1))),
    }


def _judge(row: dict, thresholds: tuple[float, float]) -> dict:
    max_rel, agreement = thresholds
    row["thresholds"] = {"rel_max_diff": max_rel, "argmax_agreement": agreement}
    row["ok"] = row["rel_max_diff"] <= max_rel and row["argmax_agreement"] >= agreement
    return row


# --- the three logit sources ------------------------------------------------------------------------

def hf_logits(model_dir: Path, ids: list[int], rounded_to: str) -> tuple[np.ndarray, np.ndarray]:
    """Logits of the Hugging Face model as it is, and with its weights rounded as the GGUF stores them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    as_is = _forward(model, ids)
    round_weights(model, model_dir, rounded_to)
    return as_is, _forward(model, ids)


def round_weights(model, model_dir: Path, quant: str) -> None:
    """Put into `model` exactly the numbers a reader of the GGUF gets back (quantize, dequantize, undo layout)."""
    config = load_config(model_dir)
    arch = arch_for(config)
    params = dict(model.named_parameters())
    with ExitStack() as stack, torch.no_grad():
        for p in plan_tensors(model_dir, config, arch, QUANTS[quant][1], stack):
            if p.hf_name is None or p.hf_name not in params:
                continue
            stored = gguf.quants.dequantize(gguf.quants.quantize(p.load(), p.qtype), p.qtype).reshape(p.shape)
            back = from_gguf_layout(torch.from_numpy(np.ascontiguousarray(stored)), p.hf_name, config, arch)
            params[p.hf_name].copy_(back)


def transformers_logits(model_dir: Path, gguf_path: Path, ids: list[int]) -> np.ndarray:
    """transformers reading the GGUF's tensors. Its GGUF reader drops rope scaling, softcapping and
    Gemma 3's local rope base, so the architecture comes from config.json; `config_mismatches` checks
    the rest of the metadata."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 config=load_config(model_dir), dtype=torch.float32)
    return _forward(model, ids)


def llama_cpp_logits(gguf_path: Path, ids: list[int], text: str, n_threads: int) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits for `ids`, and its own tokenization of `text` (no special tokens)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=max(64, len(ids) + 8), n_batch=max(8, len(ids)),
                n_threads=n_threads, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
        cpp_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        llm.close()
    return logits, cpp_ids


def _forward(model, ids: list[int]) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


# --- metadata and runtime guards --------------------------------------------------------------------

def config_mismatches(model_dir: Path, gguf_path: Path) -> dict[str, str]:
    """Hyperparameters the GGUF states (read with transformers' key mapping) that differ from config.json."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.integrations.gguf import read_gguf_metadata

    config = load_config(model_dir)
    metadata, tensor_names = read_gguf_metadata(str(gguf_path))
    arch = metadata["general.architecture"]
    stated = {hf_key: metadata[f"{arch}.{key}"] for key, hf_key in GGUF_CONFIG_MAPPING.get(arch, {}).items()
              if hf_key and f"{arch}.{key}" in metadata}
    stated["tie_word_embeddings"] = "output.weight" not in tensor_names
    expected = {
        "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
        "intermediate_size": config.intermediate_size, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings, "head_dim": getattr(config, "head_dim", None),
        "sliding_window": getattr(config, "sliding_window", None), "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": _rope(config).get("rope_theta"),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }
    out = {}
    for key, want in expected.items():
        if key not in stated or want is None:
            continue
        got = stated[key]
        same = np.isclose(got, want, rtol=1e-6) if isinstance(want, float) else got == want
        if not same:
            out[key] = f"GGUF says {got}, config.json says {want}"
    return out


def llama_cpp_skip_reason() -> str | None:
    """Why llama.cpp cannot be used here, or None. A native build crashes on AMX Xeons for batches of
    more than one token (llama.cpp#20824); set-up builds it with CMAKE_ARGS="-DGGML_NATIVE=OFF"."""
    try:
        import llama_cpp
    except Exception as e:  # noqa: BLE001 - a broken build is as unusable as a missing one
        return f"llama-cpp-python does not import ({e})"
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    if "AMX_INT8 = 1" in info and _cpu_has_amx():
        return ("llama-cpp-python was built with native AMX kernels, which crash on this CPU "
                '(llama.cpp#20824); rebuild: CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --force-reinstall '
                "--no-cache-dir llama-cpp-python")
    return None


def _cpu_has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
