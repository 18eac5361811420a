"""The runs of a sweep directory (Hydra multirun): their scores, overrides and best checkpoints.

Every `train` run writes `metrics.json` when it completes, `failure.json` when it fails (and Hydra
`.hydra/overrides.yaml` when it starts) into its own run directory; a sweep is a folder of such run
directories. Plain Python, for `sweep_dir=... top_k=...` ensembles, the sweep report and notebooks
that compare runs.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

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
    status: str = "completed"    # completed (metrics.json) | failed (failure.json) | incomplete (killed, or running)
    failure: dict = field(default_factory=dict)  # failure.json: error, epoch, global_step, seconds

    @property
    def ok(self) -> bool:
        return self.score is not None and self.best_checkpoint is not None and self.best_checkpoint.is_file()

    @property
    def settings(self) -> dict[str, str]:
        """The overrides as {key: value as typed}, keys without Hydra's +/++/~ prefixes (`+x=1` and
        `x=1` set the same key; a deletion `~x` has the value "~")."""
        out = {}
        for override in self.overrides:
            key, equals, value = override.partition("=")
            out[key.lstrip("+~")] = value if equals or not key.startswith("~") else "~"
        return out


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    # Hydra saves the list with YAML, which quotes some overrides ('+x={a: 1}'); loading it gives them back as
    # typed, and every item stays a string since each holds '=' or starts with '~'
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        log.warning("%s: unreadable (%s); the run is listed without its overrides", path, str(e).splitlines()[0])
        return []
    return [str(o) for o in loaded or []]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:  # cut short by a kill mid-write, or edited by hand
        log.warning("%s: unreadable (%s); read as if missing", path, e)
        return {}


def read_run(run_dir: str | Path) -> Run:
    """One run directory; a run without metrics.json (still running, or failed) has score None."""
    run_dir = Path(run_dir)
    metrics_path, failure_path = run_dir / "metrics.json", run_dir / "failure.json"
    report = _read_json(metrics_path) if metrics_path.is_file() else {}
    failure = _read_json(failure_path) if failure_path.is_file() else {}
    # a run directory reused with resume=auto can hold both: the newer file tells how it ended
    if failure and (not report or failure_path.stat().st_mtime >= metrics_path.stat().st_mtime):
        status = "failed"
    else:
        status = "completed" if report else "incomplete"
    optimized = report.get("optimized_metric") or {}
    name = optimized.get("name")
    mode = optimized.get("mode") or ("min" if name and "loss" in name else "max")
    best = report.get("best_checkpoint")
    best_path = Path(best) if best else None
    if best_path is not None and not best_path.is_file():  # a sweep copied or moved since: look in the run itself
        best_path = run_dir / "checkpoints" / best_path.name
    return Run(run_dir, _overrides(run_dir), name, mode, optimized.get("value"), best_path, report, status, failure)


def find_runs(sweep_dir: str | Path, where: str = "sweep_dir",
              single_run_fix: str = "use ckpt_path=<its checkpoints/best-*.ckpt> for one model") -> list[Run]:
    """Every run directory below `sweep_dir` (those holding `.hydra/overrides.yaml`, `metrics.json` or
    `failure.json`), in order. Found by content: sweepers may number or name them as they like."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"{where}={sweep_dir}: no such directory; give the folder of a multirun "
                        "(logs/train/multiruns/<time>)")
    dirs = {p.parent for pattern in ("metrics.json", "failure.json") for p in sweep_dir.rglob(pattern)}
    dirs |= {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    # a sweep folder itself holds only multirun.yaml; run files at its top make it one run (finished or not)
    if sweep_dir in dirs:
        raise UserError(f"{where}={sweep_dir}: a single run directory, not a sweep; {single_run_fix}")
    if not dirs:
        raise UserError(f"{where}={sweep_dir}: no run directories (none holds metrics.json, failure.json or "
                        ".hydra/overrides.yaml); give the folder of a multirun (logs/train/multiruns/<time>)")
    return [read_run(d) for d in sorted(dirs, key=lambda d: (len(d.parts), _natural(d.name), str(d)))]


def _natural(name: str):
    return (0, int(name)) if name.isdigit() else (1, name)


def ranked(runs: list[Run]) -> list[Run]:
    """Best first by each run's own optimized_metric and mode; then completed runs without a score, failed
    and incomplete runs, each in their given order (sorted is stable)."""
    def key(run: Run):
        scored = run.status == "completed" and run.score is not None and math.isfinite(run.score)
        if scored:
            return (0, -run.score if run.mode == "max" else run.score)
        return ({"completed": 1, "failed": 2}.get(run.status, 3), 0.0)
    return sorted(runs, key=key)


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
    return ranked(done)[:top_k]
