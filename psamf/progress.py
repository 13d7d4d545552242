"""Progress on long steps (`psamf synth`, `psamf prepare`), shown the way people expect from the tools they know.

On a terminal: a tqdm bar (tqdm comes with transformers). Anywhere else (a job log, a pipe, CI): plain lines,
one per tenth of the work and one at the end, so that a log shows the step is alive without a line per item
and without carriage returns. Everything goes to stderr: stdout stays the command's result.

    with Progress("prepare: writing shards", total=12, unit="shard", enabled=True) as bar:
        for ...:
            bar.update(1)
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

__all__ = ["Progress", "note"]

PLAIN_STEPS = 10  # plain mode: a line at every tenth of the work (and the last item)


def note(message: str, *, enabled: bool = True, stream: IO[str] | None = None) -> None:
    """One plain progress line on stderr (a step that has no count, or a summary such as prepare's repairs)."""
    if enabled:
        out = stream or sys.stderr
        print(message, file=out, flush=True)


class Progress:
    """A counted step: tqdm bar on a TTY, else a plain line every tenth. Disabled -> does nothing.

    `stream` defaults to `sys.stderr` when the step starts (so pytest's capture and redirections apply).
    """

    def __init__(self, desc: str, total: int, *, unit: str = "it", enabled: bool = True,
                 stream: IO[str] | None = None):
        self.desc, self.total, self.unit, self.enabled = desc, max(0, int(total)), unit, enabled
        self.stream = stream
        self.n = 0
        self._bar: Any = None
        self._next_line = 0
        self._t0 = 0.0

    def __enter__(self) -> "Progress":
        if not self.enabled:
            return self
        self.stream = self.stream or sys.stderr
        self._t0 = time.perf_counter()
        isatty = getattr(self.stream, "isatty", lambda: False)
        if isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, file=self.stream, leave=True,
                             mininterval=0.5)
        else:
            self._next_line = 1
        return self

    def update(self, k: int = 1) -> None:
        """Count `k` more items done."""
        if not self.enabled:
            return
        self.n += k
        if self._bar is not None:
            self._bar.update(k)
            return
        if self.total and (self.n * PLAIN_STEPS >= self._next_line * self.total or self.n >= self.total):
            pct = 100 * self.n // self.total
            secs = time.perf_counter() - self._t0
            print(f"{self.desc}: {self.n}/{self.total} {self.unit}s ({pct}%, {secs:.1f} s)", file=self.stream,
                  flush=True)
            while self._next_line * self.total <= self.n * PLAIN_STEPS:
                self._next_line += 1

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
