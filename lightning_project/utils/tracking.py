"""The resolved training config, logged to every experiment tracker so that runs compare by any setting.

Lightning would log the LightningModule's own arguments (save_hyperparameters), which leave out the data,
augmentation, trainer and seed settings that also decide a run, and name the rest differently (`optim/lr`); the
module keeps them out of the loggers (logger=False) and `log_config` logs the whole config instead, each key once,
named by its dotted path (`optim.lr`, as on the command line), in the form each tool compares runs by:

- TensorBoard: scalar parameters in the HParams dashboard, each run beside its metric values;
- MLflow: string params, within what Lightning's MLFlowLogger keeps of a value, never re-logging a different value
  (MLflow refuses to change a param);
- W&B: the nested config, which W&B itself shows as `optim.lr` (W&B asks for no dots in its keys);
- CSV and any other logger: the flat keys, in its hparams.yaml.

Nothing here imports mlflow or wandb unless such a logger was configured (so, installed).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pytorch_lightning.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)

# MLflow reports usage to its makers' server from `import mlflow` on, W&B its errors: a run here sends nothing
# anywhere unless asked (set either variable yourself to choose otherwise). Both are read when the package is
# imported, which the logger does when it is built: train.py imports this module before that.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("WANDB_ERROR_REPORTING", "false")

# what a TensorBoard HParams row shows beside the parameters (the run's last value of each scalar)
METRICS = ("val/acc", "val/loss", "train/loss", "test/acc")
# Lightning's MLFlowLogger keeps this much of a param value and drops the rest without a word
MLFLOW_VALUE_LENGTH = 250
_MLFLOW_BAD_KEY = re.compile(r"[^/\w.\- ]")  # what MLflow rejects in a key (colons too, as on Windows)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"optim": {"lr": 0.1, "groups": [{"lr": 0.2}]}, "crop": [0.7, 1.0]}` ->
    `{"optim.lr": 0.1, "optim.groups.0.lr": 0.2, "crop": "[0.7, 1.0]"}`.

    Every value is a scalar that all trackers take: lists of plain values become their JSON text (one comparable
    value, as written in an override), lists holding mappings are numbered, null becomes "null" (TensorBoard
    would drop the key) and an empty mapping "{}".
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
            flat.update(flatten({str(i): v for i, v in enumerate(value)}, f"{name}."))
        elif isinstance(value, (list, tuple, Mapping)):
            flat[name] = json.dumps(value)
        elif value is None:
            flat[name] = "null"
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:  # not from a YAML config, but still one readable value
            flat[name] = str(value)
    return flat


@rank_zero_only  # the trackers' runs live on rank 0 only
def log_config(loggers: Iterable[Logger], config: Mapping[str, Any], metrics: Iterable[str] = ()) -> None:
    """Log `config` (plain, resolved: `OmegaConf.to_container(cfg, resolve=True)`) to each of `loggers`.

    Call it once the Trainer is built and before fit. `metrics` are extra scalar names for TensorBoard's HParams
    columns, besides `config["optimized_metric"]` and METRICS.
    """
    loggers = list(loggers)
    if not loggers:
        return
    flat = flatten(config)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            names = [config.get("optimized_metric"), *metrics, *METRICS]
            _log_tensorboard(logger, flat, list(dict.fromkeys(n for n in names if n)))
        elif isinstance(logger, MLFlowLogger):
            _log_mlflow(logger, flat)
        elif isinstance(logger, WandbLogger):
            _log_wandb(logger, config)
        else:
            logger.log_hyperparams(flat)


def _log_tensorboard(logger: TensorBoardLogger, flat: dict[str, Any], metrics: list[str]) -> None:
    # Lightning's log_hyperparams only records the values for hparams.yaml unless it is also handed metric values,
    # which it would log as scalars (a fake point on val/acc): write the HParams summary ourselves, naming the
    # metric columns only; TensorBoard fills them from the run's own scalars of those names.
    from torch.utils.tensorboard.summary import hparams

    logger.log_hyperparams(flat)
    writer = logger.experiment._get_file_writer()  # what Lightning writes its own hparams summary with
    for summary in hparams(flat, dict.fromkeys(metrics, 0.0)):
        writer.add_summary(summary)


def _log_mlflow(logger: MLFlowLogger, flat: dict[str, Any]) -> None:
    params = {_MLFLOW_BAD_KEY.sub("_", key): _cut(str(value), MLFLOW_VALUE_LENGTH) for key, value in flat.items()}
    # the run can hold params already (run_id= continues a run): MLflow raises on any changed value, which would
    # stop the training for bookkeeping; the old values stay and the log says which differ
    logged = logger.experiment.get_run(logger.run_id).data.params
    changed = sorted(key for key, value in params.items() if key in logged and logged[key] != value)
    if changed:
        log.warning("MLflow run %s already holds other values for %s (MLflow never changes a param): kept those",
                    logger.run_id, ", ".join(changed))
    new = {key: value for key, value in params.items() if key not in logged}
    if new:
        logger.log_hyperparams(new)


def _log_wandb(logger: WandbLogger, config: Mapping[str, Any]) -> None:
    import wandb

    # Lightning's WandbLogger adopts any W&B run still open in the process instead of starting its own: the
    # previous job of a Hydra multirun (jobs run one after another in one process), or a train() call before in
    # a notebook. Close it, so this run's metrics and config do not land in that one.
    if wandb.run is not None and getattr(logger, "_experiment", None) is None:
        log.info("finishing the W&B run %s left open in this process before starting this run's", wandb.run.id)
        wandb.finish()
    logger.log_hyperparams(dict(config))


def _cut(text: str, limit: int) -> str:
    """`text` within `limit` characters, visibly cut (an ellipsis at the end)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
