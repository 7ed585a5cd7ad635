"""The tokenizer part of a GGUF file, read from the model's own fast tokenizer.

Two kinds, the two llama.cpp tokenizes like Hugging Face does:
  * byte-level BPE (GPT-2, Llama 3): `tokenizer.ggml.model = "gpt2"`, tokens + merges, and a `pre` name
    that selects llama.cpp's split regex (read from the tokenizer's pre-tokenizer, not from a hash of
    known models, so a tokenizer trained here works);
  * SentencePiece-style BPE with byte fallback (Gemma, Llama 2): `"llama"`, tokens + scores. llama.cpp
    merges the adjacent pair whose joined text has the highest score, so each token's score is minus
    the rank of the merge that makes it: the same order Hugging Face applies its merges in.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import gguf
from gguf import TokenType

from chat.templates import END_OF_TURN_TOKENS

from ..errors import GGUFExportError

log = logging.getLogger(__name__)

# Split regexes llama.cpp implements, by its `tokenizer.ggml.pre` name.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}

BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def write_vocab(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int, chat_template: str | None) -> None:
    """Tokens, their types (and scores or merges), special ids and the chat template."""
    tok = load_tokenizer(model_dir)
    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"tokenizer model {model.get('type')!r} in {model_dir} has no GGUF writer here",
                              "use a byte-level BPE (Llama 3 style) or a SentencePiece BPE with byte fallback (Gemma)")
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model only "
                              f"{vocab_size} embeddings", "resize the model's embeddings to the tokenizer")
    by_id = {i: t for t, i in vocab.items()}
    added = {a["content"]: a for a in spec.get("added_tokens", [])}
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model.get("merges", [])]

    if _has(spec.get("pre_tokenizer"), "ByteLevel"):
        _write_byte_level(writer, spec, by_id, added, merges, vocab_size, model_dir)
    elif model.get("byte_fallback"):
        _write_sentencepiece(writer, spec, by_id, added, merges, vocab_size, tok.unk_token)
    else:
        raise GGUFExportError(f"the tokenizer in {model_dir} is neither byte-level BPE nor BPE with byte fallback, "
                              "so llama.cpp would tokenize text differently", "retrain it as one of those two")
    _write_special_ids(writer, tok, vocab)
    template = chat_template if chat_template is not None else tok.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        writer.add_chat_template(template)
    else:
        log.warning("no chat template for %s: chat apps will guess one; pass chat_template=", model_dir)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any loading failure has the same fix
        raise GGUFExportError(f"cannot load the tokenizer in {model_dir}: {e}",
                              "save the tokenizer next to the model (tokenizer.save_pretrained)") from e
    if getattr(tok, "backend_tokenizer", None) is None:
        raise GGUFExportError(f"the tokenizer in {model_dir} has no fast (tokenizer.json) form",
                              "save a fast tokenizer (tokenizer.json) next to the model")
    return tok


def _write_byte_level(writer, spec, by_id, added, merges, vocab_size, model_dir) -> None:
    pre = _byte_level_pre(spec)
    if pre is None:
        raise GGUFExportError(
            f"the byte-level tokenizer in {model_dir} splits text in a way llama.cpp has no name for",
            "train it with the Llama 3 split regex (pre_tokenizers.Split + ByteLevel(use_regex=False)) or "
            "plain GPT-2 ByteLevel(add_prefix_space=False)",
        )
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(TokenType.CONTROL if added[token].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{a} {b}" for a, b in merges])


def _write_sentencepiece(writer, spec, by_id, added, merges, vocab_size, unk_token) -> None:
    rank = {}
    for r, (a, b) in enumerate(merges):
        rank.setdefault(a + b, r)
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        score = 0.0
        if token is None:
            token, kind, score = f"[PAD{i}]", TokenType.UNUSED, -1e9
        elif token in added and added[token].get("special"):
            kind, score = TokenType.CONTROL, -1e9
        elif token in added:
            token, kind, score = token.replace("\u2581", " "), TokenType.USER_DEFINED, -1e9
        elif token == unk_token:
            kind, score = TokenType.UNKNOWN, -1e9
        elif BYTE_TOKEN.match(token):
            kind, score = TokenType.BYTE, -1e9
        else:
            # a multi-character token no merge makes is one Hugging Face never produces
            kind = TokenType.NORMAL
            score = -float(rank[token]) if token in rank else (0.0 if len(token) == 1 else -1e9)
        tokens.append(token)
        scores.append(score)
        types.append(kind)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_adds_space_prefix(spec))
    # llama.cpp ignores merges here; transformers' GGUF loader rebuilds the exact tokenizer from them.
    if not any(" " in a or " " in b for a, b in merges):
        writer.add_token_merges([f"{a} {b}" for a, b in merges])


def _write_special_ids(writer, tok, vocab: dict[str, int]) -> None:
    if tok.bos_token_id is not None:
        writer.add_bos_token_id(tok.bos_token_id)
    if tok.eos_token_id is not None:
        writer.add_eos_token_id(tok.eos_token_id)
    if tok.unk_token_id is not None:
        writer.add_unk_token_id(tok.unk_token_id)
    if tok.pad_token_id is not None:
        writer.add_pad_token_id(tok.pad_token_id)
    eot = next((vocab[t] for t in END_OF_TURN_TOKENS if t in vocab), None)
    if eot is not None:
        writer.add_eot_token_id(eot)
    # What the tokenizer does, not what its config claims: encode one character and look.
    ids = tok("a", add_special_tokens=True)["input_ids"]
    writer.add_add_bos_token(tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id])
    writer.add_add_eos_token(tok.eos_token_id is not None and ids[-1:] == [tok.eos_token_id])


def _byte_level_pre(spec: dict) -> str | None:
    """llama.cpp's name for this pre-tokenizer, or None when it has none."""
    parts = _flatten(spec.get("pre_tokenizer"))
    splits = [p for p in parts if p.get("type") == "Split"]
    levels = [p for p in parts if p.get("type") == "ByteLevel"]
    if len(levels) != 1 or levels[0].get("add_prefix_space"):
        return None
    if not splits and levels[0].get("use_regex", True):
        return "gpt-2"
    if len(splits) == 1 and not levels[0].get("use_regex", True):
        return SPLITS.get((splits[0].get("pattern") or {}).get("Regex"))
    return None


def _adds_space_prefix(spec: dict) -> bool:
    """SentencePiece's `add_dummy_prefix`: Llama 2 prepends "▁" to the text, Gemma does not."""
    for part in _flatten(spec.get("normalizer")) + _flatten(spec.get("pre_tokenizer")):
        if part.get("type") == "Prepend" and part.get("prepend") == "\u2581":
            return True
        if part.get("type") == "Metaspace" and part.get("prepend_scheme", "always") in ("always", "first"):
            return True
    return False


def _flatten(node: dict | None) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        inner = node.get("pretokenizers") or node.get("normalizers") or []
        return [p for child in inner for p in _flatten(child)]
    return [node]


def _has(node: dict | None, kind: str) -> bool:
    return any(p.get("type") == kind for p in _flatten(node))
