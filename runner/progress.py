"""Progress on the terminal: bars for transfers (image layers, inputs, outputs: bytes, rate, ETA)
and for training (step of total, loss, tokens/s, ETA, cost so far).

On a terminal the bars are drawn with rich, and every other line the run prints appears above
them. Without one (a log file, CI, a pipe) there are no bars: a transfer prints at most one plain
line per item every PROGRESS_EVERY_S seconds and one when it is done, and training shows the
trainer's own step lines, which are printed either way.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, ProgressColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

PROGRESS_EVERY_S = 2.0
# trainer/finetune.py's step line: "step 10/60 loss 3.2100 lr 3.00e-03 1234 tok/s padding ..."
STEP_LINE = re.compile(r"step (\d+)/(\d+) loss ([0-9.eE+-]+|nan|inf) .*?(\d+) tok/s")


class Progress:
    """The bars of one command; plain lines where the stream is not a terminal."""

    def __init__(self, stream: TextIO, *, bars: bool, silent: bool = False) -> None:
        self.stream = stream
        self.bars = bars
        self.silent = silent  # --quiet: no transfer lines either
        self._rich = None  # started with the first bar, stopped by close()
        self._tasks: dict[str, int] = {}
        self._last_line: dict[str, float] = {}
        self.cost_so_far: Callable[[], str] | None = None  # shown on the training bar
        self._cost, self._cost_at = "", float("-inf")

    # -- lines -------------------------------------------------------------------------

    def print(self, text: str) -> None:
        """A line of output: above the bars while they are drawn."""
        if self._rich is not None:
            self._rich.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        self.print(text)

    # -- transfers ---------------------------------------------------------------------

    def __call__(self, key: str, done: int, total: int) -> None:
        """A transfer of `total` bytes named key has `done` so far (image sync's LayerProgress)."""
        self.transfer(_short(key), done, total)

    def sink(self, label: str) -> Callable[[int, int], None]:
        """A (done, total) callback for one transfer, as RemoteHost.put and get take."""
        return lambda done, total: self.transfer(label, done, total)

    def transfer(self, label: str, done: int, total: int) -> None:
        if self.silent:
            return
        if self.bars:
            rich = self._started()
            if label not in self._tasks:
                self._tasks[label] = rich.add_task(label, total=total or None, kind="bytes", status="")
            rich.update(self._tasks[label], completed=done, total=total or None)
            return
        now = time.monotonic()
        if done < total and now - self._last_line.get(label, float("-inf")) < PROGRESS_EVERY_S:
            return
        self._last_line[label] = now
        percent = 100 * done / total if total else 100
        self.print(f"  {label}: {done / 1e6:.1f}/{total / 1e6:.1f} MB ({percent:.0f}%)")

    # -- training ----------------------------------------------------------------------

    def training_line(self, line: str) -> None:
        """Move the training bar on to the step a trainer's step line reports."""
        match = STEP_LINE.search(line) if self.bars else None
        if match is None:
            return
        step, total, loss, tokens_per_s = match.groups()
        rich = self._started()
        if "train" not in self._tasks:
            self._tasks["train"] = rich.add_task("train", total=int(total), kind="steps", status="")
        status = f"loss {float(loss):.4f}  {int(tokens_per_s)} tok/s{self._cost_text()}"
        rich.update(self._tasks["train"], completed=int(step), total=int(total), status=status)

    def _cost_text(self) -> str:
        """What the run has cost so far, asked for at most every PROGRESS_EVERY_S seconds."""
        if self.cost_so_far is None:
            return ""
        now = time.monotonic()
        if now - self._cost_at >= PROGRESS_EVERY_S:
            self._cost, self._cost_at = self.cost_so_far(), now
        return f"  {self._cost}"

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
            self._tasks.clear()

    def _started(self):
        if self._rich is None:
            console = Console(file=self.stream, force_terminal=True)
            self._rich = RichProgress(
                TextColumn("{task.description:<14}"),
                BarColumn(bar_width=30),
                TaskProgressColumn(),
                _AmountColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=console,
                transient=False,
            )
            self._rich.start()
        return self._rich


def _short(key: str) -> str:
    """A layer's diffID as its first 12 hex digits; anything else as given."""
    return "layer " + key.removeprefix("sha256:")[:12] if key.startswith("sha256:") else key


class _AmountColumn(ProgressColumn):
    """Bytes done of total and the rate for transfers; step of total for training."""

    def render(self, task) -> Text:
        if task.fields.get("kind") == "steps":
            return Text(f"{int(task.completed)}/{int(task.total or 0)} steps")
        speed = f" {task.speed / 1e6:.1f} MB/s" if task.speed else ""
        total = f"/{task.total / 1e6:.1f}" if task.total else ""
        return Text(f"{task.completed / 1e6:.1f}{total} MB{speed}")
