"""Shared helpers: run the real commands in subprocesses, build tiny image folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# quiet, offline, CSV only: what most end-to-end runs share
FAST = ["trainer.enable_progress_bar=false", "model.pretrained=false", "logger=csv", "trainer.num_sanity_val_steps=0"]


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory) -> Path:
    """An empty torch cache: no test sees (or fills) the user's real $TORCH_HOME."""
    return tmp_path_factory.mktemp("torch_home")


@pytest.fixture(scope="session")
def env(torch_home) -> dict:
    return {**os.environ, "TORCH_HOME": str(torch_home), "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}


@pytest.fixture(autouse=True)
def _isolated_torch_home(monkeypatch, torch_home):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))


def run_command(module: str, *args: str, env: dict, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m lightning_project.<module> args...` as a user types it."""
    proc = subprocess.run(
        [sys.executable, "-m", f"lightning_project.{module}", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
            f"--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def run_module(capsys, name: str, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python -m lightning_project.<name> args`, run in this process as
    Python runs it (runpy, sys.argv: Hydra parses the command line): the imports are paid once. Hydra's job
    logging replaces the root logger's handlers with ones on this test's captured streams, so they are put
    back afterwards (a later test would log into a closed stream)."""
    import logging
    import runpy
    import warnings

    root, argv = logging.getLogger(), sys.argv
    handlers, level = root.handlers[:], root.level
    HydraConfig.instance().cfg = None  # as in a new process: no config left by an earlier compose_train
    sys.argv = [f"lightning_project.{name}", *args]
    status = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is also imported as a package member
            runpy.run_module(f"lightning_project.{name}", run_name="__main__")
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def train(run_dir: Path, *overrides: str, env: dict, check: bool = True, fast: bool = True):
    args = [f"hydra.run.dir={run_dir}", *(FAST if fast else []), *overrides]
    return run_command("train", *args, env=env, cwd=run_dir.parent, check=check)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a user mistake must produce: non-zero exit, `error: ...`, no traceback."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def make_image_folder(
    root: Path, classes=("cat", "dog", "fox"), per_class: int = 8, size: int = 40, ext: str = ".png", seed: int = 0
) -> Path:
    """Class folders of small images whose colour says the class (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    for index, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            pixels = rng.integers(0, 60, (size, size, 3))
            pixels[..., index % 3] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img{j}{ext}")
    return root


def compose_train(overrides: list[str], run_dir: Path, name: str = "train"):
    """The config as `python -m lightning_project.<name> overrides` composes it, resolved, with
    HydraConfig set as in a real run (for in-process runs of the entry functions)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.runtime.cwd = str(run_dir)
    HydraConfig.instance().set_config(cfg)  # what ${hydra:...} resolves against
    with open_dict(cfg):
        del cfg["hydra"]  # as the task function sees it
    OmegaConf.resolve(cfg)
    return cfg


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """Three colour classes of 12 PNGs each (40 px)."""
    return make_image_folder(tmp_path_factory.mktemp("photos") / "images", per_class=12)


@pytest.fixture(scope="session")
def sweep(tmp_path_factory, photo_folder, env) -> Path:
    """A real two-run grid sweep (`train -m optim.lr=0.02,0.05`) of ResNet-18 on the colour folders:
    the sweep directory that ensembles, evaluate, predict, serve and the sweep notebook read."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "multirun"
    run_command(
        "train", "-m", "data=imagefolder", f"data.root={photo_folder}", "augment.image_size=32", "data.batch_size=8",
        "data.num_workers=0", "trainer.max_epochs=2", "optim.lr=0.02,0.05", f"hydra.sweep.dir={sweep_dir}", *FAST,
        env=env, cwd=sweep_dir.parent,
    )
    return sweep_dir
