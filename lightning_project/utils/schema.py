"""The training configuration's schema, checked at the entry point before any data is read or model built.

Why not Hydra structured configs: their types cannot say `int or "auto"` (data.num_workers) or
`bool or "auto"` (model.pretrained), their errors span several lines, and the keys a group may hold
depend on a class chosen in the same group (data._target_, optim._target_, scheduler.name). Here:
- each group's keys are those its consumer takes: the data module's and the Trainer's signatures,
  the optimizer's options, the scheduler's options, and the keys our code reads (KNOWN);
- each value has a rule (RULES): its type and range, named in the message;
- the metrics named by optimized_metric and the monitors must be ones the model logs.
The first violation is one UserError naming the key, the value and what is allowed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from lightning_project.errors import UserError, close_names
from lightning_project.optim.schedulers import PLANNED, SCHEDULERS, scheduler_options


@dataclass(frozen=True)
class Rule:
    test: Callable[[Any], bool]
    allowed: str  # completes "must be ..."


def _number(low: float, high: float = math.inf, *, integer: bool = False, low_open: bool = False,
            high_open: bool = False, null: bool = False, words: tuple = ()) -> Rule:
    def test(v: Any) -> bool:
        if v is None or v in words:
            return v is not None or null
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
            return False
        return (low < v if low_open else low <= v) and (v < high if high_open else v <= high)

    kind = "an integer" if integer else "a number"
    if high == math.inf:
        span = f">= {low:g}" if not low_open else f"> {low:g}"
    else:
        span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    extra = "".join(f" or {w}" for w in words) + (" or null" if null else "")
    return Rule(test, f"{kind} {span}{extra}")


def _one_of(*values: Any) -> Rule:
    # by type and value: 1 is not true, 0.0 is not false
    return Rule(lambda v: any(type(v) is type(x) and v == x for x in values),
                "one of " + ", ".join("null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
                                      for v in values))


def _increasing(null: bool = False) -> Rule:
    def test(v: Any) -> bool:
        if v is None:
            return null
        return (isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
                and all(a < b for a, b in zip(v, v[1:])))

    return Rule(test, "a list of increasing epoch numbers, e.g. [2, 4]")


POSITIVE_INT = _number(1, integer=True)
FRACTION = _number(0, 1)
BOOL = _one_of(True, False)
TEXT = Rule(lambda v: isinstance(v, str) and v != "", "a non-empty string")
BATCHES = Rule(lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
               or (isinstance(v, float) and 0 <= v <= 1), "a batch count (integer) or a fraction in [0, 1], or null")

RULES: dict[str, Rule] = {
    "seed": _number(0, integer=True, null=True),
    "optimized_metric": TEXT,
    "optimized_mode": _one_of("max", "min"),
    "matmul_precision": _one_of("highest", "high", "medium"),
    "channels_last": _one_of(True, False, "auto"),
    "compile": BOOL,
    "compile_options.mode": _one_of(None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "compile_options.fullgraph": BOOL,
    "compile_options.dynamic": _one_of(None, True, False),
    "compile_options.backend": TEXT,
    "resume": _one_of(None, "auto"),
    "test": BOOL,
    "loss.label_smoothing": _number(0, 1, high_open=True),
    "data.batch_size": POSITIVE_INT,
    "data.eval_batch_size": _number(1, integer=True, null=True),
    "data.num_workers": _number(0, integer=True, words=("auto",)),
    "data.image_size": POSITIVE_INT,
    "data.num_classes": _number(2, integer=True, null=True),
    "data.val_fraction": _number(0, 1, low_open=True, high_open=True),
    "data.test_fraction": _number(0, 1, high_open=True),
    "data.fold": _number(0, integer=True, null=True),
    "data.num_folds": _number(2, integer=True),
    "data.seed": _number(0, integer=True, null=True),
    "data.pin_memory": _one_of(True, False, "auto"),
    "data.persistent_workers": BOOL,
    "data.sampler": _one_of(None, "balanced", "sqrt"),
    "data.shuffle": BOOL,
    "data.on_bad_file": _one_of("error", "skip"),
    "data.check_images": BOOL,
    "augment.image_size": POSITIVE_INT,
    "augment.mixup_alpha": _number(0),
    "augment.cutmix_alpha": _number(0),
    "augment.mix_prob": FRACTION,
    "model.name": TEXT,
    "model.pretrained": _one_of(True, False, "auto"),
    "model.download": BOOL,
    "model.head_dropout": _number(0, 1, high_open=True),
    "finetune.train_stages": _number(0, integer=True),
    "finetune.milestones": _increasing(),
    "finetune.lr_decay": _number(0, 1, low_open=True, null=True),
    "finetune.freeze_bn_stats": BOOL,
    "finetune.feature_cache": _one_of("auto", "disk", False, "false"),
    "optim.lr": _number(0, low_open=True),
    "optim.weight_decay": _number(0),
    "optim.momentum": _number(0, 1, high_open=True),
    "optim.rest": _one_of("default", "freeze"),
    "optim.no_decay_norm_bias": BOOL,
    "optim.scale_lr": _one_of(None, "linear", "sqrt"),
    "optim.base_batch_size": POSITIVE_INT,
    "scheduler.name": _one_of(*SCHEDULERS),
    "scheduler.warmup_epochs": _number(0),
    "scheduler.min_lr_ratio": FRACTION,
    "scheduler.pct_start": _number(0, 1, low_open=True, high_open=True),
    "scheduler.div_factor": _number(0, low_open=True),
    "scheduler.final_div_factor": _number(0, low_open=True),
    "scheduler.gamma": _number(0, low_open=True),
    "scheduler.factor": _number(0, 1, low_open=True, high_open=True),
    "scheduler.step_size": POSITIVE_INT,
    "scheduler.patience": _number(0, integer=True),
    "scheduler.milestones": _increasing(),
    "trainer.max_epochs": _number(1, integer=True, null=True, words=(-1,)),
    "trainer.min_epochs": _number(0, integer=True, null=True),
    "trainer.max_steps": _number(-1, integer=True),
    "trainer.accumulate_grad_batches": POSITIVE_INT,
    "trainer.gradient_clip_val": _number(0, null=True),
    "trainer.check_val_every_n_epoch": _number(1, integer=True, null=True),
    "trainer.log_every_n_steps": POSITIVE_INT,
    "trainer.num_sanity_val_steps": _number(-1, integer=True),
    "trainer.limit_train_batches": BATCHES,
    "trainer.limit_val_batches": BATCHES,
    "trainer.limit_test_batches": BATCHES,
    "trainer.deterministic": _one_of(True, False, "warn", None),
    "trainer.benchmark": _one_of(True, False, None),
}

# the keys our code reads from groups that are not handed whole to a class
KNOWN = {
    "model": {"name", "pretrained", "weights", "weights_path", "download", "head_dropout", "parts"},
    "finetune": {"strategy", "train_stages", "milestones", "lr_decay", "freeze", "unfreeze", "freeze_bn_stats",
                 "feature_cache", "feature_cache_dir"},
    "augment": {"image_size", "eval_resize", "train", "eval", "mixup_alpha", "cutmix_alpha", "mix_prob"},
    "loss": {"label_smoothing", "class_weights"},
}
# ours; the rest go to the optimizer
OPTIM_KEYS = {"_target_", "lr", "groups", "rest", "no_decay_norm_bias", "scale_lr", "base_batch_size"}


def init_parameters(cls: type) -> set[str] | None:
    """The keyword arguments `cls(...)` takes along its class chain (None: it takes any **kwargs)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


def _unknown(group: str, keys: Iterable[str], allowed: set[str] | None, whose: str) -> None:
    if allowed is None:
        return
    for key in keys:
        if key not in allowed:
            close = close_names(key, allowed)
            hint = f"close names: {close}" if close != "none close" else f"keys: {', '.join(sorted(allowed))}"
            raise UserError(f"{group}.{key}: {whose} takes no such key; {hint}")


def _show(value: Any) -> str:
    return f"{value!r}" if isinstance(value, str) else "null" if value is None else str(value)


def check_values(cfg: DictConfig) -> None:
    for key, rule in RULES.items():
        group, _, name = key.rpartition(".")
        node = cfg.get(group) if group else cfg
        if node is None or name not in node:
            continue
        value = node[name]
        value = list(value) if hasattr(value, "__iter__") and not isinstance(value, (str, DictConfig)) else value
        if not rule.test(value):
            raise UserError(f"{key}={_show(value)}: must be {rule.allowed}")


def check_keys(cfg: DictConfig) -> None:
    """Keys that no consumer reads: a typo (`+data.batchsize`) or a key of another option of the group."""
    from lightning_project.data import datamodules
    from lightning_project.utils.imports import resolve

    for group, allowed in KNOWN.items():
        if cfg.get(group) is not None:
            _unknown(group, cfg[group].keys(), allowed, f"the {group} group")
    if cfg.get("data") is not None and cfg.data.get("_target_"):
        cls = resolve(cfg.data._target_, datamodules, "data._target_")
        taken = init_parameters(cls)
        # image_size goes to the module from augment.image_size; transforms and normalisation come from elsewhere
        _unknown("data", cfg.data.keys(), taken and taken | {"_target_"}, cls.__name__)
    if cfg.get("trainer") is not None and cfg.trainer.get("_target_"):
        import pytorch_lightning as pl

        cls = resolve(cfg.trainer._target_, pl, "trainer._target_")
        taken = init_parameters(cls)
        _unknown("trainer", cfg.trainer.keys(), taken and taken | {"_target_"}, "Lightning's Trainer")
    if cfg.get("optim") is not None:
        import torch

        cls = resolve(cfg.optim.get("_target_", "SGD"), torch.optim, "optim._target_")
        taken = init_parameters(cls) if inspect.isclass(cls) else None
        _unknown("optim", cfg.optim.keys(), taken and (taken - {"params"}) | OPTIM_KEYS, cls.__name__)
    if cfg.get("compile_options") is not None:
        import torch

        taken = set(inspect.signature(torch.compile).parameters) - {"model"}
        _unknown("compile_options", cfg.compile_options.keys(), taken, "torch.compile")
    if cfg.get("scheduler") is not None:
        name = cfg.scheduler.get("name", "none")
        _unknown("scheduler", cfg.scheduler.keys(), scheduler_options(name) | {"name"}, f"scheduler={name}")


def check_length(cfg: DictConfig) -> None:
    """A schedule shaped over the run needs the run's length in steps (OneCycle with no epochs)."""
    trainer = cfg.get("trainer") or {}
    epochs, steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    name = (cfg.get("scheduler") or {}).get("name", "none")
    if name not in PLANNED or epochs not in (None, -1) or steps not in (None, -1):
        return
    endless = "an endless run" if epochs == -1 else "Lightning's default of 1000 epochs"
    raise UserError(f"trainer.max_epochs={_show(epochs)} with no trainer.max_steps: scheduler={name} is planned over "
                    f"the run's length in steps, which would be {endless}; set trainer.max_epochs=N or "
                    "trainer.max_steps=N (or pick scheduler=constant, step or plateau)")


def check_metrics(cfg: DictConfig, logged: list[str]) -> None:
    """optimized_metric and every monitor must be a metric the training logs (`logged`)."""
    watched = {"optimized_metric": cfg.get("optimized_metric")}
    for name, node in (cfg.get("callbacks") or {}).items():
        if isinstance(node, DictConfig) and node.get("monitor"):
            watched[f"callbacks.{name}.monitor"] = node.monitor
    if cfg.get("scheduler") is not None and cfg.scheduler.get("name") == "plateau":
        watched["scheduler.monitor"] = cfg.scheduler.get("monitor", "val/loss")
    for key, metric in watched.items():
        if metric is not None and metric not in logged:
            raise UserError(f"{key}={metric!r} is not a metric the training logs; close names: "
                            f"{close_names(metric, logged)} (logged: {', '.join(logged)})")
    metric, mode = cfg.get("optimized_metric"), cfg.get("optimized_mode")
    if isinstance(metric, str) and metric.endswith("loss") and mode == "max":
        raise UserError(f"optimized_mode=max with optimized_metric={metric}: a loss is better when lower; "
                        "set optimized_mode=min")


def check(cfg: DictConfig, logged: list[str]) -> None:
    """The whole schema: values, keys, metrics (cheap: nothing is read, built or downloaded)."""
    check_values(cfg)
    check_keys(cfg)
    check_length(cfg)
    check_metrics(cfg, logged)
