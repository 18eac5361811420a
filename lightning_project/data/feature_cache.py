"""Frozen-backbone feature cache: run the frozen backbone once, train the head on its features.

When nothing before the head trains at any epoch, frozen BatchNorm layers keep their statistics
and both pipelines are deterministic, every epoch sends the same images through the same
function: the backbone's output (the head's input) can be computed once, kept as tensors, and
the head trained on them. Epochs then cost the head's forward and backward only.

How it runs (`FeatureCache.plan(...)`, then `with cache.serving(module, datamodule): trainer.fit(...)`):
- while serving, the data module's `train_dataloader`/`val_dataloader` hand out (features, labels)
  and `module.feature_input` is True (the module runs only its head). The trainer's data module,
  the module and so the checkpoints are unchanged: a checkpoint is the full network, and testing
  (after `serving`) sees real images;
- the features are extracted lazily, when Lightning first asks for a loader: by then a resumed
  checkpoint is restored and the module is on its device. Extraction runs the network in eval mode
  under `torch.inference_mode` (and the trainer's precision), in evaluation order, batched like
  evaluation, and captures the head's input with a forward pre-hook. It does not consume the
  global random state, so a cached run draws the same shuffles as an uncached one;
- `disk` keeps the features under the run directory too, keyed by a hash of the model, the frozen
  weights, the data module and its arguments, the pipeline, the split and the precision; a later
  run in the same directory with the same key loads them instead of extracting.

Under DDP every process extracts both splits whole (nothing is sharded; Lightning's distributed
sampler then splits the feature batches as it splits image batches).

Differences from the uncached path: frozen Dropout/StochasticDepth layers before the head (VGG's
classifier.2 and .5) are active in uncached training but not on cached features (computed in eval
mode); this is logged. Callbacks that feed images to the module during `fit` see features instead.

The module is duck-typed (`net`, `head_module`, `feature_input`, `backbone_frozen_throughout()`,
`hparams.finetune`), so this file needs nothing from `models/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_only
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, TensorDataset, WeightedRandomSampler

from lightning_project.errors import UserError

log = logging.getLogger(__name__)


def _info(message: str, *args) -> None:
    if rank_zero_only.rank == 0:  # under DDP every process runs the same cache: one report is enough
        log.info(message, *args)

SETTINGS = ("auto", "disk", "false")
CACHED_SPLITS = ("train", "val")  # test always sees real images through the full network

# transforms that give the same output for the same input (by class name: v1 and v2 alike);
# anything else counts as random, so that an unknown transform never silently freezes augmentation
DETERMINISTIC = frozenset({
    "Compose", "ToImage", "ToDtype", "ConvertImageDtype", "ToPureTensor", "PILToTensor", "ToTensor",
    "ToPILImage", "Normalize", "Resize", "CenterCrop", "Pad", "Grayscale", "RGB", "Identity",
    "LinearTransformation", "ClampBoundingBoxes", "SanitizeBoundingBoxes",
})
KNOWN_RANDOM = frozenset({
    "ColorJitter", "GaussianBlur", "GaussianNoise", "AutoAugment", "RandAugment", "TrivialAugmentWide",
    "AugMix", "ElasticTransform", "MixUp", "CutMix", "ScaleJitter", "JPEG",
})


# ---- eligibility (pure) -------------------------------------------------------------------------
def random_steps(transform: Any) -> list[str]:
    """Class names of the steps of `transform` that are random or not known to be deterministic
    (nested Compose pipelines are searched; empty list: the pipeline is deterministic)."""
    if transform is None:
        return []
    name = type(transform).__name__
    if name == "Compose":
        return [n for t in getattr(transform, "transforms", []) for n in random_steps(t)]
    if name in DETERMINISTIC:
        return []
    if name.startswith("Random") or name in KNOWN_RANDOM:
        return [name]
    return [f"{name} (not known to be deterministic)"]


def parse_setting(value: Any) -> str:
    """`finetune.feature_cache` as one of auto | disk | false."""
    text = str(value).strip().lower() if value is not None else "false"
    if value is False or text in ("false", "off", "none", "null"):
        return "false"
    if text not in SETTINGS:
        raise UserError(
            f"finetune.feature_cache={value!r}: choose auto (features in memory when the backbone is frozen and "
            "the transforms are deterministic), disk (the same, also stored under the run directory) or false"
        )
    return text


@dataclass(frozen=True)
class Decision:
    use: bool
    reason: str


def decide(
    setting: Any,
    *,
    backbone_frozen: bool,
    bn_batch_stats: bool = False,
    train_random: list[str] = (),
    eval_random: list[str] = (),
    strategy: str | None = None,
) -> Decision:
    """Whether to cache, and why (or why not).

    backbone_frozen: no parameter outside the head trains at any epoch.
    bn_batch_stats: frozen BatchNorm layers before the head normalise with batch statistics in
        training (finetune.freeze_bn_stats=false), so a sample's features depend on its batch.
    train_random / eval_random: `random_steps` of the training and evaluation pipelines.
    """
    setting = parse_setting(setting)
    if setting == "false":
        return Decision(False, "finetune.feature_cache=false")
    if not backbone_frozen:
        how = f" (finetune.strategy={strategy})" if strategy else ""
        return Decision(False, f"parameters before the head train{how}; finetune=feature_extractor freezes them")
    if bn_batch_stats:
        return Decision(
            False, "frozen BatchNorm layers use batch statistics in training (finetune.freeze_bn_stats=false)"
        )
    if train_random:
        return Decision(False, f"training batches are random ({', '.join(train_random)}); augment=none (and "
                               "augment.mixup_alpha=0, augment.cutmix_alpha=0) makes them deterministic")
    if eval_random:
        return Decision(False, f"evaluation transforms are random ({', '.join(eval_random)})")
    where = "memory and disk" if setting == "disk" else "memory"
    return Decision(True, f"frozen backbone and deterministic transforms: features computed once, kept in {where}")


def stochastic_layers(net: nn.Module, head: str) -> list[str]:
    """Layers before the head whose train mode adds noise (Dropout, StochasticDepth); cached
    features are computed in eval mode, without it."""
    names = []
    for name, m in net.named_modules():
        if name == head or name.startswith(head + "."):
            continue
        noisy = isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ == "StochasticDepth"
        if noisy and getattr(m, "p", 0) > 0:
            names.append(name)
    return names


# ---- the cache ------------------------------------------------------------------------------------
class FeatureCache:
    """Backbone features of the train and val splits, extracted on first use; see the module doc."""

    def __init__(self, decision: Decision, setting: str = "auto", directory: str | Path | None = None,
                 skipped_layers: list[str] | None = None) -> None:
        self.decision, self.setting = decision, parse_setting(setting)
        self.directory = Path(directory) if directory is not None and self.setting == "disk" else None
        self.skipped_layers = list(skipped_layers or [])
        self.key: str | None = None
        self.extraction_seconds = 0.0
        self.reused: dict[str, bool] = {}
        self._data: dict[str, TensorDataset] = {}
        self._module = self._datamodule = None
        self._checked = False

    @property
    def used(self) -> bool:
        return self.decision.use

    @classmethod
    def plan(cls, module, datamodule, setting: Any = "auto", directory: str | Path | None = None) -> FeatureCache:
        """Decide for this module and data module (cheap: nothing is extracted yet) and log why."""
        setting = parse_setting(setting)
        finetune = dict(getattr(module.hparams, "finetune", None) or {})
        head = getattr(module, "head", "")
        bn_batch_stats = not finetune.get("freeze_bn_stats", True) and any(
            isinstance(m, _BatchNorm) for name, m in module.net.named_modules()
            if not (name == head or name.startswith(head + "."))
        )
        decision = decide(
            setting,
            backbone_frozen=module.backbone_frozen_throughout(),
            bn_batch_stats=bn_batch_stats,
            train_random=random_steps(getattr(datamodule, "train_transform", None))
            + (["MixUp/CutMix batches"] if getattr(datamodule, "mixer", None) is not None else []),
            eval_random=random_steps(getattr(datamodule, "eval_transform", None)),
            strategy=finetune.get("strategy"),
        )
        skipped = stochastic_layers(module.net, head) if decision.use else []
        if decision.use:
            _info("feature cache on: %s", decision.reason)
            if skipped:
                _info("feature cache: frozen Dropout/StochasticDepth layers before the head (%s) are not applied "
                      "to cached features (computed in eval mode); finetune.feature_cache=false keeps them",
                      ", ".join(skipped[:4]) + (f", ... ({len(skipped)} layers)" if len(skipped) > 4 else ""))
        elif setting != "false":
            _info("feature cache off: %s", decision.reason)
        return cls(decision, setting, directory, skipped)

    # ---- serving during fit ------------------------------------------------------------------
    @contextlib.contextmanager
    def serving(self, module, datamodule) -> Iterator[None]:
        """While inside: the data module's train/val loaders serve features and the module runs its
        head only. Nothing happens when the cache is not used."""
        if not self.used:
            yield
            return
        self._module, self._datamodule, self._checked = module, datamodule, False
        module.feature_input = True
        datamodule.train_dataloader = lambda: self._loader("train", type(datamodule).train_dataloader(datamodule))
        datamodule.val_dataloader = lambda: self._loader("val", type(datamodule).val_dataloader(datamodule))
        try:
            yield
        finally:
            module.feature_input = False
            for name in ("train_dataloader", "val_dataloader"):
                datamodule.__dict__.pop(name, None)

    def _loader(self, split: str, original: DataLoader) -> DataLoader:
        """A loader of features batched, shuffled and trimmed like the image loader it replaces."""
        data = self.features(split)
        # a class-balanced sampler draws indices only: it serves the features as it served the images
        sampler = original.sampler if isinstance(original.sampler, WeightedRandomSampler) else None
        if isinstance(original.sampler, DistributedSampler):  # data.shuffle=false under DDP: keep it so
            old = original.sampler
            sampler = DistributedSampler(data, old.num_replicas, old.rank, shuffle=old.shuffle, seed=old.seed)
        return DataLoader(
            data,
            batch_size=original.batch_size,
            sampler=sampler,
            shuffle=sampler is None and isinstance(original.sampler, RandomSampler),
            drop_last=original.drop_last,
            pin_memory=original.pin_memory,
        )

    def features(self, split: str) -> TensorDataset:
        """(features, labels) of `split`, extracted (or loaded from disk) on first use."""
        if not self._checked:
            # first use in this `serving`: the weights are final (a resumed checkpoint is restored by
            # now); features kept from an earlier `serving` are reused only under the same key
            started = time.perf_counter()
            key = cache_key(self._module, self._datamodule)
            if key != self.key:
                self._data, self.reused, self.key, self.extraction_seconds = {}, {}, key, 0.0
            self.extraction_seconds += time.perf_counter() - started  # hashing is part of the cost
            self._checked = True
        if split not in self._data:
            self._build(split)
        return self._data[split]

    # ---- extraction ---------------------------------------------------------------------------
    def _build(self, split: str) -> None:
        module, datamodule = self._module, self._datamodule
        assert module is not None and datamodule is not None, "features are extracted inside serving()"
        started = time.perf_counter()
        file = self.directory / f"{split}-{self.key[:20]}.pt" if self.directory is not None else None
        saved = torch.load(file, map_location="cpu", weights_only=True) if file is not None and file.is_file() else {}
        if saved.get("key") == self.key:
            features, labels = saved["features"], saved["labels"]
            self.reused[split] = True
        else:
            features, labels = extract_features(module, datamodule, split)
            self.reused[split] = False
            if file is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
                partial = file.with_suffix(f".{os.getpid()}.tmp")
                torch.save({"key": self.key, "features": features, "labels": labels}, partial)
                partial.replace(file)  # atomic: a concurrent reader sees the whole file or none
        self._data[split] = TensorDataset(features, labels)
        seconds = time.perf_counter() - started
        self.extraction_seconds += seconds
        _info("feature cache: %s features %s %s in %.2f s (key %s)", split, tuple(features.shape),
                 "loaded from disk" if self.reused[split] else "extracted", seconds, self.key[:12])

    def report(self) -> dict:
        """The `feature_cache` entry of metrics.json (extraction time is part of fit_seconds too)."""
        out: dict[str, Any] = {"setting": self.setting, "used": self.used, "reason": self.decision.reason}
        if self.used:
            first = next(iter(self._data.values()), None)
            out.update({
                "key": self.key,
                "extraction_seconds": round(self.extraction_seconds, 3),
                "loaded_from_disk": self.reused,
                "feature_shape": list(first.tensors[0].shape[1:]) if first is not None else None,
                "samples": {s: len(d) for s, d in self._data.items()},
                "directory": str(self.directory) if self.directory is not None else None,
                "skipped_layers": self.skipped_layers,
            })
        return out


def _eval_loader(datamodule, split: str) -> DataLoader:
    """The images of `split` in evaluation order, batched like evaluation."""
    if hasattr(datamodule, "eval_dataloader"):  # ImageDataModule: any split with the evaluation settings
        return datamodule.eval_dataloader(split)
    raise UserError(f"feature cache: {type(datamodule).__name__} cannot list its {split} images in order; "
                    "set finetune.feature_cache=false")


def extract_features(module, datamodule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of `split` on CPU, features in float32: the input of `module.head_module`
    when `module.net` runs in eval mode on the split's images, on the module's device and precision."""
    net, head = module.net, module.head_module
    trainer = getattr(module, "_trainer", None)
    precision = trainer.precision_plugin if trainer is not None else None
    device = next(net.parameters()).device
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().float().cpu()))
    modes = {m: m.training for m in net.modules()}
    datamodule.setup("fit")
    loader = _eval_loader(datamodule, split)
    show = trainer is not None and trainer.progress_bar_callback is not None and trainer.is_global_zero
    chunks, labels = [], []
    net.eval()
    try:
        # fork_rng: the global random state is left as it was (the loader iterator draws a seed)
        with torch.random.fork_rng(devices=[]), _progress(show, len(loader), split) as advance:
            with torch.inference_mode(), (precision.val_step_context() if precision else contextlib.nullcontext()):
                for x, y in loader:
                    x = x.to(device, non_blocking=True)
                    if precision is not None:
                        x = precision.convert_input(x)
                    captured.clear()
                    net(x)
                    if len(captured) != 1:
                        raise RuntimeError(f"feature cache: the head ran {len(captured)} times in one forward pass")
                    chunks.append(captured[0])
                    labels.append(y.cpu())
                    advance()
    finally:
        hook.remove()
        for m, training in modes.items():
            m.training = training
    # outside inference mode: plain tensors, usable as autograd inputs
    return torch.cat(chunks).clone(), torch.cat(labels).clone()


@contextlib.contextmanager
def _progress(show: bool, total: int, split: str):
    if not show:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(f"feature cache: {split}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task("extract", total=total)
        yield lambda: bar.advance(task)


def _tensor_digest(h, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def cache_key(module, datamodule) -> str:
    """sha256 of what the cached features depend on: model name, the weights and buffers before
    the head, the data module class and arguments, the pipelines, split sizes and labels, precision."""
    h = hashlib.sha256()
    head = getattr(module, "head", "")
    for name, t in module.net.state_dict().items():
        if not (name == head or name.startswith(head + ".")):
            h.update(name.encode())
            _tensor_digest(h, t)
    trainer = getattr(module, "_trainer", None)
    meta = {
        "model": getattr(module.hparams, "model_name", type(module.net).__name__),
        "datamodule": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
        "hparams": dict(getattr(datamodule, "hparams", {}) or {}),
        "train_transform": repr(getattr(datamodule, "train_transform", None)),
        "eval_transform": repr(getattr(datamodule, "eval_transform", None)),
        "counts": getattr(datamodule, "counts", None),
        "precision": str(trainer.precision) if trainer is not None else None,
    }
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    items = getattr(datamodule, "_items", None) or {}
    for split in CACHED_SPLITS:  # which images went where (a different split is different data)
        if split in items:
            h.update(split.encode())
            _tensor_digest(h, torch.as_tensor(items[split][1]))
            paths = items[split][0]
            if isinstance(paths, list):
                h.update("\n".join(map(str, paths)).encode())
            elif torch.is_tensor(paths):
                _tensor_digest(h, paths)
    return h.hexdigest()
