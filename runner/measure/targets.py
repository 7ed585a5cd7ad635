"""A recipe's own bar (`targets:` in the recipe), checked against what its run measured: the forgetting
matrix, the quality checks and the wall time. Each target that is set becomes one row of report.md's
"Targets" section: what it asks, what was measured, whether it is met."""
from __future__ import annotations

from ..recipe import GateTargets, TargetsConfig


def check_targets(targets: TargetsConfig | None, forgetting: dict | None, quality: dict | None,
                  wall_s: float | None, gate: dict | None = None) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for every target that is set and has a measurement; `gate`: the evaluation
    gate of the served GGUF (runner/measure/gate.py)."""
    if targets is None:
        return []
    rows: list[tuple[str, str, bool]] = []
    if forgetting and len(forgetting["rows"]) >= 3:
        ppl, columns = forgetting["ppl"], forgetting["stages"]
        stage_of = forgetting.get("column_stage") or {c: c for c in columns}  # older matrices: a column per stage
        order = [row for row in forgetting["rows"] if row != "base"]
        first, last, before = order[0], order[-1], forgetting["rows"][-2]
        if targets.first_stage_beats_base:
            for column in (c for c in columns if stage_of[c] == first):
                base, after = ppl["base"][column], ppl[first][column]
                rows.append((f"stage {first} lowers {column} val ppl below the base model's",
                             f"{base:.3f} → {after:.3f}", after < base))
        if targets.last_stage_gain is not None:
            for column in (c for c in columns if stage_of[c] == last):
                gain = (ppl[before][column] - ppl[last][column]) / ppl[before][column]
                rows.append((f"stage {last} lowers {column} val ppl by ≥ {targets.last_stage_gain * 100:.0f}% vs "
                             f"after {before}", f"{ppl[before][column]:.3f} → {ppl[last][column]:.3f} "
                             f"({-gain * 100:+.1f}%)", gain >= targets.last_stage_gain))
        if targets.forgetting is not None:
            for column in (c for c in columns if stage_of[c] != last and stage_of[c] in ppl):
                own = stage_of[column]
                rise = (ppl[last][column] - ppl[own][column]) / ppl[own][column]
                rows.append((f"{column} val ppl after {last} rises ≤ {targets.forgetting * 100:.0f}% over after {own}",
                             f"{ppl[own][column]:.3f} → {ppl[last][column]:.3f} ({rise * 100:+.1f}%)",
                             rise <= targets.forgetting))
    if quality:
        q, g = quality["quantization"], quality["generation"]
        if targets.gguf_ppl_within is not None:
            rows.append((f"GGUF ppl within {targets.gguf_ppl_within * 100:g}% of merged ({quality['stage']} val)",
                         f"{q['gguf_ppl']:.4f} vs {q['merged_ppl']:.4f} ({q['relative'] * 100:+.2f}%)",
                         abs(q["relative"]) <= targets.gguf_ppl_within))
        if targets.stop_rate is not None:
            rows.append((f"in-distribution held-out answers stop at end-of-turn within {g['max_tokens']} tokens "
                         f"(≥ {targets.stop_rate * 100:.0f}%)", f"{g['stopped']}/{g['questions']} "
                         f"({g['stop_rate'] * 100:.1f}%)", g["stop_rate"] >= targets.stop_rate))
        if targets.first_token_s is not None:
            rows.append((f"first streamed token ≤ {targets.first_token_s:g} s (chat engine, this machine)",
                         f"median {g['first_token_s_median']:.2f} s, max {g['first_token_s_max']:.2f} s",
                         g["first_token_s_max"] <= targets.first_token_s))
    if gate and targets.gate is not None:
        rows += gate_targets(targets.gate, gate)
    if wall_s is not None and targets.wall_minutes is not None:
        rows.append((f"whole run ≤ {targets.wall_minutes:g} min wall", f"{wall_s / 60:.1f} min",
                     wall_s / 60 <= targets.wall_minutes))
    return rows


def _share(hits: int, total: int) -> str:
    return f"{hits}/{total} ({hits / total * 100:.1f}%)" if total else "none expected"


def gate_targets(t: GateTargets, gate: dict) -> list[tuple[str, str, bool]]:
    """The evaluation-set targets, for the served GGUF's greedy answers and its answers with the chat's sampler."""
    rows: list[tuple[str, str, bool]] = []
    modes = [(mode, "greedy" if mode == "greedy" else "chat sampler") for mode in ("greedy", "chat") if mode in gate]
    name = gate.get("eval_set", "the evaluation set")
    for mode, words in modes:
        g = gate[mode]["summary"]
        stop = t.stop_rate_greedy if mode == "greedy" else t.stop_rate_chat
        if stop is not None:
            rows.append((f"{name}, {words}: answers stop at end-of-turn (≥ {stop * 100:.0f}%)",
                         _share(g["stopped"], g["questions"]), g["stop_rate"] >= stop))
        if t.referral is not None:
            rows.append((f"{name}, {words}: referral to a vet where expected (≥ {t.referral * 100:.0f}%)",
                         _share(g["referred"], g["refer_expected"]),
                         not g["refer_expected"] or g["referral_rate"] >= t.referral))
        if t.warning is not None:
            rows.append((f"{name}, {words}: warning where expected (≥ {t.warning * 100:.0f}%)",
                         _share(g["warned"], g["warn_expected"]),
                         not g["warn_expected"] or g["warning_rate"] >= t.warning))
        for key, what in (("forbidden", "answers with a forbidden phrase"), ("echo", "answers repeating the system "
                          "prompt"), ("loops", "answers that loop")):
            limit = getattr(t, key)
            if limit is not None:
                rows.append((f"{name}, {words}: {what} (≤ {limit})", str(g[key]), g[key] <= limit))
    return rows
