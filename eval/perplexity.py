"""Token-weighted perplexity: one definition for torch models and GGUF files.

    loss = total NLL over scored tokens / number of scored tokens,    ppl = exp(loss)

A token is scored when its label is not -100 (labels are aligned to input_ids, the Hugging Face
convention; the model's prediction for position t comes from the logits at t-1, so position 0 is
never scored). Padding is never scored and never attended to: batches are right-padded, labels are
padded with -100. Totals are summed in float64 across batches and across torch.distributed ranks, so
the number does not depend on batch size, example order or the number of processes. Per-batch means
are never averaged.

Long examples (more tokens than ``max_length``):

* ``truncate`` (default): keep the first ``max_length`` tokens; scored tokens after that are dropped
  and do not count.
* ``sliding``: cover the whole example with windows of at most ``max_length`` tokens whose ends
  advance by ``stride`` tokens (default ``max_length // 2``, must be < ``max_length``). Window k ends
  at ``e_k = min(max_length + k * stride, n)`` and starts at ``max(0, e_k - max_length)``; it scores
  only the targets in ``[e_{k-1}, e_k)``. Every scored token is counted exactly once, with at least
  ``max_length - stride`` tokens of left context (all of it when fewer exist). This is the approach
  of the Hugging Face perplexity guide, token-weighted and mask-aware.

An example left with no scored token (all labels -100, or all of them cut by ``truncate``) is counted
in ``EvalResult.unscored``, not hidden.

``evaluate_torch`` has no trainer imports, so a ``TrainerCallback.on_evaluate`` or a custom
``Trainer.evaluate`` can call it. Under torch.distributed every rank passes the same example list;
each scores its share (``examples[rank::world_size]``) and all ranks return the all-reduced result.
Models whose forward is itself a collective (FSDP, ZeRO-3) are not handled: ranks may run different
numbers of batches.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from eval.labels import IGNORE_INDEX

POLICIES = ("truncate", "sliding")


@dataclass
class EvalResult:
    loss: float           # mean NLL per scored token (nats)
    ppl: float            # exp(loss)
    tokens: int           # scored tokens
    seconds: float        # wall time of the evaluation
    tokens_per_s: float   # scored tokens per second
    examples: int         # examples evaluated (scored or not)
    unscored: int = 0     # examples with no scored token (after truncation)

    def to_dict(self) -> dict:
        return asdict(self)


class NllAccumulator:
    """Running float64 totals; the only place loss and perplexity are computed from them."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.tokens = 0
        self.examples = 0
        self.unscored = 0

    def add(self, nll: float, tokens: int) -> None:
        self.nll += float(nll)
        self.tokens += int(tokens)

    def add_example(self, scored: bool) -> None:
        self.examples += 1
        self.unscored += 0 if scored else 1

    def merge(self, other: "NllAccumulator") -> "NllAccumulator":
        self.nll += other.nll
        self.tokens += other.tokens
        self.examples += other.examples
        self.unscored += other.unscored
        return self

    def all_reduce(self, device: torch.device | str | None = None) -> "NllAccumulator":
        """Sum the totals over all ranks (no-op unless torch.distributed is initialized)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        # float64 holds counts exactly up to 2**53
        totals = torch.tensor([self.nll, self.tokens, self.examples, self.unscored], dtype=torch.float64, device=device)
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        nll, tokens, examples, unscored = totals.tolist()
        self.nll, self.tokens, self.examples, self.unscored = nll, int(tokens), int(examples), int(unscored)
        return self

    def result(self, seconds: float = 0.0) -> EvalResult:
        loss = self.nll / self.tokens if self.tokens else float("nan")
        ppl = math.exp(loss) if self.tokens else float("nan")
        return EvalResult(
            loss=loss,
            ppl=ppl,
            tokens=self.tokens,
            seconds=seconds,
            tokens_per_s=self.tokens / seconds if seconds > 0 else 0.0,
            examples=self.examples,
            unscored=self.unscored,
        )


# ---------------------------------------------------------------------------------------------
# scoring primitives


def token_nll(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 4096) -> tuple[float, int]:
    """Sum of -log p(label_t | tokens < t) over positions with label != -100.

    logits [batch, seq, vocab] and labels [batch, seq] are aligned to input_ids; the shift by one
    happens here. Log-softmax runs in float32 (float64 when the logits are), only on scored rows and
    in chunks, so a large vocabulary does not double the memory of the whole logits tensor.
    """
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:].to(shift_logits.device)
    mask = shift_labels != IGNORE_INDEX
    n_tokens = int(mask.sum())
    if n_tokens == 0:
        return 0.0, 0
    rows = shift_logits[mask]
    targets = shift_labels[mask]
    dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=torch.float64, device=rows.device)
    for start in range(0, n_tokens, chunk_rows):
        chunk = rows[start : start + chunk_rows].to(dtype)
        nll = F.cross_entropy(chunk, targets[start : start + chunk_rows], reduction="none")
        total += nll.to(torch.float64).sum()
    return float(total), n_tokens


def scored_positions(labels: Sequence[int]) -> np.ndarray:
    """The positions whose logits are scored: row t predicts labels[t + 1]."""
    labels = np.asarray(labels, dtype=np.int64)
    return np.nonzero(labels[1:] != IGNORE_INDEX)[0]


def rows_nll(rows: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
    """Summed negative log-likelihood of `targets` under logits `rows` (one row each), in float64. torch's
    logsumexp runs on every core (numpy's exp on one), and a 262k-token vocabulary makes this the GGUF
    path's largest cost after the model itself."""
    if len(targets) == 0:
        return 0.0, 0
    rows = torch.from_numpy(np.ascontiguousarray(rows)).to(torch.float64)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    nll = torch.logsumexp(rows, dim=1) - rows[torch.arange(len(targets)), targets]
    return float(nll.sum()), int(len(targets))


def numpy_token_nll(logits: np.ndarray, labels: Sequence[int]) -> tuple[float, int]:
    """The same as token_nll for one unbatched sequence of numpy logits, in float64 (the GGUF path)."""
    positions = scored_positions(labels)
    return rows_nll(logits[positions], np.asarray(labels, dtype=np.int64)[positions + 1])


def collate(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids with pad_id, labels with -100, attention_mask 0."""
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# ---------------------------------------------------------------------------------------------
# long examples → rows the model sees


def _windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) per sliding window; see the module docstring."""
    out = []
    prev_end = 1  # position 0 has no context and is never a target
    end = min(max_length, n)
    while True:
        begin = max(0, end - max_length)
        out.append((begin, end, prev_end))
        if end >= n:
            return out
        prev_end, end = end, min(end + stride, n)


def _rows(ids: list[int], labels: list[int], max_length: int | None, policy: str, stride: int | None) -> list[dict]:
    """One example → the rows to run through the model, labels outside each row's targets set to -100."""
    if max_length is None or len(ids) <= max_length:
        return [{"input_ids": ids, "labels": labels}]
    if policy == "truncate":
        return [{"input_ids": ids[:max_length], "labels": labels[:max_length]}]
    rows = []
    for begin, end, first in _windows(len(ids), max_length, stride):
        keep = first - begin  # row positions before this are context only
        row_labels = [IGNORE_INDEX] * keep + labels[first:end]
        rows.append({"input_ids": ids[begin:end], "labels": row_labels})
    return rows


def _check_policy(max_length: int | None, policy: str, stride: int | None) -> int | None:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if policy == "sliding" and max_length is not None:
        stride = max_length // 2 if stride is None else stride
        if not 1 <= stride < max_length:
            # stride == max_length would leave each window's first target without context
            raise ValueError(f"stride must be in [1, max_length); got stride={stride}, max_length={max_length}")
    return stride


def _prepare(examples: Iterable[dict], max_length, policy, stride, acc: NllAccumulator) -> list[dict]:
    """Examples → rows; counts every example, and those with nothing left to score."""
    stride = _check_policy(max_length, policy, stride)
    rows = []
    for ex in examples:
        ids = [int(t) for t in ex["input_ids"]]
        labels = [int(t) for t in ex.get("labels", ids)]
        if len(labels) != len(ids):
            raise ValueError(f"labels ({len(labels)}) and input_ids ({len(ids)}) differ in length")
        ex_rows = [r for r in _rows(ids, labels, max_length, policy, stride) if _scored(r["labels"])]
        acc.add_example(scored=bool(ex_rows))
        rows.extend(ex_rows)
    return rows


def _scored(labels: list[int]) -> bool:
    return any(t != IGNORE_INDEX for t in labels[1:])


class _Reported:
    """Progress handed to the caller's `(done, total)` callable instead of drawn here."""

    def __init__(self, report, total: int):
        self.report, self.total, self.done = report, total, 0

    def __enter__(self):
        self.report(0, self.total)
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return None

    def advance(self, task, n: int = 1):
        self.done += n
        self.report(self.done, self.total)


def _progress(progress, total: int, description: str):
    """`progress`: True draws a transient bar on a terminal; a `(done, total)` callable is told instead."""
    if callable(progress):
        return _Reported(progress, total)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not (progress and console.is_terminal),
    )


def _rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ---------------------------------------------------------------------------------------------
# torch models: base, base + peft adapter, merged


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _vocab_size(model) -> int:
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    return int(getattr(text, "vocab_size", 0) or 0)


def ensure_fused_head(model) -> bool:
    """Give the (base) model trl's fused LM head unless it has one; False when trl cannot patch it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.forward, "__func__", None) is not None and base.forward.__func__ is not type(base).forward:
        return True  # patched already (SFTTrainer does it when training starts)
    try:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(base)
    except Exception:  # an architecture trl does not know: score through full logits
        return False
    return True


def evaluate_torch(
    model,
    examples: Sequence[dict],
    batch_size: int = 8,
    max_length: int | None = None,
    policy: str = "truncate",
    stride: int | None = None,
    progress: bool | Callable[[int, int], None] = True,
    pad_id: int | None = None,
    shard: bool = True,
    fused: bool | None = None,
) -> EvalResult:
    """Perplexity of any causal LM on examples of {"input_ids", "labels"} (labels optional).

    Rows are sorted by length (longest first) and batched to cut padding; the result does not
    depend on order or batch size. The model's train/eval mode is restored afterwards, so a trainer
    callback can call this mid-training. ``pad_id`` only fills padding, which is neither attended
    nor scored; it defaults to the model's pad token, or 0. With ``shard`` (the default) and
    torch.distributed initialized, each rank scores ``examples[rank::world_size]``; pass
    ``shard=False`` when each rank already holds its own share. Totals are always all-reduced.
    ``fused`` scores through a fused LM head (trl's ``add_fused_lm_head``: log-probabilities of the
    scored tokens only, in tiles, never the whole (batch, length, vocab) logits); ``None`` uses it for
    vocabularies over 32k tokens (Gemma 3: 262k), where full logits dominate memory and time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rank, world = _rank_and_world()
    examples = list(examples)
    if shard and world > 1:
        examples = examples[rank::world]
    if pad_id is None:
        pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        pad_id = 0 if pad_id is None else int(pad_id)

    start = time.perf_counter()
    acc = NllAccumulator()
    rows = _prepare(examples, max_length, policy, stride, acc)
    rows.sort(key=lambda r: len(r["input_ids"]), reverse=True)
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    device = _model_device(model)
    use_fused = ensure_fused_head(model) if fused or (fused is None and _vocab_size(model) > 32_000) else False
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _progress(progress if rank == 0 else False, len(batches), "perplexity") as bar:
            task = bar.add_task("perplexity", total=len(batches))
            for batch in batches:
                inputs = collate(batch, pad_id)
                if use_fused:
                    out = model(input_ids=inputs["input_ids"].to(device),
                                attention_mask=inputs["attention_mask"].to(device),
                                labels=inputs["labels"].to(device), fused_lm_head=True)
                    acc.add(-float(out.log_probs.double()[out.label_mask].sum()), int(out.label_mask.sum()))
                else:
                    logits = model(
                        input_ids=inputs["input_ids"].to(device),
                        attention_mask=inputs["attention_mask"].to(device),
                        use_cache=False,
                    ).logits
                    acc.add(*token_nll(logits, inputs["labels"]))
                bar.advance(task)
    finally:
        model.train(was_training)
    acc.all_reduce(device if device.type == "cuda" else None)
    return acc.result(seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# GGUF through llama-cpp-python


def _import_llama():
    try:
        from chat import llama_runtime

        llama_runtime.load()
    except (ImportError, OSError, RuntimeError) as exc:
        raise ImportError(f"GGUF perplexity needs llama-cpp-python (`make setup` builds it). Loading failed: {exc}") from exc
    return llama_runtime.open_llama


def evaluate_gguf(
    gguf_path: str | Path,
    examples: Sequence[dict],
    n_ctx: int | None = None,
    n_threads: int | None = None,
    max_length: int | None = None,
    policy: str = "truncate",
    stride: int | None = None,
    progress: bool | Callable[[int, int], None] = True,
) -> EvalResult:
    """Perplexity of a GGUF model on the same token ids and scored positions as evaluate_torch.

    Nothing is re-tokenized: each row's ids are evaluated from an empty context (the model is reset
    between rows); llama.cpp returns logits only at the scored positions, and they are log-softmaxed in
    float64. ``max_length`` and ``policy`` mean what they mean for evaluate_torch; ``max_length`` defaults
    to ``n_ctx`` when that is given, and ``n_ctx`` defaults to the longest row. The model runs as the chat
    app runs it, with llama.cpp's default F16 KV cache: on the tiny test model that alone moves an F32
    GGUF's logits by ~4e-4 relative (an F32 cache brings them within ~4e-6 of torch).
    """
    open_llama = _import_llama()
    if max_length is None:
        max_length = n_ctx
    elif n_ctx is not None and max_length > n_ctx:
        raise ValueError(f"max_length ({max_length}) is larger than n_ctx ({n_ctx})")

    start = time.perf_counter()
    acc = NllAccumulator()
    rows = _prepare(examples, max_length, policy, stride, acc)
    if n_ctx is None:
        n_ctx = max((len(r["input_ids"]) for r in rows), default=1)
    llm = open_llama(
        gguf_path,
        n_ctx=n_ctx,
        n_threads=n_threads,
        n_threads_batch=n_threads,  # prompt evaluation is all this does; None keeps llama.cpp's default
        verbose=False,
    )
    try:
        n_vocab = llm.n_vocab()
        with _progress(progress, len(rows), "perplexity (gguf)") as bar:
            task = bar.add_task("gguf", total=len(rows))
            for row in rows:
                ids = row["input_ids"]
                bad = [t for t in ids if not 0 <= t < n_vocab]
                if bad:
                    raise ValueError(f"token id {bad[0]} is outside the GGUF vocabulary ({n_vocab})")
                positions = scored_positions(row["labels"])
                logits = _scored_logits(llm, ids, positions, n_vocab)
                acc.add(*rows_nll(logits, np.asarray(row["labels"], dtype=np.int64)[positions + 1]))
                bar.advance(task)
    finally:
        llm.close()
    return acc.result(seconds=time.perf_counter() - start)


def _scored_logits(llm, ids: list[int], positions: np.ndarray, n_vocab: int) -> np.ndarray:
    """The logits of `ids` at `positions` only, from an empty context. llama.cpp runs the output head just for
    the positions a batch flags, and with a 262k-token vocabulary that head costs more than the rest of a small
    model: a prompt's unscored tokens (system prompt, question) go through the layers alone."""
    import llama_cpp

    ctx = llm.ctx
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    wanted = np.zeros(len(ids), dtype=bool)
    wanted[positions] = True
    out = np.empty((len(positions), n_vocab), dtype=np.float32)
    n_batch = llm.n_batch
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    try:
        row = 0
        for begin in range(0, len(ids), n_batch):
            chunk = ids[begin:begin + n_batch]
            batch.n_tokens = len(chunk)
            for j, token in enumerate(chunk):
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, begin + j, 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = bool(wanted[begin + j])
            if not wanted[begin:begin + len(chunk)].any():  # llama.cpp wants an output: the chunk's last
                batch.logits[len(chunk) - 1] = True
            code = llama_cpp.llama_decode(ctx, batch)
            if code != 0:
                raise RuntimeError(f"llama_decode returned {code}")
            for j in np.nonzero(wanted[begin:begin + len(chunk)])[0]:
                out[row] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, int(j)), shape=(n_vocab,))
                row += 1
    finally:
        llama_cpp.llama_batch_free(batch)
    return out
