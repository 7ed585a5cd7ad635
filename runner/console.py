"""What a person sees while tunebook works: a progress bar with rate and ETA for every long step, plain
lines instead when stderr is not a terminal (CI, a log file), and no library noise unless `--verbose`.

`progress(label, total, unit)` opens a bar; bars opened while another is live (an evaluation inside a
training stage) share one display, each on its own line. The rate and the ETA are the mean since the bar
started, so they are known after the first unit even when a unit takes a minute. In plain mode a bar
prints a line when it starts, at most every PLAIN_EVERY seconds while it runs, and when it ends; a bar
inside another one prints only the lines in between.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Iterator

PLAIN_EVERY = 30.0  # seconds between plain progress lines

_live = None   # the shared rich Progress while a bar is open on a terminal
_open = 0      # bars open (on it, or as plain lines)


def quiet_libraries(quiet: bool = True) -> None:
    """Keep library log lines, progress bars and warnings off the console (`quiet`), or let them all through.
    Set through the environment, so processes tunebook starts (backends, ranks) behave the same."""
    os.environ["TUNEBOOK_VERBOSE"] = "0" if quiet else "1"  # read by chat/llama_log.py for llama.cpp's lines
    if not quiet:
        return
    for name, value in (("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"), ("PYTHONWARNINGS", "ignore"),
                        ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(name, value)
    warnings.simplefilter("ignore")


def is_verbose() -> bool:
    return os.environ.get("TUNEBOOK_VERBOSE") == "1"


def _terminal() -> bool:
    from rich.console import Console

    return Console(stderr=True).is_terminal


def duration(seconds: float) -> str:
    """1:05 or 1:02:05."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def rate_text(done: float, seconds: float, unit: str) -> str:
    """'3.2 steps/s' or, for slow units, '28.1 s/step'."""
    if done <= 0 or seconds <= 0:
        return ""
    per_s = done / seconds
    singular = unit[:-2] if unit.endswith(("ches", "shes", "xes")) else unit[:-1] if unit.endswith("s") else unit
    return f"{per_s:,.1f} {unit}/s" if per_s >= 1 else f"{seconds / done:,.1f} s/{singular}"


class Bar:
    """One long step. `advance(n)` or `update(completed=...)`; `status` is short text shown beside it."""

    def __init__(self, label: str, total: float | None, unit: str, initial: float = 0.0):
        self.label, self.total, self.unit = label, total, unit
        self.completed = self.initial = initial
        self.status = ""
        self.start = time.perf_counter()
        self._last_line = self.start
        self._task = None
        self._nested = False
        self._stop = threading.Event()  # plain mode: ends the thread that prints a line while nothing moves
        self._silent = int(os.environ.get("RANK", "0")) != 0  # other ranks of a launch stay quiet

    # --- what callers use

    @property
    def live(self) -> bool:
        """Drawn on a terminal (False: plain lines, or a quiet rank)."""
        return self._task is not None

    def advance(self, n: float = 1.0, status: str | None = None) -> None:
        self.update(completed=self.completed + n, status=status)

    def update(self, completed: float | None = None, total: float | None = None, status: str | None = None) -> None:
        if completed is not None:
            self.completed = completed
        if total is not None:
            self.total = total
        if status is not None:
            self.status = status
        if self._task is not None:
            _live.update(self._task, completed=self.completed, total=self.total, status=self.status,
                         rate=self._rate(), eta=self._eta(), counts=self._counts())
        elif not self._silent and time.perf_counter() - self._last_line >= PLAIN_EVERY:
            self._line()

    def callback(self, offset: float = 0.0, span: float | None = None):
        """A `(done, total)` callable for code that reports its own progress (eval/): it moves this bar from
        `offset` over `span` units (default: the reported total)."""
        def report(done: int, total: int) -> None:
            if span is None:  # the bar is the reporter's own
                self.update(completed=offset + done, total=offset + total)
            else:
                self.update(completed=offset + (span * done / total if total else span))
        return report

    # --- rendering

    def _elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _rate(self) -> str:
        return rate_text(self.completed - self.initial, self._elapsed(), self.unit)

    def _eta(self) -> str:
        done = self.completed - self.initial
        if not self.total or done <= 0:
            return "ETA -:--"
        left = max(0.0, self.total - self.completed) * self._elapsed() / done
        return f"ETA {duration(left)}"

    def _counts(self) -> str:
        def fmt(x: float) -> str:
            return f"{x:,.0f}" if float(x).is_integer() or x >= 100 else f"{x:,.1f}"
        done = f"{fmt(self.completed)}/{fmt(self.total)}" if self.total else fmt(self.completed)
        return f"{done} {self.unit}".strip()

    def _tick(self) -> None:
        """Plain mode: a line every PLAIN_EVERY seconds even while one unit takes longer than that."""
        while not self._stop.wait(PLAIN_EVERY / 3):
            if time.perf_counter() - self._last_line >= PLAIN_EVERY:
                self._line()

    def _line(self, end: bool = False) -> None:
        self._last_line = time.perf_counter()
        parts = [f"{self.label}: {self._counts()}"]
        if end:
            parts.append(f"in {duration(self._elapsed())}")
        else:
            parts += [p for p in (self._rate(), self._eta() if self.total and self.completed > self.initial else "") if p]
        if self.status and not end:
            parts.append(self.status)
        print(", ".join(parts), file=sys.stderr, flush=True)

    def _open(self) -> None:
        global _live, _open
        if self._silent:
            return
        if not _terminal():
            self._nested = _open > 0
            _open += 1
            if not self._nested:
                self._line()
                self._ticker = threading.Thread(target=self._tick, daemon=True)
                self._ticker.start()
            return
        if _live is None:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
            from rich.table import Column

            def text(field: str, **style) -> TextColumn:  # never cut short
                return TextColumn(field, table_column=Column(no_wrap=True), **style)

            _live = Progress(text("[bold]{task.description}"), BarColumn(bar_width=16), text("{task.fields[counts]}"),
                             text("{task.fields[rate]}", style="dim"), TimeElapsedColumn(),
                             text("{task.fields[eta]}", style="cyan"),
                             TextColumn("{task.fields[status]}", table_column=Column(no_wrap=True, overflow="ellipsis",
                                                                                     ratio=1)),
                             console=Console(stderr=True), transient=False, expand=True)
            _live.start()
        _open += 1
        self._task = _live.add_task(self.label, total=self.total, completed=self.completed, status=self.status,
                                    rate="", eta="ETA -:--", counts=self._counts())

    def _close(self) -> None:
        global _live, _open
        if self._task is None:
            if not self._silent:
                _open -= 1
                self._stop.set()
                if not self._nested:
                    self._line(end=True)
            return
        _open -= 1
        if _open:  # a bar inside another one (an evaluation during training) leaves no line behind
            _live.remove_task(self._task)
        else:
            _live.update(self._task, counts=self._counts(), rate=self._rate(), eta=f"done in {duration(self._elapsed())}")
            _live.stop()
            _live = None
        self._task = None


@contextmanager
def progress(label: str, total: float | None, unit: str = "", initial: float = 0.0,
             min_total: float = 0) -> Iterator[Bar]:
    """A bar for one long step, closed (and summed up) when the block ends; silent when `total` is below
    `min_total` (work too small to be worth a line)."""
    bar = Bar(label, total, unit, initial)
    bar._silent = bar._silent or (total is not None and total < min_total)
    bar._open()
    try:
        yield bar
    finally:
        bar._close()
