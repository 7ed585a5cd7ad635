"""Merged model vs its GGUF export: same token ids, same scored positions, nearly the same perplexity."""

import copy
import math

import pytest
import torch

pytest.importorskip("llama_cpp")
runner_gguf = pytest.importorskip("runner.export.gguf_writer")

from eval.perplexity import IGNORE_INDEX, evaluate_gguf, evaluate_torch  # noqa: E402

TEXT = """\
The dog has a fever and will not eat; check the gums and the hydration first.
A cat that hides and stops grooming is often in pain, even when it still purrs.
Give the puppy small meals four times a day and fresh water at all times.
Rabbits need hay before anything else: their teeth and their gut depend on it.
An old horse that loses weight may have bad teeth; float them and watch the feed.
Keep chocolate, grapes and onions away from dogs; all three can poison them.
""".splitlines()


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1], pad_token=specials[2]
    )


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matrices: one thread is fastest, and two spin badly on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory):
    """A tiny Llama with a random LoRA merged in, saved with its tokenizer, like runs/<name>/merged/."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    base = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        base.lm_head.weight.mul_(20)  # away from uniform, so the comparison means something
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"], init_lora_weights=False)
    merged = get_peft_model(copy.deepcopy(base), lora).merge_and_unload()
    out = tmp_path_factory.mktemp("merged")
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, merged.eval(), tokenizer


@pytest.fixture(scope="module")
def examples(merged_dir):
    """Each line as [BOS] prompt answer [EOS]; the first few tokens are the unscored prompt."""
    _, _, tokenizer = merged_dir
    out = []
    for i, line in enumerate(TEXT):
        ids = [tokenizer.bos_token_id] + tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prompt = 2 + i
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


@pytest.mark.parametrize("quant,tolerance", [("f32", 1e-3), ("q8_0", 1e-2)])
def test_gguf_perplexity_matches_merged_model(merged_dir, examples, tmp_path, quant, tolerance):
    model_dir, model, _ = merged_dir
    gguf_path = runner_gguf.write_gguf(model_dir, tmp_path / f"tiny-{quant}.gguf", quant)
    torch_result = evaluate_torch(model, examples, batch_size=4, progress=False)
    gguf_result = evaluate_gguf(gguf_path, examples, n_threads=1, progress=False)
    relative = abs(gguf_result.ppl - torch_result.ppl) / torch_result.ppl
    print(f"{quant}: torch ppl {torch_result.ppl:.4f}, gguf ppl {gguf_result.ppl:.4f}, relative {relative:.2e}")
    assert gguf_result.tokens == torch_result.tokens > 0
    assert gguf_result.examples == torch_result.examples == len(examples)
    assert math.isfinite(gguf_result.ppl)
    assert relative < tolerance


def test_gguf_sliding_window_matches_torch(merged_dir, examples, tmp_path):
    """The long-example policy means the same thing on both paths."""
    model_dir, model, _ = merged_dir
    gguf_path = runner_gguf.write_gguf(model_dir, tmp_path / "tiny-f32.gguf", "f32")
    kwargs = dict(max_length=8, policy="sliding", stride=3, progress=False)
    torch_result = evaluate_torch(model, examples, batch_size=4, **kwargs)
    gguf_result = evaluate_gguf(gguf_path, examples, n_threads=1, **kwargs)
    assert gguf_result.tokens == torch_result.tokens
    assert abs(gguf_result.ppl - torch_result.ppl) / torch_result.ppl < 1e-3


def test_scored_logits_are_the_full_pass_logits(merged_dir, examples, tmp_path):
    """The GGUF path asks llama.cpp for logits only where a label is scored: they are the logits a pass over
    every position gives there, across batch boundaries (4 tokens a batch here) and for a batch with none."""
    import numpy as np

    from chat.llama_runtime import open_llama
    from eval.perplexity import _scored_logits, scored_positions

    model_dir, _, _ = merged_dir
    gguf_path = runner_gguf.write_gguf(model_dir, tmp_path / "tiny-f32.gguf", "f32")
    common = dict(n_ctx=64, n_batch=4, n_ubatch=4, n_threads=1, n_threads_batch=1, verbose=False)
    full = open_llama(gguf_path, logits_all=True, **common)
    part = open_llama(gguf_path, **common)
    try:
        for ex in examples:
            ids = ex["input_ids"]
            positions = scored_positions(ex["labels"])
            full.reset()
            full.eval(ids)
            expected = full.scores[: len(ids)][positions]
            got = _scored_logits(part, ids, positions, part.n_vocab())
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    finally:
        full.close()
        part.close()
