"""The `tune:` section as typed, validated settings.

Every value is checked here, before any model is built or batch is loaded, so a negative step
count or an inverted lr range costs the user one line, not a minute of set-up followed by a
traceback from deep inside a loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from lightning_project.errors import UserError, close_names

CHECKS = ("initial_loss", "overfit_batch", "lr_finder", "batch_size")
BATCH_SIZE_MODES = ("power", "binsearch")


def _positive_int(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{where}={value!r}: must be a positive integer")
    return value


def _positive_float(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UserError(f"{where}={value!r}: must be a positive number")
    return float(value)


@dataclass
class InitialLoss:
    batches: int = 4
    band: tuple[float, float] = (0.5, 1.5)

    def validate(self) -> None:
        _positive_int("tune.initial_loss.batches", self.batches)
        band = list(self.band) if isinstance(self.band, (list, tuple)) else []
        if len(band) != 2 or not all(isinstance(v, (int, float)) for v in band) or not 0 < band[0] < 1 < band[1]:
            raise UserError(
                f"tune.initial_loss.band={self.band!r}: give [low, high] with 0 < low < 1 < high (e.g. [0.5, 1.5])"
            )
        self.band = (float(band[0]), float(band[1]))


@dataclass
class OverfitBatch:
    batch_size: int = 16
    max_steps: int = 100
    target_loss: float = 0.05
    lr: float | None = None

    def validate(self) -> None:
        if _positive_int("tune.overfit_batch.batch_size", self.batch_size) < 2:
            raise UserError(
                "tune.overfit_batch.batch_size=1: give at least 2 (BatchNorm in train mode needs two values)"
            )
        _positive_int("tune.overfit_batch.max_steps", self.max_steps)
        self.target_loss = _positive_float("tune.overfit_batch.target_loss", self.target_loss)
        if self.lr is not None:
            self.lr = _positive_float("tune.overfit_batch.lr", self.lr)


@dataclass
class LRFinder:
    min_lr: float = 1e-6
    max_lr: float = 1.0
    num_steps: int = 100
    early_stop: float | None = 4.0
    smoothing: float = 0.9

    def validate(self) -> None:
        self.min_lr = _positive_float("tune.lr_finder.min_lr", self.min_lr)
        self.max_lr = _positive_float("tune.lr_finder.max_lr", self.max_lr)
        if self.min_lr >= self.max_lr:
            raise UserError(
                f"tune.lr_finder.min_lr={self.min_lr:g} >= max_lr={self.max_lr:g}: "
                "the sweep goes from min_lr up to max_lr"
            )
        if _positive_int("tune.lr_finder.num_steps", self.num_steps) < 5:
            raise UserError(f"tune.lr_finder.num_steps={self.num_steps}: too few points for a curve; give at least 5")
        if self.early_stop is not None and not (_positive_float("tune.lr_finder.early_stop", self.early_stop) > 1):
            raise UserError(
                f"tune.lr_finder.early_stop={self.early_stop}: a factor > 1 over the best loss (e.g. 4), or null"
            )
        if isinstance(self.smoothing, bool) or not isinstance(self.smoothing, (int, float)) or not (
            0 <= self.smoothing < 1
        ):
            raise UserError(f"tune.lr_finder.smoothing={self.smoothing!r}: must be in [0, 1) (0 = raw losses)")


@dataclass
class BatchSize:
    mode: str = "power"
    init_val: int = 2
    max_trials: int | str = "auto"
    steps_per_trial: int = 3
    margin: float = 0.05

    def validate(self) -> None:
        if self.mode not in BATCH_SIZE_MODES:
            raise UserError(f"tune.batch_size.mode={self.mode!r}: choose {' or '.join(BATCH_SIZE_MODES)}")
        _positive_int("tune.batch_size.init_val", self.init_val)
        if self.max_trials != "auto":
            _positive_int("tune.batch_size.max_trials", self.max_trials)
        _positive_int("tune.batch_size.steps_per_trial", self.steps_per_trial)
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or not 0 <= self.margin < 1:
            raise UserError(f"tune.batch_size.margin={self.margin!r}: must be in [0, 1)")

    def trials(self, device_type: str) -> int:
        """max_trials, with `auto` bounded by the device: a CPU never reports out-of-memory (the
        process is killed instead), so there the search must stop well before RAM runs out."""
        if self.max_trials != "auto":
            return int(self.max_trials)
        return 7 if device_type == "cpu" else 12


SECTIONS = {"initial_loss": InitialLoss, "overfit_batch": OverfitBatch, "lr_finder": LRFinder, "batch_size": BatchSize}


@dataclass
class TuneOptions:
    checks: list[str] = field(default_factory=lambda: list(CHECKS))
    apply: bool = False
    initial_loss: InitialLoss = field(default_factory=InitialLoss)
    overfit_batch: OverfitBatch = field(default_factory=OverfitBatch)
    lr_finder: LRFinder = field(default_factory=LRFinder)
    batch_size: BatchSize = field(default_factory=BatchSize)

    @classmethod
    def from_dict(cls, raw: dict | None) -> TuneOptions:
        """Typed options from the plain `tune:` mapping; a misspelt or wrong value is a UserError."""
        raw = dict(raw or {})
        sections = [f.name for f in fields(cls)]
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in sections:
                raise UserError(f"tune.{key}: unknown key; keys: {', '.join(sections)}")
            section_cls = SECTIONS.get(key)
            if section_cls is None:
                kwargs[key] = value
                continue
            if value is not None and not isinstance(value, dict):
                raise UserError(f"tune.{key}={value!r}: a mapping of options (see conf/tune.yaml)")
            known = {f.name for f in fields(section_cls)}
            unknown = sorted(set(value or {}) - known)
            if unknown:
                raise UserError(f"tune.{key}.{unknown[0]}: unknown key; keys: {', '.join(sorted(known))}")
            kwargs[key] = section_cls(**(value or {}))
        options = cls(**kwargs)
        options.validate()
        return options

    def validate(self) -> None:
        checks = [self.checks] if isinstance(self.checks, str) else list(self.checks or [])
        if not checks:
            raise UserError(f"tune.checks is empty: choose some of {', '.join(CHECKS)}")
        for name in checks:
            if name not in CHECKS:
                raise UserError(
                    f"tune.checks: unknown check {name!r}; choose from {', '.join(CHECKS)} "
                    f"(closest: {close_names(str(name), CHECKS, n=1)})"
                )
        if len(set(checks)) != len(checks):
            raise UserError(f"tune.checks={checks}: a check is listed twice")
        self.checks = checks
        if not isinstance(self.apply, bool):
            raise UserError(f"tune.apply={self.apply!r}: true or false")
        for section in (self.initial_loss, self.overfit_batch, self.lr_finder, self.batch_size):
            section.validate()
