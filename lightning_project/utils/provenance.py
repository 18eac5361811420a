"""What a run directory needs to be rerun: the command line, the package versions, the git commit."""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("lightning_project", "torch", "torchvision", "pytorch-lightning", "torchmetrics", "hydra-core",
            "omegaconf", "numpy", "pillow", "scikit-learn", "optuna", "hydra-optuna-sweeper")
PROJECT = Path(__file__).resolve().parents[2]  # the checkout (conf/ beside the package), when run from one


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(PROJECT), *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> dict | None:
    """The checkout's commit and whether it had uncommitted changes (None: not a git checkout)."""
    if not (PROJECT / "conf").is_dir():  # an installed copy: whatever repository holds site-packages is not ours
        return None
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None
    changed = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(changed), "changed_files": (changed or "").splitlines()[:50]}


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


SWEEP_ONLY = ("hparams_search", "hydra.", "+hydra.")  # what made a sweep, not one of its runs


def rerun_command(overrides: list[str], module: str = "lightning_project.train") -> str:
    """The command line that repeats one run alone: its overrides without the sweep's own settings
    (hparams_search= would start the search again), quoted for a POSIX shell."""
    kept = [o for o in overrides if not o.startswith(SWEEP_ONLY)]
    if any(o.startswith("experiment=") for o in kept):  # a recipe may be a search itself (coarse_search)
        kept.append("hydra.mode=RUN")
    return " ".join(["python", "-m", module, *map(shlex.quote, kept)])


def describe(command: str, overrides: list[str]) -> dict:
    """Everything `environment.json` holds; `command` is the module (lightning_project.train)."""
    return {
        "command": rerun_command(overrides, command),
        "overrides": overrides,
        "argv": sys.argv,
        "cwd": str(Path.cwd()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions(),
        "git": git_state(),
    }
