"""MixUp and CutMix on training batches (torchvision transforms v2), applied when batches are
collated, in the loader's workers as torchvision's reference recipes do.

Targets become class probabilities (N, C) for every batch, mixed or not, so the loss sees one
kind of target: cross-entropy takes probabilities, and training accuracy counts the dominant class.
"""

from __future__ import annotations

import torch
from torch.utils.data import default_collate
from torchvision.transforms import v2

from lightning_project.errors import UserError


class BatchMixer:
    """collate_fn: stack the samples, then MixUp or CutMix (one at random when both are on) with
    probability `prob`; plain batches get one-hot targets."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0):
        for key, value in (("augment.mixup_alpha", mixup_alpha), ("augment.cutmix_alpha", cutmix_alpha)):
            if not isinstance(value, (int, float)) or value < 0:
                raise UserError(f"{key}={value!r}: must be >= 0 (0 = off; 0.2 for MixUp and 1.0 for CutMix are usual)")
        if not isinstance(prob, (int, float)) or not 0 < prob <= 1:
            raise UserError(f"augment.mix_prob={prob!r}: must be in (0, 1] (the share of batches mixed)")
        ops = [op(alpha=float(a), num_classes=num_classes)
               for op, a in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha)) if a > 0]
        if not ops:
            raise UserError("augment.mixup_alpha and augment.cutmix_alpha are both 0: nothing to mix")
        self.mix = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
        self.num_classes, self.prob = num_classes, float(prob)

    def __call__(self, samples):
        images, labels = default_collate(samples)
        if self.prob >= 1 or torch.rand(()) < self.prob:
            return self.mix(images, labels)
        return images, torch.nn.functional.one_hot(labels, self.num_classes).float()

    def __repr__(self) -> str:
        return f"BatchMixer({self.mix}, prob={self.prob})"


def mixer(num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0):
    """A BatchMixer, or None when both alphas are 0 (batches are left alone)."""
    if not mixup_alpha and not cutmix_alpha:
        return None
    return BatchMixer(num_classes, mixup_alpha, cutmix_alpha, prob)
