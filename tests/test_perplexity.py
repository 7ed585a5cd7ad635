"""eval/perplexity.py against a naive per-token reference on a tiny random Llama."""

import copy
import json
import math
import random
import socket

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from eval.perplexity import (
    IGNORE_INDEX,
    NllAccumulator,
    collate,
    evaluate_torch,
    numpy_token_nll,
    token_nll,
)

VOCAB = 97
PAD = 0
REL = 1e-5


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    # random init is near-uniform; sharper weights make per-token NLLs differ, so mistakes show
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model.eval()


def make_examples() -> list[dict]:
    """11 chat-like examples: masked prompt, sometimes a masked middle turn, one with nothing to score,
    one where the pad id is a real, scored token (pad == a real id must not hide it)."""
    rng = random.Random(1234)
    lengths = [3, 5, 9, 17, 24, 31, 40, 12, 2, 28, 36]
    examples = []
    for i, n in enumerate(lengths):
        ids = [1] + [rng.randrange(3, VOCAB) for _ in range(n - 1)]
        prompt = rng.randrange(1, max(2, n // 2))
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        if n > 20 and i % 2:  # a second user turn inside the example
            labels[n // 2 : n // 2 + 4] = [IGNORE_INDEX] * 4
        examples.append({"input_ids": ids, "labels": labels})
    examples[7]["labels"] = [IGNORE_INDEX] * len(examples[7]["input_ids"])  # nothing to score
    examples[5]["input_ids"][-3] = PAD
    examples[5]["labels"][-3] = PAD
    return examples


def reference(model, examples, context_begin=lambda n, t: 0) -> tuple[float, int]:
    """One forward per scored token on the unpadded prefix; -log softmax in float64."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids, labels = ex["input_ids"], ex["labels"]
            for t in range(1, len(ids)):
                if labels[t] == IGNORE_INDEX:
                    continue
                begin = context_begin(len(ids), t)
                prefix = torch.tensor([ids[begin:t]])
                logits = model(input_ids=prefix).logits[0, -1].double()
                nll -= float(torch.log_softmax(logits, dim=-1)[labels[t]])
                count += 1
    return nll, count


def assert_close(a: float, b: float, rel: float = REL) -> None:
    assert math.isclose(a, b, rel_tol=rel), (a, b, abs(a - b) / abs(b))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matrices: one thread is fastest, and two spin badly on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def examples():
    return make_examples()


@pytest.fixture(scope="module")
def ref(model, examples):
    nll, count = reference(model, examples)
    return nll / count, count


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_matches_naive_reference(model, examples, ref, batch_size):
    loss, count = ref
    result = evaluate_torch(model, examples, batch_size=batch_size, progress=False)
    assert result.tokens == count
    assert_close(result.loss, loss)
    assert_close(result.ppl, math.exp(loss))


@pytest.mark.parametrize("batch_size", [1, 8])
def test_fused_lm_head_path_matches_the_reference(examples, ref, batch_size):
    """Large vocabularies score through a fused LM head (no full logits): same number."""
    fused_model = tiny_llama()
    loss, count = ref
    result = evaluate_torch(fused_model, examples, batch_size=batch_size, progress=False, fused=True)
    assert result.tokens == count
    assert_close(result.loss, loss)
    assert fused_model.forward.__func__ is not type(fused_model).forward  # really went through the fused head


def test_result_fields(model, examples, ref):
    result = evaluate_torch(model, examples, batch_size=4, progress=False)
    assert result.ppl == math.exp(result.loss)
    assert result.examples == len(examples)
    assert result.unscored == 1
    assert result.seconds > 0 and result.tokens_per_s == pytest.approx(result.tokens / result.seconds)
    assert set(result.to_dict()) == {"loss", "ppl", "tokens", "seconds", "tokens_per_s", "examples", "unscored"}
    assert json.loads(json.dumps(result.to_dict()))["tokens"] == ref[1]


def test_collate_pads_right_and_masks():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=9)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_padding_never_scored(model, examples):
    """Neither the pad id nor the pad token's embedding can move the number."""
    unused = min(set(range(3, VOCAB)) - {t for e in examples for t in e["input_ids"]})
    base = evaluate_torch(model, examples, batch_size=8, progress=False, pad_id=PAD)
    other_pad = evaluate_torch(model, examples, batch_size=8, progress=False, pad_id=unused)
    scrambled = copy.deepcopy(model)
    with torch.no_grad():
        scrambled.model.embed_tokens.weight[unused] = 1e3 * torch.randn(32)
    scrambled_pad = evaluate_torch(scrambled, examples, batch_size=8, progress=False, pad_id=unused)
    assert other_pad.tokens == base.tokens == scrambled_pad.tokens
    assert_close(other_pad.loss, base.loss, 1e-9)
    assert_close(scrambled_pad.loss, base.loss, 1e-9)


def test_order_does_not_matter(model, examples, ref):
    shuffled = examples[:]
    random.Random(7).shuffle(shuffled)
    result = evaluate_torch(model, shuffled, batch_size=3, progress=False)
    assert_close(result.loss, ref[0])


def test_truncate_keeps_first_max_length_tokens(model, examples):
    max_length = 16
    cut = [{"input_ids": e["input_ids"][:max_length], "labels": e["labels"][:max_length]} for e in examples]
    nll, count = reference(model, cut)
    result = evaluate_torch(model, examples, batch_size=3, max_length=max_length, progress=False)
    assert result.tokens == count
    assert_close(result.loss, nll / count)
    assert result.examples == len(examples)


@pytest.mark.parametrize("max_length,stride", [(12, 5), (10, 9), (8, 1)])
def test_sliding_window_scores_every_token_once(model, examples, ref, max_length, stride):
    def window_begin(n, t):  # window k ends at min(max_length + k * stride, n); target t lies in the first that passes t
        end = max_length
        while end <= t:
            end += stride
        return max(0, min(end, n) - max_length)

    nll, count = reference(model, examples, context_begin=window_begin)
    result = evaluate_torch(
        model, examples, batch_size=4, max_length=max_length, policy="sliding", stride=stride, progress=False
    )
    assert count == ref[1]
    assert result.tokens == ref[1]  # same tokens as with no limit at all
    assert_close(result.loss, nll / count)


def test_sliding_with_room_equals_no_limit(model, examples, ref):
    result = evaluate_torch(model, examples, max_length=64, policy="sliding", progress=False)
    assert result.tokens == ref[1]
    assert_close(result.loss, ref[0])


def test_bad_policy_arguments(model, examples):
    with pytest.raises(ValueError, match="stride"):
        evaluate_torch(model, examples, max_length=8, policy="sliding", stride=8, progress=False)
    with pytest.raises(ValueError, match="policy"):
        evaluate_torch(model, examples, max_length=8, policy="middle", progress=False)


def test_token_nll_shift_and_mask():
    torch.manual_seed(3)
    logits = torch.randn(2, 6, VOCAB, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (2, 6))
    labels[0, :3] = IGNORE_INDEX
    labels[1, 4:] = IGNORE_INDEX
    nll, n = token_nll(logits, labels)
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum()) == 6
    assert_close(nll, float(expected), 1e-12)
    np_nll, np_n = numpy_token_nll(logits[0].numpy(), labels[0].tolist())
    row_nll, row_n = token_nll(logits[:1], labels[:1])
    assert np_n == row_n
    assert_close(np_nll, row_nll, 1e-12)
    assert token_nll(logits, torch.full_like(labels, IGNORE_INDEX)) == (0.0, 0)


def test_accumulator_merge_is_token_weighted():
    a, b, whole = NllAccumulator(), NllAccumulator(), NllAccumulator()
    a.add(10.0, 2)
    b.add(3.0, 8)
    whole.add(13.0, 10)
    merged = a.merge(b).result()
    assert merged.loss == whole.result().loss == 1.3  # not (5.0 + 0.375) / 2
    assert NllAccumulator().result().tokens == 0 and math.isnan(NllAccumulator().result().loss)


def test_training_mode_is_restored(model, examples):
    model.train()
    try:
        evaluate_torch(model, examples[:3])  # progress on: no TTY here, so the bar stays quiet
        assert model.training
    finally:
        model.eval()


def test_peft_adapter_and_merged_model_agree(model, examples):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    wrapped = get_peft_model(copy.deepcopy(model), lora)
    with torch.no_grad():  # make the adapter matter
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapter = evaluate_torch(wrapped, examples, batch_size=3, progress=False)
    merged = copy.deepcopy(wrapped).merge_and_unload()
    merged_result = evaluate_torch(merged, examples, batch_size=8, progress=False)
    base = evaluate_torch(model, examples, batch_size=8, progress=False)
    nll, count = reference(wrapped, examples)
    assert adapter.tokens == merged_result.tokens == count
    assert_close(adapter.loss, nll / count)
    assert_close(merged_result.loss, adapter.loss)
    assert abs(adapter.loss - base.loss) > 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world, port, model_dir, examples, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = LlamaForCausalLM.from_pretrained(model_dir)
        result = evaluate_torch(model, examples, batch_size=2, progress=False)
        out.put((rank, result.to_dict()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_give_the_single_process_number(model, examples, ref, tmp_path):
    """Two gloo ranks each score half the examples; the all-reduced totals equal the one-process ones."""
    import torch.multiprocessing as mp

    model.save_pretrained(tmp_path)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_worker, args=(r, 2, port, str(tmp_path), examples, out)) for r in range(2)]
    try:
        for p in procs:
            p.start()
        results = dict(out.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    for r in (0, 1):
        assert results[r]["tokens"] == ref[1]
        assert results[r]["examples"] == len(examples)
        assert_close(results[r]["loss"], ref[0])
