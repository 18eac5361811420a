"""Every scheduler through the real training function: each group's lr is logged and keeps its ratio."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import CONF, compose_train

from lightning_project.train import train

pytestmark = pytest.mark.slow

TINY = ["optim=sgd_groups", "logger=csv", "trainer.enable_progress_bar=false", "trainer.max_epochs=2",
        "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
        "data.batch_size=16", "trainer.log_every_n_steps=1", "model.pretrained=false", "trainer.num_sanity_val_steps=0"]


@pytest.mark.parametrize("scheduler", sorted(p.stem for p in (CONF / "scheduler").glob("*.yaml")))
def test_scheduler_trains_every_group_at_its_ratio(scheduler, tmp_path):
    cfg = compose_train([f"scheduler={scheduler}", *TINY], tmp_path)
    returned = train(cfg)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert returned == report["optimized_metric"]["value"] is not None  # what sweeps receive
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr/head")]
    assert len(rows) >= 2
    for row in rows:
        body, neck, head = (float(row[f"lr/{g}"]) for g in ("body", "neck", "head"))
        assert 0 < head <= 1e-3 + 1e-12
        assert body / head == pytest.approx(0.1) and neck / head == pytest.approx(0.5)
    heads = [float(r["lr/head"]) for r in rows]
    if scheduler == "onecycle":
        assert heads[0] == pytest.approx(1e-3 / 25) and heads[-1] < heads[0]
    if scheduler in ("none", "constant"):
        assert heads[-1] == pytest.approx(1e-3)
    if scheduler in ("cosine", "linear"):
        assert heads.index(max(heads)) == 3 and heads[-1] < max(heads)  # warm-up of one epoch (3 steps)
