"""What a person watching ``tune`` sees: one live status line on a terminal, and a line per finished trial.

On a terminal the status line is redrawn in place; elsewhere (a log file, CI) it is printed at most once a
minute, so an overnight log stays readable. Finished trials are printed and logged as they happen.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

log = logging.getLogger("autoresearch.tune")

QUIET_INTERVAL_S = 60.0


class Progress:
    def __init__(self, budget: Callable[[], str], stream=sys.stderr) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.started = time.monotonic()
        self.line = ""
        self.printed_at = 0.0
        self.event(f"budget: {budget()}")

    def update(self, status: str) -> None:
        line = f"[{format_duration(time.monotonic() - self.started)}] {status}"
        if self.live:
            self.stream.write("\r\033[K" + line[: _width()])
            self.stream.flush()
        elif line != self.line and time.monotonic() - self.printed_at >= QUIET_INTERVAL_S:
            print(line, file=self.stream, flush=True)
            self.printed_at = time.monotonic()
        self.line = line

    def event(self, text: str) -> None:
        log.info(text)
        prefix = "\r\033[K" if self.live else ""
        print(f"{prefix}[{format_duration(time.monotonic() - self.started)}] {text}", file=self.stream, flush=True)
        if self.live and self.line:
            self.stream.write(self.line[: _width()])
            self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _width() -> int:
    import shutil

    return max(40, shutil.get_terminal_size().columns - 1)
