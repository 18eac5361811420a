"""The report of a sweep: every run in one table, the metric against each swept parameter, the command
that repeats the best run.

`write_report(sweep_dir)` writes `sweep_summary.csv` and `sweep.png` into the sweep directory and
`show(report)` prints the best runs and that command. The `report` command, the Hydra callback at the
end of each multirun and notebooks all call these two.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lightning_project.errors import UserError
from lightning_project.inference.runs import Run, find_runs, ranked
from lightning_project.utils.provenance import rerun_command
from lightning_project.utils.summary import subplots

CSV_NAME, PNG_NAME = "sweep_summary.csv", "sweep.png"
# final values, as columns "final <name>": the optimized metric's column (its best value) may be "val/acc" too
FINAL = ("train/loss", "train/acc", "val/loss", "val/acc")
CURVES = 5  # learning curves overlaid at most: more are unreadable


def scored(run: Run) -> bool:
    return run.status == "completed" and run.score is not None and math.isfinite(run.score)


@dataclass
class Report:
    sweep_dir: Path
    runs: list[Run]     # best first, then completed runs without a score, failed, incomplete
    swept: list[str]    # the override keys whose values differ between runs
    metrics: list[str]  # the optimized metrics' names: one per sweep, normally, but each run says its own
    rows: list[dict]    # sweep_summary.csv, in the order of `runs`
    csv_path: Path
    png_path: Path

    @property
    def best(self) -> Run | None:
        return self.runs[0] if self.runs and scored(self.runs[0]) else None


def swept_keys(runs: list[Run]) -> list[str]:
    """Override keys (in command-line order) that differ between runs: those a grid or Optuna varied.
    The ones every run shares (data.root, ...) are in the reproducing command instead."""
    settings = [run.settings for run in runs]
    keys = dict.fromkeys(key for s in settings for key in s)
    return [key for key in keys if len({s.get(key) for s in settings}) > 1]


def summary_rows(runs: list[Run], swept: list[str], metrics: list[str], sweep_dir: Path) -> list[dict]:
    rows = []
    for run in runs:
        final = run.metrics.get("metrics") or {}
        rows.append({
            "run": run.path.relative_to(sweep_dir).as_posix(),
            "status": run.status,
            **{key: run.settings.get(key) for key in swept},
            **{name: run.score if run.metric == name else None for name in metrics},
            **{f"final {name}": final.get(name) for name in FINAL},
            "epochs": run.metrics.get("epochs", run.failure.get("epoch")),
            "wall_seconds": (run.metrics.get("timings") or {}).get("total_seconds", run.failure.get("seconds")),
            "best_checkpoint": run.best_checkpoint,
            "error": run.failure.get("error") if run.status == "failed" else None,
        })
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:  # None is written as an empty cell
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def command(run: Run) -> str:
    """The command line that repeats `run` alone (the sweep's own settings left out)."""
    return rerun_command(run.overrides)


def _number(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _label(run: Run, swept: list[str], width: int = 60) -> str:
    text = f"{run.path.name}: " + (" ".join(f"{k}={run.settings[k]}" for k in swept if k in run.settings) or "-")
    return text if len(text) <= width else text[: width - 3] + "..."


def _by_parameter(ax, key: str, runs: list[Run]) -> None:
    """Each scored run's metric at its value of `key`; the best run as a star (`runs` are ranked)."""
    points = [(run, run.settings[key]) for run in runs if key in run.settings]
    ax.set_xlabel(key)
    ax.grid(alpha=0.3)
    if not points:
        ax.text(0.5, 0.5, "no completed run", ha="center", va="center", transform=ax.transAxes)
        return
    xs = [_number(value) for _, value in points]
    if None in xs:  # model names, presets, lists: one column of points per value
        names = sorted({value for _, value in points})
        xs = [names.index(value) for _, value in points]
        ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 4 else 0)
        ax.set_xlim(-0.5, len(names) - 0.5)
    elif min(xs) > 0 and max(xs) / min(xs) > 10:
        ax.set_xscale("log")  # learning rates, weight decays: decades apart
    ax.scatter(xs, [run.score for run, _ in points], alpha=0.7)
    best = [(x, run.score) for x, (run, _) in zip(xs, points) if run is runs[0]]
    if best:
        ax.scatter(*zip(*best), marker="*", s=200, color="C1", zorder=3)
    ax.set_ylabel(runs[0].metric)
    ax.set_title(f"{runs[0].metric} by {key}")


def _curves(ax, runs: list[Run], swept: list[str]) -> None:
    """The optimized metric per epoch (metrics.json's history) of each run, overlaid."""
    for run in runs:
        history = run.metrics.get("history") or []
        points = [(int(row.get("epoch", i)) + 1, row[run.metric]) for i, row in enumerate(history)
                  if row.get(run.metric) is not None]
        if points:
            ax.plot(*zip(*points), "o-", label=_label(run, swept))
    metric = runs[0].metric if runs else "metric"
    ax.set_title(f"{metric} per epoch, best {len(runs)} runs")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=8)
    else:  # runs without a per-epoch history of the metric
        ax.text(0.5, 0.5, f"no per-epoch {metric} in the runs' history", ha="center", va="center",
                transform=ax.transAxes)


def plot(runs: list[Run], swept: list[str], path: Path, curves: int = CURVES) -> Figure:
    """One panel per swept key (metric against its values), then the learning curves of the best runs."""
    done = [run for run in runs if scored(run)]
    panels = len(swept) + 1
    columns = min(panels, 3)
    rows = math.ceil(panels / columns)
    fig, axes = subplots(rows, columns, figsize=(4.5 * columns, 3.6 * rows), squeeze=False)
    axes = list(axes.flat)
    for ax in axes[panels:]:
        fig.delaxes(ax)
    for ax, key in zip(axes, swept):
        _by_parameter(ax, key, done)
    _curves(axes[panels - 1], done[:curves], swept)
    best = f"; \u2605 best run {done[0].path.name}" if done and swept else ""
    fig.suptitle(f"{path.parent.name}: {len(done)} of {len(runs)} runs completed with a score{best}")
    fig.savefig(path, dpi=100)
    return fig


def write_report(sweep_dir: str | Path, where: str = "SWEEP_DIR") -> Report:
    """Read every run below `sweep_dir`, write sweep_summary.csv and sweep.png there."""
    sweep_dir = Path(sweep_dir)
    runs = ranked(find_runs(sweep_dir, where, single_run_fix=(
        "its own report is its metrics.json and curves.png; give the multirun folder that holds the run "
        "folders (logs/train/multiruns/<time>)")))
    swept = swept_keys(runs)
    metrics = list(dict.fromkeys(run.metric for run in runs if run.metric))
    report = Report(sweep_dir, runs, swept, metrics, summary_rows(runs, swept, metrics, sweep_dir),
                    sweep_dir / CSV_NAME, sweep_dir / PNG_NAME)
    try:
        write_csv(report.rows, report.csv_path)
        plot(runs, swept, report.png_path)
    except OSError as e:  # a read-only or full disk: the report goes next to the runs, nowhere else
        raise UserError(f"{where}={sweep_dir}: cannot write {e.filename or 'the report'} ({e.strerror or e}); "
                        "the report is written into the sweep folder: make it writable, or free space") from None
    return report


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else escape(str(value))  # overrides hold [..]: not markup


def show(report: Report, console: Console, top: int = 5) -> None:
    """The `top` runs as a table, the command that repeats the best one, and where the files are."""
    counts = ", ".join(f"{n} {status}" for status, n in Counter(run.status for run in report.runs).items())
    shown = report.rows[:top]
    columns = ["run", "status", *report.swept, *report.metrics, "epochs", "wall_seconds"]
    if any(row["error"] for row in shown):
        columns.append("error")
    table = Table(title=f"best {len(shown)} of {len(report.runs)} runs ({counts})")
    for column in columns:
        table.add_column(escape(column), overflow="fold")
    for row in shown:
        table.add_row(*(_cell(row[column]) for column in columns))
    console.print(table)
    best = report.best
    if best is None:
        console.print(f"no run completed with a score: nothing to repeat (errors in {report.csv_path})",
                      markup=False, highlight=False)
    else:
        console.print(f"best run {best.path} ({best.metric} = {best.score:.4g}), repeated by:",
                      markup=False, highlight=False)
        console.print(command(best), markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {report.csv_path} and {report.png_path}", markup=False, highlight=False, soft_wrap=True)
