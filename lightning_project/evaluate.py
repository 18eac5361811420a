"""`python -m lightning_project.evaluate ckpt_path=P`: test metrics of a checkpoint, as JSON.

By default the data module is rebuilt from the checkpoint (same data, same split), so the test
accuracy of training is reproduced; `data=...` evaluates on other images with the checkpoint's
own evaluation transforms and normalisation.

With several checkpoints (`ckpt_paths=[A,B]`, `sweep_dir=DIR top_k=3`) or `tta=...`, every
single model, with and without TTA, and their ensemble are scored on the same test images, side
by side (`comparison` in the JSON, and a table); `metrics` is the combination asked for. Each
member is fed by its own evaluation pipeline. Members of one k-fold series share their test split
(it is carved before the folds), so fold ensembles compare on the same images.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.table import Table
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_confusion_matrix, multiclass_f1_score

from lightning_project.data import create_datamodule
from lightning_project.errors import UserError
from lightning_project.inference import checkpoint_paths, tta
from lightning_project.inference.predictor import check_same_classes, pick_device
from lightning_project.models import load_checkpoint
from lightning_project.models.checkpoints import warn_if_split_changed
from lightning_project.models.classifier import CHECKPOINT_KEY
from lightning_project.utils import runtime, summary
from lightning_project.utils.config import plain

log = logging.getLogger("lightning_project")


def datamodule_for(checkpoint: dict, data_cfg: DictConfig | None, where: str = "ckpt_path", path=None):
    """The checkpoint's own data module (same split), or `data_cfg`'s images through the checkpoint's
    evaluation pipeline; their classes must be the checkpoint's."""
    stored = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    target = checkpoint[CHECKPOINT_KEY].get("datamodule_target")
    if data_cfg is None:
        if not target or not stored:
            raise UserError(
                f"{where}={path}: the checkpoint does not record its data module; pass data=... "
                "(e.g. data=imagefolder data.root=DIR)"
            )
        datamodule = create_datamodule(target, **stored)
        warn_if_split_changed(checkpoint, datamodule.class_counts, path)
        return datamodule
    kwargs = plain(data_cfg)
    target = kwargs.pop("_target_")
    hp = checkpoint["hyper_parameters"]
    kwargs.update(  # how the network expects its inputs comes from the checkpoint, not the data config
        image_size=hp["image_size"],
        num_classes=None,  # compared below, naming the checkpoint
        eval_transforms=stored.get("eval_transforms"),
        train_transforms=stored.get("eval_transforms"),
        mean=hp["mean"],
        std=hp["std"],
    )
    datamodule = create_datamodule(target, **kwargs)
    if datamodule.classes != list(hp["class_names"]):
        raise UserError(
            f"{where}={path}: trained for the {hp['num_classes']} classes {hp['class_names']}, the data holds "
            f"{len(datamodule.classes)}: {datamodule.classes}; evaluate on data with the same class folders"
        )
    return datamodule


def _scores(probabilities: torch.Tensor, labels: torch.Tensor) -> dict:
    classes = probabilities.shape[1]
    predicted = probabilities.argmax(dim=1)
    return {
        "test/acc": float(multiclass_accuracy(predicted, labels, classes, average="micro")),
        "test/f1": float(multiclass_f1_score(predicted, labels, classes, average="macro")),
        "test/loss": float(torch.nn.functional.nll_loss(probabilities.clamp_min(1e-12).log(), labels)),
    }


def compare(cfg: DictConfig, sources: list[tuple[str, Path]]) -> dict:
    """Single models (with and without TTA) and their ensemble, scored on the test split."""
    mode, device = tta.check_mode(cfg.tta), pick_device(cfg.device)
    loaded = [load_checkpoint(path, "cpu", where) for where, path in sources]
    check_same_classes(sources, [m for m, _ in loaded])
    names = [m.hparams.class_names for m, _ in loaded]
    datamodules: dict[str, object] = {}  # members of one data set and pipeline share one (k folds: same test split)
    labels, first_split, rows, probs = None, None, [], {"none": [], mode: []}
    for (where, path), (module, checkpoint) in zip(sources, loaded):
        stored = {k: v for k, v in (checkpoint.get("datamodule_hyper_parameters") or {}).items()
                  if k not in ("fold", "num_folds")}
        key = json.dumps([checkpoint[CHECKPOINT_KEY].get("datamodule_target"), stored], sort_keys=True, default=str)
        if key not in datamodules:
            datamodules[key] = datamodule_for(checkpoint, cfg.get("data"), where, path)
        datamodule = datamodules[key]
        datamodule.setup("test")
        module.to(device)
        batches: dict[str, list] = {m: [] for m in probs}
        ys = []
        with torch.inference_mode():
            for x, y in datamodule.test_dataloader():
                ys.append(y)
                for m in probs:
                    batches[m].append(tta.average_probabilities(module, x.to(device), m).cpu())
        split = datamodule.fingerprint("test")  # the images themselves, in order: labels alone match across seeds
        if first_split is None:
            labels, first_split = torch.cat(ys), split
        elif split != first_split:
            raise UserError(f"{where}={path}: its test split holds other images than that of {sources[0][1]} (other "
                            "data, data.seed or data.test_fraction); an ensemble is evaluated on one test split")
        member = Path(path).parent.parent.name if Path(path).parent.name == "checkpoints" else Path(path).stem
        for m in probs:
            probs[m].append(torch.cat(batches[m]))
            rows.append({"model": member, "checkpoint": str(path), "tta": m, **_scores(probs[m][-1], labels)})
        module.cpu()
    if len(sources) > 1:
        for m in probs:
            rows.append({"model": f"ensemble of {len(sources)}", "checkpoint": None, "tta": m,
                         **_scores(torch.stack(probs[m]).mean(dim=0), labels)})
    chosen = torch.stack(probs[mode]).mean(dim=0)
    confusion = multiclass_confusion_matrix(chosen.argmax(dim=1), labels, chosen.shape[1]).cpu()
    return {"rows": rows, "headline": rows[-1], "confusion": confusion, "classes": names[0],
            "split_sizes": datamodule.counts}


def print_comparison(rows: list[dict]) -> None:
    table = Table(title="test split: single models and ensemble")
    for column in ("model", "tta", "acc", "f1", "loss"):
        table.add_column(column, justify="left" if column in ("model", "tta") else "right")
    for r in rows:
        table.add_row(r["model"], r["tta"], f"{r['test/acc']:.4f}", f"{r['test/f1']:.4f}", f"{r['test/loss']:.4f}")
    runtime.console().print(table)


def evaluate(cfg: DictConfig) -> dict:
    runtime.setup(cfg.seed, cfg.matmul_precision)
    out = Path(HydraConfig.get().runtime.output_dir)
    sources = checkpoint_paths(cfg.get("ckpt_path"), plain(cfg.get("ckpt_paths")), cfg.get("sweep_dir"), cfg.top_k)
    tta.check_mode(cfg.tta)
    if len(sources) > 1 or cfg.tta != "none":
        result = compare(cfg, sources)
        print_comparison(result["rows"])
        headline = result["headline"]
        report = {
            "checkpoints": [str(p) for _, p in sources],
            "tta": cfg.tta,
            "metrics": {k: v for k, v in headline.items() if k.startswith("test/")},
            "comparison": result["rows"],
            "classes": result["classes"],
            "split_sizes": result["split_sizes"],
            "per_class": summary.per_class(result["confusion"], result["classes"]),
        }
        return _write(cfg, out, report, result["confusion"], result["classes"])
    module, checkpoint = load_checkpoint(sources[0][1], where=sources[0][0])
    datamodule = datamodule_for(checkpoint, cfg.get("data"), *sources[0])
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False, _convert_="all")
    results = trainer.test(module, datamodule=datamodule)[0]
    report = {
        "checkpoint": str(Path(sources[0][1]).resolve()),
        "metrics": {k: float(v) for k, v in results.items()},
        "model": module.hparams.model_name,
        "classes": module.hparams.class_names,
        "split_sizes": datamodule.counts,
        "per_class": summary.per_class(module.confusion, module.hparams.class_names)
        if module.confusion is not None else None,
        "pretrained": {"used": module.weights_source.used, "source": module.weights_source.source},
    }
    return _write(cfg, out, report, module.confusion, module.hparams.class_names)


def _write(cfg: DictConfig, out: Path, report: dict, confusion, classes: list[str]) -> dict:
    path = Path(cfg.output) if cfg.get("output") else out / "metrics.json"
    summary.write_json(path, report)
    if confusion is not None:
        summary.plot_confusion(confusion, classes, out / "confusion_matrix.png")
    log.info("test metrics written to %s", path)
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with runtime.user_errors():
        evaluate(cfg)


if __name__ == "__main__":
    main()
