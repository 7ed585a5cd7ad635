"""Reports that compare runs: the seed's table (hyperparameters, lowest validation loss, best perplexity,
step of best) with the relative change between rows, and PNG curves of validation loss and perplexity
against optimizer step, per run and overlaid."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from runner.metrics import read_metrics
from runner.recipe import Recipe, load_recipe


@dataclass
class StageRow:
    run: str
    stage: str
    model: str
    r: int
    alpha: float
    learning_rate: float
    micro_batch: int
    grad_accum: int
    backend: str
    evals: list[dict]   # metrics rows that carry eval_loss, in step order

    @property
    def best(self) -> dict | None:
        return min(self.evals, key=lambda row: row["eval_loss"]) if self.evals else None

    @property
    def label(self) -> str:
        return f"{self.run}/{self.stage}"


def run_rows(run_dir: Path) -> list[StageRow]:
    recipe: Recipe = load_recipe(run_dir / "recipe.yaml")
    rows = []
    for stage in recipe.stages:
        metrics = read_metrics(run_dir / stage.name / "metrics.jsonl")
        evals = sorted((m for m in metrics if m.get("eval_loss") is not None), key=lambda m: m["step"])
        t = stage.train
        rows.append(StageRow(recipe.name, stage.name, recipe.model.base, recipe.lora.r, recipe.lora.alpha,
                             t.learning_rate, t.micro_batch_size, t.gradient_accumulation_steps, recipe.backend, evals))
    return rows


def _num(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def relative(new: float, old: float) -> str:
    return f"{(new - old) / old * 100:+.1f}%"


def comparison_table(rows: list[StageRow]) -> str:
    """The seed's table; 'Δ ppl' compares a row's best perplexity with the previous row of the same stage
    name (the same validation data), e.g. the 1B run's `general` and the 3B run's `general`."""
    from runner.resolved import number_text

    head = ("| run | stage | model | backend | LoRA r | alpha | learning rate | micro batch | grad accum | "
            "lowest val loss | best perplexity | step of best | Δ ppl vs previous run |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    previous: dict[str, float] = {}
    for row in rows:
        best = row.best
        ppl = best["eval_ppl"] if best else None
        before = previous.get(row.stage)
        delta = relative(ppl, before) if ppl is not None and before else "–"
        lines.append(f"| {row.run} | {row.stage} | {row.model} | {row.backend} | {row.r} | {number_text(row.alpha)} | "
                     f"{number_text(row.learning_rate)} | {row.micro_batch} | {row.grad_accum} | "
                     f"{_num(best['eval_loss'] if best else None)} | {_num(ppl, 3)} | "
                     f"{best['step'] if best else '–'} | {delta} |")
        if ppl is not None:
            previous[row.stage] = ppl
    return "\n".join(lines)


def plot_curves(rows: list[StageRow], out_dir: Path, prefix: str = "") -> list[Path]:
    """One PNG per run (loss and perplexity side by side) and two overlays across runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    plotted = [r for r in rows if r.evals]
    for row in plotted:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        steps = [m["step"] for m in row.evals]
        ax1.plot(steps, [m["eval_loss"] for m in row.evals], marker="o")
        ax1.set(title=f"{row.label}: validation loss", xlabel="optimizer step", ylabel="validation loss (nats/token)")
        ax2.plot(steps, [m["eval_ppl"] for m in row.evals], marker="o", color="tab:orange")
        ax2.set(title=f"{row.label}: perplexity", xlabel="optimizer step", ylabel="perplexity (exp of loss)")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{prefix}{row.run}-{row.stage}-curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    for key, ylabel, name in (("eval_loss", "validation loss (nats/token)", "val-loss"),
                              ("eval_ppl", "perplexity (exp of loss)", "perplexity")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for row in plotted:
            ax.plot([m["step"] for m in row.evals], [m[key] for m in row.evals], marker="o", label=row.label)
        ax.set(title=f"{ylabel.split(' (')[0]} by run", xlabel="optimizer step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend()
        fig.tight_layout()
        path = out_dir / f"{prefix}compare-{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def forgetting_table(matrix: dict) -> str:
    """rows: the base model, then the model after each stage; columns: each stage's validation set;
    cells: perplexity and its change from the row above (training a stage should lower its own column
    and, ideally, leave the others where they were)."""
    stages, rows, ppl = matrix["stages"], matrix["rows"], matrix["ppl"]
    lines = ["| model \\ val set | " + " | ".join(stages) + " |", "|---|" + "|".join("---" for _ in stages) + "|"]
    for i, row in enumerate(rows):
        cells = []
        for stage in stages:
            value = ppl[row].get(stage)
            cell = _num(value, 3)
            above = ppl[rows[i - 1]].get(stage) if i else None
            if value is not None and above:
                cell += f" ({relative(value, above)})"
            cells.append(cell)
        lines.append(f"| {'base model' if row == 'base' else 'after ' + row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_compare_report(run_dirs: list[Path], out_dir: Path) -> Path:
    rows = [row for run_dir in run_dirs for row in run_rows(run_dir)]
    images = plot_curves(rows, out_dir)
    parts = ["# Run comparison", "", comparison_table(rows), "",
             "Validation loss is the token-weighted mean negative log-likelihood over assistant tokens; "
             "perplexity = exp(loss). Δ ppl is the change of best perplexity from the row above.", ""]
    for image in images:
        parts += [f"![{image.stem}]({image.name})", ""]
    out = out_dir / "report.md"
    from runner.atomic import write_text

    write_text(out, "\n".join(parts))
    return out


def write_run_report(run_dir: Path, sections: dict[str, str] | None = None) -> Path:
    """runs/<name>/report.md: the stage table, curves, forgetting matrix and any extra sections."""
    from runner.atomic import write_text

    rows = run_rows(run_dir)
    images = plot_curves(rows, run_dir)
    parts = [f"# {rows[0].run}", "", comparison_table(rows), ""]
    forgetting = run_dir / "forgetting.json"
    if forgetting.is_file():
        parts += ["## Forgetting matrix (validation perplexity)", "", forgetting_table(json.loads(forgetting.read_text())),
                  "", "Each cell: perplexity of the model in that row on that stage's validation set, and in "
                  "brackets its change from the row above.", ""]
    for title, body in (sections or {}).items():
        parts += [f"## {title}", "", body, ""]
    for image in images:
        parts += [f"![{image.stem}]({image.name})", ""]
    out = run_dir / "report.md"
    write_text(out, "\n".join(parts))
    return out
