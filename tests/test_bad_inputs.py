"""The catalogue of bad inputs: each through its real command, exit status 2 and one `error:` line
naming the key or file, the value and the fix, with no traceback and no output that looks like success.

The commands run in-process exactly as `python -m lightning_project.<command> ARGS` runs them (runpy
with sys.argv: Hydra parses the command line and composes the config, the entry's main() reports),
so the imports are paid once for the whole catalogue.
"""

from __future__ import annotations

import errno
import io
import re

import numpy as np
import pytest
import torch
from conftest import FAST, make_image_folder, run_module
from PIL import Image

import lightning_project.data
from lightning_project.inference.runs import find_runs
from lightning_project.models import ClassifierModule

pytestmark = pytest.mark.slow
SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1", "data.batch_size=16", *FAST]


def command(capsys, name: str, *args: str) -> tuple[int, str]:
    """(exit status, stderr) of `python -m lightning_project.<name> args` run in this process."""
    status, _, err = run_module(capsys, name, *args)
    return status, err


def one_line(status: int, err: str) -> str:
    assert status == 2 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def train_error(capsys, run, *overrides: str, checkpoints: bool = False) -> str:
    line = one_line(*command(capsys, "train", f"hydra.run.dir={run}", *FAST, *overrides))
    assert not (run / "metrics.json").exists()
    assert checkpoints or not list(run.glob("checkpoints/*.ckpt"))
    return line


@pytest.fixture
def no_data_read(monkeypatch):
    """The schema is checked before any data is read or model built."""
    def refuse(*args, **kwargs):
        raise AssertionError("the data was read before the configuration was checked")
    monkeypatch.setattr(lightning_project.data, "create_datamodule", refuse)


# ---- the configuration: wrong types, unknown keys, impossible values (before any data is read) -------------
@pytest.mark.parametrize("overrides, expected", [
    (["data.batch_size=abc"], r"data.batch_size='abc': must be an integer >= 1$"),
    (["data.batch_size=0"], r"data.batch_size=0: must be an integer >= 1$"),
    (["optim.lr=-0.1"], r"optim.lr=-0.1: must be a number > 0$"),
    (["optim.lr=fast"], r"optim.lr='fast': must be a number > 0$"),
    (["data.val_fraction=1.5"], r"data.val_fraction=1.5: must be a number in \(0, 1\)$"),
    (["data.val_fraction=0"], r"data.val_fraction=0: must be a number in \(0, 1\)$"),
    (["data.num_workers=-2"], r"data.num_workers=-2: must be an integer >= 0 or auto$"),
    (["data.pin_memory=1"], r"data.pin_memory=1: must be one of true, false, auto$"),
    (["trainer.max_epochs=ten"], r"trainer.max_epochs='ten': must be an integer >= 1 or -1 or null$"),
    (["loss.label_smoothing=1.5"], r"loss.label_smoothing=1.5: must be a number in \[0, 1\)$"),
    (["optimized_mode=maximum"], r"optimized_mode='maximum': must be one of max, min$"),
    (["scheduler=multistep", "scheduler.milestones=[4,2]"],
     r"scheduler.milestones=\[4, 2\]: must be a list of increasing epoch numbers"),
    (["finetune=gradual", "finetune.milestones=[3,1]"], r"finetune.milestones=\[3, 1\]: must be a list of increasing"),
    (["finetune.lr_decay=0"], r"finetune.lr_decay=0: must be a number in \(0, 1\] or null$"),
    (["scheduler.name=cosin"], r"scheduler.name='cosin': must be one of onecycle, cosine, linear"),
    (["matmul_precision=fast"], r"matmul_precision='fast': must be one of highest, high, medium$"),
    (["+data.batchsize=32"], r"data.batchsize: DigitsDataModule takes no such key; close names: batch_size"),
    (["+model.head_drop=0.2"], r"model.head_drop: the model group takes no such key; close names: head_dropout"),
    (["+trainer.max_epoch=3"], r"trainer.max_epoch: Lightning's Trainer takes no such key; close names: max_epochs"),
    (["+optim.momentun=0.9"], r"optim.momentun: SGD takes no such key; close names: momentum"),
    (["optim=adam", "+optim.momentum=0.9"], r"optim.momentum: Adam takes no such key"),
    (["scheduler=cosine", "+scheduler.pct_start=0.3"],
     r"scheduler.pct_start: scheduler=cosine takes no such key; keys: min_lr_ratio, name, warmup_epochs$"),
    (["trainer.max_epochs=null"], r"trainer.max_epochs=null with no trainer.max_steps: scheduler=onecycle is planned "
                                  r"over the run's length in steps, which would be Lightning's default of 1000 epochs"),
    (["trainer.max_epochs=-1", "scheduler=cosine"], r"scheduler=cosine .* which would be an endless run"),
    (["optimized_metric=val/accuracy"],
     r"optimized_metric='val/accuracy' is not a metric the training logs; close names: val/acc.* \(logged: train/loss"),
    (["callbacks.model_checkpoint.monitor=val/acuracy"],
     r"callbacks.model_checkpoint.monitor='val/acuracy' is not a metric the training logs; close names: val/acc"),
    (["optimized_metric=test/acc"], r"optimized_metric='test/acc' is not a metric the training logs"),
    (["optimized_metric=val/loss"], r"optimized_mode=max with optimized_metric=val/loss: .* set optimized_mode=min$"),
    (["optim._target_=Adamm"], r"optim._target_: torch.optim has no 'Adamm'; close names: Adam"),
], ids=["type-batch-size", "batch-size-0", "negative-lr", "type-lr", "val-fraction-high", "val-fraction-0",
        "num-workers", "pin-memory", "type-epochs", "label-smoothing", "mode", "milestones", "gradual-order",
        "lr-decay", "scheduler-name", "matmul", "unknown-data-key", "unknown-model-key", "unknown-trainer-key",
        "unknown-optim-key", "option-of-another-optimizer", "option-of-another-scheduler", "onecycle-no-epochs",
        "endless", "optimized-metric", "monitor", "test-metric", "loss-maximised", "optimizer-name"])
def test_the_configuration_is_checked_before_any_data_is_read(tmp_path, capsys, no_data_read, overrides, expected):
    line = train_error(capsys, tmp_path / "run", *overrides)
    assert re.search(expected, line.removeprefix("error: ")), line


# ---- checks that need the classes or a built object: still before training -----------------------------------
@pytest.mark.parametrize("overrides, expected", [
    (["model.name=resnet5"], r"model.name='resnet5' is not a torchvision classification model; close names: resnet50"),
    (["model.pretrained=true", "model.download=false"],
     r"model.pretrained=true but ResNet18_Weights.IMAGENET1K_V1 could not be loaded .* place "
     r"https://download.pytorch.org/models/resnet18-f37072fd.pth at .*/hub/checkpoints/resnet18-f37072fd.pth"),
    (["augment.train.crop._target_=RandomResizedCrap"],
     r"augment.train.crop._target_: torchvision.transforms.v2 has no 'RandomResizedCrap'; close names: "
     r"RandomResizedCrop"),
    (["+augment.train.crop.sise=3"], r"augment.train.crop: RandomResizedCrop\(size.* rejects"),
    (["optim.groups=[{name:head,patterns:[fc],weight_decy:0.1}]"], r"optim.groups.head: SGD has no option weight_decy"),
    (["model=vgg16", "optim=sgd_groups", "model.parts.neck=[classifier.0.biase]"],
     r"optim.groups.neck.patterns: pattern 'classifier.0.biase' matches no parameter; closest names: "
     r"classifier.0.bias"),
    (["model=vgg16", "optim=sgd_groups", "model.parts.neck=[classifier]"],
     r"optim.groups.head: parameter classifier.6.weight is also claimed by group 'neck'"),
    (["finetune.strategy=everything"],
     r"finetune.strategy='everything': choose one of full, feature_extractor, partial"),
    (["finetune=partial", "finetune.train_stages=7"], r"finetune.train_stages=7: ResNet has 5 blocks"),
    (["data.val_fraction=0.9"], r"data.val_fraction \+ data.test_fraction = 1.05: leaves no training images"),
    (["data.num_classes=5"], r"data.num_classes=5 but the data holds 10 classes"),
    (["optimized_metric=val/top5", "data=imagefolder", "data.root={photos}"],
     r"optimized_metric='val/top5' is not a metric the training logs"),  # 3 classes: no top-5 accuracy
    (["trainer.precision=fp33"], r"trainer \(accelerator=auto, devices=1, precision=fp33\): .*fp33.*; fix trainer"),
    (["trainer.precision=16-mixed", "trainer.accelerator=cpu"],
     r"trainer.precision=16-mixed: float16 mixed precision needs a GPU and this run is on the CPU; use "
     r"trainer.precision=bf16-mixed or 32-true"),
    (["model.weights=IMAGENET9K"],
     r"model.weights='IMAGENET9K' is not a weight set of resnet18; choose one of IMAGENET1K"),
    (["finetune=gradual", "trainer.max_epochs=6"], r"finetune.milestones=\[2, 4, 6\]: the last milestone \(epoch 6\)"),
    (["callbacks.collapse_detector.patience=0"],
     r"callbacks.collapse_detector \(lightning_project.callbacks.CollapseDetector\): patience=0: must be at least 1"),
    (["trainer=ddp_cpu", "trainer.sync_batchnorm=true"],
     r"trainer.sync_batchnorm=true: PyTorch's SyncBatchNorm runs on GPUs only .* set trainer.sync_batchnorm=false"),
    (["channels_last=yes"], r"channels_last='yes': must be one of true, false, auto$"),
    (["+compile_options.modes=max-autotune"],
     r"compile_options.modes: torch.compile takes no such key; close names: mode"),
    (["compile_options.mode=fastest"],
     r"compile_options.mode='fastest': must be one of null, default, reduce-overhead"),
    (["compile=true", "compile_options.backend=inductr"],
     r"compile_options \{'backend': 'inductr'.*\}: torch.compile refuses them \(InvalidBackend: .*; fix compile_options"),
], ids=["model-name", "pretrained-offline", "transform-name", "transform-argument", "group-option",
        "pattern-matches-nothing", "overlapping-groups", "strategy", "train-stages", "fractions", "num-classes",
        "top5-of-3-classes", "precision", "16-mixed-on-cpu", "weight-set", "gradual-too-long", "callback-option",
        "sync-batchnorm-on-cpu", "channels-last", "compile-option-name", "compile-mode", "compile-backend"])
def test_bad_names_and_settings_stop_before_training(tmp_path, capsys, photo_folder, overrides, expected):
    line = train_error(capsys, tmp_path / "run", *[o.replace("{photos}", str(photo_folder)) for o in overrides])
    assert re.search(expected, line.removeprefix("error: ")), line


@pytest.mark.parametrize("override", ["scheduler=cosin", "augment=strongg", "model=resnet5", "optim=adamm"])
def test_an_unknown_option_of_a_group_is_named_by_hydra_with_the_choices(tmp_path, capsys, override):
    """Composition errors come from Hydra itself (exit 1, before our code runs): the first line names the
    missing option and the available ones follow."""
    status, err = command(capsys, "train", f"hydra.run.dir={tmp_path / 'run'}", override)
    group, option = override.split("=")
    assert status == 1 and "Traceback" not in err
    assert err.splitlines()[0] == f"In 'train': Could not find '{group}/{option}'"
    assert f"Available options in '{group}':" in err and not (tmp_path / "run").exists()


def test_a_tracker_that_is_not_installed_names_the_extra(tmp_path, capsys, monkeypatch):
    """As on a machine without mlflow: Lightning's logger refuses, the line names our extra (not Lightning's
    hint, which asks for the full mlflow server)."""
    from pytorch_lightning.loggers import mlflow

    class Missing:
        def __bool__(self):
            return False

        def __str__(self):
            return "Requirement 'mlflow>=1.0.0' not met. HINT: Try running `pip install -U 'mlflow>=1.0.0'`"
    monkeypatch.setattr(mlflow, "_MLFLOW_AVAILABLE", Missing())
    line = train_error(capsys, tmp_path / "run", "logger=mlflow")
    assert line == ("error: logger.mlflow needs a package that is not installed (Requirement 'mlflow>=1.0.0' not "
                    "met): pip install -e '.[tracking]'")


# ---- the data -----------------------------------------------------------------------------------------------
def _bad_files(root):
    make_image_folder(root, ("cat", "dog"), per_class=6)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (root / "cat" / "truncated.jpg").write_bytes(buffer.getvalue()[:700])
    (root / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2)
    (root / "dog" / "zero.png").write_bytes(b"")
    (root / "dog" / "page.jpg").write_text("<html>not an image</html>")


@pytest.mark.parametrize("overrides, layout, expected", [
    (["data.root={root}"], "missing", r"data.root=.*missing: no such directory"),
    (["data.root={root}"], "files_only", r"data.root=.*files_only: no class folders"),
    (["data.root={root}"], "empty_class", r"class folder bird/ holds no images .* add images or remove the folder"),
    ([], None, r"data.root is not set: data=imagefolder needs data.root=DIR"),
    (["data.root={root}"], "bad_files",
     r"data.root=.*bad_files: 4 of 16 files are not readable images: .*corrupt.jpg.*truncated.jpg.*page.jpg.*"
     r"zero.png .*; fix or delete them, or set data.on_bad_file=skip$"),
], ids=["root-missing", "no-class-folders", "empty-class", "root-unset", "corrupt-truncated-empty-not-image"])
def test_bad_data_folders(tmp_path, capsys, overrides, layout, expected):
    root = tmp_path / (layout or "unused")
    if layout == "files_only":
        root.mkdir()
        (root / "photo.jpg").write_bytes(b"\xff\xd8")
    elif layout == "empty_class":
        make_image_folder(root, ("cat", "dog"), per_class=4)
        (root / "bird").mkdir()
    elif layout == "bad_files":
        _bad_files(root)
    line = train_error(capsys, tmp_path / "run", "data=imagefolder", "data.num_workers=0",
                       *[o.format(root=root) for o in overrides])
    assert re.search(expected, line.removeprefix("error: ")), line


# ---- checkpoints and files after training ----------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, sweep) -> dict:
    good = find_runs(sweep)[0].best_checkpoint
    folder = tmp_path_factory.mktemp("bad_checkpoints")
    truncated = folder / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = folder / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    wider = folder / "wider.ckpt"  # says 4 classes, holds the weights of 3
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["hyper_parameters"].update(num_classes=4, class_names=["a", "b", "c", "d"])
    torch.save(checkpoint, wider)
    return {"good": good, "truncated": truncated, "foreign": foreign, "wider": wider, "missing": folder / "gone.ckpt"}


@pytest.mark.parametrize("name, checkpoint, expected", [
    ("evaluate", "missing", r"ckpt_path=.*gone.ckpt: no such file"),
    ("predict", "truncated", r"ckpt_path=.*truncated.ckpt: not a readable checkpoint"),
    ("evaluate", "foreign", r"ckpt_path=.*foreign.ckpt: not a lightning_project checkpoint"),
    ("predict", "wider", r"ckpt_path=.*wider.ckpt: its weights do not fit a resnet18 for 4 classes"),
    ("export", "truncated", r"ckpt_path=.*truncated.ckpt: not a readable checkpoint"),
], ids=["missing", "truncated", "not-ours", "other-number-of-classes", "export-truncated"])
def test_bad_checkpoints(tmp_path, capsys, photo_folder, checkpoints, name, checkpoint, expected):
    out = tmp_path / "out"
    args = {"evaluate": [], "predict": [f"input={photo_folder}", f"output={out}.csv"], "export": [f"output={out}.onnx"]}
    status, err = command(capsys, name, f"ckpt_path={checkpoints[checkpoint]}", f"hydra.run.dir={tmp_path / 'run'}",
                          *args[name])
    line = one_line(status, err)
    assert re.search(expected, line.removeprefix("error: ")), line
    assert not list(tmp_path.glob("out*")) and not (tmp_path / "run" / "metrics.json").exists()


def test_evaluating_on_data_of_other_classes(tmp_path, capsys, checkpoints):
    status, err = command(capsys, "evaluate", f"ckpt_path={checkpoints['good']}", "data=digits",
                          f"hydra.run.dir={tmp_path / 'run'}")
    line = one_line(status, err)
    assert "trained for the 3 classes" in line and line.endswith("evaluate on data with the same class folders")


@pytest.mark.parametrize("spec, expected", [
    ("{tmp}/nowhere", "input={tmp}/nowhere: no such file or folder (and not a glob pattern)"),
    ("{tmp}/empty", "input={tmp}/empty: the folder holds no images"),
    ("{tmp}/*.webp", "input={tmp}/*.webp: the pattern matches no file"),
])
def test_predict_on_unreadable_paths(tmp_path, capsys, checkpoints, spec, expected):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "preds.csv"
    status, err = command(capsys, "predict", f"ckpt_path={checkpoints['good']}", f"input={spec.format(tmp=tmp_path)}",
                          f"output={out}", f"hydra.run.dir={tmp_path / 'run'}")
    assert one_line(status, err).startswith(f"error: {expected.format(tmp=tmp_path)}")
    assert not out.exists()


# ---- resources: memory and disk --------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes"),
], ids=["cuda", "cpu"])
def test_out_of_memory_names_the_batch_size_and_the_finder(tmp_path, capsys, monkeypatch, error):
    """Simulated: the first training step runs out of memory on the chosen device."""
    def step(self, batch, batch_idx):
        raise error
    monkeypatch.setattr(ClassifierModule, "training_step", step)
    line = train_error(capsys, tmp_path / "run", *SHORT)
    assert line.startswith("error: out of memory with data.batch_size=16 on CPU (resnet18, 32 px, precision 32-true) (")
    assert line.endswith("lower data.batch_size (raise trainer.accumulate_grad_batches to keep the effective batch), "
                         "or find the largest that fits with `python -m lightning_project.tune "
                         "tune.checks=[batch_size]` and the same overrides")


@pytest.mark.parametrize("where", ["checkpoint", "metrics"])
def test_disk_full_while_saving(tmp_path, capsys, monkeypatch, where):
    """Simulated ENOSPC while a checkpoint is written, and while metrics.json is written."""
    from lightning_project.callbacks import crash_safety
    from lightning_project.utils import summary

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "metrics.json"))
    if where == "checkpoint":
        monkeypatch.setattr(crash_safety.torch, "save", full)
    else:
        monkeypatch.setattr(summary, "write_json", lambda path, data: full() if path.name == "metrics.json" else None)
    line = train_error(capsys, tmp_path / "run", *SHORT, checkpoints=where == "metrics")
    if where == "checkpoint":
        assert line.startswith(f"error: no space left on the device of {tmp_path / 'run' / 'checkpoints'} while "
                               "saving best-epoch000.ckpt; free space (the previous best-epoch000.ckpt is intact)")
        assert not list((tmp_path / "run" / "checkpoints").glob("*tmp*"))
    else:
        assert line == (f"error: no space left on the device while writing {tmp_path / 'run' / 'metrics.json'}: free "
                        "space, or set paths.log_dir (and hydra.run.dir) to a disk with room")
