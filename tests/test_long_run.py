"""Under load: a long run of many small epochs keeps its memory flat."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import FAST, compose_train

from lightning_project.train import train

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]
EPOCHS = 200


def test_memory_stays_flat_over_hundreds_of_epochs(tmp_path):
    """One tiny batch per epoch, with the default callbacks, loggers and history: every per-epoch
    structure (metric states, logged values, callback state, the epoch history) is exercised 300 times.
    Checkpoints are off (they cost disk time, not memory). From epoch 50 to 200, RSS must grow less than
    8 MiB: anything kept per epoch from about 55 KB up fails it (a retained loss with its autograd graph,
    a batch's activations, a loader or a metric state copied each epoch); measured growth is about 0."""
    probe = tmp_path / "probe"
    cfg = compose_train([
        f"trainer.max_epochs={EPOCHS}", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
        "data.batch_size=8", "data.image_size=16", "scheduler=constant", "test=false", "logger=default",
        "callbacks.model_checkpoint=null", "callbacks.last_checkpoint=null", "+trainer.enable_checkpointing=false",
        "+callbacks.memory._target_=probes.MemoryProbe", f"+callbacks.memory.out={probe}",
        *[o for o in FAST if not o.startswith("logger=")],
    ], tmp_path)
    train(cfg)
    rss = {int(epoch): size / 2**20 for epoch, size in json.loads((probe / "rss.json").read_text()).items()}
    assert sorted(rss) == list(range(25, EPOCHS + 1, 25))
    growth = rss[EPOCHS] - rss[50]
    print(f"RSS (MiB) by epoch: {({e: round(m, 1) for e, m in rss.items()})}")
    assert growth < 8, f"RSS grew {growth:.1f} MiB from epoch 50 to {EPOCHS}: {rss}"
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert len(history) == EPOCHS  # the run really went the distance
