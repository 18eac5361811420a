"""Deployable models: a checkpoint (or an ensemble) as ONNX, TorchScript or a torch.export program.

The exported graph takes float RGB images in [0, 1], (batch, 3, S, S), with any batch size, and
returns class probabilities: normalisation, test-time views and ensemble averaging are inside, so
a client only resizes and crops as the checkpoint's evaluation pipeline does (written beside the
model with the class names). Every export is verified against the checkpoint before it is kept.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms.v2 import functional as F

from lightning_project.errors import UserError
from lightning_project.inference import tta
from lightning_project.inference.predictor import Predictor

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}
VERIFY_BATCHES = (1, 3)  # two sizes: a graph that kept the example's batch size fails here


class Deployable(nn.Module):
    """Images in [0, 1] -> probabilities averaged over TTA views and members (the predictor's maths)."""

    def __init__(self, predictor: Predictor) -> None:
        super().__init__()
        sizes = {m.spec["image_size"] for m in predictor.members}
        if len(sizes) > 1:
            raise UserError(f"ckpt_paths: the members take different input sizes {sorted(sizes)}; one exported graph "
                            "has one input size, so export them separately (or ensemble members of one size)")
        if len({json.dumps(s["transforms"], sort_keys=True) for s in predictor.specs}) > 1:
            raise UserError("ckpt_paths: the members resize and crop differently (their eval_transforms differ); the "
                            "graph's one input cannot suit both, so export them separately")
        self.image_size = sizes.pop()
        self.tta = predictor.tta
        self.nets = nn.ModuleList(m.module.net.cpu().eval() for m in predictor.members)
        stats = [(m.spec["mean"], m.spec["std"]) for m in predictor.members]
        self.register_buffer("mean", torch.tensor([s[0] for s in stats]).view(len(stats), 1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([s[1] for s in stats]).view(len(stats), 1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = []
        for i, net in enumerate(self.nets):
            x = (image - self.mean[i]) / self.std[i]
            out += [net(v).softmax(dim=1) for v in tta.views(x, self.tta)]
        return torch.stack(out).mean(dim=0)


def _onnx(model: Deployable, example: torch.Tensor, path: Path, opset: int | None) -> None:
    try:
        import onnxruntime  # noqa: F401  (needed to verify; fail before the slow export)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UserError(f"format=onnx needs onnx, onnxscript and onnxruntime ({e}); "
                        "pip install 'lightning_project[deploy]'") from None
    batch = torch.export.Dim("batch", min=1, max=4096)
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8e9  # protobuf's 2 GB limit
    torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["image"], output_names=["probabilities"],
                      dynamic_shapes={"image": {0: batch}}, opset_version=opset, external_data=large, verbose=False)


def _torchscript(model: Deployable, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():  # deprecated in favour of torch.export, still what many C++/mobile runtimes load
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(model, example).save(str(path))


def _pt2(model: Deployable, example: torch.Tensor, path: Path) -> None:
    program = torch.export.export(model, (example,), dynamic_shapes={"image": {0: torch.export.Dim("batch", max=4096)}})
    torch.export.save(program, str(path))


def export_model(predictor: Predictor, path: Path, fmt: str, opset: int | None = None) -> Deployable:
    """Write the deployable graph of `predictor` to `path` in format `fmt`; returns the module exported."""
    if fmt not in FORMATS:
        raise UserError(f"format={fmt!r}: choose one of {', '.join(FORMATS)}")
    model = Deployable(predictor).eval()
    example = torch.rand(2, 3, model.image_size, model.image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if fmt == "onnx":
            _onnx(model, example, path, opset)
        elif fmt == "torchscript":
            _torchscript(model, example, path)
        else:
            _pt2(model, example, path)
    return model


def runner(path: Path, fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exported file loaded back by its own runtime (ONNX Runtime for ONNX), as a function."""
    run = _load(path, fmt)

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return run(x)

    return probabilities


def _load(path: Path, fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            loaded = torch.jit.load(str(path), map_location="cpu")
        return lambda x: loaded(x)
    module = torch.export.load(str(path)).module()
    return lambda x: module(x)


def checkpoint_reference(predictor: Predictor) -> Callable[[torch.Tensor], torch.Tensor]:
    """What an export must reproduce for images in [0, 1]: the predictor's own probabilities (each
    member's normalisation, TTA views and averaging, through its checkpoint's module), a code path
    independent of `Deployable`."""
    def probabilities(x: torch.Tensor) -> torch.Tensor:
        return predictor.probabilities(tuple(F.normalize(x, s["mean"], s["std"]) for s in predictor.specs))

    return probabilities


def verify(path: Path, fmt: str, reference: Callable[[torch.Tensor], torch.Tensor], size: int, tolerance: float,
           seed: int = 0) -> dict:
    """Largest absolute difference of probabilities between the export, run by its own runtime, and
    `reference` on random images at batch sizes VERIFY_BATCHES; a UserError above `tolerance`."""
    run = runner(path, fmt)
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    with torch.no_grad():
        for n in VERIFY_BATCHES:
            x = torch.rand(n, 3, size, size, generator=generator)
            got, want = run(x), reference(x)
            if got.shape != want.shape:
                raise UserError(f"format={fmt}: the export returns shape {tuple(got.shape)} for a batch of {n}, "
                                f"the checkpoint {tuple(want.shape)}")
            worst = max(worst, float((got.float() - want).abs().max()))
    if not worst <= tolerance:
        raise UserError(f"format={fmt}: the export's probabilities differ from the checkpoint's by {worst:.3g} "
                        f"(> tolerance={tolerance:g}); not kept. Try another format or opset")
    return {"max_abs_diff": worst, "tolerance": tolerance, "batch_sizes": list(VERIFY_BATCHES)}
