"""Sweeps through the real command: a grid (with a failing combination), a random search, and an Optuna
study killed mid-trial and resumed by rerunning the same command; the reports they leave; reproducibility.
The commands run in this process (conftest.run_module) except the one that is killed."""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
import time

import optuna
import pytest
from conftest import FAST, ROOT, compose_train, run_module

from lightning_project.train import train

pytestmark = pytest.mark.slow
# digits, two batches of 16 per epoch: a trial takes a second or two
TINY = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
        "data.batch_size=16", *FAST]


def rows(sweep_dir) -> list[dict]:
    with open(sweep_dir / "sweep_summary.csv") as f:
        return list(csv.DictReader(f))


def study(sweep_dir, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'study.db'}")


def test_grid_sweep_records_a_failed_run_goes_on_and_reports(tmp_path, capsys):
    """cosine's 1-epoch warm-up does not fit a 2-step run: those two runs fail, the others finish."""
    sweep = tmp_path / "grid"
    status, out, err = run_module(capsys, "train", "-m", "optim.lr=0.01,0.05", "scheduler=onecycle,cosine",
                                  "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}", *TINY)
    assert status == 0, err[-3000:]
    table = {(r["optim.lr"], r["scheduler"]): r for r in rows(sweep)}
    assert len(table) == 4 and [r["status"] for r in rows(sweep)] == ["completed"] * 2 + ["failed"] * 2
    for lr in ("0.01", "0.05"):
        done, failed = table[(lr, "onecycle")], table[(lr, "cosine")]
        assert 0 <= float(done["val/acc"]) <= 1 and done["best_checkpoint"].endswith(".ckpt")
        assert float(done["final train/loss"]) > 0 and done["epochs"] == "1"
        assert failed["val/acc"] == "" and "warm-up steps but only 2 training steps" in failed["error"]
        record = json.loads((sweep / failed["run"] / "failure.json").read_text())
        assert record["status"] == "failed" and record["error"] == failed["error"]
    assert (sweep / "sweep.png").stat().st_size > 10_000
    assert "error: run 1 failed: scheduler.warmup_epochs=1.0" in err  # one line each, the sweep went on
    best = rows(sweep)[0]
    expected = (f"python -m lightning_project.train optim.lr={best['optim.lr']} scheduler=onecycle "
                "trainer.max_epochs=1")
    assert expected in out


def test_random_search_samples_log_uniform_goes_on_past_failed_trials_and_a_rerun_has_nothing_left(tmp_path,
                                                                                                   capsys):
    """cosine's 1-epoch warm-up does not fit a 2-step run: those trials fail, and the search goes on."""
    args = ["hparams_search=random", "hydra.sweeper.n_trials=4", "trainer.max_epochs=1",
            "scheduler=choice(onecycle, cosine)", f"paths.log_dir={tmp_path / 'logs'}", *TINY]
    status, _, err = run_module(capsys, "train", *args)
    assert status == 0, err[-3000:]
    sweep = tmp_path / "logs" / "train" / "optuna" / "train-random"
    found = {r["run"]: r for r in rows(sweep)}
    assert sorted(found) == ["0", "1", "2", "3"]
    assert {r["scheduler"] for r in found.values()} == {"onecycle", "cosine"}  # the seed draws both
    for r in found.values():
        assert r["status"] == ("failed" if r["scheduler"] == "cosine" else "completed")
        assert 1e-4 <= float(r["optim.lr"]) <= 1e-1
    assert len({r["optim.lr"] for r in found.values()}) == 4
    trials = study(sweep, "train-random").trials
    for t in trials:  # the run directory is the trial; a failed run is a failed trial
        row = found[str(t.number)]
        assert t.params["optim.lr"] == pytest.approx(float(row["optim.lr"]))
        assert t.state.name == ("FAIL" if row["status"] == "failed" else "COMPLETE")
    status, out, err = run_module(capsys, "train", *args)  # the same command: the study is complete
    assert status == 0 and "4 trials done, 0 to go" in out + err
    assert len(study(sweep, "train-random").trials) == 4 and not (sweep / "4").exists()
    status, _, err = run_module(capsys, "train", *[a.replace("(onecycle, cosine)", "(step, cosine)") for a in args])
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert status == 2 and len(line) == 1 and "Traceback" not in err
    assert line[0].startswith("error: scheduler: study train-random searched CategoricalDistribution(choices=("
                              "'onecycle', 'cosine')), this run asks") and "hparams_search.study=NEW" in line[0]


def test_a_sweep_where_every_run_fails_exits_non_zero(tmp_path, capsys):
    status, _, err = run_module(capsys, "train", "-m", "optim.lr=0.01,0.02", "scheduler=cosine", "trainer.max_epochs=1",
                                f"hydra.sweep.dir={tmp_path / 'grid'}", *TINY)
    assert status == 1 and "Traceback" not in err
    assert f"error: no run of the sweep in {tmp_path / 'grid'} completed" in err
    assert {r["status"] for r in rows(tmp_path / "grid")} == {"failed"}


def test_a_sweep_without_a_sweep_dir_goes_under_logs_of_the_current_directory(tmp_path, capsys, monkeypatch):
    """As the README types it: the sweep directory comes from paths.log_dir, which the sweeper resolves before
    Hydra has set its own config (${hydra:runtime.cwd} is not available then)."""
    monkeypatch.chdir(tmp_path)
    status, out, err = run_module(capsys, "train", "-m", "optim.lr=0.01", "trainer.max_epochs=1", *TINY)
    assert status == 0 and "error" not in err, err[-3000:] + out[-3000:]
    [sweep] = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    assert (sweep / "0" / "metrics.json").is_file() and (sweep / "sweep_summary.csv").is_file()


def test_optuna_sweep_killed_mid_trial_continues_when_rerun(tmp_path, env, capsys, monkeypatch):
    args = [sys.executable, "-m", "lightning_project.train", "hparams_search=optuna", "hydra.sweeper.n_trials=3",
            "trainer.max_epochs=2", "scheduler=onecycle", f"paths.log_dir={tmp_path / 'logs'}", *TINY]
    sweep = tmp_path / "logs" / "train" / "optuna" / "train"
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (sweep / "1" / "environment.json").is_file():  # trial 0 done, trial 1 started
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before its second trial"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (sweep / "0" / "metrics.json").is_file() and not (sweep / "1" / "metrics.json").exists()
    states = [t.state for t in study(sweep, "train").trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING]

    monkeypatch.chdir(tmp_path)
    status, out, err = run_module(capsys, "train", *args[3:])  # the same command
    assert status == 0 and "1 trials done, 2 to go" in out + err
    trials = study(sweep, "train").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    first = [trials[0].params["optim.lr"], trials[1].params["optim.lr"]]
    assert not {trials[2].params["optim.lr"], trials[3].params["optim.lr"]} & set(first)  # new draws, not replays
    assert study(sweep, "train").user_attrs["killed_trials"] == [1]
    assert trials[0].value == json.loads((sweep / "0" / "metrics.json").read_text())["optimized_metric"]["value"]
    found = {r["run"]: r["status"] for r in rows(sweep)}
    assert found == {"0": "completed", "2": "completed", "3": "completed", "1": "incomplete"}
    results = (sweep / "optimization_results.yaml").read_text()
    assert "completed: 3" in results and "failed: 1" in results


def test_same_seed_and_deterministic_give_identical_metrics_and_a_rerunnable_directory(tmp_path):
    """Two runs on CPU with the same seed and trainer.deterministic=true, random augmentation included:
    identical metrics, epoch by epoch."""
    reports = []
    for name in ("a", "b"):
        cfg = compose_train(["trainer.deterministic=true", "trainer.max_epochs=2", "seed=7", "augment=basic", *TINY],
                            tmp_path / name)
        train(cfg)
        reports.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert reports[0]["history"] == reports[1]["history"] and reports[0]["metrics"] == reports[1]["metrics"]
    assert len(reports[0]["history"]) == 2 and not math.isnan(reports[0]["metrics"]["val/loss"])
    environment = json.loads((tmp_path / "a" / "environment.json").read_text())
    assert environment["command"].startswith("python -m lightning_project.train")
    assert {"torch", "torchvision", "pytorch-lightning", "hydra-core"} <= set(environment["packages"])
    if (ROOT / ".git").exists():  # a clone: the commit it ran
        assert len(environment["git"]["commit"]) == 40 and isinstance(environment["git"]["dirty"], bool)
    assert (tmp_path / "a" / ".hydra" / "config.yaml").is_file()
