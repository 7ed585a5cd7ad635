"""An Ollama Modelfile beside each exported GGUF, so `ollama create NAME -f runs/<name>/<name>-<quant>.Modelfile`
serves the model as `tunebook chat` does: the same prompt text, system prompt, stop markers and sampling.

Ollama renders prompts with a Go template, not the Jinja one inside the GGUF. Each named chat template
(chat/templates/*.jinja) has its Go twin here, written for Ollama's template data: `.Messages` (every
message, the Modelfile's SYSTEM first when the conversation has no system message) with `.Role` and
`.Content`. Ollama adds the BOS token itself when the GGUF says so (tokenizer.ggml.add_bos_token), so the
twin leaves out the `{{ bos_token }}` the Jinja template writes; for a GGUF that does not, the BOS text opens
the TEMPLATE (Ollama reads special tokens in prompt text, as the chat does). Message text is used as sent (Go templates
have no `trim`). The run's template is matched to a twin by rendering both on sample conversations; a template
none renders like gets no TEMPLATE line and a warning (Ollama would then guess one).
"""
from __future__ import annotations

from pathlib import Path

from chat.templates import TURN_MARKERS, strip_generation_markers, template_names, template_text

from .. import atomic
from ..errors import GGUFExportError

# named chat template -> the same prompt as an Ollama Go template (add_generation_prompt always on: Ollama
# renders a prompt for the next assistant reply)
OLLAMA_TEMPLATES = {
    "gemma": (
        '{{ $prefix := "" }}'
        '{{ range $i, $m := .Messages }}'
        '{{ if and (eq $i 0) (eq $m.Role "system") }}{{ $prefix = $m.Content }}'
        '{{ else if eq $m.Role "assistant" }}<start_of_turn>model\n{{ $m.Content }}<end_of_turn>\n{{ $prefix = "" }}'
        '{{ else }}<start_of_turn>{{ $m.Role }}\n{{ if $prefix }}{{ $prefix }}\n\n{{ $prefix = "" }}{{ end }}'
        '{{ $m.Content }}<end_of_turn>\n'
        '{{ end }}{{ end }}<start_of_turn>model\n'
    ),
    "llama-3": (
        '{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}'
        '<|start_header_id|>assistant<|end_header_id|>\n\n'
    ),
    "chatml": (
        '{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
        '<|im_start|>assistant\n'
    ),
}

# conversations a template must render exactly like a named one to be taken for it
PROBES = (
    [{"role": "user", "content": "Is chocolate bad for dogs?"}],
    [{"role": "system", "content": "You are VetAI."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
     {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
     {"role": "assistant", "content": "A2"}, {"role": "user", "content": "Q3"}],
)
BOS = "\x00BOS\x00"  # stands for the tokenizer's BOS text while templates are compared


def render_jinja(template: str, messages: list[dict], bos_token: str = BOS, eos_token: str = "") -> str:
    """A chat template rendered the way transformers and llama-cpp-python render it (generation tags removed)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(strip_generation_markers(template)).render(
        messages=messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=True)


def chat_format(template: str) -> str | None:
    """The named template that renders every probe conversation exactly like `template`, or None."""
    for name in template_names():
        if name not in OLLAMA_TEMPLATES:
            continue
        try:
            if all(render_jinja(template, m) == render_jinja(template_text(name), m) for m in PROBES):
                return name
        except Exception:  # noqa: BLE001 - a template that fails on a probe is simply not this one
            continue
    return None


def stop_markers(template: str) -> list[str]:
    """The turn markers the template writes: where the chat engine stops a reply, and where Ollama must."""
    return [m for m in TURN_MARKERS if m in template]


def sampling_defaults() -> dict[str, float | int]:
    """The chat's own defaults (chat/engine.py), as Ollama parameters."""
    import inspect

    from chat.engine import ChatEngine, Sampling

    s = Sampling()
    return {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "repeat_penalty": s.repeat_penalty,
            "num_predict": s.max_tokens, "num_ctx": inspect.signature(ChatEngine).parameters["n_ctx"].default}


def modelfile_text(gguf_name: str, template: str, system_prompt: str | None, adds_bos: bool,
                   bos_token: str | None = None) -> tuple[str, str | None]:
    """(the Modelfile, the chat format it uses or None). `adds_bos`: the GGUF asks for a BOS token (its text:
    `bos_token`)."""
    fmt = chat_format(template) if template.strip() else None
    lines = [f"# Ollama: ollama create NAME -f {gguf_name.removesuffix('.gguf')}.Modelfile && ollama run NAME",
             f"FROM ./{gguf_name}"]
    if fmt:
        go = OLLAMA_TEMPLATES[fmt]
        if render_jinja(template, PROBES[0]).startswith(BOS) and not adds_bos:
            if not bos_token:
                raise GGUFExportError(f"{gguf_name}: the chat template writes a BOS token, the GGUF does not add "
                                      "one, and the tokenizer names none", "set the tokenizer's bos_token")
            go = bos_token + go  # the GGUF adds no BOS: the template writes it, as the Jinja one does
        lines += [f"# the Go twin of the '{fmt}' chat template embedded in the GGUF", f'TEMPLATE """{go}"""']
    else:
        lines.append("# no TEMPLATE: the GGUF's chat template is none of tunebook's named ones, so Ollama picks one")
    if system_prompt:
        if '"""' in system_prompt:
            raise GGUFExportError('the system prompt contains """, which an Ollama Modelfile cannot hold',
                                  "reword the last stage's data.system_prompt")
        lines.append(f'SYSTEM """{system_prompt}"""')
    for marker in stop_markers(template):
        lines.append(f'PARAMETER stop "{marker}"')
    for key, value in sampling_defaults().items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n", fmt


def write_modelfile(path: Path, gguf: Path, merged: Path, system_prompt: str | None, log=print) -> Path:
    """`path`: the Modelfile for `gguf` (written only when its text changes)."""
    template_file = merged / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else ""
    text, fmt = modelfile_text(gguf.name, template, system_prompt, adds_bos=_adds_bos(gguf),
                               bos_token=_bos_text(merged))
    if not fmt:
        log(f"{path.name}: the chat template is none of {', '.join(OLLAMA_TEMPLATES)}; the Modelfile has no "
            "TEMPLATE (Ollama will guess one)")
    if not path.is_file() or path.read_text() != text:
        atomic.write_text(path, text)
        log(f"Ollama Modelfile: {path}")
    return path


def _bos_text(merged: Path) -> str | None:
    import json

    config = merged / "tokenizer_config.json"
    bos = json.loads(config.read_text()).get("bos_token") if config.is_file() else None
    return bos.get("content") if isinstance(bos, dict) else bos


def _adds_bos(gguf: Path) -> bool:
    from .gguf_table import read_table

    return bool(read_table(gguf)[0].get("tokenizer.ggml.add_bos_token", False))
