"""Batches without waste: packing samples into rows, or grouping samples of similar length.

Packing puts several samples in one row and gives each its own `position_ids` starting at 0, with NO
attention_mask: transformers then builds a block-diagonal causal mask from the position_ids
(`masking_utils.find_packed_sequence_indices`), so packed samples never attend to each other. That
needs `use_cache=False` in the forward pass (with a cache the packed detection is skipped). The label
at each sample's first token is -100, so no sample is trained to predict across a boundary; the
packed loss then equals the per-sample loss. The samples of a mixed stage (several sources, replay) share
rows like any others; a packed row remembers which item each token came from, so batches can be counted.

Two ways to use it: `pack_examples` ahead of time (best fill, a known number of rows; then
`make_collator(packing=True)` only pads rows), or `make_collator(packing=True)` on plain examples,
which packs each batch on the fly. Without packing, the trainer's length-grouped sampler keeps padding low.
"""
from __future__ import annotations

import bisect

import torch

from eval.labels import IGNORE_INDEX as IGNORE

from ..errors import TunebookError


def plan_bins(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: indices grouped into bins of total length <= max_length. Deterministic
    (ties broken by index); each sample goes to the fullest bin it still fits in."""
    too_long = [n for n in lengths if n > max_length]
    if too_long:
        raise TunebookError(f"cannot pack a {max(too_long)}-token sample into rows of {max_length} tokens\n"
                            "    fix: truncate or drop long samples first (data.truncation)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            space, b = max_length, len(bins) - 1
        else:
            space, b = free.pop(at)
            bins[b].append(i)
        left = space - lengths[i]
        if left > 0:
            bisect.insort(free, (left, b))
    return bins


def _pack_row(samples: list[dict]) -> dict:
    ids, labels, positions, sources = [], [], [], []
    for s in samples:
        n = len(s["input_ids"])
        ids += s["input_ids"]
        labels += [IGNORE] + list(s["labels"][1:n])
        positions += range(n)
        sources += [s.get("source", 0)] * n
    row = {"input_ids": ids, "labels": labels, "position_ids": positions}
    if any("source" in s for s in samples):  # a mixed stage: which item each token came from
        row["sources"] = sources
    return row


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Examples -> packed rows {"input_ids", "labels", "position_ids"} of at most max_length tokens."""
    bins = plan_bins([len(e["input_ids"]) for e in examples], max_length)
    return [_pack_row([examples[i] for i in b]) for b in bins]


def packing_efficiency(lengths: list[int], max_length: int) -> tuple[int, float]:
    """(rows, real tokens / token slots) when these samples are packed into rows of max_length."""
    bins = plan_bins(lengths, max_length)
    slots = len(bins) * max_length
    return len(bins), (sum(lengths) / slots if slots else 0.0)


class Collator:
    """Turns a list of examples (or packed rows) into tensors; counts real tokens and slots. For a mixed stage
    (`sources` > 1) each batch also carries "source_tokens": its trained tokens per item of the mix, which
    the trainer takes out before the forward pass and adds up (the mix as actually trained)."""

    def __init__(self, pad_id: int, packing: bool, max_length: int, sources: int = 1) -> None:
        self.pad_id, self.packing, self.max_length, self.sources = pad_id, packing, max_length, sources
        self.real_tokens = 0
        self.slots = 0

    @property
    def efficiency(self) -> float:
        """Real tokens / token slots over every batch made so far."""
        return self.real_tokens / self.slots if self.slots else 0.0

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        if self.packing:
            if not all("position_ids" in b for b in batch):
                batch = pack_examples(list(batch), self.max_length)
            return self._pad(batch, packed=True)
        return self._pad(batch, packed=False)

    def _pad(self, rows: list[dict], packed: bool) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        other = torch.zeros((len(rows), width), dtype=torch.long)  # attention_mask, or position_ids
        for r, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[r, :n] = torch.tensor(row["input_ids"])
            labels[r, :n] = torch.tensor(row["labels"])
            if packed:
                # padding gets positions 0.. too, so it forms its own segment and nothing attends to it
                other[r, :n] = torch.tensor(row["position_ids"])
                other[r, n:] = torch.arange(width - n)
            else:
                other[r, :n] = 1
            self.real_tokens += n
        self.slots += ids.numel()
        key = "position_ids" if packed else "attention_mask"
        batch = {"input_ids": ids, "labels": labels, key: other}
        if self.sources > 1:
            batch["source_tokens"] = self._source_tokens(rows)
        return batch

    def _source_tokens(self, rows: list[dict]) -> torch.Tensor:
        counts = torch.zeros(self.sources, dtype=torch.long)
        for row in rows:
            trained = torch.tensor(row["labels"]) != IGNORE
            if "sources" in row:
                counts += torch.bincount(torch.tensor(row["sources"])[trained], minlength=self.sources)
            else:
                counts[row.get("source", 0)] += int(trained.sum())
        return counts


def make_collator(tokenizer, packing: bool, max_length: int, sources: int = 1) -> Collator:
    """A collate function for DataLoader / Trainer. Unpacked: pad to the batch's longest sample, with
    attention_mask. Packed: rows of <= max_length with per-sample position_ids and no attention_mask.
    sources: the number of items in the stage's mix (more than one: batches count trained tokens per item)."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return Collator(pad_id, packing, max_length, sources)
