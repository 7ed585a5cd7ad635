"""The Ollama Modelfile beside each GGUF: its TEMPLATE renders the prompt text the chat renders with the Jinja
template, for single- and multi-turn conversations. Ollama cannot run here: its Modelfile parser and the Go
template subset are ported in tests/ollama_support.py, and its chat data (the Modelfile's SYSTEM as the first
message, BOS added by the tokenizer) is built as its server builds it."""
from __future__ import annotations

import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from ollama_support import ollama_messages, parse_modelfile, render_go

from chat.engine import ChatEngine, Sampling
from chat.templates import END_OF_TURN, strip_generation_markers, template_names, template_text
from runner.export.modelfile import OLLAMA_TEMPLATES, chat_format, modelfile_text

BOS = {"gemma": "<bos>", "llama-3": "<|begin_of_text|>", "chatml": ""}
SYSTEM = "You are VetAI, a careful assistant for pet owners."
CONVERSATIONS = {
    "single turn": [{"role": "user", "content": "My dog ate a grape. What should I do?"}],
    "multi turn": [{"role": "user", "content": "Is chocolate toxic to cats?"},
                   {"role": "assistant", "content": "Yes. Theobromine is toxic to cats."},
                   {"role": "user", "content": "How much is dangerous?"},
                   {"role": "assistant", "content": "Even a little. Call your vet."},
                   {"role": "user", "content": "Thanks!\nAnd for a 4 kg cat?"}],
    "own system prompt": [{"role": "system", "content": "Answer in one sentence."},
                          {"role": "user", "content": "Can rabbits eat lettuce?"},
                          {"role": "assistant", "content": "Romaine, in small amounts."},
                          {"role": "user", "content": "Iceberg?"}],
}


def chat_prompt(name: str, messages: list[dict]) -> str:
    """The prompt text the chat (llama-cpp-python's Jinja formatter, as chat/engine.py uses it) renders."""
    formatter = Jinja2ChatFormatter(template=strip_generation_markers(template_text(name)), eos_token="",
                                    bos_token=BOS[name])
    return formatter(messages=messages).prompt


def modelfile(name: str, system: str | None = SYSTEM) -> dict:
    text, fmt = modelfile_text(f"run-{name}-q4_k_m.gguf", template_text(name), system, adds_bos=bool(BOS[name]))
    assert fmt == name
    commands = parse_modelfile(text)
    return {"commands": commands, **{k: v for k, v in commands}}


def test_every_named_template_has_an_ollama_twin():
    assert set(template_names()) <= set(OLLAMA_TEMPLATES)


@pytest.mark.parametrize("name", sorted(OLLAMA_TEMPLATES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_modelfile_template_renders_like_the_jinja_template(name, conversation):
    messages = CONVERSATIONS[conversation]
    mf = modelfile(name)
    # what the chat serves: the run's system prompt first, unless the conversation brings its own
    served = messages if messages[0]["role"] == "system" else [{"role": "system", "content": SYSTEM}] + messages
    # Ollama: the tokenizer adds BOS (the GGUF says add_bos_token), the template writes the rest
    assert BOS[name] + render_go(mf["template"], ollama_messages(messages, mf["system"])) == chat_prompt(name, served)


@pytest.mark.parametrize("name", sorted(OLLAMA_TEMPLATES))
def test_without_a_system_prompt_too(name):
    mf = modelfile(name, system=None)
    assert "system" not in mf
    messages = CONVERSATIONS["multi turn"]
    assert BOS[name] + render_go(mf["template"], ollama_messages(messages, None)) == chat_prompt(name, messages)


@pytest.mark.parametrize("name", ["gemma", "llama-3"])
def test_a_gguf_that_adds_no_bos_gets_it_from_the_template(name):
    # self-trained tokenizers often add no BOS on their own: then Ollama adds none, and the TEMPLATE writes it
    text, _ = modelfile_text("x.gguf", template_text(name), SYSTEM, adds_bos=False, bos_token=BOS[name])
    mf = dict(parse_modelfile(text))
    messages = CONVERSATIONS["multi turn"]
    assert render_go(mf["template"], ollama_messages(messages, SYSTEM)) == chat_prompt(
        name, [{"role": "system", "content": SYSTEM}] + messages)


@pytest.mark.parametrize("name", sorted(OLLAMA_TEMPLATES))
def test_modelfile_names_the_file_system_prompt_stops_and_the_chat_sampling(name):
    mf = modelfile(name)
    assert mf["model"] == f"./run-{name}-q4_k_m.gguf"
    assert mf["system"] == SYSTEM
    stops = [v for k, v in mf["commands"] if k == "stop"]
    assert END_OF_TURN[name] in stops and len(stops) == len(set(stops))
    sampling = Sampling()
    assert float(mf["temperature"]) == sampling.temperature and float(mf["top_p"]) == sampling.top_p
    assert int(mf["top_k"]) == sampling.top_k and float(mf["repeat_penalty"]) == sampling.repeat_penalty
    assert int(mf["num_predict"]) == sampling.max_tokens
    assert int(mf["num_ctx"]) == 2048 == ChatEngine.__init__.__defaults__[0]


def test_the_run_template_is_matched_by_what_it_renders():
    # the run's template as training saved it, {% generation %} markers and all, is the gemma one
    assert chat_format(template_text("gemma")) == "gemma"
    # a template that writes another format is none of them: no TEMPLATE line, Ollama picks one
    other = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    assert chat_format(other) is None
    text, fmt = modelfile_text("x-q8_0.gguf", other, SYSTEM, adds_bos=True)
    assert fmt is None and "template" not in dict(parse_modelfile(text))


def test_go_renderer_and_parser_follow_go_and_ollama():
    # trimming markers, variables assigned inside range, nested if/else if
    tpl = ('{{- $n := 0 }}{{ range $i, $m := .Messages -}}\n  {{ if eq $m.Role "user" }}U{{ else if eq $m.Role '
           '"assistant" }}A{{ else }}S{{ end }}{{ $n = $i }}{{ end }} last={{ $n }}')
    data = ollama_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                            {"role": "assistant", "content": "c"}], "sys")
    assert [m["Content"] for m in data["Messages"]] == ["sys", "a\n\nb", "c"]  # collated like Ollama
    assert render_go(tpl, data) == "SUA last=2"
    parsed = parse_modelfile('FROM ./m.gguf\n# note\nTEMPLATE """a\n{{ .X }} b\n"""\nPARAMETER stop "<e>"\n'
                             'PARAMETER temperature 0.7\nSYSTEM plain\n')
    assert parsed == [("model", "./m.gguf"), ("template", "a\n{{ .X }} b\n"), ("stop", "<e>"),
                      ("temperature", "0.7"), ("system", "plain")]
