"""Tiny, local stand-ins for a real model: a byte-level BPE tokenizer (~500 tokens) trained on the
text below, with Llama-3 special tokens and the project's chat template, and a 2-layer Llama.

Both build in well under a second and are cached per process: the first call builds into a private
temporary folder, later calls copy it. Nothing is downloaded.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from chat.templates import template_text

ROOT = Path(__file__).resolve().parents[1]
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|finetune_right_pad_id|>"]
VOCAB_SIZE = 500

TEXT = """\
A healthy dog needs fresh water, a balanced diet, daily exercise and regular visits to a veterinarian.
Cats are curious animals; they like to climb, scratch and sleep in warm places for most of the day.
Rabbits eat mostly hay, with fresh leafy greens and a small amount of pellets every day.
Chocolate, grapes, raisins, onions, garlic and xylitol are dangerous for dogs. Lilies are toxic to cats.
If your pet has trouble breathing, collapses, or has a swollen belly, take it to a vet now.
Birds need a clean cage, room to fly, and a varied diet of seeds, vegetables and fruit.
Reptiles need the right temperature and light: a warm side, a cool side, and UV lighting.
Brush your dog's teeth a few times a week, and check the ears after a swim.
Older pets may sleep more, move more slowly, and need softer food and gentle exercise.
Vaccination protects puppies and kittens from serious diseases; your vet will suggest a schedule.
Fleas, ticks and worms are common parasites. Regular checks and prevention keep them away.
The user asked a question and the assistant gave a clear, short and helpful answer.
What should I feed my cat? How often should I walk my dog? Why is my rabbit not eating?
Hello! Thank you. Yes, that is right. No, please do not do that. Here is what you can do.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
One, two, three, four, five, six, seven, eight, nine, ten. Monday, Tuesday, Wednesday.
Numbers like 12, 250 and 3.5 appear in text, as do names like Max, Bella, Luna and Charlie.
Horses need hay, fresh water, salt, exercise and regular hoof care from a farrier.
Hamsters and gerbils are small mammals that are active at night and love to dig and chew.
A sudden change in behaviour, such as hiding or aggression, can be a sign of pain or illness.
Keep medicines, cleaning products and antifreeze out of reach: they can poison pets quickly.
"""


def _template(name: str) -> str:
    return template_text(name)


def _train_tokenizer(special_tokens: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT.splitlines(), trainer=trainer)
    return tok


_built: dict[tuple, Path] = {}


def _build_dir(key: tuple, build) -> Path:
    if key not in _built:
        folder = Path(tempfile.mkdtemp(prefix="tunebook-tiny-"))
        build(folder)
        _built[key] = folder
    return _built[key]


def make_tokenizer(out_dir: Path, template: str = "llama-3") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Llama-3 special tokens (plus the turn markers of `template`,
    e.g. <|im_start|>/<|im_end|> for chatml) and the project's `template`, saved in out_dir
    (tokenizer.json + tokenizer_config.json) and returned."""
    from chat.templates import REQUIRED_TOKENS

    def build(folder: Path) -> None:
        extra = [t for t in REQUIRED_TOKENS.get(template, []) if t not in SPECIAL_TOKENS]
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=_train_tokenizer(SPECIAL_TOKENS + extra), bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
            additional_special_tokens=SPECIAL_TOKENS[1:4] + extra)
        tokenizer.chat_template = _template(template)
        tokenizer.save_pretrained(folder)

    src = _build_dir(("tokenizer", template), build)
    out_dir = Path(out_dir)
    shutil.copytree(src, out_dir, dirs_exist_ok=True)
    return PreTrainedTokenizerFast.from_pretrained(out_dir)


def make_tiny_llama(out_dir: Path, tokenizer) -> LlamaForCausalLM:
    """A seeded random 2-layer Llama (hidden 64, 4 heads, 2 kv heads) sized to `tokenizer`, saved with
    it in out_dir as safetensors."""
    import torch

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model
