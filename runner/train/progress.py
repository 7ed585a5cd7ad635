"""The bar of one training stage: steps, loss, last eval perplexity, trained tokens/s, the rate per step and
the ETA (runner/console.py). Without a terminal (CI, logs piped to a file) the bar prints a progress line at
most every 30 s, and one line per logging step with the loss."""
from __future__ import annotations

import time
from contextlib import ExitStack

from ..console import Bar, progress


class StageProgress:
    def __init__(self, name: str, total: int | None = None, log=print):
        self.name = name
        self.log_fn = log
        self.bar: Bar | None = None
        self._stack = ExitStack()
        self.loss = self.ppl = None
        self.tokens_per_s = 0.0
        self._t0 = time.perf_counter()
        self._tokens0 = None

    def start(self, total: int | None, initial: int, where: str) -> None:
        self.log_fn(f"stage {self.name}: training on {where}" + (f", {total} steps" if total else ""))
        self.bar = self._stack.enter_context(progress(f"training {self.name}", total, "steps", initial=initial))

    def _status(self) -> str:
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.ppl is not None:
            parts.append(f"eval ppl {self.ppl:.2f}")
        if self.tokens_per_s:
            parts.append(f"{self.tokens_per_s:,.0f} tok/s")
        return " · ".join(parts)

    def step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(completed=step, status=self._status())

    def evaluating(self):
        """A bar for an evaluation during the stage (its `callback()` goes to eval's `progress=`)."""
        return progress(f"evaluating {self.name}", None, "batches")

    def log(self, row: dict) -> None:
        if row.get("loss") is not None:
            self.loss = row["loss"]
        if row.get("eval_ppl") is not None:
            self.ppl = row["eval_ppl"]
        now = time.perf_counter()
        if self._tokens0 is None:
            self._tokens0, self._t0 = row.get("tokens_seen", 0), now
        elif now > self._t0:
            self.tokens_per_s = (row.get("tokens_seen", 0) - self._tokens0) / (now - self._t0)
        if self.bar is None:
            return
        self.bar.update(status=self._status())
        if not self.bar.live:
            eval_part = f" eval_loss {row['eval_loss']:.4f} eval_ppl {row['eval_ppl']:.3f}" if row.get("eval_loss") is not None else ""
            if row.get("eval_sets"):
                eval_part += " (" + ", ".join(f"{name} {s['ppl']:.3f}" for name, s in row["eval_sets"].items()) + ")"
            loss_part = f" loss {row['loss']:.4f}" if row.get("loss") is not None else ""
            rate = f"{self.tokens_per_s:,.0f} tok/s, " if self.tokens_per_s else ""  # known from the second row on
            self.log_fn(f"  {self.name} step {row['step']}:{loss_part}{eval_part} ({rate}{row.get('seconds', 0):.0f} s)")

    def stop(self) -> None:
        self._stack.close()
        self.bar = None
