"""What the checks hand back, and how it reaches the user: a table on the console, tune_report.json,
and the `train` command line with the suggested values."""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

STATUSES = ("ok", "warn", "fail")
STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


@dataclass
class CheckResult:
    """One check's verdict. `value` is the measured number, `expected` what a healthy set-up gives,
    `message` one sentence saying what it means and what to do; `details` holds curves and extras."""

    name: str
    status: str
    value: Any
    expected: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def print_report(results: list[CheckResult], console: Console, title: str) -> None:
    table = Table(title=title, show_lines=True)
    for column in ("check", "status", "value", "expected", "message"):
        table.add_column(column, justify="right" if column == "value" else "left", overflow="fold")
    for r in results:
        status = f"[{STYLE[r.status]}]{r.status}[/]"
        table.add_row(r.name, status, _format(r.value), r.expected, r.message)
    console.print(table)


def overall_status(results: list[CheckResult]) -> str:
    """The worst status of all checks."""
    return max((r.status for r in results), key=STATUSES.index, default="ok")


def suggestions(results: list[CheckResult]) -> dict[str, Any]:
    """Overrides for `train`: the lr finder's base lr; the batch size only when memory bounded it
    (a search that stopped at its own bound or at the data set's size measured nothing)."""
    by_name = {r.name: r for r in results}
    suggested: dict[str, Any] = {}
    if "lr_finder" in by_name and by_name["lr_finder"].value is not None:
        suggested["optim.lr"] = float(by_name["lr_finder"].value)
    if "batch_size" in by_name and by_name["batch_size"].details.get("memory_bound"):
        suggested["data.batch_size"] = int(by_name["batch_size"].value)
    return suggested


def train_command(task_overrides: list[str], suggested: dict[str, Any]) -> str:
    """`python -m lightning_project.train` with the user's own overrides (those of `tune` itself, of
    Hydra, and the ones the suggestion replaces left out) followed by the suggested values."""
    replaced = tuple(f"{key}=" for key in suggested)
    kept = [
        o for o in task_overrides
        if not o.lstrip("+~").startswith(("tune.", "hydra.", "task_name=")) and not o.lstrip("+").startswith(replaced)
    ]
    new = [f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}" for key, value in suggested.items()]
    return " ".join(["python -m lightning_project.train", *(shlex.quote(o) for o in kept + new)])
