"""Tiny models for the GGUF tests, made from nothing but local text: a Llama with a byte-level BPE
(Llama 3 style) and a Gemma 3 with a SentencePiece-style BPE (byte fallback, "▁" for spaces).

Each is briefly trained (a second or two on one thread): on the probe text, so its predictions are
confident as a real model's are, and on one chat reply, so llama.cpp's chat path can be checked end to
end: with the template from the file the model answers REPLY and then its end-of-turn token.
"""
from __future__ import annotations

import json
import textwrap
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from runner.export.gguf_verify import DEFAULT_PROBE
from runner.export.gguf_vocab import LLAMA3_SPLIT

QUESTION = "Can my dog eat grapes?"
REPLY = "No. Grapes can hurt a dog's kidneys."
END_OF_TURN = {"LlamaForCausalLM": "<|eot_id|>", "Gemma3ForCausalLM": "<end_of_turn>"}

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}<|eot_id|>"
    "{% endgeneration %}{% else %}{{ message['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if role == 'model' %}{% generation %}{{ message['content'] | trim }}<end_of_turn>{% endgeneration %}"
    "{% else %}{{ message['content'] | trim }}<end_of_turn>{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def local_text() -> list[str]:
    """A few KB of text that ships with Python, plus the probe and the reply so they tokenize well."""
    source = Path(textwrap.__file__).read_text(encoding="utf-8")[:12000]
    return [DEFAULT_PROBE, QUESTION, REPLY] * 3 + source.splitlines()


# --- tokenizers -------------------------------------------------------------------------------------

def llama_tokenizer(vocab_size: int = 600):
    """Byte-level BPE with the Llama 3 split regex, Llama 3 special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(local_text(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", tk.token_to_id("<|begin_of_text|>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>", chat_template=LLAMA3_TEMPLATE)


def gemma_tokenizer(vocab_size: int = 700):
    """Gemma's tokenizer class over a BPE trained here: byte fallback, "▁" for spaces, no prefix space."""
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    tk.train_from_iterator(local_text(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials + byte_tokens))
    spec = json.loads(tk.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    return GemmaTokenizer(vocab=spec["vocab"], merges=merges, extra_special_tokens=specials[5:], add_bos_token=True,
                          chat_template=GEMMA_TEMPLATE)


# --- models -----------------------------------------------------------------------------------------

def tiny_llama(tokenizer, seed: int = 0, hidden_size: int = 64, intermediate_size: int = 176):
    """Llama 3.1-style: GQA, llama3 rope scaling (rope_freqs), an FFN width Q8_0 cannot block (F16).
    `hidden_size=256, intermediate_size=512`: rows the K-quants' 256-value blocks divide (llama.cpp types)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4, max_position_embeddings=512,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        rms_norm_eps=1e-5, initializer_range=0.1, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return randomize_norms(LlamaForCausalLM(config), seed)


def tiny_gemma3(tokenizer, seed: int = 0):
    """Gemma 3-style: 5 sliding layers then 1 global, a local and a global rope base, linear rope
    scaling on the global layer, q/k norms, tied embeddings."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=16, max_position_embeddings=512, initializer_range=0.1,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.architectures = ["Gemma3ForCausalLM"]
    return randomize_norms(Gemma3ForCausalLM(config), seed)


def randomize_norms(model, seed: int):
    """Norm weights that are not all one value, on a 1/1024 grid so Gemma's +1 / -1 is exact in float32."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(p + torch.round(torch.randn(p.shape, generator=g) * 0.2 * 1024) / 1024)
    return model


def teach(model, tokenizer, steps: int = 30) -> None:
    """Make the random model a (tiny) trained one: learn the probe text, and REPLY plus the end-of-turn
    token after the templated QUESTION.

    Label smoothing keeps the logits moderate, and the output is then halved: llama.cpp rounds
    activations to f16 (about 1e-3 of a logit), and the F16 check allows 0.01 absolute. Argmax and
    greedy replies do not change. Norm weights stay on their 1/1024 grid (see `randomize_norms`).
    """
    probe = tokenizer(DEFAULT_PROBE)["input_ids"][:256]
    chat = [{"role": "user", "content": QUESTION}]
    prompt = tokenizer(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)["input_ids"]
    full = tokenizer(tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": REPLY}], tokenize=False),
                     add_special_tokens=False)["input_ids"]
    assert full[: len(prompt)] == prompt
    end = full.index(tokenizer.convert_tokens_to_ids(END_OF_TURN[type(model).__name__]), len(prompt))
    reply = full[: end + 1]
    batches = [(probe, probe), (reply, [-100] * len(prompt) + reply[len(prompt):])]
    params = [p for n, p in model.named_parameters() if not n.endswith("norm.weight")]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = 0.0
        for ids, labels in batches:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            loss = loss + F.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=-100, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        if model.config.tie_word_embeddings:  # Gemma: halve the final norm's (1 + w), exact on the grid
            model.model.norm.weight.copy_(0.5 * model.model.norm.weight - 0.5)
        else:
            model.lm_head.weight.mul_(0.5)


def save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build(kind: str, path: Path, **config) -> Path:
    """Tokenizer, model, training, save: the folder a merge step would hand to the GGUF writer.
    `kind` is "llama" or "gemma"; `config`: sizes for the model maker."""
    makers = {"llama": (llama_tokenizer, tiny_llama), "gemma": (gemma_tokenizer, tiny_gemma3)}
    make_tokenizer, make_model = makers[kind]
    with one_thread():
        tokenizer = make_tokenizer()
        model = make_model(tokenizer, **config)
        teach(model, tokenizer)
    return save(model, tokenizer, path)


@contextmanager
def one_thread():
    """Small models train several times faster on one thread than on two cores shared with others."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def chat_reply(gguf_path: Path, question: str) -> dict:
    """One greedy chat turn in llama-cpp-python, with whatever template it picks from the file."""
    from chat.llama_runtime import open_llama

    llm = open_llama(gguf_path, n_ctx=256, n_threads=1, verbose=False)
    try:
        out = llm.create_chat_completion(messages=[{"role": "user", "content": question}],
                                         temperature=0.0, max_tokens=32)
        choice = out["choices"][0]
        return {"chat_format": llm.chat_format, "content": choice["message"]["content"],
                "finish_reason": choice["finish_reason"]}
    finally:
        llm.close()
