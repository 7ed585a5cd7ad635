"""The fast LM head (runner/fast_head.py) gives the loss and gradients of the model's own full-logits loss,
packed or not, in chunks or not, and training goes through it."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from runner.model import fast_head
from runner.data.pack import make_collator, pack_examples
from runner.model.fast_head import add_fast_lm_head, head_nll, is_installed

VOCAB = 97
from eval.labels import IGNORE_INDEX as IGNORE


def tiny_llama(seed: int = 0, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, **config)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():  # sharper than random init, so per-token losses differ and mistakes show
        model.lm_head.weight.mul_(20)
    return model


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # LoRA B starts at zero; nonzero B makes every LoRA weight's gradient nonzero
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return peft_model


def examples(n: int = 6, seed: int = 0) -> list[dict]:
    """Chat-like samples: a masked prompt, sometimes a masked middle turn."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randrange(6, 40)
        ids = [1] + [rng.randrange(3, VOCAB) for _ in range(length - 1)]
        prompt = rng.randrange(1, length // 2)
        labels = [IGNORE] * prompt + ids[prompt:]
        if i % 2 and length > 20:
            labels[length // 2: length // 2 + 4] = [IGNORE] * 4
        out.append({"input_ids": ids, "labels": labels})
    return out


def padded(rows: list[dict]) -> dict:
    return make_collator(type("Tok", (), {"pad_token_id": 0})(), packing=False, max_length=256)(rows)


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def loss_and_grads(model, batch: dict, fused: bool, num_items: int | None = None):
    model.zero_grad(set_to_none=True)
    kwargs = {"fused_lm_head": True} if fused else {}
    if num_items is not None:
        kwargs["num_items_in_batch"] = num_items
    out = model(**batch, use_cache=False, **kwargs)
    out.loss.backward()
    return out, float(out.loss), trainable_grads(model)


def assert_grads_equal(a: dict, b: dict, rel: float = 1e-5) -> None:
    """Every gradient equal within rel, relative to the largest entry of that gradient."""
    assert a.keys() == b.keys() and a
    for name in a:
        scale = float(b[name].abs().max())
        torch.testing.assert_close(a[name], b[name], rtol=rel, atol=rel * scale, msg=lambda m: f"{name}: {m}")


def test_lora_loss_and_gradients_equal_the_full_logits_loss():
    model = with_lora(tiny_llama())
    batch = padded(examples())
    _, plain_loss, plain_grads = loss_and_grads(model, batch, fused=False)   # transformers' own loss
    assert add_fast_lm_head(model) and is_installed(model)
    out, fast_loss, fast_grads = loss_and_grads(model, batch, fused=True)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-5)
    assert_grads_equal(fast_grads, plain_grads)
    assert all(float(g.abs().max()) > 0 for g in fast_grads.values())  # every LoRA weight really got a gradient
    mask = batch["labels"][:, 1:] != IGNORE
    assert torch.equal(out.label_mask, mask)
    assert float(out.log_probs[~mask].abs().max()) == 0


def test_full_fine_tuning_gradients_include_the_tied_head():
    model = tiny_llama()
    batch = padded(examples(seed=3))
    _, plain_loss, plain_grads = loss_and_grads(model, batch, fused=False)
    add_fast_lm_head(model)
    _, fast_loss, fast_grads = loss_and_grads(model, batch, fused=True)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-5)
    assert_grads_equal(fast_grads, plain_grads)


def test_packed_rows_equal_unpacked():
    samples = examples(8, seed=5)
    tokens = sum(sum(t != IGNORE for t in s["labels"][1:]) for s in samples)
    model = with_lora(tiny_llama())
    add_fast_lm_head(model)
    _, unpacked_loss, unpacked_grads = loss_and_grads(model, padded(samples), fused=True, num_items=tokens)
    rows = pack_examples(samples, max_length=96)
    assert len(rows) < len(samples)  # really packed several samples per row
    packed = make_collator(type("Tok", (), {"pad_token_id": 0})(), packing=True, max_length=96)(rows)
    assert "attention_mask" not in packed
    _, packed_loss, packed_grads = loss_and_grads(model, packed, fused=True, num_items=tokens)
    assert packed_loss == pytest.approx(unpacked_loss, rel=1e-5)
    assert_grads_equal(packed_grads, unpacked_grads)


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 1000])
@pytest.mark.parametrize("train_weight", [False, True])  # True: the checkpointed path that also trains the head
def test_head_nll_against_float64_cross_entropy(rows_per_chunk, train_weight):
    torch.manual_seed(0)
    hidden = torch.randn(11, 16, requires_grad=True)
    weight = (torch.randn(VOCAB, 16) * 3).requires_grad_(train_weight)
    targets = torch.randint(0, VOCAB, (11,))
    upstream = torch.randn(11)  # any incoming gradient, negative entries too

    nll, top1 = head_nll(hidden, weight, targets, rows_per_chunk=rows_per_chunk)
    (nll * upstream).sum().backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logits = h64 @ w64.t()
    ref = F.cross_entropy(logits, targets, reduction="none")
    (ref * upstream.double()).sum().backward()

    torch.testing.assert_close(nll.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-5, atol=1e-5)
    if train_weight:
        torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(top1, logits.argmax(-1) == targets)
    with torch.no_grad():  # evaluation: the same numbers, no gradient work
        torch.testing.assert_close(head_nll(hidden, weight, targets, rows_per_chunk=rows_per_chunk)[0], nll.detach())


@pytest.mark.parametrize("rows_per_chunk", [2, 1000])
def test_trained_token_rows_against_float64_cross_entropy(rows_per_chunk):
    """peft's trainable tokens: the head's rows for a few tokens are trained; the rest of it stays frozen."""
    torch.manual_seed(0)
    hidden = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(VOCAB, 16) * 3
    token_ids = torch.tensor([5, 40, 7])
    rows = (torch.randn(3, 16) * 3).requires_grad_()
    targets = torch.tensor([5, 1, 40, 7, 9, 5, 60, 2, 40])  # the trained rows are targets too
    upstream = torch.randn(9)

    nll, top1 = head_nll(hidden, weight, targets, token_ids, rows, rows_per_chunk=rows_per_chunk)
    (nll * upstream).sum().backward()
    h64, r64 = hidden.detach().double().requires_grad_(), rows.detach().double().requires_grad_()
    logits = h64 @ weight.double().index_copy(0, token_ids, r64).t()
    ref = F.cross_entropy(logits, targets, reduction="none")
    (ref * upstream.double()).sum().backward()

    torch.testing.assert_close(nll.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows.grad.double(), r64.grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(top1, logits.argmax(-1) == targets)


def test_lora_with_trainable_tokens_equals_peft_own_forward():
    """LoRA plus trained rows of the tied embedding (peft's trainable_token_indices): same loss and gradients,
    the trained rows included, as peft's own forward through full logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    trainable_token_indices=[2, 11]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.normal_(0, 0.5)
    batch = padded(examples(seed=4))
    batch["input_ids"][:, 3] = 11   # the trained tokens appear as inputs ...
    batch["labels"][:, -1] = torch.where(batch["labels"][:, -1] == IGNORE, IGNORE, 2)  # ... and as targets
    _, plain_loss, plain_grads = loss_and_grads(model, batch, fused=False)
    add_fast_lm_head(model)
    _, fast_loss, fast_grads = loss_and_grads(model, batch, fused=True)
    assert any("trainable_tokens_delta" in n for n in fast_grads)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-5)
    assert_grads_equal(fast_grads, plain_grads)


def test_a_batch_with_nothing_to_score_is_a_differentiable_zero():
    model = with_lora(tiny_llama())
    add_fast_lm_head(model)
    batch = padded(examples(2))
    batch["labels"][:] = IGNORE
    out = model(**batch, fused_lm_head=True)
    out.loss.backward()
    assert float(out.loss) == 0.0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bf16_autocast_stays_close_to_float32():
    model = with_lora(tiny_llama())
    add_fast_lm_head(model)
    batch = padded(examples())
    _, fp32_loss, fp32_grads = loss_and_grads(model, batch, fused=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, bf16_loss, bf16_grads = loss_and_grads(model, batch, fused=True)
    assert bf16_loss != fp32_loss and bf16_loss == pytest.approx(fp32_loss, rel=2e-2)
    a = torch.cat([g.flatten() for g in fp32_grads.values()])
    b = torch.cat([g.flatten() for g in bf16_grads.values()])
    assert float(F.cosine_similarity(a, b, dim=0)) > 0.99


def test_other_calls_are_the_model_own_forward():
    model = tiny_llama()
    batch = padded(examples())
    before = model(**batch)
    add_fast_lm_head(model)
    after = model(**batch)
    assert torch.equal(before.logits, after.logits) and float(before.loss) == float(after.loss)
    assert model.generate(batch["input_ids"][:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)


def test_replaces_trl_head_and_perplexity_uses_it():
    from trl.trainer.utils import add_fused_lm_head

    from eval.perplexity import evaluate_torch

    samples = examples(7, seed=9)
    plain = evaluate_torch(tiny_llama(), samples, batch_size=3, progress=False, fused=False)
    model = tiny_llama()
    add_fused_lm_head(model)  # what SFTTrainer does when it is built
    assert add_fast_lm_head(model) and is_installed(model)
    fast = evaluate_torch(model, samples, batch_size=3, progress=False, fused=True)
    assert fast.tokens == plain.tokens and fast.loss == pytest.approx(plain.loss, rel=1e-5)


def test_models_with_logit_transforms_keep_their_own_head():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    model.config.final_logit_softcapping = 30.0
    forward = model.forward
    assert not add_fast_lm_head(model) and not is_installed(model)
    assert model.forward == forward


def test_training_a_stage_goes_through_the_fast_head(tmp_path, monkeypatch):
    from runner.pipeline import train_recipe
    from runner.recipe import load_recipe
    from train_support import two_stage_recipe

    calls = []
    original = fast_head.head_nll

    def counting(hidden, *args, **kwargs):
        calls.append((torch.is_grad_enabled(), hidden.shape[0]))
        return original(hidden, *args, **kwargs)

    monkeypatch.setattr(fast_head, "head_nll", counting)
    recipe = load_recipe(two_stage_recipe(tmp_path), ["stages.0.train.max_steps=2", "stages.0.train.eval_steps=2"])
    train_recipe(recipe, only_stage="general", log=lambda *_: None)
    trained = [n for grad, n in calls if grad]
    assert len(trained) >= 2 and all(n > 0 for n in trained)   # every training step


def test_trainable_tokens_are_trained_through_both_stages(tmp_path):
    """lora.trainable_tokens: the end-of-turn row is trained in the first stage and continued in the next."""
    from safetensors.torch import load_file

    from runner.errors import TunebookError
    from runner.pipeline import train_recipe
    from runner.recipe import load_recipe
    from train_support import two_stage_recipe

    path = two_stage_recipe(tmp_path)
    with pytest.raises(TunebookError, match="not a token of the tokenizer"):
        train_recipe(load_recipe(path, ["lora.trainable_tokens=[<no_such_token>]"]), log=lambda *_: None)
    recipe = load_recipe(path, ["lora.trainable_tokens=[<|eot_id|>]", "name=tokens"])
    train_recipe(recipe, log=lambda *_: None)
    rows = {}
    for stage in ("general", "vet"):
        weights = load_file(tmp_path / "runs" / "tokens" / stage / "adapter" / "adapter_model.safetensors")
        [key] = [k for k in weights if "trainable_tokens_delta" in k]
        rows[stage] = weights[key]
        assert rows[stage].shape == (1, 64)
    assert not torch.equal(rows["general"], rows["vet"])  # the vet stage kept training the row

    # train.trainable_tokens_lr: the rows get their own learning rate (the LoRA weights keep the stage's)
    recipe = load_recipe(path, ["lora.trainable_tokens=[<|eot_id|>]", "stages.0.train.trainable_tokens_lr=0.5",
                                "name=fast-rows"])
    train_recipe(recipe, only_stage="general", log=lambda *_: None)
    fast = load_file(tmp_path / "runs" / "fast-rows" / "general" / "adapter" / "adapter_model.safetensors")
    eot = AutoTokenizer.from_pretrained(tmp_path / "tiny-llama").convert_tokens_to_ids("<|eot_id|>")
    original = load_file(tmp_path / "tiny-llama" / "model.safetensors")["model.embed_tokens.weight"][[eot]]
    moved = {name: float((r - original).abs().max()) for name, r in
             (("stage lr", rows["general"]), ("own lr", next(v for k, v in fast.items() if "trainable_tokens_delta" in k)))}
    assert moved["own lr"] > 10 * moved["stage lr"] > 0
