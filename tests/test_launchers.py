"""Sweep jobs through Hydra's launcher plugins (the `cluster` extra): joblib runs a sweep's jobs in parallel
worker processes on this machine; submitit_slurm submits each as a SLURM job (composed and translated into its
sbatch script here, not submitted).

The end-to-end sweeps run the real command in a subprocess (conftest.run_command): joblib's workers are other
processes that unpickle the task function, as they do for a user."""

from __future__ import annotations

import csv
import datetime
import json
import os
import stat

import optuna
import pytest
from conftest import CONF, FAST, run_command
from hydra import compose, initialize_config_dir

# digits, two batches of 16: a run takes a few seconds once its process has imported torch
TINY = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
        "data.batch_size=16", "data.num_workers=0", "trainer.max_epochs=1", *FAST]
# what a user gives for DDP over 2 GPUs of one node, one SLURM task per GPU
SLURM = ["hydra/launcher=submitit_slurm", "hydra.launcher.tasks_per_node=2", "hydra.launcher.nodes=1",
         "hydra.launcher.gpus_per_node=2", "hydra.launcher.timeout_min=60", "hydra.launcher.partition=gpu",
         "trainer=gpu", "trainer.devices=2", "++trainer.num_nodes=1", "trainer.strategy=ddp"]


def rows(sweep_dir) -> dict[str, dict]:
    with open(sweep_dir / "sweep_summary.csv") as f:
        return {r["run"]: r for r in csv.DictReader(f)}


def assert_completed_run(run_dir) -> dict:
    report = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= report["optimized_metric"]["value"] <= 1 and report["epochs"] == 1
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and os.path.isfile(report["best_checkpoint"])
    assert os.path.dirname(report["best_checkpoint"]) == str(run_dir / "checkpoints")
    # Hydra's job logging, set up inside the worker: each run has its own log
    assert f"run directory: {run_dir}" in (run_dir / "train.log").read_text()
    assert not (run_dir / "failure.json").exists()
    return report


@pytest.mark.slow
def test_joblib_sweep_runs_two_jobs_at_once_each_in_its_run_directory(tmp_path, env):
    sweep = tmp_path / "grid"
    proc = run_command("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optim.lr=0.01,0.05",
                       f"hydra.sweep.dir={sweep}", *TINY, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert "Joblib.Parallel(n_jobs=2,backend=loky," in out and "is launching 2 jobs" in out
    for run, lr in (("0", 0.01), ("1", 0.05)):
        assert_completed_run(sweep / run)
        assert f"optim.lr={lr}" in (sweep / run / ".hydra" / "overrides.yaml").read_text().replace("- ", "")
    found = rows(sweep)  # the SweepReport callback, in the launching process, after both jobs
    assert {r: found[r]["status"] for r in found} == {"0": "completed", "1": "completed"}
    assert {float(r["optim.lr"]) for r in found.values()} == {0.01, 0.05}
    assert all(r["best_checkpoint"].endswith(".ckpt") and r["error"] == "" for r in found.values())
    assert (sweep / "sweep.png").is_file()
    # at once: each run's log spans (first to last line) overlap, which one job after the other cannot give
    (start0, end0), (start1, end1) = (log_span(sweep / run / "train.log") for run in ("0", "1"))
    assert start0 < end1 and start1 < end0, (start0, end0, start1, end1)


def log_span(path) -> tuple[datetime.datetime, datetime.datetime]:
    stamps = [datetime.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
              for line in path.read_text().splitlines() if line.startswith("[20")]
    return stamps[0], stamps[-1]


@pytest.mark.slow
def test_random_search_on_joblib_runs_a_batch_of_n_jobs_records_the_failed_run_and_completes_the_other(tmp_path,
                                                                                                        env):
    """Our resumable sweeper asks hydra.sweeper.n_jobs trials at a time and hands them to the launcher as one batch.
    cosine's 1-epoch warm-up does not fit a 2-step run: that trial fails in its worker, the other completes."""
    proc = run_command("train", "hparams_search=random", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                       "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "scheduler=choice(onecycle, cosine)",
                       f"paths.log_dir={tmp_path / 'logs'}", *TINY, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert "0 trials done, 2 to go" in out and out.count("is launching 2 jobs") == 1  # one batch of both trials
    sweep = tmp_path / "logs" / "train" / "optuna" / "train-random"
    found = rows(sweep)
    assert sorted(found) == ["0", "1"]
    assert {r["scheduler"] for r in found.values()} == {"onecycle", "cosine"}  # seed 42 draws one of each
    for run, row in found.items():
        if row["scheduler"] == "onecycle":
            assert row["status"] == "completed"
            assert_completed_run(sweep / run)
        else:
            assert row["status"] == "failed" and "warm-up steps but only 2 training steps" in row["error"]
            record = json.loads((sweep / run / "failure.json").read_text())
            assert record["status"] == "failed" and record["error"] == row["error"]
            assert not (sweep / run / "metrics.json").exists()
            assert f"error: run {run} failed: scheduler.warmup_epochs=1.0" in proc.stderr
    trials = optuna.load_study(study_name="train-random", storage=f"sqlite:///{sweep / 'study.db'}").trials
    assert {str(t.number): t.state.name for t in trials} == {
        r: ("COMPLETE" if found[r]["status"] == "completed" else "FAIL") for r in found}


def _fake_srun(tmp_path, monkeypatch) -> None:
    """submitit's SLURM executor is only built where `srun` is on the PATH; nothing here runs it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_submitit_slurm_composes_with_ddp_settings_into_the_sbatch_script_lightning_accepts(tmp_path, monkeypatch):
    import submitit
    from hydra.utils import instantiate
    from pytorch_lightning.plugins.environments import SLURMEnvironment
    from submitit.slurm.slurm import SlurmExecutor

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*SLURM, f"hydra.sweep.dir={tmp_path / 'sweep'}"], return_hydra_config=True)
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher_cfg.tasks_per_node, launcher_cfg.nodes, launcher_cfg.gpus_per_node) == (2, 1, 2)
    assert (launcher_cfg.timeout_min, launcher_cfg.partition, launcher_cfg.max_num_timeout) == (60, "gpu", 0)
    assert launcher_cfg.submitit_folder == f"{tmp_path / 'sweep'}/.submitit/%j"
    assert cfg.hydra.sweeper._target_.endswith("BasicSweeper")  # the launcher leaves the sweeper as it was
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.strategy) == (2, 1, "ddp")
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("gpu", "bf16-mixed")

    # the launcher's own translation into submitit's executor, stopped before sbatch is called
    _fake_srun(tmp_path, monkeypatch)
    captured = {}

    def map_array(executor, fn, *args):  # the launcher maps itself over its jobs' arguments
        captured.update(executor=executor, fn=fn, jobs=list(zip(*args)))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    launcher = instantiate(launcher_cfg)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    assert launcher.launch([["optim.lr=0.01"]], initial_job_idx=0) == []
    assert captured["fn"] is launcher and len(captured["jobs"]) == 1
    overrides, dir_key, job_num = captured["jobs"][0][:3]
    assert (overrides, dir_key, job_num) == (["optim.lr=0.01"], "hydra.sweep.dir", 0)
    slurm = captured["executor"]._executor
    assert isinstance(slurm, SlurmExecutor)
    script = slurm._make_submission_file_text("python -u -m submitit.core._submit FOLDER", "uid")
    for line in ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2", "--time=60", "--partition=gpu",
                 "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in script, script
    assert "srun" in script  # each of the 2 tasks is one DDP process, started by SLURM, not by Lightning

    # inside that job SLURM sets these; Lightning's SLURM environment checks trainer.devices/num_nodes against them
    for key, value in {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "train"}.items():
        monkeypatch.setenv(key, value)
    assert SLURMEnvironment.detect()
    environment = SLURMEnvironment()
    assert environment.creates_processes_externally and environment.world_size() == 2
    environment.validate_settings(num_devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes)
    with pytest.raises(ValueError, match="HINT: Set `devices=2`"):  # trainer.devices left at 1
        environment.validate_settings(num_devices=1, num_nodes=1)


def test_joblib_launcher_composes_with_the_optuna_search(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                                          "hydra.sweeper.n_jobs=2"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert cfg.hydra.launcher.n_jobs == 2 and cfg.hydra.sweeper.n_jobs == 2
    assert cfg.hydra.sweeper._target_.endswith("ResumableOptunaSweeper")
    assert cfg.hydra.callbacks.sweep_report._target_.endswith("SweepReport")

