"""Experiment trackers: one real training run with logger=many (CSV, TensorBoard, MLflow, W&B offline), then each
tool's own reader finds the metric curves and the resolved config in what the run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_train

import lightning_project.train as train_module
from lightning_project.utils import tracking
from lightning_project.utils.config import plain
from lightning_project.utils.tracking import flatten, log_config

pytestmark = pytest.mark.slow
mlflow = pytest.importorskip("mlflow", reason='the tracking extra: pip install -e ".[tracking]"')
wandb = pytest.importorskip("wandb", reason='the tracking extra: pip install -e ".[tracking]"')

OVERRIDES = [
    "logger=many", "trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
    "data.batch_size=16", "model.pretrained=false", "trainer.enable_progress_bar=false",
    "trainer.num_sanity_val_steps=0", "test=false", "optim.lr=0.03",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, torch_home):
    """The run directory, its config and metrics.json after one in-process `train logger=many`."""
    run_dir = tmp_path_factory.mktemp("many") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(torch_home))
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # not the user's ~/.config, ~/.cache
            mp.setenv(var, str(run_dir.parent / "wandb_home"))
        mp.setenv("WANDB_MODE", "offline")  # what WandbLogger(offline=True) sets; undone after the module
        if not (hasattr(train_module, "tracking") or hasattr(train_module, "log_config")):
            # until train.py calls log_config right after building the Trainer: the same call, at the same place
            build = train_module.build_trainer

            def build_and_log(cfg, history):
                trainer = build(cfg, history)
                log_config(trainer.loggers, plain(cfg))
                return trainer

            mp.setattr(train_module, "build_trainer", build_and_log)
        cfg = compose_train(OVERRIDES, run_dir)
        train_module.train(cfg)
        wandb.finish()  # what the end of a `train` process does: the run's closing records
    return run_dir, cfg, json.loads((run_dir / "metrics.json").read_text())


def epoch_values(metrics: dict, name: str) -> list[float]:
    return [epoch[name] for epoch in metrics["history"]]


def test_tensorboard_holds_the_curves_and_the_config(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    run_dir, cfg, metrics = run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"train/loss", "val/acc", "val/loss"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("val/acc")] == pytest.approx(epoch_values(metrics, "val/acc"))
    assert len(events.Scalars("train/loss")) == 2  # one per epoch
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    assert len([tag for tag in content if tag == metadata.SESSION_START_INFO_TAG]) == 1
    hparams = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG]).hparams
    assert hparams["optim.lr"].number_value == pytest.approx(0.03)
    assert hparams["data.batch_size"].number_value == 16
    assert hparams["model.name"].string_value == cfg.model.name == "resnet18"
    assert hparams["augment.train.crop.scale"].string_value == "[0.7, 1.0]"  # a list, as one comparable value
    assert hparams["ckpt_path"].string_value == "null"
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert [m.name.tag for m in experiment.metric_infos][:2] == ["val/acc", "val/loss"]  # the optimized one first


def test_mlflow_client_finds_the_run_its_history_and_params(run):
    from mlflow.tracking import MlflowClient

    run_dir, cfg, metrics = run
    assert cfg.logger.mlflow.tracking_uri == f"sqlite:///{run_dir}/logs/mlflow.db"  # paths.log_dir: the cwd's logs/
    client = MlflowClient(tracking_uri=cfg.logger.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name("train")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name == str(run_dir)
    history = client.get_metric_history(found.info.run_id, "val/acc")
    assert [m.value for m in history] == pytest.approx(epoch_values(metrics, "val/acc"))
    assert [m.step for m in history] == sorted({m.step for m in history})  # one value per epoch, in order
    params = found.data.params
    assert params["optim.lr"] == "0.03" and params["data.batch_size"] == "16" and params["model.name"] == "resnet18"
    assert params["trainer.max_epochs"] == "2" and params["seed"] == "42"


def test_wandb_offline_run_holds_config_summary_and_history(run):
    run_dir, cfg, metrics = run
    (log_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")  # W&B's own record log of the run
    summary = json.loads(inspect_wandb(log_file, "--summary"))
    assert summary["state"] == "finished" and summary["project"] == "train" and summary["name"] == str(run_dir)
    assert summary["config"]["optim"]["lr"] == 0.03 and summary["config"]["data"]["batch_size"] == 16
    assert summary["config"]["augment"]["train"]["crop"]["scale"] == [0.7, 1.0]
    assert summary["summary"]["val/acc"] == pytest.approx(metrics["history"][-1]["val/acc"])
    records = [json.loads(line) for line in inspect_wandb(log_file).splitlines()]
    history = [r["history"]["item"]["val/acc"] for r in records if "val/acc" in r.get("history", {}).get("item", {})]
    assert history == pytest.approx(epoch_values(metrics, "val/acc"))


def inspect_wandb(log_file: Path, *options: str) -> str:
    """`wandb leet inspect FILE --json`: W&B's reader of an offline run's log (what `wandb sync` would upload)."""
    # offline: otherwise the reader reports on itself to the W&B server
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false"}
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(log_file), "--json", *options],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_a_wandb_run_left_open_in_the_process_is_finished_not_reused(tmp_path, monkeypatch):
    """Hydra multirun jobs share one process: without this, Lightning's WandbLogger would log the next job into
    the previous job's run."""
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    previous = wandb.init(dir=tmp_path / "a", project="p", mode="offline")
    logger = WandbLogger(offline=True, save_dir=tmp_path / "b", project="p")
    log_config([logger], {"optim": {"lr": 0.5}})
    try:
        assert logger.experiment.id != previous.id and dict(logger.experiment.config)["optim"] == {"lr": 0.5}
    finally:
        wandb.finish()
    (previous_log,) = (tmp_path / "a" / "wandb").glob("offline-run-*/run-*.wandb")
    assert json.loads(inspect_wandb(previous_log, "--summary"))["state"] == "finished"


def test_flatten_gives_dotted_keys_and_scalars():
    config = {"optim": {"lr": 0.1, "groups": [{"name": "head", "lr": 0.2}]}, "scale": [0.7, 1.0], "ckpt": None,
              "freeze": [], "extra": {}, "test": True}
    assert flatten(config) == {
        "optim.lr": 0.1, "optim.groups.0.name": "head", "optim.groups.0.lr": 0.2, "scale": "[0.7, 1.0]",
        "ckpt": "null", "freeze": "[]", "extra": "{}", "test": True,
    }


def test_mlflow_params_keep_within_limits_and_never_change(tmp_path, caplog):
    from mlflow.tracking import MlflowClient
    from pytorch_lightning.loggers import MLFlowLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="e", tracking_uri=uri)
    long = "x" * 400
    log_config([logger], {"optim": {"lr": 0.1}, "data": {"root": long}, "a:b": 1})
    log_config([logger], {"optim": {"lr": 0.2}, "data": {"root": long}, "seed": 3})  # a changed value: no raise
    params = MlflowClient(uri).get_run(logger.run_id).data.params
    assert params["optim.lr"] == "0.1" and params["seed"] == "3" and params["a_b"] == "1"
    assert params["data.root"] == "x" * (tracking.MLFLOW_VALUE_LENGTH - 1) + "…"
    assert "optim.lr" in caplog.text and "kept those" in caplog.text
