"""After training: predict, ensembles, TTA, evaluate side by side, export, and safe checkpoint loading.

Every test reads checkpoints of the session's real two-run sweep (conftest `sweep`).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_train, error_line, run_command

from lightning_project.data.images import load_image
from lightning_project.data.transforms import build_pipeline
from lightning_project.errors import UserError
from lightning_project.evaluate import evaluate
from lightning_project.export import export
from lightning_project.inference import Predictor, checkpoint_paths, expand_inputs, find_runs, predict_images, tta
from lightning_project.inference import exporting
from lightning_project.models import load_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpts(sweep) -> list[Path]:
    return [r.best_checkpoint for r in find_runs(sweep)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, photo_folder) -> Path:
    """Images to predict: two per class in nested folders, a broken JPEG, a text file and a hidden folder."""
    root = tmp_path_factory.mktemp("inputs")
    for cls in ("cat", "dog", "fox"):
        (root / "sub" / cls).mkdir(parents=True)
        for name in ("img0.png", "img1.png"):
            shutil.copy(photo_folder / cls / name, root / "sub" / cls / name)
    (root / "broken.jpg").write_bytes(b"plain text, not a JPEG")
    (root / "notes.txt").write_text("not an image")
    (root / ".ipynb_checkpoints").mkdir()
    shutil.copy(photo_folder / "cat" / "img2.png", root / ".ipynb_checkpoints" / "copy.png")
    return root


def probabilities(predictor: Predictor, paths: list[Path]) -> torch.Tensor:
    batches = [predictor.preprocess(load_image(p)) for p in paths]
    return predictor.probabilities(tuple(torch.stack(v) for v in zip(*batches)))


def test_predict_command_writes_one_row_per_image(tmp_path, env, ckpts, inputs):
    out = tmp_path / "preds.csv"
    run_command("predict", f"ckpt_path={ckpts[0]}", f"input={inputs}", f"output={out}", "top_classes=2",
                "progress=false", f"hydra.run.dir={tmp_path / 'run'}", env=env, cwd=tmp_path)
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "class", "confidence", "class_2", "confidence_2", "error"]
    assert [Path(r["path"]).name for r in rows] == ["broken.jpg"] + ["img0.png", "img1.png"] * 3  # no .txt, no hidden
    broken, good = rows[0], rows[1:]
    assert broken["class"] == "" and broken["confidence"] == "" and "cannot identify image" in broken["error"]
    assert all(r["error"] == "" and r["class"] in ("cat", "dog", "fox") for r in good)
    assert all(float(r["confidence"]) >= float(r["confidence_2"]) for r in good)
    # the command's numbers are the model's: the checkpoint's own pipeline, softmax, top-2
    predictor = Predictor.load(checkpoint_paths(ckpt_path=str(ckpts[0])), device="cpu")
    expected = probabilities(predictor, [Path(r["path"]) for r in good])
    top = expected.topk(2, dim=1)
    for r, values, indices in zip(good, top.values, top.indices):
        assert r["class"] == predictor.classes[indices[0]] and r["class_2"] == predictor.classes[indices[1]]
        assert float(r["confidence"]) == pytest.approx(float(values[0]), abs=1e-6)
        assert float(r["confidence_2"]) == pytest.approx(float(values[1]), abs=1e-6)


def test_predict_function_and_json_output(tmp_path, ckpts, inputs):
    rows = predict_images(ckpts[0], [inputs / "sub" / "dog", str(inputs / "sub" / "*" / "img0.png")], top_k=5)
    assert [Path(r["path"]).parent.name for r in rows] == ["dog", "dog", "cat", "fox"]  # the repeated file once
    assert all(len(r["top"]) == 3 for r in rows)  # at most the number of classes
    assert all(abs(sum(p for _, p in r["top"]) - 1) < 1e-5 for r in rows)
    from lightning_project.inference import write_predictions

    write_predictions(rows, tmp_path / "p.json", 3)
    written = json.loads((tmp_path / "p.json").read_text())
    assert written[0]["top"][0] == {"class": rows[0]["class"], "probability": rows[0]["confidence"]}


def test_inputs_are_folders_globs_and_lists(tmp_path, inputs):
    assert len(expand_inputs(inputs)) == 7  # recursive, image extensions only, hidden folders skipped
    assert len(expand_inputs(str(inputs / "**" / "img1.png"))) == 3
    assert len(expand_inputs([inputs / "notes.txt", inputs / "sub" / "cat" / "img0.png"])) == 2  # named: kept
    (tmp_path / "empty").mkdir()
    for spec, message in [(tmp_path / "nope", "no such file or folder"), (str(tmp_path / "*.jpg"), "matches no file"),
                          (tmp_path / "empty", "holds no images"), ("", "required")]:
        with pytest.raises(UserError, match=message):
            expand_inputs(spec)


def test_bad_predict_settings_fail_before_any_checkpoint_is_read(tmp_path, inputs):
    from lightning_project.predict import predict

    for overrides, message in [(["num_workers=-1"], "num_workers=-1: give a count >= 0 or auto"),
                               (["batch_size=0"], "batch_size=0: give a whole number >= 1"),
                               ([f"output={tmp_path}"], "a folder; give a file name ending in .csv or .json")]:
        cfg = compose_train(["ckpt_path=never-read.ckpt", f"input={inputs}", *overrides], tmp_path, name="predict")
        with pytest.raises(UserError, match=message):
            predict(cfg)


def test_bad_input_path_is_one_line_through_the_command(tmp_path, env, ckpts):
    proc = run_command("predict", f"ckpt_path={ckpts[0]}", f"input={tmp_path / 'missing'}",
                       f"hydra.run.dir={tmp_path / 'run'}", env=env, cwd=tmp_path, check=False)
    assert error_line(proc) == f"error: input={tmp_path / 'missing'}: no such file or folder (and not a glob pattern)"
    assert not (tmp_path / "run" / "predictions.csv").exists()


def test_ensemble_is_the_mean_of_its_members_and_sweep_picks_the_best(ckpts, inputs, sweep):
    paths = expand_inputs(inputs / "sub")
    single = [probabilities(Predictor.load(checkpoint_paths(ckpt_path=str(c)), device="cpu"), paths) for c in ckpts]
    both = Predictor.load(checkpoint_paths(ckpt_paths=[str(c) for c in ckpts]), device="cpu")
    torch.testing.assert_close(probabilities(both, paths), (single[0] + single[1]) / 2)
    runs = find_runs(sweep)
    assert [r.overrides[-1] for r in runs] and all(r.ok and r.metric == "val/acc" and r.mode == "max" for r in runs)
    (where, best), = checkpoint_paths(sweep_dir=str(sweep), top_k=1)
    assert where.startswith("sweep_dir run") and best in ckpts
    assert next(r.score for r in runs if r.best_checkpoint == best) == max(r.score for r in runs)
    assert len(checkpoint_paths(sweep_dir=str(sweep), top_k=5)) == 2  # warns, uses what there is


def test_tta_views_and_their_average():
    x = torch.rand(2, 3, 32, 32)
    flip = tta.views(x, "flip")
    assert len(flip) == 2 and torch.equal(flip[1], x.flip(-1))
    five, ten = tta.views(x, "five_crop"), tta.views(x, "ten_crop")
    assert len(five) == 5 and len(ten) == 10 and all(v.shape == x.shape for v in ten)
    assert torch.equal(ten[5], five[0].flip(-1))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    expected = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2
    torch.testing.assert_close(tta.average_probabilities(model, x, "flip"), expected)
    with pytest.raises(UserError, match="tta='mirror': choose one of none, flip, five_crop, ten_crop"):
        tta.check_mode("mirror")


def test_evaluate_puts_single_models_tta_and_ensemble_side_by_side(tmp_path, sweep):
    out = tmp_path / "eval.json"
    cfg = compose_train([f"sweep_dir={sweep}", "top_k=2", "tta=flip", f"output={out}", "device=cpu"],
                        tmp_path, name="evaluate")
    report = evaluate(cfg)
    assert json.loads(out.read_text())["comparison"] == report["comparison"]
    rows = report["comparison"]
    assert [(r["model"], r["tta"]) for r in rows][-2:] == [("ensemble of 2", "none"), ("ensemble of 2", "flip")]
    assert len(rows) == 6 and report["metrics"] == {k: v for k, v in rows[-1].items() if k.startswith("test/")}
    for run in find_runs(sweep):  # a single model without TTA scores what its training run's test reported
        row = next(r for r in rows if r["checkpoint"] == str(run.best_checkpoint) and r["tta"] == "none")
        assert row["test/acc"] == pytest.approx(run.metrics["metrics"]["test/acc"], abs=1e-6)
    assert sum(report["split_sizes"].values()) == 36 and len(report["per_class"]) == 3


def _edited(source: Path, target: Path, data: dict | None = None, **hparams) -> Path:
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"].update(hparams)
    checkpoint["datamodule_hyper_parameters"].update(data or {})
    torch.save(checkpoint, target)
    return target


def test_ensemble_members_must_share_the_test_images(tmp_path, ckpts):
    """Labels alone would match (stratified splits of class-sorted files): the images are compared."""
    reseeded = _edited(ckpts[1], tmp_path / "seed7.ckpt", data={"seed": 7})
    cfg = compose_train([f"ckpt_paths=[{ckpts[0]},{reseeded}]", "device=cpu"], tmp_path, name="evaluate")
    with pytest.raises(UserError, match=rf"ckpt_paths\[1\]={reseeded}: its test split holds other images than that"):
        evaluate(cfg)


def test_sweep_ranking_follows_each_runs_mode_and_skips_failed_runs(tmp_path):
    from lightning_project.inference import best_runs

    for name, loss, has_checkpoint in (("0", 0.9, True), ("1", 0.3, True), ("2", 0.1, False), ("3", 0.5, True)):
        run = tmp_path / "sweep" / name
        (run / "checkpoints").mkdir(parents=True)
        ckpt = run / "checkpoints" / "best.ckpt"
        if has_checkpoint:
            ckpt.write_bytes(b"x")
        report = {"optimized_metric": {"name": "val/loss", "mode": "min", "value": loss},
                  "best_checkpoint": f"/moved/elsewhere/{name}/checkpoints/best.ckpt"}  # found in the run itself
        (run / "metrics.json").write_text(json.dumps(report))
    (tmp_path / "sweep" / "4" / ".hydra").mkdir(parents=True)  # started, never reported
    (tmp_path / "sweep" / "4" / ".hydra" / "overrides.yaml").write_text("- optim.lr=1\n")
    assert [r.path.name for r in best_runs(tmp_path / "sweep", 2)] == ["1", "3"]  # 2 has no checkpoint, 4 no score
    with pytest.raises(UserError, match="a single run directory, not a sweep; use ckpt_path="):
        best_runs(tmp_path / "sweep" / "0", 1)


class NotATensor:
    pass


def test_checkpoints_load_safely_or_fail_naming_the_file(tmp_path, ckpts):
    first = ckpts[0]
    other = _edited(first, tmp_path / "other.ckpt", class_names=["a", "b", "c"])
    wider = _edited(first, tmp_path / "wider.ckpt", num_classes=4, class_names=["a", "b", "c", "d"])
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    pickled = tmp_path / "pickled.ckpt"  # arbitrary objects never unpickle: weights_only=True
    torch.save({"lightning_project": {}, "hyper_parameters": {}, "payload": NotATensor()}, pickled)
    cases = [
        ([first, other], f"ckpt_paths[1]={other}: trained for classes ['a', 'b', 'c'], but {first} for ['cat', "),
        ([wider], f"ckpt_paths[0]={wider}: its weights do not fit a resnet18 for 4 classes"),
        ([truncated], f"ckpt_paths[0]={truncated}: not a readable checkpoint"),
        ([foreign], f"ckpt_paths[0]={foreign}: not a lightning_project checkpoint"),
        ([pickled], f"ckpt_paths[0]={pickled}: not a readable checkpoint (UnpicklingError"),
        ([tmp_path / "none.ckpt"], "no such file"),
    ]
    for paths, message in cases:
        with pytest.raises(UserError) as error:
            Predictor.load(checkpoint_paths(ckpt_paths=[str(p) for p in paths]), device="cpu")
        assert str(error.value).startswith(message) or message in str(error.value), str(error.value)
    with pytest.raises(UserError, match="give exactly one of ckpt_path=P, ckpt_paths=.A,B. or sweep_dir=DIR"):
        checkpoint_paths(ckpt_path=str(first), ckpt_paths=[str(first)])
    module, _ = load_checkpoint(first)
    assert not module.training


@pytest.mark.parametrize("fmt, members, mode",
                         [("onnx", 1, "five_crop"), ("torchscript", 2, "flip"), ("pt2", 1, "none")])
def test_export_runs_in_its_runtime_like_the_checkpoint(tmp_path, ckpts, inputs, fmt, members, mode):
    chosen = [str(c) for c in ckpts[:members]]
    suffix = exporting.FORMATS[fmt]
    cfg = compose_train([f"ckpt_paths=[{','.join(chosen)}]", f"format={fmt}", f"output={tmp_path / ('m' + suffix)}",
                         f"tta={mode}"], tmp_path, name="export")
    path = export(cfg)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["classes"] == ["cat", "dog", "fox"] and sidecar["input"]["shape"] == ["batch", 3, 32, 32]
    assert sidecar["verification"]["max_abs_diff"] <= 1e-4 and len(sidecar["models"]) == members
    assert not list(tmp_path.glob("*.data"))  # one self-contained file
    # a client: the sidecar's resize/crop, values in [0, 1], no normalisation; any batch size
    paths = expand_inputs(inputs / "sub")
    client = build_pipeline(sidecar["preprocess"], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    x = torch.stack([client(load_image(p)) for p in paths])
    got = exporting.runner(path, fmt)(x)
    want = probabilities(Predictor.load(checkpoint_paths(ckpt_paths=chosen), mode, "cpu"), paths)
    assert got.shape == (6, 3) and float((got - want).abs().max()) < 1e-4


def test_export_that_does_not_match_is_not_kept(tmp_path, ckpts, monkeypatch):
    exact = exporting.runner
    monkeypatch.setattr(exporting, "runner", lambda path, fmt: (lambda x: exact(path, fmt)(x) + 1e-3))
    out = tmp_path / "m.pt"
    cfg = compose_train([f"ckpt_path={ckpts[0]}", "format=torchscript", f"output={out}"], tmp_path, name="export")
    with pytest.raises(UserError, match=r"format=torchscript: the export's probabilities differ from the checkpoint's"):
        export(cfg)
    assert not out.exists() and not out.with_suffix(".json").exists()
    for overrides, message in [(["format=tflite"], "format='tflite': choose one of onnx, torchscript, pt2"),
                               (["format=pt2", f"output={out}"], "must be saved under a name ending in .pt2"),
                               (["tolerance=0"], "tolerance=0: give the largest allowed difference")]:
        with pytest.raises(UserError, match=message):
            export(compose_train([f"ckpt_path={ckpts[0]}", *overrides], tmp_path, name="export"))


def test_ensemble_of_different_input_sizes_cannot_share_one_graph(tmp_path, ckpts, inputs):
    checkpoint = torch.load(ckpts[1], map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["image_size"] = 48
    checkpoint["datamodule_hyper_parameters"]["image_size"] = 48
    for step in checkpoint["datamodule_hyper_parameters"]["eval_transforms"].values():
        step["size"] = 48
    torch.save(checkpoint, tmp_path / "big.ckpt")
    predictor = Predictor.load(checkpoint_paths(ckpt_paths=[str(ckpts[0]), str(tmp_path / "big.ckpt")]), device="cpu")
    assert len(predictor.preprocess.pipelines) == 2  # predict feeds each member its own size ...
    assert torch.isfinite(probabilities(predictor, expand_inputs(inputs / "sub" / "cat"))).all()
    with pytest.raises(UserError, match=r"members take different input sizes \[32, 48\]"):  # ... one graph cannot
        exporting.Deployable(predictor)
    wider = {"resize": {"_target_": "Resize", "size": 40}, "crop": {"_target_": "CenterCrop", "size": 32}}
    recropped = _edited(ckpts[1], tmp_path / "recropped.ckpt", data={"eval_transforms": wider})
    predictor = Predictor.load(checkpoint_paths(ckpt_paths=[str(ckpts[0]), str(recropped)]), device="cpu")
    with pytest.raises(UserError, match="the members resize and crop differently"):
        exporting.Deployable(predictor)
