"""`tunebook export`: merge the run's final adapter into its base (merge.py), write the GGUF the chat serves
with the training chat template inside (gguf_writer.py), and verify it against the merged model
(gguf_verify.py). Each step is skipped when what it would make is up to date (run_dir.py's freshness rule)."""
from __future__ import annotations

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
        head += (f"{tensors['n_tensors']} tensors ({tensors['n_bytes'] / 2**20:.0f} MiB) identical to the merged "
                 "weights as stored; ")
    return head + f"over {report.get('n_tokens')} probe tokens: " + "; ".join(parts)


def export_run(run: RunDir | Path, quant: str | None = None, verify: bool | None = None, log=print,
               verify_level: str = "standard", force: bool = False) -> Path:
    """Merge, write the GGUF and (by default) verify it: `verify_level` "standard" (every tensor exactly,
    llama.cpp's logits) or "full" (also transformers reading the file back; slow, ~4x the model in
    memory). An up-to-date GGUF is kept unless `force`. Returns the GGUF path."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    recipe = run.load_recipe()
    quant = quant or (recipe.export.quantization if recipe.export else "q8_0")
    if quant not in QUANTS:
        raise TunebookError(f"--quant {quant}: unknown quantization\n    fix: use one of {', '.join(QUANTS)}")
    verify = (recipe.export.verify if recipe.export else True) if verify is None else verify
    merged = merge_run(recipe, run, log)
    out = run.gguf(recipe.name, quant)
    inputs = {"merged": run.made_from(merged), "template": content_identity(merged / "chat_template.jinja"),
              "quant": quant, "verified": verify_level if verify else None}
    if not force and run.fresh(out, inputs):
        log(f"export is up to date: {out}")
        return out
    from .gguf_writer import write_gguf

    with run.making(out, inputs):
        template = (merged / "chat_template.jinja").read_text() or None
        log(f"writing {out} ({quant})")
        write_gguf(merged, out, quant=quant, chat_template=template,
                   metadata={"name": recipe.name, "base_model": recipe.model.base, "recipe": recipe.name})
        if verify:
            from .gguf_verify import verify_gguf

            try:
                report = verify_gguf(merged, out, quant, level=verify_level)
            except TunebookError:
                bad = out.with_name(out.name + ".failed-verification")
                out.replace(bad)
                log(f"verification failed: the GGUF was moved to {bad}")
                raise
            log("verified: " + verification_summary(report))
    return out
