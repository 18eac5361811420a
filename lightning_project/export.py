"""`python -m lightning_project.export ckpt_path=P format=onnx|torchscript|pt2`.

Writes the model (dynamic batch size; input float RGB in [0, 1] at the checkpoint's image size;
output class probabilities, normalisation inside) and `<name>.json` beside it: class names, the
input and output, the resize/crop a client must apply, the checkpoints and their SHA-256. The
export is run by its own runtime on sample inputs and compared with the checkpoint; a difference
above `tolerance` deletes it and exits non-zero.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lightning_project.errors import UserError
from lightning_project.inference.exporting import FORMATS, checkpoint_reference, export_model, verify
from lightning_project.predict import load_predictor
from lightning_project.utils import runtime

log = logging.getLogger("lightning_project")


def export(cfg: DictConfig) -> Path:
    runtime.quiet_library_noise()
    for name in ("onnx_ir", "onnxscript"):  # one INFO line per graph rewrite otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    fmt = cfg.format
    if fmt not in FORMATS:
        raise UserError(f"format={fmt!r}: choose one of {', '.join(FORMATS)}")
    if not (isinstance(cfg.tolerance, (int, float)) and cfg.tolerance > 0):
        raise UserError(f"tolerance={cfg.tolerance!r}: give the largest allowed difference, e.g. 1e-4")
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    path = Path(cfg.output) if cfg.get("output") else out_dir / f"model{FORMATS[fmt]}"
    if fmt == "pt2" and path.suffix != ".pt2":  # torch.export.load refuses other names
        raise UserError(f"output={path}: a pt2 program must be saved under a name ending in .pt2")
    meta = path.with_suffix(".json")
    if meta == path or path.is_dir():
        raise UserError(f"output={path}: give a model file name (e.g. model{FORMATS[fmt]}); <name>.json is written "
                        "beside it")
    predictor = load_predictor(cfg)
    log.info("exporting %s (tta=%s) to %s", predictor.metadata()["model_name"], predictor.tta, path)
    leftovers = (path, path.with_name(path.name + ".data"), meta)
    for old in leftovers:  # an earlier export here must not outlive a failed one
        old.unlink(missing_ok=True)
    try:
        model = export_model(predictor, path, fmt, cfg.get("opset"))
        check = verify(path, fmt, checkpoint_reference(predictor), model.image_size, float(cfg.tolerance))
    except Exception:
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)  # an export that does not match is never left behind
        raise
    info = predictor.metadata()
    size = model.image_size
    sidecar = {
        "format": fmt,
        "file": path.name,
        "classes": info["classes"],
        "input": {"name": "image", "shape": ["batch", 3, size, size], "dtype": "float32", "range": [0, 1],
                  "layout": "RGB, channels first", "normalisation": "inside the model"},
        "output": {"name": "probabilities", "shape": ["batch", len(info["classes"])]},
        "preprocess": predictor.members[0].spec["transforms"],  # resize/crop steps (torchvision v2 specs)
        "tta": predictor.tta,
        "models": info["models"],
        "verification": check,
        "torch": torch.__version__,
        "opset": cfg.get("opset"),
    }
    meta.write_text(json.dumps(sidecar, indent=2) + "\n")
    log.info("verified (largest difference %.2g <= %g); wrote %s and %s", check["max_abs_diff"], check["tolerance"],
             path, meta)
    return path


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    with runtime.user_errors():
        export(cfg)


if __name__ == "__main__":
    main()
