"""The assistant mask: exactly the assistant replies and their end-of-turn tokens are trained."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from data_support import conversation, make_recipe, prepare, trained_runs, write_jsonl
from chat.templates import TEMPLATE_DIR, has_generation_markers, strip_generation_markers, template_names
from eval.labels import IGNORE_INDEX as IGNORE
from runner.data.render import end_of_turn_token, render_with_spans
from runner.data.templates import resolve_chat_template
from runner.data.tokenize import tokenize_conversations
from runner.errors import TunebookError
from tiny_models import make_tokenizer

CONV = conversation("What should I feed my cat?", "A balanced diet and fresh water.",
                    "How often should I walk my dog?", "Twice a day.",
                    "Thank you.", "Hello! Here is what you can do.", system="Be kind.")
REPLIES = ["A balanced diet and fresh water.", "Twice a day.", "Hello! Here is what you can do."]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def labelled(tok, conv=CONV, train_on="assistant", template=None):
    template = template or resolve_chat_template("llama-3", tok)
    result = tokenize_conversations([conv], template, tok, train_on=train_on, max_length=4096, truncation="truncate")
    return result.examples[0]


def test_trained_tokens_are_exactly_the_replies_and_eot(tok):
    example = labelled(tok)
    assert trained_runs(example, tok) == [r + "<|eot_id|>" for r in REPLIES]


def test_eot_token_is_in_the_labels(tok):
    example = labelled(tok)
    eot = tok.convert_tokens_to_ids(end_of_turn_token("llama-3", tok))
    ids, labels = example["input_ids"], example["labels"]
    ends = [i for i, t in enumerate(ids) if t == eot and labels[i] == eot]
    assert len(ends) == len(REPLIES)  # one trained end-of-turn per reply
    assert labels[-1] == eot


def test_last_assistant_only(tok):
    assert trained_runs(labelled(tok, train_on="last_assistant"), tok) == [REPLIES[-1] + "<|eot_id|>"]


def test_train_on_all(tok):
    example = labelled(tok, train_on="all")
    assert example["labels"][0] == IGNORE  # nothing predicts the first token
    assert example["labels"][1:] == example["input_ids"][1:]


def test_tokenizer_template_without_markers_gives_the_same_mask(tok):
    plain = strip_generation_markers(resolve_chat_template("llama-3", tok))
    assert not has_generation_markers(plain)
    assert labelled(tok, template=plain) == labelled(tok)


@pytest.mark.parametrize("name, eot, reply_prefix", [
    ("chatml", "<|im_end|>", "<|im_start|>assistant\n"),
    ("gemma", "<end_of_turn>", "<start_of_turn>model\n"),
    ("llama-3", "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
])
def test_each_named_template_marks_replies_with_end_of_turn(name, eot, reply_prefix, tmp_path):
    tokenizer = make_tokenizer(tmp_path / name, template=name)
    example = labelled(tokenizer, template=resolve_chat_template(name, tokenizer))
    assert trained_runs(example, tokenizer) == [r + eot for r in REPLIES]
    assert end_of_turn_token(tokenizer.chat_template, tokenizer) == eot
    # the same spans at the text level, after each template's reply header
    fake = SimpleNamespace(bos_token="<BOS>", eos_token="<EOS>", pad_token=None, unk_token=None)
    template = (TEMPLATE_DIR / f"{name}.jinja").read_text()
    text, spans = render_with_spans(template, CONV, fake)
    assert [text[a:b] for a, b in spans] == [r + eot for r in REPLIES]
    assert all(text[:a].endswith(reply_prefix) for a, _ in spans)


def test_gemma_puts_the_system_text_in_the_first_user_turn():
    fake = SimpleNamespace(bos_token="<bos>", eos_token="<eos>", pad_token=None, unk_token=None)
    template = (TEMPLATE_DIR / "gemma.jinja").read_text()
    text, _ = render_with_spans(template, CONV, fake)
    assert text.startswith("<bos><start_of_turn>user\nBe kind.\n\nWhat should I feed my cat?<end_of_turn>\n")
    assert "system" not in text


def test_generation_prompt(tok):
    from runner.data.render import render_text

    template = resolve_chat_template("llama-3", tok)
    text = render_text(template, CONV[:2], tok, add_generation_prompt=True)
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_template_resolution(tmp_path, tok):
    assert set(template_names()) >= {"llama-3", "chatml", "gemma"}
    assert resolve_chat_template(None, tok) == tok.chat_template
    (tmp_path / "mine.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert resolve_chat_template("mine.jinja", tok, base_dir=tmp_path).startswith("{% for")
    with pytest.raises(TunebookError, match="(?s)unknown chat template 'llama3'.*did you mean 'llama-3'.*chatml, gemma, llama-3"):
        resolve_chat_template("llama3", tok)
    with pytest.raises(TunebookError, match="not found"):
        resolve_chat_template("nope.jinja", tok, base_dir=tmp_path)


def test_template_that_does_not_fit_the_tokenizer(tok):
    with pytest.raises(TunebookError, match=r"(?s)'gemma' needs the special token.*<start_of_turn>.*fix: use .*llama-3"):
        resolve_chat_template("gemma", tok)


def test_no_template_anywhere(tmp_path):
    bare = make_tokenizer(tmp_path / "bare")
    bare.chat_template = None
    with pytest.raises(TunebookError, match="no chat template of its own"):
        resolve_chat_template(None, bare)


def test_end_of_turn_token_from_template_text(tok):
    assert end_of_turn_token(resolve_chat_template("llama-3", tok), tok) == "<|eot_id|>"
    assert end_of_turn_token("gemma", tok) == "<end_of_turn>"


def test_prepare_stage_sets_the_template_on_the_tokenizer(tmp_path, tok):
    write_jsonl(tmp_path / "d.jsonl", [{"messages": CONV[1:3]}])
    tok.chat_template = None
    prepare(make_recipe(tmp_path, {"source": "d.jsonl"}, template="llama-3"), tok, tmp_path / "c")
    assert tok.chat_template == resolve_chat_template("llama-3", tok)


def test_template_whose_prefixes_differ_cannot_be_masked_without_markers(tok):
    odd = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}<|eot_id|>{% endfor %}"
    with pytest.raises(TunebookError, match="(?s)no {% generation %} markers.*cannot be located.*named template"):
        labelled(tok, template=odd)


def test_tokenizer_without_offsets_gives_the_same_mask(tok):
    class NoOffsets:  # a "slow" tokenizer: encode() only
        is_fast = False
        bos_token, eos_token, pad_token, unk_token = tok.bos_token, tok.eos_token, tok.pad_token, None

        def encode(self, text, add_special_tokens=False):
            return tok.encode(text, add_special_tokens=add_special_tokens)

    assert labelled(NoOffsets(), template=resolve_chat_template("llama-3", tok)) == labelled(tok)
