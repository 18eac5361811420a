"""Data pipeline vs model: can the training loader feed the network, or does the network wait?

    .venv/bin/python benchmarks/data_pipeline.py                          # CPU, about a minute
    .venv/bin/python benchmarks/data_pipeline.py --device cuda --images 2000 --write-results

In one process, on one folder of synthetic photo-like JPEGs (500x375, quality 90, 3 classes, smooth
gradients, blobs and grain, so that files weigh what photos weigh and decode as slowly), each measured
alone, images per second of:
1. the project's real training loader (`create_datamodule("...ImageFolderDataModule")` with the
   `augment=basic` pipelines of conf/augment/basic.yaml: decode with PIL, RandomResizedCrop, flip,
   normalise, collate), at 0 workers (the main process on one torch thread: the rate of one core) and
   at `--workers` (default auto = usable cores). Start-up and the batches prefetched during it are
   skipped; a small folder's epochs are short and each restarts the prefetch, as in real training;
2. the model's training step (forward, cross-entropy, backward, SGD step) on synthetic tensors of the
   same batch shape; on CUDA with bf16 autocast and channels_last, synchronised before each clock read;
3. for context, the pre-training image check (`check_files`, JPEGs decoded at 1/8 scale) on 1 and on
   all cores, and a full decode (`load_image`) on one core (each the median of 3 passes over the folder).
The verdict is the ratio loader (at --workers) / model: above 1 the model is the bottleneck.

Writes --output (JSON, with the machine) and prints a Markdown table; --write-results also puts it in
benchmarks/RESULTS.md as the section `## Data pipeline (<machine>)`, replacing a section of that title
(`--render JSON` rewrites it from a result file). `--note` adds a sentence about the machine (with
--render: replaces the stored one).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from omegaconf import OmegaConf
from PIL import Image

from lightning_project.data import create_datamodule
from lightning_project.data.datamodules import resolve_workers
from lightning_project.data.images import check_files, load_image
from lightning_project.models.backbones import normalization

ROOT = Path(__file__).resolve().parents[1]


def machine(device: torch.device) -> dict:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def cpu_times() -> list[int]:
    """Aggregate /proc/stat CPU counters (user nice system idle iowait irq softirq steal ...)."""
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def make_photos(root: Path, n: int, width: int, height: int, classes: int = 3) -> list[str]:
    """`n` JPEGs in `classes` folders: a tinted gradient, soft blobs, smooth texture and fine grain."""
    rng, paths = np.random.default_rng(0), []
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(n):
        c, a, b = i % classes, *rng.uniform(0, 2 * np.pi, 2)
        pixels = 70 + 70 * (np.cos(a) * x / width + np.sin(b) * y / height)[..., None] + rng.uniform(-30, 30, 3)
        pixels[..., c] += 50
        for _ in range(6):
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
            pixels += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None] * rng.uniform(-60, 60, 3)
        texture = Image.fromarray(rng.integers(0, 256, (height // 6, width // 6, 3), dtype=np.uint8))
        pixels += (np.asarray(texture.resize((width, height), Image.BICUBIC), np.float32) - 128) * 0.25
        pixels += rng.normal(0, 6, pixels.shape)
        path = root / f"class{c}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def basic_specs(image_size: int) -> tuple[dict, dict]:
    """The train/eval pipelines of conf/augment/basic.yaml, resolved at `image_size`."""
    cfg = OmegaConf.create({"augment": OmegaConf.load(ROOT / "conf/augment/basic.yaml")})
    cfg.augment.image_size = cfg.augment.eval_resize = image_size
    return (OmegaConf.to_container(cfg.augment.train, resolve=True),
            OmegaConf.to_container(cfg.augment.eval, resolve=True))


def measure(step, skip: int, batches: int, seconds: float, sync=lambda: None) -> float:
    """Images/s of `step()` (one batch, returns its size) after `skip` untimed calls; stops after
    `batches` timed calls or `seconds`, whichever comes first (at least 2 calls)."""
    for _ in range(skip):
        step()
    sync()
    start, images, done = time.perf_counter(), 0, 0
    while done < 2 or (done < batches and time.perf_counter() - start < seconds):
        images, done = images + step(), done + 1
    sync()
    return images / (time.perf_counter() - start)


def loader_rate(args, root: Path, workers: int) -> tuple[float, dict]:
    train, evaluation = basic_specs(args.image_size)
    mean, std = normalization(args.model, "DEFAULT")
    dm = create_datamodule("lightning_project.data.ImageFolderDataModule", root=str(root), image_size=args.image_size,
                           batch_size=args.batch_size, num_workers=workers, train_transforms=train,
                           eval_transforms=evaluation, mean=mean, std=std)
    dm.setup("fit")
    loader = dm.train_dataloader()

    def forever():
        while True:
            yield from loader

    batches = forever()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # workers run on one thread each; so does the 0-worker figure
    try:
        rate = measure(lambda: len(next(batches)[1]), 1 + (loader.prefetch_factor or 0) * workers,
                       args.batches, args.seconds)
    finally:
        torch.set_num_threads(threads)
    return rate, dm.counts


def model_rate(args) -> float:
    device = args.device
    net = torchvision.models.get_model(args.model, weights=None, num_classes=3).to(device).train()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 3, (args.batch_size,), device=device)
    if device.type == "cuda":
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step() -> int:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        return len(y)

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return measure(step, 2 if device.type == "cpu" else 10, args.batches, args.seconds, sync)


def per_second(fn, n: int, repeats: int = 3) -> float:
    """Median rate of `repeats` calls of `fn` (each handles `n` images): short runs on a shared machine vary."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def markdown(r: dict) -> str:
    m, c, rate = r["machine"], r["config"], r["images_per_s"]
    w = c["workers"]
    rows = [
        ("loader, 0 workers (main process, 1 thread: one core)", rate["loader_0_workers"],
         "decode + `augment=basic` + normalise + collate"),
        (f"loader, {w} workers (`auto`)" if c["workers_option"] == "auto" else f"loader, {w} workers",
         rate["loader_workers"], "what training gets"),
        (f"model training step, {c['model']}, {c['device']}{', bf16' if c['device'] == 'cuda' else ', fp32'}",
         rate["model"], f"forward + cross-entropy + backward + SGD, {m['torch_threads']} torch threads"),
        ("check_files, 1 thread", rate["check_files_1"], "pre-training scan, JPEG at 1/8 scale"),
        (f"check_files, {w} threads", rate["check_files_workers"], "as the data module runs it"),
        ("load_image (full decode), 1 core", rate["load_image"], "decode alone, no augmentation"),
    ]
    v = r["verdict"]
    lines = [
        f"## Data pipeline ({r['machine_name']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} usable cores" + (f", GPU {m['device']}" if c["device"] == "cuda" else "")
        + f"; torch {m['torch']}, torchvision {m['torchvision']}, Python {m['python']}; {m['date']}; "
        f"load average at start {m['load_average']}, at end {r['load_average_end']}; during the run the cores were "
        f"{r['cpu_busy_steal'][0]:.0%} busy, {r['cpu_busy_steal'][1]:.0%} stolen by the hypervisor."
        + (f" {c['note']}" if c["note"] else ""),
        "",
        f"Data: {c['images']} synthetic JPEGs {c['size']} (quality 90, mean {c['mean_kb']:.0f} KB), 3 classes, "
        f"{c['train_images']} in the training split; network input {c['image_size']} px, batch {c['batch_size']}; "
        f"at most {c['batches']} timed batches or {c['seconds']:g} s per row "
        "(`benchmarks/data_pipeline.py`).",
        "",
        "| | images/s | |",
        "| --- | ---: | --- |",
        *[f"| {name} | {value:.1f} | {note} |" for name, value, note in rows],
        f"| **loader / model ({w} workers)** | **{v['ratio']:.1f}x** | bottleneck: **{v['bottleneck']}** |",
        "",
        f"Verdict: the {v['bottleneck']} is the bottleneck; the loader at {w} workers delivers {v['ratio']:.1f}x "
        f"what the model consumes. At {c['image_size']} px, PIL decoding + `augment=basic` delivers "
        f"{rate['loader_0_workers']:.0f} images/s per core: feeding this model takes about {v['cores_needed']} "
        f"core(s) of loader workers.",
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace the section with the same title in place (up to the next `## `), or append it."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else ["# Benchmarks\n"]
    title = section.splitlines()[0]
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == title), None)
    if start is None:
        path.write_text("".join(lines).rstrip("\n") + "\n\n" + section)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    path.write_text("".join(lines[:start]) + section + ("\n" if end < len(lines) else "") + "".join(lines[end:]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=300, help="JPEG files generated (3 classes)")
    p.add_argument("--size", default="500x375", help="WxH of the generated photos")
    p.add_argument("--image-size", type=int, default=224, help="network input side")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", default="resnet18", help="torchvision model name")
    p.add_argument("--workers", default="auto", help="loader workers for the second loader row: a count or auto")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement (at most)")
    p.add_argument("--seconds", type=float, default=15.0, help="seconds per measurement (at most)")
    p.add_argument("--note", default="", help="a sentence about the machine, added to the section")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/data_pipeline.json")
    p.add_argument("--write-results", action="store_true", help="put the table in benchmarks/RESULTS.md")
    p.add_argument("--render", type=Path, metavar="JSON", help="measure nothing: write the section of this result "
                   "file in benchmarks/RESULTS.md (with --note: replacing its note)")
    args = p.parse_args(argv)
    if args.render:
        result = json.loads(args.render.read_text())
        result["config"]["note"] = args.note or result["config"]["note"]
        args.render.write_text(json.dumps(result, indent=2) + "\n")
        write_section(ROOT / "benchmarks/RESULTS.md", markdown(result))
        return 0
    args.device = torch.device(args.device)
    width, height = (int(v) for v in args.size.lower().split("x"))
    workers = resolve_workers(args.workers if args.workers == "auto" else int(args.workers))
    info, cpu_start = machine(args.device), cpu_times()

    with tempfile.TemporaryDirectory() as tmp:
        print(f"writing {args.images} JPEGs of {width}x{height}", flush=True)
        paths = make_photos(Path(tmp), args.images, width, height)
        mean_kb = sum(os.path.getsize(f) for f in paths) / len(paths) / 1024
        rate = {"check_files_1": per_second(lambda: check_files(paths, 1, progress=False), len(paths)),
                "check_files_workers": per_second(lambda: check_files(paths, workers, progress=False), len(paths)),
                "load_image": per_second(lambda: [load_image(f) for f in paths], len(paths))}
        print("loader, 0 workers", flush=True)
        rate["loader_0_workers"], counts = loader_rate(args, Path(tmp), 0)
        print(f"loader, {workers} workers", flush=True)
        rate["loader_workers"], _ = loader_rate(args, Path(tmp), workers)
    print(f"model: {args.model} on {args.device}", flush=True)
    rate["model"] = model_rate(args)

    ratio = rate["loader_workers"] / rate["model"]
    spent = [b - a for a, b in zip(cpu_start, cpu_times())][:8]  # guest time is already in user
    name = info["device"] if args.device.type == "cuda" else f"{info['cpu']}, {info['cores']} cores, cpu"
    result = {
        "benchmark": "data_pipeline", "machine_name": name, "machine": info,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "cpu_busy_steal": [1 - sum(spent[3:5] + spent[7:]) / sum(spent), spent[7] / sum(spent)],  # of all cores' time
        "config": {"images": args.images, "size": f"{width}x{height}", "mean_kb": mean_kb,
                   "image_size": args.image_size, "batch_size": args.batch_size, "model": args.model,
                   "device": args.device.type,
                   "workers_option": args.workers, "workers": workers, "train_images": counts["train"],
                   "batches": args.batches, "seconds": args.seconds, "augment": "basic", "note": args.note},
        "images_per_s": rate,
        "verdict": {"ratio": ratio, "bottleneck": "model" if ratio >= 1 else "loader",
                    "cores_needed": max(1, math.ceil(rate["model"] / rate["loader_0_workers"]))},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    section = markdown(result)
    print(section)
    if args.write_results:
        write_section(ROOT / "benchmarks/RESULTS.md", section)
    print(f"written: {args.output}" + (", benchmarks/RESULTS.md" if args.write_results else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
