"""Human-facing progress on stderr, so stdout stays free for `--json`."""

from __future__ import annotations

import sys
from typing import TextIO

from runner.progress import Progress


class Reporter:
    """Prints phase transitions and (unless quiet) the output of the job's commands, with progress
    bars for transfers and training on a terminal (runner.progress).

    Verbose adds the chatty output (image build steps) that otherwise goes to log files only."""

    def __init__(
        self,
        *,
        quiet: bool = False,
        verbose: bool = False,
        stream: TextIO | None = None,
        bars: bool | None = None,
    ) -> None:
        self.quiet = quiet
        self.verbose = verbose and not quiet
        self.stream = stream or sys.stderr
        if bars is None:
            bars = self.stream.isatty()
        self.progress = Progress(self.stream, bars=bars and not quiet, silent=quiet)

    def _write(self, text: str) -> None:
        self.progress.print(text)

    def info(self, text: str) -> None:
        if not self.quiet:
            self._write(text)

    def warn(self, text: str) -> None:
        self._write(f"warning: {text}")

    def phase(self, name: str, status: str, detail: str = "") -> None:
        if not self.quiet or status == "failed":
            suffix = f" ({detail})" if detail else ""
            self._write(f"==> {name}: {status}{suffix}")

    def output(self, source: str, line: str) -> None:
        if not self.quiet:
            self._write(f"[{source}] {line}")
        if source == "train":
            self.progress.training_line(line)

    def close(self) -> None:
        """Stop drawing bars (the run is over); later lines print plainly."""
        self.progress.close()
