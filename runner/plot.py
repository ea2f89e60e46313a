"""Loss curves: runs/<id>/loss.png and loss.csv at the end of a run, `runner plot` for several
runs on one chart, and a one-line sparkline for the terminal.

The chart shows the training loss and the held-out loss against the step, and the learning
rate on a second axis; its title names the run, the model and what the run cost. The CSV holds
the numbers drawn, one row per step, so the chart can be checked and redrawn elsewhere.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from runner.files import json_lines

SPARKS = "▁▂▃▄▅▆▇█"
CSV_FIELDS = ("step", "loss", "val_loss", "lr")


@dataclass
class Curves:
    """One run's metrics by step (steps without a value are absent from that mapping)."""

    label: str
    loss: dict[int, float] = field(default_factory=dict)
    val_loss: dict[int, float] = field(default_factory=dict)
    lr: dict[int, float] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.loss or self.val_loss)


def read_curves(metrics: Path, label: str) -> Curves:
    """The curves of a metrics.jsonl (trainer/finetune.py writes `loss` and `lr` at training
    steps, `val_loss` at evaluations); non-finite values are left out."""
    curves = Curves(label)
    for entry in json_lines(metrics):
        step = entry.get("step")
        if not isinstance(step, int):
            continue
        for name in ("loss", "val_loss", "lr"):
            value = entry.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                getattr(curves, name)[step] = float(value)
    return curves


def write_csv(curves: Curves, path: Path) -> None:
    steps = sorted(curves.loss.keys() | curves.val_loss.keys() | curves.lr.keys())
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_FIELDS)
        for step in steps:
            writer.writerow([step, *(_cell(getattr(curves, name).get(step)) for name in CSV_FIELDS[1:])])


def _cell(value: float | None) -> str:
    return "" if value is None else repr(value)


def draw(runs: list[Curves], title: str, path: Path) -> None:
    """A PNG of the runs' losses (one colour per run; held-out loss dashed with markers) and,
    for a single run, its learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(8, 4.5), dpi=100)
    try:
        for index, curves in enumerate(runs):
            colour = f"C{index}"
            name = "" if len(runs) == 1 else f"{curves.label}: "
            if curves.loss:
                axis.plot(*_xy(curves.loss), color=colour, linewidth=1.2, label=f"{name}train loss")
            if curves.val_loss:
                axis.plot(*_xy(curves.val_loss), "o--", color=colour, label=f"{name}held-out loss")
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.grid(alpha=0.3)
        handles, labels = axis.get_legend_handles_labels()
        if len(runs) == 1 and runs[0].lr:
            second = axis.twinx()
            second.plot(*_xy(runs[0].lr), color="grey", linewidth=0.8, alpha=0.7, label="learning rate")
            second.set_ylabel("learning rate")
            more_handles, more_labels = second.get_legend_handles_labels()
            handles, labels = handles + more_handles, labels + more_labels
        axis.legend(handles, labels, loc="upper right", fontsize="small")
        axis.set_title(title, fontsize="medium")
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        pyplot.close(figure)


def _xy(values: dict[int, float]) -> tuple[list[int], list[float]]:
    steps = sorted(values)
    return steps, [values[step] for step in steps]


def sparkline(values: list[float], width: int = 24) -> str:
    """The values as a line of block characters, squeezed to at most width (each character
    the mean of its share of the values)."""
    if not values:
        return ""
    buckets = [values[i * len(values) // width : (i + 1) * len(values) // width] for i in range(width)]
    means = [sum(b) / len(b) for b in buckets if b] if len(values) > width else list(values)
    low, high = min(means), max(means)
    span = (high - low) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - low) / span * len(SPARKS)))] for v in means)


def run_title(recorded: dict, cost_report: dict | None) -> str:
    """The run's name, its model (size, or the checkpoint folder, and the LoRA) and cost."""
    parts = [str(recorded.get("run_id") or (recorded.get("job") or {}).get("name") or "run")]
    trainer = recorded.get("trainer") or {}
    config, model = trainer.get("config") or {}, (trainer.get("environment") or {}).get("model") or {}
    if model.get("base_params"):
        parts.append(f"{_count(model['base_params'])} parameters")
    elif config.get("checkpoint_dir"):
        parts.append(Path(str(config["checkpoint_dir"])).name)
    if config.get("lora_r"):
        parts.append(f"LoRA r{config['lora_r']} on {','.join(config.get('lora_targets') or [])}")
    for total in (cost_report or {}).get("totals", []):
        parts.append(f"{total['total']:.4f} {total['currency']}")
    return " · ".join(parts)


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def chart_run(run_dir: Path, recorded: dict) -> Path | None:
    """runs/<id>/loss.png and loss.csv from its metrics.jsonl; None when it has no losses."""
    curves = read_curves(run_dir / "metrics.jsonl", str(recorded.get("run_id") or run_dir.name))
    if curves.empty:
        return None
    cost_report = None
    if (run_dir / "cost.json").is_file():
        cost_report = json.loads((run_dir / "cost.json").read_text(encoding="utf-8"))
    write_csv(curves, run_dir / "loss.csv")
    draw([curves], run_title(recorded, cost_report), run_dir / "loss.png")
    return run_dir / "loss.png"
