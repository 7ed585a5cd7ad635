"""`tunebook export`: merge the run's final adapter into its base (merge.py), write each GGUF type the recipe
asks for with the training chat template inside, verify it against the merged model (gguf_verify.py), and put
an Ollama Modelfile beside it (modelfile.py).

q8_0, f16, bf16 and f32 come from the pure-Python writer (gguf_writer.py). The llama.cpp types (q4_k_m, q6_k,
iq4_xs, ...) come from llama.cpp's own quantizer (llama_quant.py), fed a full-precision GGUF the same writer
makes of the merged model. Each file is skipped when it is up to date (run_dir.py's freshness rule), so adding
a type to a finished run exports only that type.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import TunebookError
from ..recipe import QUANTS
from ..run_dir import RunDir, content_identity
from .merge import merge_run


def verification_summary(report: dict) -> str:
    parts = []
    for backend in ("transformers", "llama.cpp"):
        r = report.get(backend)
        if isinstance(r, dict) and "max_abs_diff" in r:
            parts.append(f"{backend} max |Δlogit| {r['max_abs_diff']:.4g} ({r.get('rel_max_diff', 0):.1%} of the "
                         f"largest logit), argmax agreement {r['argmax_agreement']:.1%}")
        elif r:
            parts.append(f"{backend}: {r}")
    tensors = report.get("tensors")
    head = f"{report.get('quant')}: "
    if isinstance(tensors, dict) and tensors.get("ok"):
        counts = ", ".join(f"{n} {t}" for t, n in tensors.get("type_counts", {}).items())
        head += (f"{tensors['n_tensors']} tensors ({tensors['n_bytes'] / 2**20:.0f} MiB; {counts}) identical to the "
                 "merged weights as stored; ")
    return head + f"over {report.get('n_tokens')} probe tokens: " + "; ".join(parts)


def export_run(run: RunDir | Path, quant: str | None = None, verify: bool | None = None, log=print,
               verify_level: str = "standard", force: bool = False) -> Path:
    """One GGUF (`quant`, default the recipe's first type): see `export_types`. Returns its path."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    quant = quant or export_quants(run.load_recipe())[0]
    return export_types(run, [quant], verify, log, verify_level, force)[quant]


def export_quants(recipe) -> list[str]:
    """The types a recipe exports, the served one first."""
    return recipe.export.quants if recipe.export else ["q8_0"]


def write_type(recipe, merged: Path, out: Path, quant: str, source: Path, log=print) -> None:
    """One GGUF of `merged` at `quant` as the export writes it: the writer's types directly, llama.cpp's through a
    full-precision `source` file written beside it and deleted afterwards. Not verified."""
    from .gguf_writer import QUANTS as WRITER_TYPES

    keep = recipe.export.keep if recipe.export else {}
    if quant in WRITER_TYPES:
        _write(recipe, merged, out, quant, keep, log)
        return
    try:
        _write_source(recipe, merged, source, log)
        _quantize(recipe, source, out, quant, keep, log)
    finally:
        source.unlink(missing_ok=True)


def export_types(run: RunDir | Path, quants: list[str] | None = None, verify: bool | None = None, log=print,
                 verify_level: str = "standard", force: bool = False) -> dict[str, Path]:
    """Merge, write each GGUF type and (by default) verify it: `verify_level` "standard" (every tensor exactly,
    llama.cpp's logits) or "full" (also transformers reading the file back; slow, ~4x the model in memory).
    An up-to-date GGUF is kept unless `force`. Returns {type: path} in the order asked."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    recipe = run.load_recipe()
    quants = list(dict.fromkeys(quants or export_quants(recipe)))
    for quant in quants:
        if quant not in QUANTS:
            raise TunebookError(f"--quant {quant}: unknown quantization\n    fix: use one of {', '.join(QUANTS)}")
    verify = (recipe.export.verify if recipe.export else True) if verify is None else verify
    keep = recipe.export.keep if recipe.export else {}
    merged = merge_run(recipe, run, log)
    base_inputs = {"merged": run.made_from(merged), "template": content_identity(merged / "chat_template.jinja"),
                   "verified": verify_level if verify else None, **({"keep": keep} if keep else {})}
    from .gguf_writer import QUANTS as WRITER_TYPES
    from .modelfile import write_modelfile

    outs, todo = {}, []
    for quant in quants:
        out = run.gguf(recipe.name, quant)
        inputs = {**base_inputs, "quant": quant}
        if quant not in WRITER_TYPES:
            inputs["quantizer"] = _llama_cpp_version()
        outs[quant] = out
        if not force and run.fresh(out, inputs):
            log(f"export is up to date: {out}")
        else:
            todo.append((quant, out, inputs))
    # the writer's types first; the llama.cpp types share one full-precision source file
    todo.sort(key=lambda item: item[0] not in WRITER_TYPES)
    source: Path | None = None
    try:
        for quant, out, inputs in todo:
            with run.making(out, inputs):
                if quant in WRITER_TYPES:
                    _write(recipe, merged, out, quant, keep, log)
                else:
                    source = source or _write_source(recipe, merged, run.quantize_source(recipe.name, stored_dtype(merged)), log)
                    _quantize(recipe, source, out, quant, keep, log)
                if verify:
                    _verify(merged, out, quant, keep, verify_level, log)
    finally:
        if source is not None:
            source.unlink(missing_ok=True)
    for quant, out in outs.items():
        write_modelfile(run.modelfile(recipe.name, quant), out, merged, run.system_prompt(), log)
    return outs


def _metadata(recipe) -> dict:
    return {"name": recipe.name, "base_model": recipe.model.base, "recipe": recipe.name}


def _write(recipe, merged: Path, out: Path, quant: str, keep: dict, log) -> None:
    from .gguf_writer import write_gguf

    log(f"writing {out} ({quant})")
    write_gguf(merged, out, quant=quant, chat_template=(merged / "chat_template.jinja").read_text() or None,
               metadata=_metadata(recipe), keep=keep)


def _write_source(recipe, merged: Path, source: Path, log) -> Path:
    """The merged model as a GGUF at the precision it is stored in (nothing rounded): what llama.cpp quantizes."""
    from .gguf_writer import write_gguf

    dtype = stored_dtype(merged)
    log(f"writing the {dtype} GGUF llama.cpp's quantizer reads ({source.name}, deleted afterwards)")
    return write_gguf(merged, source, quant=dtype, chat_template=(merged / "chat_template.jinja").read_text() or None,
                      metadata=_metadata(recipe))


def _quantize(recipe, source: Path, out: Path, quant: str, keep: dict, log) -> None:
    from .gguf_table import read_table
    from .gguf_writer import kept_types, tensor_type
    from .llama_quant import quantize_gguf

    shapes = {t.name: t.shape for t in read_table(source)[1]}
    kept = {name: tensor_type(name, shapes[name], qtype)  # as the writer plans it: Q8_0 rows it cannot block -> F16
            for name, qtype in kept_types(list(shapes), keep).items()}
    quantize_gguf(source, out, quant, kept, log=log)


def _verify(merged: Path, out: Path, quant: str, keep: dict, level: str, log) -> None:
    from .gguf_verify import verify_gguf

    try:
        report = verify_gguf(merged, out, quant, level=level, keep=keep)
    except TunebookError:
        bad = out.with_name(out.name + ".failed-verification")
        if out.exists():
            out.replace(bad)
            log(f"verification failed: the GGUF was moved to {bad}")
        raise
    log("verified: " + verification_summary(report))


def stored_dtype(merged: Path) -> str:
    """The GGUF type that holds the merged weights exactly: f32, bf16 or f16 (from the safetensors header)."""
    files = sorted(merged.glob("model*.safetensors"))
    if not files:
        raise TunebookError(f"no model*.safetensors in {merged}\n    fix: export again: the merge writes them")
    with open(files[0], "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    dtypes = {info["dtype"] for name, info in header.items() if name != "__metadata__" and len(info["shape"]) > 1}
    for dtype, gguf_type in (("F32", "f32"), ("BF16", "bf16"), ("F16", "f16")):
        if dtype in dtypes:
            return gguf_type
    return "f32"


def _llama_cpp_version() -> str:
    try:
        from importlib.metadata import version

        return "llama-cpp-python " + version("llama_cpp_python")
    except Exception:  # noqa: BLE001 - the version only marks what made the file
        return "llama-cpp-python"
