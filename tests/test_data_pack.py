"""Packing: rows fill well, samples never see each other, and the packed loss is the unpacked loss."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from data_support import conversation
from runner.data.pack import make_collator, pack_examples, packing_efficiency, plan_bins
from eval.labels import IGNORE_INDEX as IGNORE
from runner.data.templates import resolve_chat_template
from runner.data.tokenize import tokenize_conversations
from tiny_models import make_tiny_llama, make_tokenizer

MAX = 256


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("llama")
    make_tiny_llama(folder, tok)
    return folder


@pytest.fixture(scope="module")
def examples(tok):
    convs = [conversation(f"Question {i}: what should I feed my cat?", "Fresh water and a balanced diet. " * (1 + i % 4),
                          "Thank you.", "Hello! " * (1 + i % 3)) for i in range(7)]
    template = resolve_chat_template("llama-3", tok)
    return tokenize_conversations(convs, template, tok, train_on="assistant", max_length=MAX,
                                  truncation="truncate").examples


def load(model_dir, attn):
    return LlamaForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32).eval()


def unpacked_mean_loss(model, examples) -> float:
    total, count = 0.0, 0
    for e in examples:
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
        n = int((labels[:, 1:] != IGNORE).sum())
        with torch.no_grad():
            total += float(model(input_ids=ids, labels=labels, use_cache=False).loss) * n
        count += n
    return total / count


def test_plan_bins_is_deterministic_and_fits():
    lengths = [100, 240, 60, 140, 256, 20, 128, 128, 10, 180]
    bins = plan_bins(lengths, MAX)
    assert bins == plan_bins(lengths, MAX)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= MAX for b in bins)
    assert len(bins) <= -(-sum(lengths) // MAX) + 1  # within one row of the lower bound
    rows, eff = packing_efficiency(lengths, MAX)
    assert rows == len(bins) and eff == pytest.approx(sum(lengths) / (rows * MAX))


def test_packed_rows_restart_positions_and_mask_boundaries(examples):
    rows = pack_examples(examples, MAX)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)
    for row in rows:
        assert len(row["input_ids"]) <= MAX
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert starts[0] == 0 and len(starts) >= 1
        assert all(row["labels"][s] == IGNORE for s in starts)


def test_collators_shapes(tok, examples):
    plain = make_collator(tok, packing=False, max_length=MAX)(examples[:3])
    width = max(len(e["input_ids"]) for e in examples[:3])
    assert plain["input_ids"].shape == (3, width) and "position_ids" not in plain
    assert int(plain["attention_mask"].sum()) == sum(len(e["input_ids"]) for e in examples[:3])
    assert (plain["labels"][plain["attention_mask"] == 0] == IGNORE).all()

    collate = make_collator(tok, packing=True, max_length=MAX)
    packed = collate(examples)
    assert "attention_mask" not in packed and packed["input_ids"].shape[1] <= MAX
    assert packed["input_ids"].shape[0] < len(examples)
    assert 0.5 < collate.efficiency <= 1.0


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_equals_unpacked_loss(model_dir, tok, examples, attn):
    model = load(model_dir, attn)
    expected = unpacked_mean_loss(model, examples)
    for batch in (make_collator(tok, True, MAX)(pack_examples(examples, MAX)),  # packed ahead of time
                  make_collator(tok, True, MAX)(examples)):                     # packed by the collator
        with torch.no_grad():
            packed = float(model(**batch, use_cache=False).loss)
        assert abs(packed - expected) < 1e-4
    padded = make_collator(tok, False, MAX)(examples)
    with torch.no_grad():
        assert abs(float(model(**padded, use_cache=False).loss) - expected) < 1e-4


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_samples_do_not_attend_to_each_other(model_dir, tok, examples, attn):
    model = load(model_dir, attn)
    a, b = examples[0], examples[1]
    row = pack_examples([a, b], MAX)
    assert len(row) == 1
    batch = make_collator(tok, True, MAX)(row)
    n_first = batch["position_ids"][0].tolist().index(0, 1)  # where the second sample starts
    changed = batch["input_ids"].clone()
    changed[0, 1:n_first] = (changed[0, 1:n_first] + 7) % len(tok)  # rewrite the first sample
    with torch.no_grad():
        before = model(**batch, use_cache=False).logits[0, n_first:]
        after = model(input_ids=changed, position_ids=batch["position_ids"], use_cache=False).logits[0, n_first:]
        leaky = model(input_ids=changed, attention_mask=torch.ones_like(changed), use_cache=False).logits[0, n_first:]
        plain = model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(changed), use_cache=False).logits[0, n_first:]
    assert torch.allclose(before, after, atol=1e-5)        # the second sample does not see the first
    assert not torch.allclose(plain, leaky, atol=1e-3)    # while one causal sequence would
