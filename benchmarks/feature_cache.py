"""Frozen-backbone feature cache: head-training epochs on cached features vs images, in one process.

    .venv/bin/python benchmarks/feature_cache.py --model resnet18 --image-size 64 --epochs 3 --device cpu
    make bench ARGS="--image-size 32"

Same data, same module (finetune=feature_extractor, deterministic transforms: augment=none),
same Lightning Trainer, run twice: uncached (images through the frozen backbone every epoch) and
cached (`FeatureCache`: the backbone runs once, the head trains on the features). Reports the
median epoch time of each (training and validation), their ratio, the one-time extraction cost,
the whole fit time of each (extraction included) and the epoch from which the cache has paid for
itself; and, as a reference, one epoch of a plain PyTorch loop for each path (Lightning's
overhead). Weights are random (`--pretrained` is not needed for speed: the arithmetic is the same).

Writes a section of benchmarks/RESULTS.md (replacing the one with the same title) with the
machine it ran on, and benchmarks/results/feature_cache-<model>-<size>px-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from lightning_project.data import create_datamodule
from lightning_project.data.feature_cache import FeatureCache
from lightning_project.models import ClassifierModule
from lightning_project.models.backbones import normalization

HERE = Path(__file__).resolve().parent
TARGET_RATIO = 10.0  # the target: epochs at least 10x faster on CPU


class EpochTimer(pl.Callback):
    """Wall time of each fit epoch: training part, validation part, whole epoch."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.rows, self._t0, self._t1 = device, [], 0.0, 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = self._now()

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._t1 = self._now()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            t2 = self._now()
            self.rows.append({"train_s": self._t1 - self._t0, "val_s": t2 - self._t1, "epoch_s": t2 - self._t0})


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def synthetic_folder(root: Path, classes: int, per_class: int, size: int, seed: int = 0) -> Path:
    """Class folders of JPEG images whose colour and stripes say the class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            pixels = rng.integers(0, 90, (size, size, 3))
            pixels[..., c % 3] += 120
            pixels[:: 2 + c % 5] += 40
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{j:04d}.jpg", quality=90)
    return root


def build(args, mean, std):
    deterministic = {  # augment=none
        "resize": {"_target_": "Resize", "size": args.image_size, "antialias": True},
        "crop": {"_target_": "CenterCrop", "size": args.image_size},
    }
    common = dict(image_size=args.image_size, batch_size=args.batch_size, num_workers=args.workers, seed=0,
                  train_transforms=deterministic, eval_transforms=deterministic, mean=mean, std=std)
    if args.data == "digits":
        datamodule = create_datamodule("lightning_project.data.DigitsDataModule", **common)
    else:
        datamodule = create_datamodule("lightning_project.data.ImageFolderDataModule", root=str(args.root), **common)
    torch.manual_seed(0)
    module = ClassifierModule(
        model_name=args.model,
        num_classes=len(datamodule.classes),
        class_names=datamodule.classes,
        pretrained=False,
        finetune={"strategy": "feature_extractor", "freeze_bn_stats": True},
        optim={"_target_": "SGD", "lr": 0.01, "momentum": 0.9},
        scheduler={"name": "none"},
        image_size=args.image_size,
        mean=mean,
        std=std,
    )
    return datamodule, module


def trainer(args, timer: EpochTimer) -> pl.Trainer:
    return pl.Trainer(
        accelerator=args.device.type if args.device.type != "cuda" else "gpu",
        devices=[args.device.index or 0] if args.device.type == "cuda" else 1,
        max_epochs=args.epochs,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )


def lightning_fit(args, cached: bool) -> dict:
    mean, std = normalization(args.model, "DEFAULT")
    datamodule, module = build(args, mean, std)
    timer = EpochTimer(args.device)
    cache = FeatureCache.plan(module, datamodule, "auto" if cached else False)
    assert cache.used is cached, cache.decision.reason
    started = time.perf_counter()
    with cache.serving(module, datamodule):
        trainer(args, timer).fit(module, datamodule=datamodule)
    fit_s = time.perf_counter() - started
    out = {"epochs": timer.rows, "fit_s": fit_s, "split_sizes": datamodule.counts}
    if cached:
        out["cache"] = cache.report()
    return out


def plain_epoch(args, cached: bool) -> float:
    """One training epoch of a hand-written loop (no Lightning): the floor either path can reach."""
    mean, std = normalization(args.model, "DEFAULT")
    datamodule, module = build(args, mean, std)
    module.to(args.device).train()
    datamodule.setup("fit")
    net, head = module.net, module.head_module
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    if cached:
        feats = []
        hook = head.register_forward_pre_hook(lambda _m, a: feats.append(a[0].detach()))
        net.eval()
        with torch.inference_mode():
            ys = []
            for x, y in datamodule._loader("train", train=False):
                net(x.to(args.device))
                ys.append(y)
        hook.remove()
        features, labels = torch.cat(feats).clone(), torch.cat(ys).to(args.device)
        module.train()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(features, labels),
                                             batch_size=args.batch_size, shuffle=True, drop_last=True)
        model = head
    else:
        loader = datamodule.train_dataloader()
        model = net
    start = time.perf_counter()
    for x, y in loader:
        x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
    if args.device.type == "cuda":
        torch.cuda.synchronize(args.device)
    return time.perf_counter() - start


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def summarise(args, uncached: dict, cached: dict, plain: dict | None) -> dict:
    u_epoch, c_epoch = median(uncached["epochs"], "epoch_s"), median(cached["epochs"], "epoch_s")
    u_train, c_train = median(uncached["epochs"], "train_s"), median(cached["epochs"], "train_s")
    extraction = cached["cache"]["extraction_seconds"]
    saved_per_epoch = u_epoch - c_epoch
    result = {
        "benchmark": "feature_cache",
        "config": {"model": args.model, "image_size": args.image_size, "epochs": args.epochs,
                   "device": str(args.device), "batch_size": args.batch_size, "data": args.data,
                   "precision": args.precision, "workers": args.workers, "split_sizes": uncached["split_sizes"]},
        "machine": machine_info,
        "uncached": uncached,
        "cached": cached,
        "median_epoch_s": {"uncached": u_epoch, "cached": c_epoch},
        "median_train_s": {"uncached": u_train, "cached": c_train},
        "epoch_speedup": u_epoch / c_epoch,
        "train_speedup": u_train / c_train,
        "extraction_s": extraction,
        "extraction_in_uncached_epochs": extraction / u_epoch,
        "break_even_epochs": extraction / saved_per_epoch if saved_per_epoch > 0 else None,
        "fit_speedup": uncached["fit_s"] / cached["fit_s"],
        "target_ratio": TARGET_RATIO,
        "target_met": u_epoch / c_epoch >= TARGET_RATIO,
    }
    if plain is not None:
        result["plain_pytorch_train_epoch_s"] = plain
        result["lightning_over_plain"] = {"uncached": u_train / plain["uncached"], "cached": c_train / plain["cached"]}
    return result


def markdown(r: dict) -> str:
    c, m = r["config"], r["machine"]
    title = f"## feature cache: {c['model']}, {c['image_size']} px, {c['data']}, {c['device']}, {c['precision']}"
    u, k = r["uncached"], r["cached"]
    lines = [
        title,
        "",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores of {m['cores']}, {m['torch_threads']} torch threads"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; torch {m['torch']}, Lightning {m['lightning']}, Python {m['python']}; {m['date']}; "
        f"load average at start {m['load_average_at_start']}, at end {m.get('load_average_at_end')}.",
        "",
        f"Data: {c['data']} ({c['split_sizes']['train']} training, {c['split_sizes']['val']} validation images), "
        f"batch {c['batch_size']}, {c['workers']} loader workers; finetune=feature_extractor, augment=none, "
        f"random weights; {c['epochs']} epochs each, same Trainer (no logger, no checkpoints).",
        "",
        "| | uncached (images) | cached (features) | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| epoch (train + val), median | {r['median_epoch_s']['uncached']:.3f} s "
        f"| {r['median_epoch_s']['cached']:.3f} s | **{r['epoch_speedup']:.1f}x** |",
        f"| training part of the epoch, median | {r['median_train_s']['uncached']:.3f} s "
        f"| {r['median_train_s']['cached']:.3f} s | {r['train_speedup']:.1f}x |",
        f"| one-time feature extraction (train + val) | - | {r['extraction_s']:.2f} s "
        f"| {r['extraction_in_uncached_epochs']:.2f} uncached epochs |",
        f"| whole fit, extraction included | {u['fit_s']:.2f} s | {k['fit_s']:.2f} s | {r['fit_speedup']:.1f}x |",
    ]
    if "plain_pytorch_train_epoch_s" in r:
        p = r["plain_pytorch_train_epoch_s"]
        lines.append(f"| plain PyTorch loop, one training epoch (reference) | {p['uncached']:.3f} s "
                     f"| {p['cached']:.3f} s | {p['uncached'] / p['cached']:.1f}x |")
    be = r["break_even_epochs"]
    lines += [
        "",
        f"Epochs: {r['epoch_speedup']:.1f}x faster with the cache (target {r['target_ratio']:.0f}x: "
        f"{'met' if r['target_met'] else 'NOT met'}); the extraction costs about "
        f"{r['extraction_in_uncached_epochs']:.1f} uncached epochs and has paid for itself after "
        + (f"{be:.1f} epochs." if be is not None else "never (no epoch saving)."),
        f"Per-epoch times (s), uncached: {_times(u['epochs'], 2)}; cached: {_times(k['epochs'], 3)}.",
        "",
    ]
    return "\n".join(lines)


def _times(rows: list[dict], digits: int) -> str:
    return ", ".join(f"{row['epoch_s']:.{digits}f}" for row in rows)


def write_section(path: Path, section: str) -> None:
    """Replace the section with the same title in RESULTS.md, or append it."""
    header = "# Benchmarks\n\nWritten by `make bench` (`benchmarks/*.py`); each section says the machine it ran on.\n"
    text = path.read_text() if path.exists() else header
    title = section.splitlines()[0]
    blocks = text.split("\n## ")
    head, rest = blocks[0], ["## " + b for b in blocks[1:]]
    rest = [b for b in rest if b.splitlines()[0] != title] + [section]
    path.write_text(head.rstrip("\n") + "\n\n" + "\n".join(b.rstrip("\n") + "\n" for b in rest))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--precision", default="32-true", help="Lightning precision (bf16-mixed on GPUs)")
    p.add_argument("--data", choices=("digits", "synthetic"), default="digits",
                   help="digits: scikit-learn's 1,797 digits in memory; synthetic: a generated folder of JPEG files")
    p.add_argument("--synthetic-per-class", type=int, default=100)
    p.add_argument("--synthetic-size", type=int, default=96, help="side of the generated JPEG images")
    p.add_argument("--workers", type=int, default=0, help="loader workers for the image loaders")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch reference epochs")
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--json-dir", type=Path, default=HERE / "results")
    p.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                   help="measure nothing: rewrite the RESULTS.md sections of these result files")
    args = p.parse_args(argv)
    if args.render:
        for file in args.render:
            write_section(args.results, markdown(json.loads(file.read_text())))
        print(f"written: {args.results}")
        return 0
    args.device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    machine_info.update(machine())

    with tempfile.TemporaryDirectory() as tmp:
        if args.data == "synthetic":
            args.root = synthetic_folder(Path(tmp) / "images", 10, args.synthetic_per_class, args.synthetic_size)
        print(f"uncached: {args.model} at {args.image_size} px on {args.device}, {args.epochs} epochs", flush=True)
        uncached = lightning_fit(args, cached=False)
        print("cached", flush=True)
        cached = lightning_fit(args, cached=True)
        plain = None
        if not args.no_plain:
            print("plain PyTorch reference epochs", flush=True)
            plain = {"uncached": plain_epoch(args, cached=False), "cached": plain_epoch(args, cached=True)}
    machine_info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    result = summarise(args, uncached, cached, plain)

    args.json_dir.mkdir(parents=True, exist_ok=True)
    name = f"feature_cache-{args.model}-{args.image_size}px-{args.device.type}-{args.data}.json"
    (args.json_dir / name).write_text(json.dumps(result, indent=2, default=str) + "\n")
    section = markdown(result)
    write_section(args.results, section)
    print(section)
    print(f"written: {args.results}, {args.json_dir / name}")
    return 0


machine_info: dict = {}

if __name__ == "__main__":
    sys.exit(main())
