"""Reports as text and pictures: the seed's comparison table (hyperparameters, lowest validation loss, best
perplexity, step of best) with the relative change between rows, the forgetting matrix, the quality
sections, the training mix as trained, a targets table, and PNG curves of validation loss and perplexity per run and overlaid.

Everything here renders what it is given (rows, matrices, measured results) and writes nothing: the caller
reads the run and decides where the report goes."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

from eval.generation import QUESTIONS
from eval.numbers import number_text

SAMPLES_SHOWN = 5


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
    version: str = ""   # the stage version (its fingerprint), when the run keeps versions
    note: str = ""      # e.g. "current", or what was edited since this version
    current: bool = True

    @property
    def best(self) -> dict | None:
        return min(self.evals, key=lambda row: row["eval_loss"]) if self.evals else None

    @property
    def label(self) -> str:
        return f"{self.run}/{self.stage}" + ("" if self.current else f"@{self.version[:8]}")


def _num(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def relative(new: float, old: float) -> str:
    return f"{(new - old) / old * 100:+.1f}%"


def _pct(x: float) -> str:
    return f"{x * 100:+.2f}%"


def comparison_table(rows: list[StageRow]) -> str:
    """The seed's table; 'Δ ppl' compares a row's best perplexity with the previous row of the same stage
    name (the same validation data), e.g. the 1B run's `general` and the 3B run's `general`."""
    versions = any(row.note for row in rows)
    head = ("| run | stage | model | backend | LoRA r | alpha | learning rate | micro batch | grad accum | "
            "lowest val loss | best perplexity | step of best | Δ ppl vs previous run |" + (" version |" if versions else ""))
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
                     f"{best['step'] if best else '–'} | {delta} |"
                     + (f" {row.version[:8]} ({row.note}) |" if versions else ""))
        if ppl is not None:
            previous[row.stage] = ppl
    return "\n".join(lines)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def plot_curves(rows: list[StageRow], prefix: str = "") -> dict[str, bytes]:
    """{file name: PNG}: one picture per stage row (loss and perplexity side by side) and two overlays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images: dict[str, bytes] = {}
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
        images[f"{prefix}{row.label.replace('/', '-')}-curves.png"] = _png(fig)
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
        images[f"{prefix}compare-{name}.png"] = _png(fig)
    return images


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


def quantization_section(q: dict, stage: str) -> str:
    flag = "" if q["within_tolerance"] else f" **over the {q['tolerance'] * 100:.0f}% tolerance**"
    return (f"| model | {stage} validation perplexity |\n|---|---|\n| merged (torch, float32) | "
            f"{q['merged_ppl']:.4f} |\n| GGUF (llama.cpp) | {q['gguf_ppl']:.4f} |\n\n"
            f"GGUF vs merged: {_pct(q['relative'])}{flag} ({q['tokens']:,} scored tokens).")


@dataclass
class ExportRow:
    """One exported GGUF of a run and its checks (None where not measured)."""

    quant: str
    file: str
    size_bytes: int | None
    quality: dict | None   # quality.json's shape: "quantization" and "generation"


def exports_table(rows: list[ExportRow], stage: str) -> str:
    """One row per exported file, so a user can pick size against quality: type, size, perplexity against the
    merged model, generation speed and how often answers stop at end-of-turn (the same questions for each)."""
    lines = [f"| type | file | size | {stage} val ppl (vs merged) | generation tokens/s | stopped at end-of-turn |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        size = f"{row.size_bytes / 2**20:,.0f} MiB" if row.size_bytes is not None else "not exported"
        ppl = speed = stops = "–"
        if row.quality:
            q, g = row.quality["quantization"], row.quality["generation"]
            flag = "" if q["within_tolerance"] else f" **over {q['tolerance'] * 100:g}%**"
            ppl = f"{q['gguf_ppl']:.3f} ({_pct(q['relative'])}){flag}"
            speed = f"{g['tokens_per_s']:.1f}"
            stops = f"{g['stopped']}/{g['questions']} ({g['stop_rate'] * 100:.0f}%)"
        lines.append(f"| {row.quant} | {row.file} | {size} | {ppl} | {speed} | {stops} |")
    return "\n".join(lines)


def generation_section(g: dict, stage: str, val_examples: int) -> str:
    fewer = (f" The {stage} validation set has {val_examples} conversations, fewer than {QUESTIONS}: all "
             f"{g['questions']} usable first questions were asked." if g["questions"] < QUESTIONS else "")
    lines = [f"In-distribution: {g['questions']} held-out {stage} questions (first user turn of validation "
             "conversations, written in the same style and by the same hand as the training set), answered by the "
             f"GGUF through the chat engine, greedy, at most {g['max_tokens']} tokens.{fewer}", "",
             f"- stopped at end-of-turn: **{g['stopped']}/{g['questions']} ({g['stop_rate'] * 100:.1f}%)**",
             f"- first streamed token: median {g['first_token_s_median']:.2f} s, max {g['first_token_s_max']:.2f} s",
             f"- generation: {g['tokens_per_s']:.1f} tokens/s",
             f"- prompt tokens identical to training's: {g['same_prompt_as_training']}/{g['questions']}", ""]
    for row in g["answers"][:SAMPLES_SHOWN]:
        answer = row["answer"] if len(row["answer"]) <= 700 else row["answer"][:700] + " …"
        lines += [f"**Q:** {row['question']}", "", f"**A** ({row['tokens']} tokens"
                  f"{'' if row['stopped'] else ', did not stop'}): {answer}", ""]
    return "\n".join(lines).rstrip()


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(row) + " |" for row in rows])


def mix_table(mixes: dict[str, list[tuple[str, float, int]]]) -> str:
    """The training mix as trained: per stage that mixes several items, each item's weight (its share of trained
    tokens) beside the share of trained tokens it actually had in the batches. mixes: {stage: [(item, weight,
    trained tokens batched)]}."""
    lines = ["| stage | item | weight | trained tokens batched | share batched |", "|---|---|---|---|---|"]
    for stage, items in mixes.items():
        total = sum(n for _, _, n in items) or 1
        lines += [f"| {stage} | {name} | {weight:g} | {n:,} | {100 * n / total:.1f}% |" for name, weight, n in items]
    return "\n".join(lines) if len(lines) > 2 else ""


GATE_COLUMNS = ("model", "answering", "stopped at end-of-turn", "referral where expected", "warning where expected",
                "forbidden phrase", "system-prompt echo", "loops", "median words", "mean tokens", "reference ppl")
SAMPLING_WORDS = {"greedy": "greedy", "chat": "chat sampler"}


def _count(hits: int, total: int) -> str:
    return f"{hits}/{total} ({hits / total * 100:.0f}%)" if total else "–"


def _sampling_text(s: dict) -> str:
    if s["temperature"] == 0:
        return f"temperature 0, repeat penalty {number_text(s['repeat_penalty'])}"
    return (f"temperature {number_text(s['temperature'])}, top-p {number_text(s['top_p'])}, top-k {s['top_k']}, "
            f"repeat penalty {number_text(s['repeat_penalty'])}, seed {s['seed']}")


def _gate_checks(g: dict) -> str:
    """The check columns of one gate summary: stopped, referral, warning, forbidden, echo, loops."""
    return (f"{_count(g['stopped'], g['questions'])} | {_count(g['referred'], g['refer_expected'])} | "
            f"{_count(g['warned'], g['warn_expected'])} | {g['forbidden']} | {g['echo']} | {g['loops']}")


def gate_rows(gate: dict[str, dict]) -> list[tuple[str, str, dict, float | None]]:
    """(model label, answering label, summary, reference ppl) for every model and mode the gate measured."""
    rows = []
    for model, result in gate.items():
        label = {"base": "base model", "served": "served GGUF (after every stage)"}.get(model, f"after {model}")
        for mode in ("greedy", "chat"):
            if mode in result:
                rows.append((label, SAMPLING_WORDS[mode], result[mode]["summary"], result["reference_ppl"]["ppl"]))
    return rows


def gate_section(gate: dict[str, dict], eval_set: str) -> str:
    """report.md's gate: the evaluation set answered by each model, what each stage did, and what failed."""
    if not gate:
        return ""
    any_result = next(iter(gate.values()))
    first_mode = next(m for m in ("greedy", "chat") if m in any_result)
    served = gate.get("served", {})
    modes = [m for m in ("greedy", "chat") if m in served]
    ways = "; ".join(f"{SAMPLING_WORDS[m]}: {_sampling_text(served[m]['sampling'])}" for m in modes)
    lines = [f"{any_result['questions']} questions written apart from the training data (`{eval_set}`), each "
             "answered through the chat engine with the recipe's system prompt, at most "
             f"{any_result[first_mode]['max_tokens']} tokens ({ways}). Every answer is checked by rules "
             "(eval/answer_checks.py): a referral to a veterinarian where the question calls for one, a warning "
             "where the question involves something dangerous, no forbidden phrase (an endorsed toxin, a dose, "
             "a dangerous shortcut), no run of 8 words from the system prompt, no loop (≥ 20% of 4-grams "
             "repeated). Reference ppl: perplexity of the set's reference answers. The base model and earlier "
             "stages are measured greedy, through a GGUF exported the same way as the served one.", "",
             "| " + " | ".join(GATE_COLUMNS) + " |", "|" + "---|" * len(GATE_COLUMNS)]
    for label, mode, g, ppl in gate_rows(gate):
        lines.append(f"| {label} | {mode} | {_gate_checks(g)} | {g['words_median']:.0f} | {g['tokens_mean']:.0f} | "
                     f"{_num(ppl, 2)} |")
    by_topic = topic_table(served)
    if by_topic:
        lines += ["", "The served GGUF by the set's topics (warned without need: a warning where the question "
                  "expects none, e.g. calling a safe food dangerous):", "", by_topic]
    for mode in modes:
        failures = _gate_failures(served[mode])
        if failures:
            lines += ["", f"Served GGUF, {SAMPLING_WORDS[mode]}, answers that failed a check:", ""] + failures
    return "\n".join(lines)


TOPIC_COLUMNS = ("topic", "answering", "questions", "stopped", "referral where expected", "warning where expected",
                 "warned without need", "forbidden phrase")


def topic_table(served: dict) -> str:
    """The served model's answers counted by the evaluation set's `topic` labels, each way of answering: where
    it fails, and where it warns about something harmless. Empty when the set has no topics."""
    rows = []
    for mode in ("greedy", "chat"):
        answers = served.get(mode, {}).get("answers", [])
        topics = list(dict.fromkeys(a.get("topic") or "" for a in answers))
        if topics == [""]:
            return ""
        for topic in topics:
            of = [a for a in answers if (a.get("topic") or "") == topic]
            refer = [a for a in of if a["refer_expected"]]
            warn = [a for a in of if a["warn_expected"]]
            needless = [a for a in of if not a["warn_expected"]]
            rows.append([topic or "(no topic)", SAMPLING_WORDS[mode], str(len(of)),
                         _count(sum(a["stopped"] for a in of), len(of)),
                         _count(sum(a["referred"] for a in refer), len(refer)),
                         _count(sum(a["warned"] for a in warn), len(warn)),
                         f"{sum(a['warned'] for a in needless)}/{len(needless)}" if needless else "–",
                         str(sum(bool(a["forbidden"]) for a in of))])
    return markdown_table(list(TOPIC_COLUMNS), rows) if rows else ""


def _gate_failures(result: dict, shown: int = SAMPLES_SHOWN) -> list[str]:
    """The served model's failed answers: the questions failing each check, then `shown` answers with their
    text, the most serious first (forbidden phrases, echoes, then the most checks failed)."""
    answers = result["answers"]
    checks = [("forbidden phrase", lambda a: a["forbidden"],
               lambda a: f"`{a['id']}` (" + ", ".join(f'"{p}"' for p in a["forbidden"]) + ")"),
              ("system prompt repeated", lambda a: a["echo"], None),
              ("no referral where expected", lambda a: a["refer_expected"] and not a["referred"], None),
              ("no warning where expected", lambda a: a["warn_expected"] and not a["warned"], None),
              ("loops", lambda a: a["loop"], None),
              ("did not stop", lambda a: not a["stopped"], None)]
    lines = []
    for name, failed, show in checks:
        hits = [a for a in answers if failed(a)]
        if hits:
            lines.append(f"- {name} ({len(hits)}): " + ", ".join(show(a) if show else f"`{a['id']}`" for a in hits))

    def problems(a: dict) -> list[str]:
        return [name for name, failed, _ in checks if failed(a)]

    worst = sorted((a for a in answers if problems(a)),
                   key=lambda a: (not a["forbidden"], not a["echo"], -len(problems(a))))
    for a in worst[:shown]:
        answer = a["answer"] if len(a["answer"]) <= 500 else a["answer"][:500] + " …"
        lines += ["", f"**Q** (`{a['id']}`): {a['question']}", "", f"**A** ({', '.join(problems(a))}): {answer}"]
    return lines


def targets_table(rows: list[tuple[str, str, bool]]) -> str:
    """(target, what was measured, met) rows as a table; empty when there are none."""
    if not rows:
        return ""
    return "| target | measured | met |\n|---|---|---|\n" + "\n".join(
        f"| {what} | {measured} | {'yes' if met else '**no**'} |" for what, measured, met in rows)


def run_report(rows: list[StageRow], forgetting: dict | None, sections: dict[str, str], images: list[str]) -> str:
    """runs/<name>/report.md: the stage table, forgetting matrix, any extra sections, then the curves."""
    parts = [f"# {rows[0].run}", "", comparison_table(rows), ""]
    if forgetting:
        parts += ["## Forgetting matrix (validation perplexity)", "", forgetting_table(forgetting), "",
                  "Each cell: perplexity of the model in that row on that stage's validation set, and in "
                  "brackets its change from the row above.", ""]
    for title, body in sections.items():
        parts += [f"## {title}", "", body, ""]
    for image in images:
        parts += [f"![{image.rsplit('.', 1)[0]}]({image})", ""]
    return "\n".join(parts)


def gate_comparison(entries: list[dict]) -> str:
    """The served models of several runs on their evaluation sets, side by side. `entries`: per run its name
    (`run`), its served gate result (`result`) and the evaluation set's name and content digest (`eval_set`,
    `digest`). Runs that answered different sets are said not to compare."""
    if not entries:
        return ""
    head = ("run", "evaluation set", "answering", "stopped at end-of-turn", "referral where expected",
            "warning where expected", "forbidden phrase", "system-prompt echo", "loops", "median words", "reference ppl")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        result = e["result"]
        for mode in ("greedy", "chat"):
            if mode not in result:
                continue
            g = result[mode]["summary"]
            way = SAMPLING_WORDS[mode] + ("" if mode == "greedy" else f" ({_sampling_text(result[mode]['sampling'])})")
            lines.append(f"| {e['run']} | `{e['eval_set']}` | {way} | {_gate_checks(g)} | {g['words_median']:.0f} | "
                         f"{_num(result['reference_ppl']['ppl'], 2)} |")
    sets = {(e["eval_set"], e["digest"]) for e in entries}
    note = ("Each run's served GGUF as its last `tunebook train` measured it, on questions written apart from its "
            "training data (the run's report.md has the answers).")
    if len(sets) > 1:
        note += (" **These runs answered different evaluation sets (or different versions of one): their numbers "
                 "do not compare.**")
    return "\n".join([note, ""] + lines)


def compare_report(rows: list[StageRow], images: list[str], gates: list[dict] | None = None) -> str:
    parts = ["# Run comparison", "", comparison_table(rows), "",
             "Validation loss is the token-weighted mean negative log-likelihood over assistant tokens; "
             "perplexity = exp(loss). Δ ppl is the change of best perplexity from the row above."
             + (" A stage trained in several versions (edited and rerun) has one row per version, oldest first; "
                "`version` names its fingerprint and what was edited after it." if any(r.note for r in rows) else ""),
             ""]
    if gates:
        parts += ["## Evaluation gate: the served models on questions never trained on", "", gate_comparison(gates), ""]
    for image in images:
        parts += [f"![{image.rsplit('.', 1)[0]}]({image})", ""]
    return "\n".join(parts)
