"""The evaluation gate for real: a GGUF answers through the chat engine (llama.cpp), greedy and with the chat's
sampler at a fixed seed, and a run measures its served model, its base and its first stage, writes the gate
into report.md, and redoes none of it on a rerun; another run on the same base reads the base's answers kept on
the machine."""
from __future__ import annotations

import json
import os
import time

import pytest
from rich.console import Console

from chat_support import tiny_gguf
from eval.eval_set import EvalItem
from eval.gate import answer_set
from eval.report import gate_comparison
from runner.export.gguf_table import read_table
from runner.cli.recipe import rerun_table
from runner.export.stage_gguf import stage_gguf
from runner.measure.report import served_gate, write_compare_report
from runner.pipeline import train_recipe
from runner.recipe import load_recipe
from runner.run_dir import RunDir
from tiny_gguf_models import QUESTION, REPLY
from train_support import two_stage_recipe

ITEM = EvalItem("grapes", ({"role": "user", "content": QUESTION},), REPLY, refer=True, warn=False,
                forbid=("grapes are safe",))


def test_answers_through_the_chat_engine_catch_a_missing_referral():
    gguf = tiny_gguf("llama")
    greedy = answer_set(gguf, [ITEM], None, "greedy", log=lambda m: None)
    (row,) = greedy["answers"]
    assert row["answer"] == REPLY and row["stopped"]  # the tiny model learnt this reply and its end-of-turn
    s = greedy["summary"]
    assert (s["stopped"], s["refer_expected"], s["referred"], s["forbidden"]) == (1, 1, 0, 0)
    assert greedy["sampling"]["temperature"] == 0 and greedy["sampling"]["repeat_penalty"] == 1

    chat = [answer_set(gguf, [ITEM] * 3, None, "chat", seed=5, max_tokens=24, log=lambda m: None) for _ in range(2)]
    assert chat[0]["sampling"]["temperature"] > 0
    assert [a["answer"] for a in chat[0]["answers"]] == [a["answer"] for a in chat[1]["answers"]]  # fixed seed


def test_answers_decoded_together_are_those_of_one_at_a_time_and_repeat(monkeypatch):
    """The gate decodes its questions together (eval.gate.PARALLEL). On the tiny model, whose next tokens are
    never nearly tied, each answer is the one a lone user gets; a second run gives the same answers to the last
    token, with the chat's sampler too."""
    from chat.batcher import Batcher
    from eval.generation import generate

    largest = []
    close = Batcher.close
    monkeypatch.setattr(Batcher, "close", lambda self: (largest.append(self.largest_batch), close(self))[1])

    gguf = tiny_gguf("gemma")
    questions = [QUESTION, "Is my cat too thin?", "Why does my dog itch?", "Can rabbits eat grapes?", "Hello",
                 "What is in a first-aid kit for pets?"]
    conversations = [[{"role": "user", "content": q}] for q in questions]
    alone = generate(gguf, conversations, max_tokens=24, log=lambda m: None)
    together = [generate(gguf, conversations, max_tokens=24, log=lambda m: None, parallel=4) for _ in range(2)]
    assert alone[0]["answer"] == REPLY
    assert largest == [1, 4, 4]  # one at a time, then four replies in one decode step
    for run in together:
        assert [(r["answer"], r["stopped"], r["tokens"]) for r in run] == \
            [(r["answer"], r["stopped"], r["tokens"]) for r in alone]
    chat = [answer_set(gguf, [ITEM] * 5, None, "chat", seed=3, max_tokens=24, log=lambda m: None, parallel=p)
            for p in (1, 4, 4)]
    assert [a["answer"] for a in chat[0]["answers"]] == [a["answer"] for a in chat[1]["answers"]] \
        == [a["answer"] for a in chat[2]["answers"]]


EVAL = [{"id": f"q{i}", "question": q, "reference": "Give fresh water and call your vet if it goes on.",
         "refer": True, "warn": i == 0, "forbid": ["wait and see"], "topic": "toxins" if i == 0 else "care"}
        for i, q in enumerate(["My dog ate grapes, what now?", "Is my cat too thin?", "Why does my dog itch?"])]


@pytest.mark.slow
def test_a_run_measures_served_base_and_stage_models_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBOOK_CACHE", str(tmp_path / "cache"))
    recipe_file = two_stage_recipe(tmp_path, name="gated")
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVAL))
    with recipe_file.open("a") as f:
        f.write("export: {quantization: q8_0}\neval: {data: eval.jsonl, max_tokens: 12}\n"
                "targets: {gate: {stop_rate_greedy: 0.9, referral: 0.9, forbidden: 0, echo: 0}}\n")
    logs: list[str] = []
    recipe = load_recipe(recipe_file)
    train_recipe(recipe, log=logs.append)
    run = RunDir.of(recipe)

    served = json.loads(run.gate_file("served").read_text())
    assert set(served) >= {"greedy", "chat", "reference_ppl"} and served["questions"] == 3
    assert served["reference_ppl"]["ppl"] > 1 and served["reference_ppl"]["tokens"] > 20
    for model in ("base", "general"):
        measured = json.loads(run.gate_file(model).read_text())
        assert "greedy" in measured and "chat" not in measured
        assert len(measured["greedy"]["answers"]) == 3
    # the models of base and general were exported only to be measured
    assert not list(run.gate_dir.glob("*.gguf")) and not list(run.gate_dir.glob("*-merged"))
    base_ppl = json.loads(run.gate_file("base").read_text())["reference_ppl"]["ppl"]
    assert base_ppl != served["reference_ppl"]["ppl"]  # different models, different numbers

    report = run.report.read_text()
    assert "## Evaluation gate: questions never trained on" in report
    for label in ("| base model | greedy |", "| after general | greedy |",
                  "| served GGUF (after every stage) | greedy |", "| served GGUF (after every stage) | chat sampler |"):
        assert label in report
    assert "eval.jsonl, greedy: referral to a vet where expected (≥ 90%)" in report
    assert "## In-distribution sample answers" in report

    # a rerun measures nothing again
    stamps = {p: p.stat().st_mtime_ns for p in run.gate_dir.glob("*.json")}
    logs.clear()
    train_recipe(load_recipe(recipe_file), log=logs.append)
    assert all(f"gate of {m} is up to date" in "\n".join(logs) for m in ("served", "base", "general"))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # `tunebook plan` says what a rerun would answer again: with other chat settings, only the chat sampler's answers
    def plan_rows(sets=()):
        console = Console(width=400, record=True)
        console.print(rerun_table(load_recipe(recipe_file, list(sets)), None))
        return [line for line in console.export_text().splitlines() if "gate: " in line]

    assert all("reuse" in row for row in plan_rows()) and len(plan_rows()) == 3
    served_row, base_row, general_row = plan_rows(["chat.temperature=0.3"])
    assert "answer chat" in served_row and "changed: sampling; greedy answers kept from before" in served_row
    assert "reuse" in base_row and "reuse" in general_row
    assert "answer greedy, chat" in plan_rows(["stages.1.train.learning_rate=1e-3"])[0]  # vet trains again
    _, base_row, general_row = plan_rows(["stages.0.train.learning_rate=1e-3"])  # general trains again: the base
    assert "reuse" in base_row and "answer greedy" in general_row                # model is the same

    # the chat's settings changed (`chat:`): the stages and the export are kept, and only the served model answers
    # again, its chat answers drawn with them
    logs.clear()
    train_recipe(load_recipe(recipe_file, ["chat.temperature=0.3"]), log=logs.append)
    text = "\n".join(logs)
    assert "stage general: reuse" in text and "stage vet: reuse" in text, text
    assert "export is up to date" in text and "gate of served is up to date" not in text
    assert all(f"gate of {m} is up to date" in text for m in ("base", "general"))
    assert json.loads(run.gate_file("served").read_text())["chat"]["sampling"]["temperature"] == 0.3
    assert "gate of served: greedy answers were made from the same model and settings before" in text
    assert "answered by the served GGUF (chat" in text and "answered by the served GGUF (greedy" not in text
    # back to the recipe's own settings: every part of the served gate was kept, nothing is answered again
    logs.clear()
    train_recipe(load_recipe(recipe_file), log=logs.append)
    text = "\n".join(logs)
    assert "gate of served: greedy, chat answers were made from the same model and settings before" in text
    assert "evaluation questions answered by" not in text
    assert "read kept answers" in plan_rows(["chat.temperature=0.3"])[0]  # both settings' answers are kept now
    assert json.loads(run.gate_file("served").read_text()) | {"seconds": 0} == served | {"seconds": 0}

    # a changed evaluation set is answered again; the export is kept
    EVAL[1]["forbid"] = ["too thin"]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVAL))
    logs.clear()
    train_recipe(load_recipe(recipe_file), log=logs.append)
    text = "\n".join(logs)
    assert "export is up to date" in text and "gate of served is up to date" not in text

    # a topic label edited alone keeps every answer, and report.md counts them by the new label
    EVAL[2]["topic"] = "skin"
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVAL))
    logs.clear()
    train_recipe(load_recipe(recipe_file), log=logs.append)
    assert all(f"gate of {m} is up to date" in "\n".join(logs) for m in ("served", "base", "general"))
    by_topic = run.report.read_text().split("The served GGUF by the set's topics", 1)[1]
    assert "| skin | greedy | 1 |" in by_topic and "| care | greedy | 1 |" in by_topic
    assert "| toxins | chat sampler | 1 |" in by_topic

    # another exported type leaves the served one as it was: base and general are not measured again
    recipe_file.write_text(recipe_file.read_text().replace("export: {quantization: q8_0}",
                                                           "export: {quantization: [q8_0, q4_k_m]}"))
    assert all("reuse" in row for row in plan_rows())  # the new type is made; the served one is not
    good = (tmp_path / "eval.jsonl").read_text()
    (tmp_path / "eval.jsonl").write_text("not json\n")
    [row] = plan_rows()
    assert "gate: evaluation set" in row and "cannot tell" in row and "eval.jsonl:1: not valid JSON" in row
    (tmp_path / "eval.jsonl").write_text(good)
    logs.clear()
    train_recipe(load_recipe(recipe_file), log=logs.append)
    assert all(f"gate of {m} is up to date" in "\n".join(logs) for m in ("base", "general"))

    # a llama.cpp type served: the base model is measured through a GGUF quantized by llama.cpp the same way
    recipe_file.write_text(recipe_file.read_text().replace("[q8_0, q4_k_m]", "[q4_k_m, q8_0]"))
    with stage_gguf(load_recipe(recipe_file), run, "base", log=lambda m: None) as gguf:
        types = {t.qtype.name for t in read_table(gguf)[1]}
        assert gguf.name == "base-q4_k_m.gguf" and types & {"Q4_K", "Q5_0", "Q6_K", "IQ4_NL"}
    assert not list(run.gate_dir.glob("*.gguf")) and not run.gate_quantize_source("base").exists()  # both gone

    # another run on the same base, set and settings reads the base model's answers kept on this machine
    twin = recipe_file.with_name("twin.yaml")
    twin.write_text(recipe_file.read_text().replace("name: gated", "name: gated-twin")
                    .replace("[q4_k_m, q8_0]", "q8_0"))  # served as the first run's base gate was measured
    logs.clear()
    train_recipe(load_recipe(twin), log=logs.append)
    twin_run = RunDir.of(load_recipe(twin))
    assert "gate of base: the same measurement was made on this machine before" in "\n".join(logs)
    assert "gate of general is up to date" not in "\n".join(logs)  # its own stage: measured
    assert json.loads(twin_run.gate_file("base").read_text()) == json.loads(run.gate_file("base").read_text())
    assert twin_run.made_from(twin_run.gate_file("base")) == run.made_from(run.gate_file("base"))

    # `tunebook compare` puts the served models' gates side by side, and says when the sets differ
    report = write_compare_report([run, twin_run], tmp_path / "compare").read_text()
    section = report.split("## Evaluation gate: the served models on questions never trained on", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| gated")]
    assert [r.split(" | ")[2] for r in rows] == ["greedy", "chat sampler (temperature 0.7, top-p 0.9, top-k 40, "
                                                 "repeat penalty 1.1, seed 0)"] * 2, rows
    served_now = json.loads(run.gate_file("served").read_text())["greedy"]["summary"]
    assert f"| {served_now['stopped']}/3 (" in rows[0] and "do not compare" not in section
    other = served_gate(twin_run)[0] | {"digest": "another set"}
    assert "do not compare" in gate_comparison(served_gate(run) + [other])

    # `tunebook gc`: kept answers of a served GGUF that was rewritten since can never be read again; the others stay
    kept = {p: json.loads(p.read_text())["inputs"]["model"] for p in run.gate_kept_dir.glob("*.json")}
    served_parts = {p for p, model in kept.items() if isinstance(model, list)}
    assert served_parts and len(served_parts) < len(kept)
    assert not [p for p in run.garbage(["general", "vet"]) if "kept" in p.parts]
    for name in {model[0] for model in map(kept.get, served_parts)}:
        os.utime(run.path / name, ns=((run.path / name).stat().st_atime_ns, time.time_ns()))  # written again
    assert {p for p in run.garbage(["general", "vet"]) if "kept" in p.parts} == served_parts
