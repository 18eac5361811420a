"""One model or an ensemble, loaded from checkpoints alone, turning images into class probabilities.

Each checkpoint brings its own evaluation pipeline (the resize/crop spec it was trained with, its
input size and normalisation, from the checkpoint), so members trained at different sizes can be
averaged: an image is preprocessed once per distinct pipeline. Probabilities are averaged over
test-time views (tta.py) and then over members. The checkpoints must agree on the classes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from lightning_project.data.transforms import build_pipeline
from lightning_project.errors import UserError
from lightning_project.inference import runs, tta
from lightning_project.models.checkpoints import load_checkpoint
from lightning_project.models.classifier import ClassifierModule

log = logging.getLogger("lightning_project")


def pick_device(device: str) -> torch.device:
    """auto: the best available (CUDA, then Apple MPS, then CPU); or any torch device name."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
        torch.empty(0, device=chosen)
    except (RuntimeError, AssertionError) as e:
        reason = str(e).splitlines()[0]
        raise UserError(f"device={device!r}: not usable here ({reason}); use device=auto or cpu") from None
    return chosen


def checkpoint_paths(
    ckpt_path: str | None = None, ckpt_paths: Sequence[str] | None = None, sweep_dir: str | None = None, top_k: int = 3
) -> list[tuple[str, Path]]:
    """(key for messages, path) of the checkpoints named by exactly one of the three options."""
    given = [name for name, v in (("ckpt_path", ckpt_path), ("ckpt_paths", ckpt_paths), ("sweep_dir", sweep_dir)) if v]
    if len(given) != 1:
        raise UserError(
            f"give exactly one of ckpt_path=P, ckpt_paths=[A,B] or sweep_dir=DIR (got {', '.join(given) or 'none'})"
        )
    if ckpt_path:
        return [("ckpt_path", Path(ckpt_path))]
    if ckpt_paths:
        if isinstance(ckpt_paths, str):
            ckpt_paths = [ckpt_paths]
        return [(f"ckpt_paths[{i}]", Path(p)) for i, p in enumerate(ckpt_paths)]
    chosen = runs.best_runs(sweep_dir, top_k)
    for run in chosen:
        log.info("sweep member %s: %s=%.4f", run.path.name, run.metric, run.score)
    return [(f"sweep_dir run {r.path.name}", r.best_checkpoint) for r in chosen]


def check_same_classes(sources: list[tuple[str, Path]], modules: list[ClassifierModule]) -> None:
    """Ensemble members must predict the same classes in the same order (one clear line naming the file)."""
    first = list(modules[0].hparams.class_names)
    for (where, path), module in zip(sources[1:], modules[1:]):
        if list(module.hparams.class_names) != first:
            raise UserError(f"{where}={path}: trained for classes {module.hparams.class_names}, but {sources[0][1]} "
                            f"for {first}; an ensemble needs checkpoints of the same classes")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def eval_spec(checkpoint: dict) -> dict:
    """How the checkpoint's network expects an image: its evaluation pipeline spec, size, mean and std."""
    hp = checkpoint["hyper_parameters"]
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    size = hp["image_size"]
    steps = data.get("eval_transforms") or {  # trained outside a data module of ours: the usual resize + centre crop
        "resize": {"_target_": "Resize", "size": size},
        "crop": {"_target_": "CenterCrop", "size": size},
    }
    return {"transforms": steps, "image_size": size, "mean": list(hp["mean"]), "std": list(hp["std"])}


@dataclass
class Member:
    module: ClassifierModule
    path: Path
    sha256: str
    spec: dict       # eval_spec(checkpoint)
    pipeline: int    # index into Predictor.pipelines


class Preprocess:
    """PIL image -> one tensor per distinct pipeline (picklable: runs in loader workers)."""

    def __init__(self, specs: list[dict]) -> None:
        self.pipelines = [build_pipeline(s["transforms"], s["mean"], s["std"], "checkpoint eval_transforms")
                          for s in specs]

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, ...]:
        return tuple(p(image) for p in self.pipelines)


class Predictor:
    """Class probabilities of one checkpoint or the average of several, optionally over TTA views."""

    def __init__(self, members: list[Member], specs: list[dict], tta_mode: str = "none", device: str = "auto"):
        self.members, self.specs = members, specs
        self.tta = tta.check_mode(tta_mode)
        self.device = pick_device(device)
        self.preprocess = Preprocess(specs)
        for m in members:
            m.module.to(self.device).eval()

    @classmethod
    def load(cls, sources: list[tuple[str, Path]], tta_mode: str = "none", device: str = "auto") -> Predictor:
        """From `checkpoint_paths(...)`: every checkpoint read with weights_only=True, classes compared."""
        tta.check_mode(tta_mode)
        pick_device(device)  # a wrong device fails before the checkpoints are read
        members, specs = [], []
        for where, path in sources:
            module, checkpoint = load_checkpoint(path, "cpu", where)
            spec = eval_spec(checkpoint)
            if spec not in specs:
                specs.append(spec)
            members.append(Member(module, Path(path), sha256(Path(path)), spec, specs.index(spec)))
        check_same_classes(sources, [m.module for m in members])
        return cls(members, specs, tta_mode, device)

    @property
    def classes(self) -> list[str]:
        return list(self.members[0].module.hparams.class_names)

    def member_probabilities(self, member: Member, x: torch.Tensor) -> torch.Tensor:
        """One member's probabilities for a batch already through its pipeline (averaged over TTA views)."""
        with torch.inference_mode():
            return tta.average_probabilities(member.module, x.to(self.device), self.tta).cpu()

    def probabilities(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """(N, classes) for `inputs`: one batch per pipeline, as `preprocess` makes them and a loader stacks them."""
        out = [self.member_probabilities(m, inputs[m.pipeline]) for m in self.members]
        return torch.stack(out).mean(dim=0)

    def metadata(self) -> dict:
        first = self.members[0].module.hparams
        return {
            "classes": self.classes,
            "models": [
                {"checkpoint": str(m.path), "sha256": m.sha256, "model_name": m.module.hparams.model_name,
                 "image_size": m.spec["image_size"], "mean": m.spec["mean"], "std": m.spec["std"]}
                for m in self.members
            ],
            "model_name": first.model_name if len(self.members) == 1 else f"ensemble of {len(self.members)}",
            "input_size": [3, self.specs[0]["image_size"], self.specs[0]["image_size"]],
            "tta": self.tta,
            "device": str(self.device),
        }


def top_classes(probabilities: torch.Tensor, classes: list[str], k: int) -> list[list[tuple[str, float]]]:
    """Per row, the `k` most probable (class name, probability), best first."""
    values, indices = probabilities.topk(min(k, len(classes)), dim=1)
    return [[(classes[i], float(v)) for v, i in zip(vs, idx)] for vs, idx in zip(values.tolist(), indices.tolist())]

