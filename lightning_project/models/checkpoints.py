"""Reading our checkpoints: for evaluation (module + raw dict) and before resuming (same recipe?)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lightning_project.errors import UserError
from lightning_project.models.classifier import CHECKPOINT_KEY, ClassifierModule

log = logging.getLogger("lightning_project")

# what must match for a resumed run to be the same run
RECIPE_KEYS = (
    "model_name", "num_classes", "class_names", "head_dropout", "finetune", "optim", "scheduler", "image_size",
    "class_weights",
)
# settings that change how fast a run goes, never what it computes
SPEED_ONLY = ("finetune.feature_cache", "finetune.feature_cache_dir")


def _flat(value, prefix: str) -> dict:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}.{key}").items()}
    return {prefix: value}


def _read(path: str | Path, where: str = "ckpt_path", **load_options) -> dict:
    """A checkpoint of ours as a dict (tensors and plain values only), or one clear error naming `where`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{where}={path}: no such file")
    try:
        checkpoint = torch.load(path, weights_only=True, **load_options)
    except Exception as e:
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        raise UserError(f"{where}={path}: not a readable checkpoint ({reason}); is the file complete?") from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint or "hyper_parameters" not in checkpoint:
        raise UserError(f"{where}={path}: not a lightning_project checkpoint (no {CHECKPOINT_KEY!r} entry); "
                        "give a checkpoint written by lightning_project.train")
    return checkpoint


def warn_if_split_changed(checkpoint: dict, class_counts: dict, path: str | Path) -> None:
    """Images per split and class now, against those the checkpoint was trained with: files added to
    or removed from the data since move images between splits (a test image may have been trained on)."""
    saved = checkpoint.get(CHECKPOINT_KEY, {}).get("classes", {}).get("counts")
    if saved and saved != class_counts:
        totals = {s: sum(c.values()) for s, c in saved.items()}, {s: sum(c.values()) for s, c in class_counts.items()}
        log.warning("%s: the data has changed since training (images per split then %s, now %s): the splits differ, "
                    "so metrics are not comparable and the test split may hold training images", path, *totals)


def check_resumable(path: str | Path, module: ClassifierModule, class_counts: dict | None = None) -> None:
    """A run resumed with `ckpt_path` must have the recipe it was started with (else Lightning fails
    deep inside optimizer loading, or silently mixes two recipes); the first difference is named.
    With `class_counts` (the data module's), a changed data set is warned about."""
    checkpoint = _read(path, map_location="cpu", mmap=True)  # memory-mapped: tensors unread
    if class_counts is not None:
        warn_if_split_changed(checkpoint, class_counts, path)
    saved = checkpoint["hyper_parameters"]
    before = {k: v for key in RECIPE_KEYS for k, v in _flat(saved.get(key), key).items()}
    now = {k: v for key in RECIPE_KEYS for k, v in _flat(module.hparams.get(key), key).items()}
    diff = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k) and k not in SPEED_ONLY]
    if diff:
        k = diff[0]
        raise UserError(
            f"ckpt_path={path}: trained with {k}={before.get(k)!r}, this run has {now.get(k)!r}"
            f"{f' (and {len(diff) - 1} more differences)' if len(diff) > 1 else ''}; resume with the same "
            "configuration, or start afresh from its weights with model.weights_path=<checkpoint>"
        )


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", where: str = "ckpt_path"
) -> tuple[ClassifierModule, dict]:
    """The module in eval mode and the raw checkpoint (read once, with weights_only=True)."""
    checkpoint = _read(path, where, map_location=map_location)
    hp = checkpoint["hyper_parameters"]
    module = ClassifierModule(**{**hp, "pretrained": False, "weights_path": None})
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, KeyError) as e:  # weights of another shape: an edited or foreign checkpoint
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise UserError(f"{where}={path}: its weights do not fit a {hp.get('model_name')} for "
                        f"{hp.get('num_classes')} classes ({first[0].strip()})") from None
    module.on_load_checkpoint(checkpoint)
    return module.eval(), checkpoint
