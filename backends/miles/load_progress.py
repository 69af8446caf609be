"""Progress of a long checkpoint load, written to stderr by global rank 0 only.

On a terminal it redraws one tqdm-style bar; otherwise (a server log file) it writes one
line at the start and one each time another 10% is done, so logs stay readable:

    loading /models/Qwen3-8B: 40% (160/399 tensors, 12.3s)

Usage:

    with LoadProgress("loading /models/Qwen3-8B", total=len(tensors), unit="tensors") as progress:
        for ...:
            progress.advance()
"""
from __future__ import annotations

import os
import sys
import time
from typing import TextIO

BAR_WIDTH = 30
LOG_STEP_PERCENT = 10


class LoadProgress:
    """Counts finished units of work (tensors, bytes) out of `total` and reports the share done."""

    def __init__(self, label: str, total: int, unit: str = "items", stream: TextIO | None = None,
                 rank: int | None = None) -> None:
        self.label, self.total, self.unit = label, max(int(total), 0), unit
        self.done = 0
        self.stream = sys.stderr if stream is None else stream
        self.enabled = (int(os.environ.get("RANK", "0")) if rank is None else rank) == 0
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._started = time.monotonic()
        self._last_reported_percent = -1  # bar: the last percent drawn; log: the last step written
        self._bar_length = 0

    def __enter__(self) -> "LoadProgress":
        if self.enabled:
            if self.is_tty:
                self._draw_bar()
            else:
                self._write(f"{self.label}: 0/{self.total} {self.unit}\n")
                self._last_reported_percent = 0
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled and self.is_tty:
            self._write("\n")  # leave the bar on its own line, finished or not

    def advance(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        if not self.enabled:
            return
        percent = self.percent
        if self.is_tty:
            if percent != self._last_reported_percent:
                self._draw_bar()
        else:
            step = percent // LOG_STEP_PERCENT * LOG_STEP_PERCENT  # 100 is a step too
            if step > self._last_reported_percent:
                self._write(f"{self.label}: {step}% ({self.done}/{self.total} {self.unit}, {self.elapsed:.1f}s)\n")
                self._last_reported_percent = step

    @property
    def percent(self) -> int:
        return 100 if self.total == 0 else self.done * 100 // self.total

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def _draw_bar(self) -> None:
        percent = self.percent
        filled = BAR_WIDTH * percent // 100
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        remaining = ""
        if 0 < self.done < self.total:
            remaining = f"<{self.elapsed * (self.total - self.done) / self.done:.0f}s"
        line = (f"{self.label}: {percent:3d}% [{bar}] {self.done}/{self.total} {self.unit} "
                f"[{self.elapsed:.1f}s{remaining}]")
        self._write("\r" + line.ljust(self._bar_length))  # spaces cover the end of a longer previous line
        self._bar_length = len(line)
        self._last_reported_percent = percent

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
