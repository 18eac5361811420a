"""The runs of a sweep directory (Hydra multirun): their scores, overrides and best checkpoints.

Every `train` run writes `metrics.json` (and Hydra `.hydra/overrides.yaml`) into its own run
directory; a sweep is a folder of such run directories. Plain Python, for `sweep_dir=...
top_k=...` ensembles and for notebooks that compare runs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from lightning_project.errors import UserError

log = logging.getLogger("lightning_project")


@dataclass
class Run:
    path: Path                   # the run directory
    overrides: list[str]         # the command-line overrides that made this run (Hydra's overrides.yaml)
    metric: str | None           # optimized_metric's name ...
    mode: str                    # ... whether larger (max) or smaller (min) is better ...
    score: float | None          # ... and its best value; None for a run that failed before reporting
    best_checkpoint: Path | None
    metrics: dict = field(default_factory=dict)  # the full metrics.json

    @property
    def ok(self) -> bool:
        return self.score is not None and self.best_checkpoint is not None and self.best_checkpoint.is_file()


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    # one override per line as `- key=value`; read without YAML so values stay exactly as typed
    return [line[2:].strip() for line in path.read_text().splitlines() if line.startswith("- ")]


def read_run(run_dir: str | Path) -> Run:
    """One run directory; a run without metrics.json (still running, or failed) has score None."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    report = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    optimized = report.get("optimized_metric") or {}
    name = optimized.get("name")
    mode = optimized.get("mode") or ("min" if name and "loss" in name else "max")
    best = report.get("best_checkpoint")
    best_path = Path(best) if best else None
    if best_path is not None and not best_path.is_file():  # a sweep copied or moved since: look in the run itself
        best_path = run_dir / "checkpoints" / best_path.name
    return Run(run_dir, _overrides(run_dir), name, mode, optimized.get("value"), best_path, report)


def find_runs(sweep_dir: str | Path, where: str = "sweep_dir") -> list[Run]:
    """Every run directory below `sweep_dir` (those holding `.hydra/` or `metrics.json`), in order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"{where}={sweep_dir}: no such directory; give the folder of a multirun "
                        "(logs/train/multiruns/<time>)")
    dirs = {p.parent for p in sweep_dir.rglob("metrics.json")}
    dirs |= {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    if (sweep_dir / "metrics.json").is_file():
        raise UserError(f"{where}={sweep_dir}: a single run directory, not a sweep; use "
                        f"ckpt_path=<its checkpoints/best-*.ckpt> for one model")
    dirs.discard(sweep_dir)  # the sweep's own .hydra (multirun.yaml) is not a run
    if not dirs:
        raise UserError(f"{where}={sweep_dir}: no run directories (none holds metrics.json); is it a sweep directory?")
    return [read_run(d) for d in sorted(dirs, key=lambda d: (len(d.parts), _natural(d.name), str(d)))]


def _natural(name: str):
    return (0, int(name)) if name.isdigit() else (1, name)


def best_runs(sweep_dir: str | Path, top_k: int, where: str = "sweep_dir") -> list[Run]:
    """The `top_k` finished runs with the best scores (by each run's own optimized_metric and mode)."""
    if not isinstance(top_k, int) or top_k < 1:
        raise UserError(f"top_k={top_k!r}: give the number of best runs to use (>= 1)")
    runs = find_runs(sweep_dir, where)
    done = [r for r in runs if r.ok]
    if not done:
        raise UserError(f"{where}={sweep_dir}: none of its {len(runs)} runs finished with a best checkpoint")
    names = {(r.metric, r.mode) for r in done}
    if len(names) > 1:
        raise UserError(f"{where}={sweep_dir}: its runs optimised different metrics {sorted(map(str, names))}; "
                        "rank runs of one sweep at a time")
    if len(done) < len(runs):
        log.warning("%s: %d of %d runs did not finish with a best checkpoint and are left out",
                    sweep_dir, len(runs) - len(done), len(runs))
    if top_k > len(done):
        log.warning("top_k=%d: the sweep has only %d finished runs; using all of them", top_k, len(done))
    sign = -1.0 if done[0].mode == "max" else 1.0
    return sorted(done, key=lambda r: sign * r.score)[:top_k]
