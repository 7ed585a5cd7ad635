"""Several sources and replay in one stage: weights count trained tokens, draws are seeded, replay never sees a
validation split, every source keeps its validation set, and packing mixed rows keeps the loss exact."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
from rich.console import Console
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

from data_support import write_jsonl
from eval.labels import IGNORE_INDEX as IGNORE
from runner.data.mix import MAX_REPEATS, draw, trained_tokens
from runner.data.pack import make_collator, pack_examples
from runner.data.prepare import prepare_stage
from runner.cli import app
from runner.data.report import render_mix
from runner.errors import TunebookError
from runner.recipe import load_recipe
from tiny_models import make_tiny_llama, make_tokenizer

MAX = 256


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def rows(n: int, topic: str, reply_words: int) -> list[dict]:
    """n conversations whose replies are about reply_words words long (so tokens and samples disagree)."""
    return [{"messages": [{"role": "user", "content": f"{topic} question {i}?"},
                          {"role": "assistant", "content": " ".join([f"{topic}{i % 5}"] * (reply_words + i % 3))}]}
            for i in range(n)]


def mixed_recipe(folder, vet_data: str, *, seed: int = 7, extra: str = "", base: str = "tiny"):
    write_jsonl(folder / "general.jsonl", rows(120, "cats", 6))
    write_jsonl(folder / "vet.jsonl", rows(60, "dogs", 30))
    write_jsonl(folder / "extra.jsonl", rows(40, "birds", 3))
    text = textwrap.dedent(f"""\
        name: mix
        seed: {seed}
        model: {{base: {base}, chat_template: llama-3, max_seq_length: {MAX}}}
        data: {{format: messages}}
        stages:
          - name: general
            data: {{source: general.jsonl, val_size: 10}}
            train: {{max_steps: 1}}
          - name: vet
            data:
        """) + textwrap.indent(textwrap.dedent(vet_data), " " * 6) + "    train: {max_steps: 1" + extra + "}\n"
    path = folder / "recipe.yaml"
    path.write_text(text)
    return load_recipe(path)


def prepare(recipe, tok, cache, stage="vet"):
    return prepare_stage(recipe, recipe.stage(stage), tok, cache_dir=cache, log=lambda m: None)


TWO_SOURCES = """\
- {source: vet.jsonl, val_size: 6, weight: 0.7}
- {source: extra.jsonl, val_size: 4, weight: 0.3}
"""
REPLAY = """\
- {source: vet.jsonl, val_size: 6}
- {stage: general, weight: 0.2}
"""


def test_weights_are_shares_of_trained_tokens(tmp_path, tok):
    data = prepare(mixed_recipe(tmp_path, TWO_SOURCES), tok, tmp_path / "c")
    vet, extra = data.mix.parts
    assert (vet.name, extra.name) == ("vet", "extra")
    # the first item is used whole, once; the second gets 0.3 of the trained tokens, to within half a sample
    assert vet.samples == vet.pool == 54 and vet.trained == vet.pool_trained
    total = vet.trained / 0.7
    assert abs(extra.trained - 0.3 * total) <= max(trained_tokens(s) for s in data.train) / 2
    by_samples, by_tokens = data.mix.shares()["extra"]
    assert by_tokens == pytest.approx(0.3, abs=0.02)
    assert by_samples > by_tokens + 0.1  # its replies are shorter: more samples for the same tokens
    # the tags count what each item put in the training set
    tagged = {j: sum(trained_tokens(s) for s in data.train if s["source"] == j) for j in (0, 1)}
    assert tagged == {0: vet.trained, 1: extra.trained}
    assert len(data.train) == vet.samples + extra.samples


def test_a_small_item_is_repeated_and_a_too_small_one_is_an_error(tmp_path, tok):
    recipe = mixed_recipe(tmp_path, """\
        - {source: vet.jsonl, val_size: 0, weight: 0.8}
        - {source: extra.jsonl, val_size: 0, weight: 0.2, max_samples: 30}
        """)
    data = prepare(recipe, tok, tmp_path / "c")
    extra = data.mix.parts[1]
    assert 1 < extra.repeats <= MAX_REPEATS and extra.samples > extra.pool
    assert extra.trained / data.mix.trained == pytest.approx(0.2, abs=0.02)
    recipe = mixed_recipe(tmp_path, """\
        - {source: vet.jsonl, val_size: 0, weight: 0.8}
        - {source: extra.jsonl, val_size: 0, weight: 0.2, max_samples: 5}
        """)
    with pytest.raises(TunebookError) as err:
        prepare(recipe, tok, tmp_path / "c")
    text = str(err.value)
    assert "recipe.yaml:12:" in text and "stages.1.data.1.weight" in text and "too small for its share" in text
    assert f"more than {MAX_REPEATS:g}" in text and "fix:" in text


def test_replay_draws_only_from_the_earlier_training_split_and_is_seeded(tmp_path, tok):
    recipe = mixed_recipe(tmp_path, REPLAY)
    general = prepare(recipe, tok, tmp_path / "c", "general")
    vet = prepare(recipe, tok, tmp_path / "c")
    key = lambda s: (tuple(s["input_ids"]), tuple(s["labels"]))  # noqa: E731
    replayed = [key(s) for s in vet.train if s["source"] == 1]
    assert replayed and set(replayed) <= {key(s) for s in general.train}
    assert not set(replayed) & {key(s) for s in general.val}
    # its share: the rest (0.8) for vet, 0.2 for the replay, counted in trained tokens
    assert vet.mix.parts[0].weight == pytest.approx(0.8) and vet.mix.parts[1].kind == "replay of general"
    assert vet.mix.shares()["replay-general"][1] == pytest.approx(0.2, abs=0.02)
    assert list(vet.val_sets) == ["vet"] and vet.mix.parts[1].val == 0  # replay brings no validation set
    again = prepare(mixed_recipe(tmp_path, REPLAY), tok, tmp_path / "c2")
    assert again.train == vet.train  # same seed: the same draw, the same order
    other = prepare(mixed_recipe(tmp_path, REPLAY, seed=8), tok, tmp_path / "c3")
    assert {key(s) for s in other.train if s["source"] == 1} != set(replayed)


def test_draw_comes_closest_to_its_tokens():
    counts = [10] * 20
    assert len(draw(counts, 54, "s")) == 5 and len(draw(counts, 56, "s")) == 6
    chosen = draw(counts, 230, "s")  # one whole pass, then a seeded part of a second
    assert len(chosen) == 23 and sorted(chosen[:20]) == list(range(20))
    assert len(set(chosen[20:])) == 3 and draw(counts, 230, "s") == chosen != draw(counts, 230, "t")
    uneven = [50] * 10 + [3] * 10  # long and short samples: within half of the shortest sample left
    for seed in "abcdef":
        picks = draw(uneven, 106, seed)
        left = set(range(20)) - set(picks)
        assert abs(sum(uneven[i] for i in picks) - 106) <= min(uneven[i] for i in left) / 2
    assert sum(uneven[i] for i in draw(uneven, 106, "b")) == 106


def test_every_source_keeps_its_validation_set(tmp_path, tok):
    data = prepare(mixed_recipe(tmp_path, TWO_SOURCES), tok, tmp_path / "c")
    assert list(data.val_sets) == ["vet/vet", "vet/extra"]
    assert [len(v) for v in data.val_sets.values()] == [6, 4] and len(data.val) == 10
    assert [p.column for p in data.mix.parts] == ["vet/vet", "vet/extra"]
    assert [r.source for r in data.reports] == ["vet.jsonl", "extra.jsonl"]
    console = Console(record=True, width=220)
    console.print(render_mix("vet", data.mix))
    shown = console.export_text()
    assert "share of trained tokens" in shown and "54 of 54" in shown and "vet/extra" in shown


def test_a_one_item_list_is_the_same_stage_as_a_mapping(tmp_path, tok):
    listed = prepare(mixed_recipe(tmp_path, "- {source: vet.jsonl, val_size: 6}\n"), tok, tmp_path / "c")
    mapping = mixed_recipe(tmp_path, "{source: vet.jsonl, val_size: 6}\n")
    plain = prepare(mapping, tok, tmp_path / "c")
    assert listed.train == plain.train and listed.val == plain.val and list(plain.val_sets) == ["vet"]
    assert "source" not in plain.train[0]  # one source: its samples as they are


def test_packed_mixed_rows_keep_the_unpacked_loss_and_count_each_item(tmp_path, tok):
    data = prepare(mixed_recipe(tmp_path, REPLAY), tok, tmp_path / "c")
    batch = data.train[:12]
    rows = pack_examples(batch, MAX)
    assert any(len(set(r["sources"])) > 1 for r in rows)  # items share rows
    collator = make_collator(tok, packing=True, max_length=MAX, sources=2)
    packed = collator(rows)
    expected = [sum(trained_tokens(s) for s in batch if s["source"] == j) for j in (0, 1)]
    assert packed.pop("source_tokens").tolist() == expected
    make_tiny_llama(tmp_path / "llama", tok)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in batch:
            labels = torch.tensor([s["labels"]])
            n = int((labels[:, 1:] != IGNORE).sum())
            total += float(model(input_ids=torch.tensor([s["input_ids"]]), labels=labels, use_cache=False).loss) * n
            count += n
        loss = float(model(**packed, use_cache=False).loss)
    assert loss == pytest.approx(total / count, rel=1e-4)


def test_unpacked_batches_count_each_item_too(tmp_path, tok):
    data = prepare(mixed_recipe(tmp_path, REPLAY), tok, tmp_path / "c")
    batch = make_collator(tok, packing=False, max_length=MAX, sources=2)(data.train[:8])
    expected = [sum(trained_tokens(s) for s in data.train[:8] if s["source"] == j) for j in (0, 1)]
    assert batch["source_tokens"].tolist() == expected
    assert "source_tokens" not in make_collator(tok, packing=False, max_length=MAX)(data.train[:8])


def test_the_data_section_digest_covers_replay(tmp_path, tok):
    recipe = mixed_recipe(tmp_path, REPLAY)
    section = [item.model_dump(mode="json") for item in recipe.stage("vet").data_items()]
    assert section[1] == {"stage": "general", "weight": 0.2, "name": "replay-general"}
    assert json.dumps(section)  # plain data: digestible as a whole


def test_plan_and_data_show_samples_and_trained_tokens_per_item(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBOOK_CACHE", str(tmp_path / "cache"))
    make_tokenizer(tmp_path / "tok")
    three = TWO_SOURCES.replace("weight: 0.3", "weight: 0.2") + "- {stage: general, weight: 0.1}\n"
    path = mixed_recipe(tmp_path, three, base=str(tmp_path / "tok")).path
    # --schema-only: the base here is a tokenizer alone, which the preflight (rightly) refuses as a model
    plan = CliRunner().invoke(app, ["plan", str(path), "--schema-only"], env={"COLUMNS": "200"})
    assert plan.exit_code == 0, plan.output
    out = plan.output
    assert "stage vet: training mix" in out and "replay of general" in out and "samples (of its pool)" in out
    assert "0.7 vet.jsonl + 0.2 extra.jsonl + 0.1 replay of general" in out
    assert "54 of 54" in out and "(vet/extra)" in out and "packed rows" in out
    data = CliRunner().invoke(app, ["data", str(path), "--stage", "vet"], env={"COLUMNS": "200"})
    assert data.exit_code == 0, data.output
    assert "stage vet, source vet" in data.output and "stage vet, source extra" in data.output
    assert "stage vet: training mix" in data.output


def test_package_and_hub_sources_mix_like_local_files(tmp_path, tok, monkeypatch):
    import datasets

    package = tmp_path / "pkg" / "birds_data"  # an installed package that ships its data
    write_jsonl(package / "birds.jsonl", rows(40, "birds", 3))
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    hub_rows = rows(50, "fish", 8)  # the hub cannot be reached here: datasets.load_dataset is replaced
    monkeypatch.setattr(datasets, "load_dataset", lambda name, subset=None, split=None: datasets.Dataset.from_list(hub_rows))
    data = prepare(mixed_recipe(tmp_path, """\
        - {source: vet.jsonl, val_size: 6, weight: 0.6}
        - {source: "package:birds_data", val_size: 4, weight: 0.2}
        - {source: someone/fish, val_size: 5, weight: 0.2}
        """), tok, tmp_path / "c")
    assert [p.name for p in data.mix.parts] == ["vet", "birds_data", "fish"]
    shares = data.mix.shares()
    assert shares["birds_data"][1] == pytest.approx(0.2, abs=0.02) and shares["fish"][1] == pytest.approx(0.2, abs=0.02)
    assert list(data.val_sets) == ["vet/vet", "vet/birds_data", "vet/fish"]
    assert [len(v) for v in data.val_sets.values()] == [6, 4, 5]


def test_the_data_identity_changes_with_any_item_and_with_the_replayed_data(tmp_path):
    """The data part of a stage's fingerprint: every item of its data section, and the content of the sources a
    replay item draws from (an edit to the replayed stage's data changes this stage's data too)."""
    from runner.train.fingerprint import data_identity

    def identity(recipe):
        return json.dumps(data_identity(recipe.stage("vet").model_dump(mode="json")["data"], recipe), sort_keys=True)

    recipe = mixed_recipe(tmp_path, REPLAY)
    first = identity(recipe)
    assert identity(load_recipe(recipe.path)) == first
    assert identity(load_recipe(recipe.path, ["stages.1.data.1.weight=0.25"])) != first
    with (tmp_path / "general.jsonl").open("a") as f:  # the replayed stage's source changes
        f.write(json.dumps(rows(1, "cats", 6)[0]) + "\n")
    assert identity(recipe) != first
