"""Training step through lightning_project against a plain PyTorch loop, in one process.

    .venv/bin/python benchmarks/train_step.py                                  # CPU, about 2 minutes
    .venv/bin/python benchmarks/train_step.py --device cuda --write-results    # ResNet-50, 224 px, batch 128, bf16

Rows, each images/s of training steps on the same model, batches and precision:
1. the project: `conf/train.yaml` composed with Hydra's compose API (default callbacks, loggers = CSV +
   TensorBoard, progress bar as configured), built with train.py's own `build_datamodule`, `build_module`
   and `build_trainer`, fitted for `--warmup + --steps` batches of one epoch with no validation;
2. a plain PyTorch loop written here: a fresh torchvision model of the same name, SGD over a decay and a
   no-decay group, OneCycleLR stepped per batch, cross-entropy, the same autocast and memory format;
3. the project with `trainer.deterministic=true`, and with `trainer.benchmark=false` (cudnn autotuning off).
The batches are a few synthetic ones, made once and already on the device, handed to `trainer.fit` as its
train loader: no decoding, collation or host-to-device copy is measured (benchmarks/data_pipeline.py does
that). The clock starts after `--warmup` steps and stops after `--steps` more, the device synchronised at
both ends only, so that the project's own per-step synchronisations show. Rows run in `--rounds`
interleaved rounds, the order rotated each round (a shared machine drifts); the table gives the median of each.

--write-results replaces (or appends) this configuration's section of benchmarks/RESULTS.md and writes
benchmarks/results/train_step_<config>.json; `--render JSON` rewrites a section from such a file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from data_pipeline import write_section  # the same RESULTS.md section writer (benchmarks/ is on sys.path)

import pytorch_lightning as pl
import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from torch import nn

from lightning_project.callbacks import EpochHistory
from lightning_project.models.backbones import build_network, normalization
from lightning_project.train import apply_speed, build_datamodule, build_module, build_trainer
from lightning_project.utils import runtime, tracking
from lightning_project.utils.config import plain

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"cpu": 0.90, "cuda": 0.97}  # issue 7: within 10% of the plain loop on CPU, 3% on GPU
DEFAULTS = {  # per device: small enough for 2 CPU cores in about 2 minutes; the GPU setting
    "cpu": dict(model="resnet18", image_size=32, batch_size=32, steps=100, warmup=10, precision="32-true",
                channels_last=False, rounds=3),
    "cuda": dict(model="resnet50", image_size=224, batch_size=128, steps=100, warmup=20, precision="bf16-mixed",
                 channels_last=True, rounds=3),
}
FROZEN = ["finetune=feature_extractor", "finetune.feature_cache=false"]  # the backbone runs every step
ROWS = {  # row name -> extra overrides of the project path (None: the plain loop; "frozen": its frozen version)
    "project": [],
    "plain": None,
    "deterministic": ["trainer.deterministic=true"],
    "no_benchmark": ["trainer.benchmark=false"],
    "project_frozen": FROZEN,
    "plain_frozen": "frozen",
}


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class StepClock(pl.Callback):
    """Seconds from the end of step `warmup` to the end of step `warmup + steps`: `steps` whole steps,
    hooks, logging and progress bar included, the device synchronised at those two points only."""

    def __init__(self, device: torch.device, warmup: int, steps: int) -> None:
        self.device, self.warmup, self.steps = device, warmup, steps
        self.start, self.seconds = 0.0, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup - 1:
            self.start = now(self.device)
        elif batch_idx == self.warmup + self.steps - 1:
            self.seconds = now(self.device) - self.start


class Batches(torch.utils.data.Dataset):
    """`length` ready-made batches, cycled: a loader with batch_size=None hands them over as they are."""

    def __init__(self, batches: list, length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.batches[i % len(self.batches)]


def make_batches(args, num_classes: int, count: int = 4) -> list:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
        y = torch.randint(0, num_classes, (args.batch_size,), generator=generator)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x.to(args.device), y.to(args.device)))
    return out


def overrides(args) -> list[str]:
    model = [f"model={args.model}"] if (ROOT / "conf/model" / f"{args.model}.yaml").exists() else [
        "model=torchvision", f"model.name={args.model}"]
    out = model + [
        "model.pretrained=false",  # same arithmetic as pretrained weights, and no download
        f"augment.image_size={args.image_size}", f"data.batch_size={args.batch_size}", "data.num_workers=0",
        f"trainer={'gpu' if args.device.type == 'cuda' else 'cpu'}", f"trainer.precision={args.precision}",
        "trainer.max_epochs=1", f"trainer.limit_train_batches={args.warmup + args.steps}",
        "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "test=false",
        f"channels_last={str(args.channels_last).lower()}",
    ]
    return out + ([] if args.progress_bar is None else [f"trainer.enable_progress_bar={args.progress_bar}"])


def compose_config(extra: list[str], run_dir: Path):
    """The resolved config `python -m lightning_project.train <overrides>` would run, in this process."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=extra, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = cfg.hydra.runtime.cwd = str(run_dir)
    HydraConfig.instance().set_config(cfg)  # ${hydra:runtime.output_dir} is the run directory
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.resolve(cfg)
    return cfg


def project_rate(args, batches: list, extra: list[str]) -> float:
    """train.py's path up to trainer.fit, with the synthetic batches as the train loader."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose_config(overrides(args) + extra, Path(run_dir))
        torch.backends.cudnn.benchmark = False  # the process default: a previous row's setting must not leak
        runtime.setup(cfg.seed, cfg.matmul_precision)
        trainer = build_trainer(cfg, EpochHistory())
        mean, std = normalization(cfg.model.name, cfg.model.weights)
        datamodule = build_datamodule(cfg, mean, std)  # the class names; its images are never loaded
        module = build_module(cfg, datamodule, mean, std)
        apply_speed(cfg, module, trainer)  # channels_last (and compile), as train.py does
        clock = StepClock(args.device, args.warmup, args.steps)
        trainer.callbacks.append(clock)
        tracking.log_config(trainer.loggers, plain(cfg))
        loader = torch.utils.data.DataLoader(Batches(batches, args.warmup + args.steps), batch_size=None)
        trainer.fit(module, train_dataloaders=loader)
    assert clock.seconds is not None, "the fit stopped before the last timed step"
    return args.steps * args.batch_size / clock.seconds


def plain_rate(args, batches: list, num_classes: int, frozen: bool = False) -> float:
    """The floor: the same step hand-written, with the optimizer and schedule the default config asks for;
    `frozen`: only the new head trains, the backbone (BatchNorm too) in eval mode, as finetune=feature_extractor."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose_config(overrides(args), Path(run_dir))
    assert cfg.optim._target_.endswith("SGD") and cfg.scheduler.name == "onecycle", "written for sgd + onecycle"
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = bool(cfg.trainer.benchmark)  # what the project's default Trainer sets
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    torch.manual_seed(cfg.seed)
    memory_format = torch.channels_last if args.channels_last else torch.preserve_format
    net = torchvision.models.get_model(args.model, weights=None, num_classes=num_classes)
    net = net.to(args.device, memory_format=memory_format).train()
    if frozen:
        head = net.get_submodule(build_network(args.model, num_classes, 0.0)[1])  # the project's head name
        net.eval().requires_grad_(False)
        head.train().requires_grad_(True)
    # norm scales and biases are the 1-d tensors: no weight decay on them, as optim.no_decay_norm_bias does
    trainable = [p for p in net.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim > 1], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)
    options = {k: v for k, v in cfg.scheduler.items() if k != "name"}
    total = args.warmup + args.steps
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[cfg.optim.lr] * 2, total_steps=total,
                                                    **options)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.loss.label_smoothing)
    bf16 = args.precision.startswith("bf16")
    start = 0.0
    for i in range(total):
        if i == args.warmup:
            start = now(args.device)
        x, y = batches[i % len(batches)]
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = criterion(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return args.steps * args.batch_size / (now(args.device) - start)


def cpu_times() -> list[int]:
    """Aggregate /proc/stat counters: user nice system idle iowait irq softirq steal ..."""
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def machine(device: torch.device) -> dict:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "torchvision": torchvision.__version__, "lightning": pl.__version__,
            "python": platform.python_version(), "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def config_name(c: dict) -> str:
    return f"{c['model']}-{c['image_size']}px-b{c['batch_size']}-{c['device']}-{c['precision']}" + (
        "-channels_last" if c["channels_last"] else "") + ("" if c["progress_bar"] is not False else "-no_bar")


def markdown(r: dict) -> str:
    c, m, rate = r["config"], r["machine"], r["images_per_s"]
    base, plain_ = rate["project"], rate["plain"]
    bar = {None: "on, as configured", True: "on", False: "off"}[c["progress_bar"]]
    target = r["target"]
    rows = [
        ("plain PyTorch loop (written in the benchmark)", "plain", "1.00", ""),
        (f"**project, default** (callbacks, CSV + TensorBoard, progress bar {bar})", "project",
         f"**{base / plain_:.3f}**", "1.00"),
        ("project, `trainer.deterministic=true`", "deterministic", f"{rate['deterministic'] / plain_:.3f}",
         f"{rate['deterministic'] / base:.3f}"),
        ("project, `trainer.benchmark=false`", "no_benchmark", f"{rate['no_benchmark'] / plain_:.3f}",
         f"{rate['no_benchmark'] / base:.3f}"),
        ("plain loop, frozen backbone (only the head trains)", "plain_frozen", "", ""),
        ("**project, `finetune=feature_extractor finetune.feature_cache=false`**", "project_frozen",
         f"**{rate['project_frozen'] / rate['plain_frozen']:.3f}** (vs frozen plain)",
         f"{rate['project_frozen'] / base:.3f}"),
    ]
    title = (f"## Training step: {c['model']}, {c['image_size']} px, batch {c['batch_size']}, {c['device']}, "
             f"{c['precision']}" + (", channels_last" if c["channels_last"] else "")
             + ("" if c["progress_bar"] is not False else ", no progress bar"))
    busy, steal = r["cpu_busy_steal"]
    lines = [
        title,
        "",
        f"Machine: {m['cpu']}, {m['cores']} usable cores, {m['torch_threads']} torch threads"
        + (f", GPU {m['gpu']}" if m["gpu"] else "")
        + f"; torch {m['torch']}, torchvision {m['torchvision']}, Lightning {m['lightning']}, Python {m['python']}; "
        f"{m['date']}; load average at start {m['load_average']}, at end {r['load_average_end']}; during the run the "
        f"cores were {busy:.0%} busy, {steal:.0%} stolen by the hypervisor.",
        "",
        f"Setting: {c['warmup']} warm-up then {c['steps']} timed steps per row, {c['rounds']} interleaved rounds "
        f"(median shown); {c['batches']} synthetic batches already on the device (no input pipeline); random "
        "weights. Project rows: `conf/train.yaml` with "
        f"`{' '.join(c['overrides'])}`, built by train.py's build_datamodule/build_module/build_trainer, "
        "`trainer.fit(train_dataloaders=...)`; the frozen rows keep the backbone running every step (the feature "
        "cache, which removes it, is measured by `benchmarks/feature_cache.py`).",
        "",
        "| | images/s | vs plain loop | vs project default |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {name} | {rate[key]:.1f} | {vs_plain} | {vs_base} |" for name, key, vs_plain, vs_base in rows],
        "",
        f"Project / plain loop: {base / plain_:.3f}, frozen {rate['project_frozen'] / rate['plain_frozen']:.3f} "
        f"(target on {c['device']}: at least {target:.2f}: "
        f"{'met' if min(base / plain_, rate['project_frozen'] / rate['plain_frozen']) >= target else 'NOT met'})."
        + (" On the CPU `trainer.benchmark` (cudnn) changes nothing: that row shows the noise."
           if c["device"] == "cpu" else "")
        + " Per-round images/s: "
        + "; ".join(f"{key} {', '.join(f'{v:.1f}' for v in r['rounds'][key])}" for key in ROWS) + ".",
        "",
    ]
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", help="torchvision model name (cpu: resnet18, cuda: resnet50)")
    p.add_argument("--image-size", type=int, help="cpu: 32, cuda: 224")
    p.add_argument("--batch-size", type=int, help="cpu: 32, cuda: 128")
    p.add_argument("--steps", type=int, help="timed steps per row (cpu: 100, cuda: 100)")
    p.add_argument("--warmup", type=int, help="untimed steps first, at least 1 (cpu: 10, cuda: 20)")
    p.add_argument("--rounds", type=int, help="interleaved rounds of all rows (cpu: 3, cuda: 3)")
    p.add_argument("--precision", choices=("32-true", "bf16-mixed"), help="cpu: 32-true, cuda: bf16-mixed")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="cpu: off, cuda: on")
    p.add_argument("--progress-bar", action=argparse.BooleanOptionalAction,
                   help="the project's progress bar (default: as configured, on)")
    p.add_argument("--write-results", action="store_true",
                   help="write the section in benchmarks/RESULTS.md and benchmarks/results/train_step_<config>.json")
    p.add_argument("--render", type=Path, metavar="JSON", help="measure nothing: rewrite this result's section")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    args.device = torch.device(args.device)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    results = ROOT / "benchmarks/RESULTS.md"
    if args.render:
        write_section(results, markdown(json.loads(args.render.read_text())))
        print(f"written: {results}")
        return 0
    # what a run prints once (model summary, missing val loader, few workers) is no news here
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning_project").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*(num_workers|monitored key|val_dataloader|limit_val_batches).*")
    info, cpu_start = machine(args.device), cpu_times()
    num_classes = 10  # the digits data module's classes: the default config's data
    batches = make_batches(args, num_classes)
    rounds: dict[str, list[float]] = {key: [] for key in ROWS}
    for r in range(args.rounds):
        order = list(ROWS)[r % len(ROWS):] + list(ROWS)[:r % len(ROWS)]  # no row always follows the same one
        for key in order:
            extra = ROWS[key]
            gc.collect()  # the previous row's trainer and module hold reference cycles (and device memory)
            rate = (plain_rate(args, batches, num_classes, frozen=extra == "frozen") if extra in (None, "frozen")
                    else project_rate(args, batches, extra))
            rounds[key].append(rate)
            print(f"round {r + 1}/{args.rounds}, {key}: {rate:.1f} images/s", flush=True)
    spent = [b - a for a, b in zip(cpu_start, cpu_times())][:8]
    config = {"model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
              "device": args.device.type, "precision": args.precision, "channels_last": args.channels_last,
              "progress_bar": args.progress_bar, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
              "batches": len(batches), "overrides": overrides(args)}
    median = {key: statistics.median(values) for key, values in rounds.items()}
    result = {
        "benchmark": "train_step", "config": config, "machine": info,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "cpu_busy_steal": [1 - sum(spent[3:5] + spent[7:]) / sum(spent), spent[7] / sum(spent)],
        "images_per_s": median, "rounds": rounds,
        "project_over_plain": median["project"] / median["plain"],
        "frozen_project_over_plain": median["project_frozen"] / median["plain_frozen"],
        "deterministic_over_default": median["deterministic"] / median["project"],
        "no_benchmark_over_default": median["no_benchmark"] / median["project"],
        "target": TARGETS[args.device.type],
    }
    section = markdown(result)
    print(section)
    if args.write_results:
        out = ROOT / "benchmarks/results" / f"train_step_{config_name(config)}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        write_section(results, section)
        print(f"written: {results}, {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
