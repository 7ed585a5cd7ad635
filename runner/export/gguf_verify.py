"""Check that a GGUF file computes what the model it came from computes.

The default check (level "standard"), one model in memory at a time:
  * tensors: every tensor the file holds, read back from the file one at a time (never the whole file
    or model in memory), with llama.cpp's rotary permute undone, must equal byte for byte the model's
    weight stored the way the file stores it (Q8_0/F16 quantization of the Hugging Face tensor; Gemma
    norms as weight + 1); names, shapes and types must be the ones planned, and nothing may be missing
    or extra. So a layout, permute, norm-shift, swapped or truncated tensor shows exactly, and
    quantization error does not hide it;
  * llama.cpp (llama-cpp-python, where it imports) must match the Hugging Face model as trained, within
    a per-quantization tolerance: an independent reader that also checks the metadata (heads, rope,
    sliding window, scales) and the tokenizer.
Level "full" adds a second independent reader: transformers loads the GGUF back (`gguf_file=`) and must
match the Hugging Face model with its weights rounded as the file stores them. It costs ~4x the fp32 model
in memory and most of the export's time (bench/results/export.md), so it is opt-in.
"""
from __future__ import annotations

import gc
import json
import math
import os
from contextlib import ExitStack
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from ..console import Bar, progress
from ..errors import GGUFExportError, TunebookError
from .gguf_writer import (QUANTS, arch_for, from_gguf_layout, kept_types, load_config, plan_tensors, rope_parameters,
                          tensor_nbytes, tensor_type)
from .gguf_table import read_table
from .gguf_vocab import load_tokenizer
from .llama_quant import FTYPES, ggml_quantize_rows

ALL_QUANTS = (*QUANTS, *FTYPES)

# backend -> quant -> (max |Δlogit| as a fraction of the largest |logit|, argmax agreement required).
# Measured on Gemma 3 270M (229 probe tokens): llama.cpp f32 0.1% / 100%, f16 0.14% / 100%, q8_0 4.7% /
# 96.9%; the Q4_K_M file it ships as gets 7.6% / 96.9% against its own exact dequantization. llama.cpp
# rounds activations (KV cache to f16, and to 8 bits against Q8_0 weights), so argmax flips only where
# two logits nearly tie; a missing rotary permute gives over 100%. llama.cpp's types, on Gemma 3 270M's base
# weights (250 probe tokens, no importance matrix): q6_k 7.7% / 95.2%, q5_k_m 21.8% / 92.1%, q4_k_m 9.1% /
# 96.9% (those weights come from a Q4_K_M file: requantizing them is nearly exact), iq4_xs 34% / 75.5%; on
# the tiny 256-wide test Llama up to 47% / 99.6% at 4 bits. Their tensors are checked byte for byte; the
# logit bounds catch a file llama.cpp reads differently (metadata, tokenizer), not a subtle weight error.
THRESHOLDS = {
    # against Hugging Face with the file's rounding: the same numbers through the same code
    "transformers": {quant: (1e-5, 0.99) for quant in ALL_QUANTS},
    # against Hugging Face as trained
    "llama.cpp": {"f32": (0.01, 0.98), "f16": (0.02, 0.98), "bf16": (0.03, 0.98), "q8_0": (0.12, 0.90),
                  "q6_k": (0.2, 0.85), "q5_k_m": (0.35, 0.8), "q5_k_s": (0.35, 0.8), "q5_0": (0.35, 0.8),
                  "q4_k_m": (0.6, 0.7), "q4_k_s": (0.6, 0.7), "q4_0": (0.6, 0.7), "iq4_xs": (0.6, 0.7),
                  "iq4_nl": (0.6, 0.7), "q3_k_m": (1.0, 0.6)},
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


LEVELS = ("standard", "full")


class GGUFVerifyError(TunebookError):
    """The GGUF does not reproduce its model within the thresholds for its quantization."""


def verify_gguf(model_dir, gguf_path, quant: str, probe_text: str | None = None,
                max_tokens: int = 256, n_threads: int | None = None, level: str = "standard",
                keep: dict[str, str] | None = None) -> dict:
    """Check the file's tensors and compare logits on a probe text; return what was found, raise
    GGUFVerifyError when off. `keep`: the embedding / output types the export asked for (gguf_writer.py).

    Result: {"quant", "level", "n_tokens", "config_mismatches", "tensors": {...}, "llama.cpp": {...}} and,
    at level "full", "transformers": {...}. `tensors` has n_tensors, n_bytes, mismatches (tensor -> what
    differs) and ok; each logit backend has max_abs_diff, rel_max_diff, mean_abs_diff, argmax_agreement,
    thresholds and ok (or `skipped`: why llama.cpp could not run); llama.cpp also has tokenizer_match.
    """
    model_dir, gguf_path = Path(model_dir), Path(gguf_path)
    if quant not in ALL_QUANTS:
        raise GGUFExportError(f"unknown GGUF quantization {quant!r}", f"use one of {', '.join(ALL_QUANTS)}")
    if level not in LEVELS:
        raise GGUFExportError(f"unknown verification level {level!r}", f"use one of {', '.join(LEVELS)}")
    tok = load_tokenizer(model_dir)
    text = probe_text or DEFAULT_PROBE
    ids = tok(text, add_special_tokens=True)["input_ids"][:max_tokens]
    hf_text_ids = tok(text, add_special_tokens=False)["input_ids"]
    del tok  # Gemma 3's 262k-token tokenizer holds ~300 MB: not kept while the models load
    # one bar: every tensor, then each logit source (the merged model, llama.cpp; transformers at level full)
    with progress(f"verifying {gguf_path.name}", None, "checks") as bar:
        # the tensors first: a damaged file is refused clearly
        tensors = check_tensors(model_dir, gguf_path, quant, keep, bar=bar, then=3 if level == "full" else 2)
        result: dict = {"quant": quant, "level": level, "n_tokens": len(ids),
                        "config_mismatches": config_mismatches(model_dir, gguf_path), "tensors": tensors}

        bar.update(status="logits of the merged model")
        if level == "full":
            hf, rounded = hf_logits(model_dir, ids, rounded_to=quant, types=tensors["types"])
            bar.advance(status="logits of transformers reading the GGUF")
            try:
                got = transformers_logits(model_dir, gguf_path, ids)
                result["transformers"] = _judge(compare(rounded, got), THRESHOLDS["transformers"][quant])
            except ValueError as exc:  # a type transformers cannot read (Q5_0 in llama.cpp's K-quant mixtures)
                if "not supported" not in str(exc):
                    raise
                result["transformers"] = {"skipped": f"transformers cannot read this file: {exc}"}
            del rounded
        else:
            hf = hf_logits(model_dir, ids)
        bar.advance(status="logits of llama.cpp")
        gc.collect()  # the torch model is gone before llama.cpp loads the file
        skip = llama_cpp_skip_reason()
        if skip:
            result["llama.cpp"] = {"skipped": skip}
        else:
            got, cpp_ids = llama_cpp_logits(gguf_path, ids, text, n_threads or _threads())
            row = _judge(compare(hf, got), THRESHOLDS["llama.cpp"][quant])
            row["tokenizer_match"] = cpp_ids == hf_text_ids
            result["llama.cpp"] = row
        bar.advance(status="")

    problems = _problems(result)
    if problems:
        raise GGUFVerifyError(
            f"{gguf_path} does not reproduce {model_dir} ({quant}):\n  " + "\n  ".join(problems)
            + "\n    fix: do not ship this file; re-export, and report the numbers above if it persists"
        )
    return result


def _problems(result: dict) -> list[str]:
    problems = [f"{k}: {v}" for k, v in result["config_mismatches"].items()]
    problems += [f"tensor {name}: {what}" for name, what in result["tensors"]["mismatches"].items()]
    for backend in ("transformers", "llama.cpp"):
        row = result.get(backend)
        if row is not None and not row.get("skipped") and not row["ok"]:
            limits = row["thresholds"]
            problems.append(
                f"{backend}: max |Δlogit| {row['max_abs_diff']:.4g} = {row['rel_max_diff']:.2%} of the largest "
                f"logit (allowed {limits['rel_max_diff']:.2%}), argmax agreement {row['argmax_agreement']:.1%} "
                f"(required {limits['argmax_agreement']:.0%})")
    if result["llama.cpp"].get("tokenizer_match") is False:
        problems.append("llama.cpp tokenizes the probe text differently from the model's tokenizer")
    return problems


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    """Max, relative max and mean |difference| (in float64) and argmax agreement of two logit matrices;
    a few rows at a time, so no float64 copy of the whole matrix is made."""
    max_diff, total, largest = 0.0, 0.0, 0.0
    for start in range(0, ref.shape[0], 16):
        r, g = ref[start:start + 16].astype(np.float64), got[start:start + 16].astype(np.float64)
        diff = np.abs(r - g)
        max_diff, total = max(max_diff, float(diff.max())), total + float(diff.sum())
        largest = max(largest, float(np.abs(r).max()))
    return {
        "max_abs_diff": max_diff,
        "rel_max_diff": float(max_diff / max(largest, 1e-12)),
        "mean_abs_diff": total / ref.size,
        "argmax_agreement": float(np.mean(ref.argmax(-1) == got.argmax(-1))),
    }


def _judge(row: dict, thresholds: tuple[float, float]) -> dict:
    max_rel, agreement = thresholds
    row["thresholds"] = {"rel_max_diff": max_rel, "argmax_agreement": agreement}
    row["ok"] = row["rel_max_diff"] <= max_rel and row["argmax_agreement"] >= agreement
    return row


# --- the file's tensors -----------------------------------------------------------------------------

CHUNK_ELEMENTS = 1 << 22  # rows of at most ~4M weights (16 MiB in fp32) are compared at a time


def check_tensors(model_dir: Path, gguf_path: Path, quant: str, keep: dict[str, str] | None = None,
                  bar: Bar | None = None, then: int = 0) -> dict:
    """Every tensor in the GGUF against the model's weight stored the way the file stores it, exactly.

    The file's bytes are read one row chunk at a time (plain reads: neither file stays mapped), llama.cpp's
    rotary permute is undone with `from_gguf_layout` (transformers' inverse), and the bytes must equal the
    Hugging Face weight quantized as the plan says (every type rounds each row on its own, so rounding in
    the Hugging Face row order gives the same bytes); Gemma norms must read weight + 1. Tensors made here
    (rope_freqs) must equal what the plan computes. `bar` advances per tensor (its total: the tensors and
    `then` steps after them).

    The writer's types are planned here in full. For a llama.cpp type, llama.cpp chose each weight's type:
    the plan takes it from the file (except the kept embedding / output, and 1-D tensors, which stay F32)
    and the bytes must equal llama.cpp's own quantizer applied to the model's weight.
    """
    config = load_config(model_dir)
    arch = arch_for(config)
    stored = {t.name: (t.qtype, t.shape, t.offset, t.nbytes) for t in read_table(gguf_path)[1]}
    mismatches: dict[str, str] = {}
    n_bytes = 0
    weights = _SafetensorsRows(model_dir)
    with ExitStack() as stack, open(gguf_path, "rb") as f:
        plans, quantize = expected_plans(model_dir, config, arch, quant, keep, stack,
                                         {name: s[0] for name, s in stored.items()})
        if bar is not None:
            bar.update(total=len(plans) + then, status="tensors against the merged weights")
        for name in sorted(set(stored) - {p.name for p in plans}):
            mismatches[name] = "in the file, but the model has no such tensor"
        for p in plans:
            if p.name not in stored:
                mismatches[p.name] = "missing from the file"
                continue
            qtype, shape, offset, size = stored[p.name]
            if (qtype, shape, size) != (p.qtype, tuple(p.shape), tensor_nbytes(p)):
                mismatches[p.name] = (f"stored as {qtype.name} {list(shape)} ({size} bytes), planned "
                                      f"{p.qtype.name} {list(p.shape)} ({tensor_nbytes(p)} bytes)")
                continue
            n_bytes += size
            what = _check_tensor(f, offset, p, config, arch, weights, quantize)
            if what:
                mismatches[p.name] = what
            if bar is not None:
                bar.advance()
    types = {name: s[0].name for name, s in stored.items()}
    return {"n_tensors": len(stored), "n_bytes": n_bytes, "mismatches": mismatches, "ok": not mismatches,
            "types": types, "type_counts": {t: list(types.values()).count(t) for t in sorted(set(types.values()))}}


def expected_plans(model_dir: Path, config, arch, quant: str, keep: dict[str, str] | None, stack: ExitStack,
                   stored_types: dict[str, QT]):
    """(the planned tensors, the function that quantizes a weight as the file must store it)."""
    if quant in QUANTS:  # the writer's own
        return plan_tensors(model_dir, config, arch, QUANTS[quant][1], stack, keep), gguf.quants.quantize
    plans = plan_tensors(model_dir, config, arch, QT.F32, stack, keep)
    kept = kept_types([p.name for p in plans], keep)
    for p in plans:
        quantizable = tensor_type(p.name, p.shape, QT.Q8_0) != QT.F32
        if quantizable and p.name not in kept and p.name in stored_types:
            p.qtype = stored_types[p.name]  # llama.cpp's choice for this weight
    return plans, llama_cpp_quantize


def llama_cpp_quantize(data: np.ndarray, qtype: QT) -> np.ndarray:
    """A weight (rows of the last axis) stored as llama.cpp's quantizer stores it."""
    if qtype == QT.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    return ggml_quantize_rows(data.reshape(-1, data.shape[-1]), qtype)


def _check_tensor(f, offset: int, p, config, arch, weights: "_SafetensorsRows", quantize) -> str | None:
    rows = p.shape[0]  # rows of a matrix, elements of a vector: the unit the rotary permute moves
    row_bytes = tensor_nbytes(p) // rows
    if p.hf_name is None:  # made by the writer from config.json
        got = _read(f, offset, tensor_nbytes(p)).view(np.float32).reshape(p.shape)
        return None if np.array_equal(got, p.load()) else "differs from what config.json gives"
    shifted = bool(arch.norm_shift) and p.hf_name.endswith("norm.weight")
    permuted = from_gguf_layout(torch.arange(p.shape[0]), p.hf_name, config, arch) if not shifted else None
    if permuted is not None and not torch.equal(permuted, torch.arange(p.shape[0])):
        step = rows  # the rotary permute mixes rows across the tensor: read it whole
    else:
        step = max(1, CHUNK_ELEMENTS // max(1, math.prod(p.shape[1:])))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        raw = _read(f, offset + start * row_bytes, (stop - start) * row_bytes)
        weight = weights.rows(p.hf_name, start, stop)
        if shifted:  # llama.cpp's Gemma norm multiplies by w where Hugging Face multiplies by 1 + w
            got, want = raw.view(np.float32), weight.numpy().reshape(-1) + np.float32(arch.norm_shift)
            if not np.array_equal(got, want):
                return f"max |stored - (weight + {arch.norm_shift:g})| {np.abs(got - want).max():.4g}"
            continue
        got = from_gguf_layout(torch.from_numpy(raw.reshape(stop - start, row_bytes)), p.hf_name, config, arch)
        want = np.ascontiguousarray(quantize(weight.numpy(), p.qtype)).view(np.uint8)
        if not np.array_equal(got.numpy().reshape(-1), want.reshape(-1)):
            back = gguf.quants.dequantize(got.numpy().reshape(-1, row_bytes), p.qtype).reshape(weight.shape)
            return (f"rows {start}-{stop} differ from the model's weight stored as {p.qtype.name}: max |Δ| "
                    f"{np.abs(back - weight.numpy()).max():.4g} after dequantizing")
    return None


def _read(f, offset: int, size: int) -> np.ndarray:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise GGUFVerifyError(f"{f.name} ends inside a tensor (wanted {size} bytes at {offset})\n"
                              "    fix: the file is truncated: re-export it")
    return np.frombuffer(bytearray(data), dtype=np.uint8)


class _SafetensorsRows:
    """Rows of the model's safetensors weights, read with plain reads as float32 (nothing stays mapped)."""

    DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}

    def __init__(self, model_dir: Path):
        self.where: dict[str, tuple[Path, int, dict]] = {}
        for path in sorted(model_dir.glob("model*.safetensors")):
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            for name, info in header.items():
                if name != "__metadata__":
                    self.where[name] = (path, 8 + n, info)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        path, base, info = self.where[name]
        shape = info["shape"]
        dtype = self.DTYPES[info["dtype"]]
        per_row = math.prod(shape[1:]) * dtype.itemsize
        begin = info["data_offsets"][0] + start * per_row
        with open(path, "rb") as f:
            f.seek(base + begin)
            data = bytearray(f.read((stop - start) * per_row))
        return torch.frombuffer(data, dtype=dtype).reshape(stop - start, *shape[1:]).to(torch.float32)


# --- the three logit sources ------------------------------------------------------------------------

def hf_logits(model_dir: Path, ids: list[int], rounded_to: str | None = None, types: dict[str, str] | None = None):
    """Logits of the Hugging Face model as it is and, with `rounded_to`, also with its weights rounded as
    the GGUF stores them (a pair; `types`: each tensor's type in the file). The model is freed before this
    returns."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    as_is = _forward(model, ids)
    if rounded_to is None:
        del model
        gc.collect()
        return as_is
    round_weights(model, model_dir, rounded_to, types)
    rounded = _forward(model, ids)
    del model
    gc.collect()
    return as_is, rounded


def round_weights(model, model_dir: Path, quant: str, types: dict[str, str] | None = None) -> None:
    """Put into `model` exactly the numbers a reader of the GGUF gets back (quantize, dequantize, undo layout);
    `types`: each tensor's type in the file."""
    config = load_config(model_dir)
    arch = arch_for(config)
    params = dict(model.named_parameters())
    stored_types = {name: QT[t] for name, t in (types or {}).items()}
    with ExitStack() as stack, torch.no_grad():
        plans, quantize = expected_plans(model_dir, config, arch, quant, None, stack, stored_types)
        for p in plans:
            if p.hf_name is None or p.hf_name not in params:
                continue
            qtype = stored_types.get(p.name, p.qtype)
            stored = gguf.quants.dequantize(quantize(p.load(), qtype), qtype).reshape(p.shape)
            back = from_gguf_layout(torch.from_numpy(np.ascontiguousarray(stored)), p.hf_name, config, arch)
            params[p.hf_name].copy_(back)


def transformers_logits(model_dir: Path, gguf_path: Path, ids: list[int]) -> np.ndarray:
    """transformers reading the GGUF's tensors. Its GGUF reader drops rope scaling, softcapping and
    Gemma 3's local rope base, so the architecture comes from config.json; `config_mismatches` checks
    the rest of the metadata."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 config=load_config(model_dir), dtype=torch.float32)
    logits = _forward(model, ids)
    del model
    gc.collect()
    return logits


def llama_cpp_logits(gguf_path: Path, ids: list[int], text: str, n_threads: int) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits for `ids`, and its own tokenization of `text` (no special tokens)."""
    from chat.llama_runtime import open_llama

    llm = open_llama(gguf_path, n_ctx=max(64, len(ids) + 8), n_batch=max(8, len(ids)),
                     n_threads=n_threads, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float32)  # a view: it outlives close(), no copy
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
        "rope_theta": rope_parameters(config).get("rope_theta"),
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
    """Why llama.cpp cannot be used here, or None (chat/llama_runtime.py loads it, AMX guard included)."""
    try:
        from chat import llama_runtime

        llama_runtime.load()
    except Exception as e:  # noqa: BLE001 - a broken build is as unusable as a missing one
        return f"llama-cpp-python does not load ({e})"
    return None


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
