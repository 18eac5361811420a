"""The sweep report (`python -m lightning_project.report SWEEP_DIR` and the Hydra callback at the end of a
multirun): sweep_summary.csv, sweep.png and the command that repeats the best run.

Most sweeps here are written by hand in the files train.py leaves (metrics.json, failure.json,
.hydra/overrides.yaml), so every status and ordering is covered without training; one test reads the
session's real two-run sweep (conftest `sweep`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shlex
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from lightning_project import report as report_command
from lightning_project.reporting import command, write_report
from lightning_project.reporting.sweep import plot

CALLBACK = "lightning_project.reporting.hydra_callback.SweepReport"  # the _target_ in conf/hydra/default.yaml


def fake_run(sweep: Path, name: str, overrides: list[str], value: float | None = None, metric: str = "val/acc",
             mode: str = "max", curve: list[float] | None = None, failure: dict | None = None) -> Path:
    """A run directory as train.py leaves it: completed with `value`, failed with `failure`, else incomplete."""
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")  # as Hydra writes it (YAML quoting)
    if value is not None:
        curve = curve or [value]
        history = [{"epoch": float(i), metric: v, "train/loss": 1.0 / (i + 1)} for i, v in enumerate(curve)]
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "best.ckpt").write_bytes(b"x")
        (run / "metrics.json").write_text(json.dumps({
            "optimized_metric": {"name": metric, "mode": mode, "value": value},
            "metrics": {"train/loss": 0.5, "train/acc": 0.9, "val/loss": 0.25, "val/acc": curve[-1], "test/acc": 0.8},
            "best_checkpoint": str(run / "checkpoints" / "best.ckpt"),
            "epochs": len(curve),
            "timings": {"fit_seconds": 10.0, "test_seconds": 1.0, "total_seconds": 12.5},
            "history": history,
        }))
    if failure is not None:
        (run / "failure.json").write_text(json.dumps({"status": "failed", **failure}))
    return run


@pytest.fixture
def grid(tmp_path) -> Path:
    """optim.lr x scheduler with gaps in the numbering, an Optuna-style name, a failure and a killed run."""
    sweep = tmp_path / "multirun"
    fake_run(sweep, "0", ["data=digits", "optim.lr=0.001", "scheduler=onecycle"], 0.80, curve=[0.5, 0.7, 0.80])
    fake_run(sweep, "2", ["data=digits", "optim.lr=0.01", "scheduler=cosine"], 0.95, curve=[0.6, 0.95, 0.93])
    fake_run(sweep, "trial_a", ["data=digits", "optim.lr=0.1", "scheduler=cosine"], 0.90, curve=[0.9])
    fake_run(sweep, "5", ["data=digits", "optim.lr=1.0", "scheduler=onecycle"],
             failure={"error": "out of memory with data.batch_size=512", "epoch": 1, "global_step": 40,
                      "seconds": 33.0})
    fake_run(sweep, "7", ["data=digits", "optim.lr=0.5", "scheduler=cosine"])  # killed: neither file
    return sweep


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_summary_has_one_row_per_run_best_first_with_a_column_per_swept_key(grid):
    report = write_report(grid)
    rows = read_csv(grid / "sweep_summary.csv")
    assert list(rows[0]) == ["run", "status", "optim.lr", "scheduler", "val/acc", "final train/loss",
                             "final train/acc", "final val/loss", "final val/acc", "epochs", "wall_seconds",
                             "best_checkpoint", "error"]  # data=digits is shared by all: not a column
    assert [(r["run"], r["status"], r["optim.lr"], r["scheduler"], r["val/acc"]) for r in rows] == [
        ("2", "completed", "0.01", "cosine", "0.95"),
        ("trial_a", "completed", "0.1", "cosine", "0.9"),
        ("0", "completed", "0.001", "onecycle", "0.8"),
        ("5", "failed", "1.0", "onecycle", ""),
        ("7", "incomplete", "0.5", "cosine", ""),
    ]
    best, failed, killed = rows[0], rows[3], rows[4]
    # the optimized metric's best (epoch 2) next to the final epoch's value
    assert (best["val/acc"], best["final val/acc"], best["final train/loss"]) == ("0.95", "0.93", "0.5")
    assert (best["epochs"], best["wall_seconds"], best["error"]) == ("3", "12.5", "")
    assert best["best_checkpoint"] == str(grid / "2" / "checkpoints" / "best.ckpt")
    assert (failed["error"], failed["epochs"], failed["wall_seconds"]) == ("out of memory with data.batch_size=512",
                                                                            "1", "33.0")
    assert failed["best_checkpoint"] == killed["best_checkpoint"] == killed["error"] == killed["epochs"] == ""
    assert report.best.path == grid / "2" and report.swept == ["optim.lr", "scheduler"]


def test_min_mode_ranks_the_lowest_first_then_unscored_failed_and_incomplete(tmp_path):
    sweep = tmp_path / "sweep"
    fake_run(sweep, "0", ["optim.lr=1e-3"], 0.40, metric="val/loss", mode="min")
    fake_run(sweep, "1", ["optim.lr=1e-2"], 0.15, metric="val/loss", mode="min")
    fake_run(sweep, "2", ["optim.lr=1e-1"], 0.30, metric="val/loss", mode="min")
    diverged = fake_run(sweep, "3", ["optim.lr=1"], 0.1, metric="val/loss", mode="min")
    report_json = json.loads((diverged / "metrics.json").read_text())
    report_json["optimized_metric"]["value"] = None  # NaN is written as null
    (diverged / "metrics.json").write_text(json.dumps(report_json))
    fake_run(sweep, "4", ["optim.lr=10"])  # incomplete: last, after the failed runs 5 and 6
    fake_run(sweep, "5", ["optim.lr=100"], failure={"error": "nan loss", "epoch": 0, "global_step": 3, "seconds": 2.0})
    # a run resumed (resume=auto) that then failed: the newer of its two files says how it ended
    again = fake_run(sweep, "6", ["optim.lr=0.5"], 0.01, metric="val/loss", mode="min",
                     failure={"error": "killed by the OOM killer", "epoch": 4, "global_step": 9, "seconds": 9.0})
    os.utime(again / "metrics.json", (1e9, 1e9))
    rows = read_csv(write_report(sweep).csv_path)
    assert [(r["run"], r["status"], r["val/loss"]) for r in rows] == [
        ("1", "completed", "0.15"), ("2", "completed", "0.3"), ("0", "completed", "0.4"), ("3", "completed", ""),
        ("5", "failed", ""), ("6", "failed", "0.01"), ("4", "incomplete", ""),
    ]
    assert rows[5]["error"] == "killed by the OOM killer"


def test_plot_has_a_panel_per_swept_key_and_the_curves_of_the_best_five(tmp_path):
    sweep = tmp_path / "sweep"
    for i, lr in enumerate(["1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2", "1e-1"]):
        fake_run(sweep, str(i), [f"optim.lr={lr}", f"model={'resnet18' if i % 2 else 'vgg16'}"], 0.5 + i / 20,
                 curve=[0.3, 0.5 + i / 20])
    fake_run(sweep, "9", ["optim.lr=1", "model=vgg16"], failure={"error": "x", "epoch": None, "global_step": None,
                                                                 "seconds": 0.1})
    report = write_report(sweep)
    fig = plot(report.runs, report.swept, tmp_path / "again.png")
    lr_axes, model_axes, curves = fig.axes
    assert (lr_axes.get_xlabel(), lr_axes.get_xscale()) == ("optim.lr", "log")  # 1e-4 .. 1e-1: decades apart
    assert [t.get_text() for t in model_axes.get_xticklabels()] == ["resnet18", "vgg16"]
    points = lr_axes.collections[0].get_offsets()
    assert sorted(points[:, 0].tolist()) == pytest.approx([1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1])  # failed: none
    assert lr_axes.collections[1].get_offsets().tolist() == [[0.1, pytest.approx(0.8)]]  # the best, starred
    labels = [line.get_label() for line in curves.get_lines()]
    assert labels == ["6: optim.lr=1e-1 model=vgg16", "5: optim.lr=3e-2 model=resnet18", "4: optim.lr=1e-2 model=vgg16",
                      "3: optim.lr=3e-3 model=resnet18", "2: optim.lr=1e-3 model=vgg16"]
    assert curves.get_lines()[0].get_ydata().tolist() == pytest.approx([0.3, 0.8])
    with Image.open(report.png_path) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 2 * image.size[1]  # three panels side by side


def test_numeric_values_within_a_decade_stay_linear_and_one_run_still_plots(tmp_path):
    sweep = tmp_path / "sweep"
    fake_run(sweep, "0", ["optim.lr=0.02"], 0.7)
    fake_run(sweep, "1", ["optim.lr=0.05"], 0.6)
    fig = plot(write_report(sweep).runs, ["optim.lr"], tmp_path / "p.png")
    assert fig.axes[0].get_xscale() == "linear"
    single = tmp_path / "single"
    fake_run(single, "0", ["optim.lr=0.02"], 0.7)
    report = write_report(single)
    assert report.swept == [] and len(plot(report.runs, report.swept, tmp_path / "q.png").axes) == 1


def test_best_command_repeats_the_overrides_quoted_for_the_shell(tmp_path):
    overrides = ["data=imagefolder", "data.root=/data/my photos", "finetune.freeze=[layer1,layer2]",
                 "+trainer.profiler={name: simple}", "optim.lr=0.001"]
    fake_run(tmp_path / "sweep", "0", overrides, 0.9)
    fake_run(tmp_path / "sweep", "1", [*overrides[:-1], "optim.lr=0.1"], 0.5)
    report = write_report(tmp_path / "sweep")
    line = command(report.best)
    assert line.startswith("python -m lightning_project.train data=imagefolder 'data.root=/data/my photos' "
                           "'finetune.freeze=[layer1,layer2]' '+trainer.profiler={name: simple}' optim.lr=0.001")
    assert shlex.split(line)[3:] == overrides  # back to the overrides exactly, as a shell passes them to Hydra


def test_report_command_writes_the_files_and_prints_the_best_runs(grid, capsys):
    assert report_command.main([str(grid), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "best 2 of 5 runs (3 completed, 1 failed, 1 incomplete)" in out
    assert "trial_a" in out and "onecycle" not in out  # the table holds the top 2 only
    assert f"best run {grid / '2'} (val/acc = 0.95), repeated by:" in out
    assert "python -m lightning_project.train data=digits optim.lr=0.01 scheduler=cosine\n" in out
    assert f"wrote {grid / 'sweep_summary.csv'} and {grid / 'sweep.png'}" in out
    assert (grid / "sweep.png").stat().st_size > 10_000


def test_a_sweep_where_every_run_failed_is_reported_without_a_best(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for i in range(2):
        fake_run(sweep, str(i), [f"optim.lr={i}"], failure={"error": f"boom {i}", "epoch": 0, "global_step": 0,
                                                            "seconds": 1.0})
    assert report_command.main([str(sweep)]) == 0
    assert f"no run completed with a score: nothing to repeat (errors in {sweep / 'sweep_summary.csv'})" in \
        capsys.readouterr().out
    assert [r["error"] for r in read_csv(sweep / "sweep_summary.csv")] == ["boom 0", "boom 1"]


@pytest.mark.parametrize("case, expected", [
    ("missing", r"SWEEP_DIR=.*missing: no such directory; give the folder of a multirun"),
    ("empty", r"SWEEP_DIR=.*empty: no run directories .*; give the folder of a multirun"),
    ("run", r"SWEEP_DIR=.*0: a single run directory, not a sweep; its own report is its metrics.json and "
            r"curves.png; give the multirun folder"),
    ("failed_run", r"SWEEP_DIR=.*0: a single run directory, not a sweep"),
    ("top", r"--top=0: give how many of the best runs to print \(>= 1\)"),
    ("unwritable", r"SWEEP_DIR=.*unwritable: cannot write .*sweep_summary.csv \(Is a directory\); the report is "
                   r"written into the sweep folder: make it writable"),
])
def test_bad_arguments_are_one_line_with_the_fix_and_exit_2(tmp_path, capsys, case, expected):
    (tmp_path / "empty" / "logs").mkdir(parents=True)
    fake_run(tmp_path / "run", "0", ["optim.lr=1"], 0.5)
    fake_run(tmp_path / "failed_run", "0", ["optim.lr=1"], failure={"error": "x", "epoch": 0, "global_step": 0,
                                                                    "seconds": 1.0})
    fake_run(tmp_path / "unwritable", "0", ["optim.lr=1"], 0.5)
    (tmp_path / "unwritable" / "sweep_summary.csv").mkdir()  # fails to open as a read-only folder would (for root too)
    path = tmp_path / {"run": "run/0", "failed_run": "failed_run/0", "top": "run"}.get(case, case)
    with pytest.raises(SystemExit) as exit_info:
        report_command.main([str(path), *(["--top", "0"] if case == "top" else [])])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert re.search(expected, lines[0]), lines[0]
    assert not (path / "sweep_summary.csv").is_file()


def test_hydra_callback_writes_the_report_and_never_raises(grid, tmp_path, capsys, caplog):
    callback = instantiate({"_target_": CALLBACK, "top": 1})  # as Hydra builds it from hydra.callbacks
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(grid)}}}), config_name="train")
    assert [r["run"] for r in read_csv(grid / "sweep_summary.csv")] == ["2", "trial_a", "0", "5", "7"]
    assert (grid / "sweep.png").is_file()
    assert "python -m lightning_project.train data=digits optim.lr=0.01 scheduler=cosine" in capsys.readouterr().out

    missing = tmp_path / "gone"
    with caplog.at_level(logging.WARNING, logger="lightning_project"):
        callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(missing)}}}))
        callback.on_multirun_end(OmegaConf.create({"hydra": {}}))
    first, second = [r.getMessage() for r in caplog.records]
    assert f"hydra.sweep.dir={missing}: no such directory" in first
    assert f"`python -m lightning_project.report {missing}`" in first
    assert "the config has no hydra.sweep.dir" in second


@pytest.mark.slow
def test_report_of_a_real_sweep(sweep):
    report = write_report(sweep)
    rows = read_csv(sweep / "sweep_summary.csv")
    by_run = {row["run"]: row for row in rows}
    assert sorted(by_run) == ["0", "1"] and report.swept == ["optim.lr"]
    assert {row["optim.lr"] for row in rows} == {"0.02", "0.05"}
    for name, row in by_run.items():
        written = json.loads((sweep / name / "metrics.json").read_text())
        assert row["status"] == "completed"
        assert float(row["val/acc"]) == pytest.approx(written["optimized_metric"]["value"])
        assert float(row["final train/loss"]) == pytest.approx(written["metrics"]["train/loss"])
        assert int(row["epochs"]) == 2 and float(row["wall_seconds"]) > 0
        assert Path(row["best_checkpoint"]).is_file()
    assert float(rows[0]["val/acc"]) >= float(rows[1]["val/acc"])
    best = report.best
    assert best.path.name == rows[0]["run"]
    args = shlex.split(command(best))
    assert args[:3] == ["python", "-m", "lightning_project.train"]
    assert args[3:] == best.overrides and f"optim.lr={rows[0]['optim.lr']}" in args
    assert any(a.startswith("data.root=") for a in args) and not any(a.startswith("hydra.") for a in args)
    with Image.open(report.png_path) as image:
        assert image.format == "PNG"
    lines = plot(report.runs, report.swept, sweep / "sweep.png").axes[1].get_lines()
    assert [len(line.get_xdata()) for line in lines] == [2, 2]  # two epochs each, from metrics.json's history
