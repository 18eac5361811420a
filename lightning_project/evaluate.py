"""`python -m lightning_project.evaluate ckpt_path=P`: test metrics of a checkpoint, as JSON.

By default the data module is rebuilt from the checkpoint (same data, same split), so the test
accuracy of training is reproduced; `data=...` evaluates on other images with the checkpoint's
own evaluation transforms and normalisation.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_project.data import create_datamodule
from lightning_project.errors import UserError
from lightning_project.models import load_checkpoint
from lightning_project.models.checkpoints import warn_if_split_changed
from lightning_project.models.classifier import CHECKPOINT_KEY
from lightning_project.utils import runtime, summary
from lightning_project.utils.config import plain

log = logging.getLogger("lightning_project")


def datamodule_for(checkpoint: dict, data_cfg: DictConfig | None):
    stored = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    target = checkpoint[CHECKPOINT_KEY].get("datamodule_target")
    if data_cfg is None:
        if not target or not stored:
            raise UserError(
                "the checkpoint does not record its data module; pass data=... (e.g. data=imagefolder data.root=DIR)"
            )
        datamodule = create_datamodule(target, **stored)
        warn_if_split_changed(checkpoint, datamodule.class_counts, "ckpt_path")
        return datamodule
    kwargs = plain(data_cfg)
    target = kwargs.pop("_target_")
    hp = checkpoint["hyper_parameters"]
    kwargs.update(  # how the network expects its inputs comes from the checkpoint, not the data config
        image_size=hp["image_size"],
        num_classes=hp["num_classes"],
        eval_transforms=stored.get("eval_transforms"),
        train_transforms=stored.get("eval_transforms"),
        mean=hp["mean"],
        std=hp["std"],
    )
    datamodule = create_datamodule(target, **kwargs)
    if datamodule.classes != list(hp["class_names"]):
        raise UserError(
            f"data: classes {datamodule.classes} differ from the checkpoint's {hp['class_names']}; "
            "evaluate on data with the same class folders"
        )
    return datamodule


def evaluate(cfg: DictConfig) -> dict:
    runtime.setup(cfg.seed, cfg.matmul_precision)
    out = Path(HydraConfig.get().runtime.output_dir)
    module, checkpoint = load_checkpoint(cfg.ckpt_path)
    datamodule = datamodule_for(checkpoint, cfg.get("data"))
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False, _convert_="all")
    results = trainer.test(module, datamodule=datamodule)[0]
    report = {
        "checkpoint": str(Path(cfg.ckpt_path).resolve()),
        "metrics": {k: float(v) for k, v in results.items()},
        "model": module.hparams.model_name,
        "classes": module.hparams.class_names,
        "split_sizes": datamodule.counts,
        "per_class": summary.per_class(module.confusion, module.hparams.class_names)
        if module.confusion is not None else None,
        "pretrained": {"used": module.weights_source.used, "source": module.weights_source.source},
    }
    path = Path(cfg.output) if cfg.get("output") else out / "metrics.json"
    summary.write_json(path, report)
    if module.confusion is not None:
        summary.plot_confusion(module.confusion, module.hparams.class_names, out / "confusion_matrix.png")
    log.info("test metrics written to %s", path)
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with runtime.user_errors():
        evaluate(cfg)


if __name__ == "__main__":
    main()
