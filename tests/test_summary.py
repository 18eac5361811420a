"""Run reports are strict JSON even when a run diverged."""

import json
import math

from lightning_project.utils.summary import write_json


def test_nan_and_inf_become_null_at_any_depth(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"loss": math.nan, "history": [{"val/loss": math.inf}], "pair": (1.0, -math.inf)})

    def strict(token):
        raise AssertionError(f"non-standard JSON token {token}")

    assert json.loads(path.read_text(), parse_constant=strict) == {
        "loss": None, "history": [{"val/loss": None}], "pair": [1.0, None],
    }


def test_per_class_from_the_confusion_matrix():
    import torch

    from lightning_project.utils.summary import per_class

    # rows = true class. a: 3 right, 1 taken for b; b: 2 right; c: its one image taken for b, never
    # predicted; d: no test image at all (too small to split) -> nothing measured, not zero
    matrix = torch.tensor([[3, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    rows = per_class(matrix, ["a", "b", "c", "d"])
    assert rows["a"] == {"precision": 1.0, "recall": 0.75, "f1": round(6 / 7, 6), "support": 4}
    assert rows["b"] == {"precision": 0.5, "recall": 1.0, "f1": round(2 / 3, 6), "support": 2}
    assert rows["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert rows["d"] == {"precision": None, "recall": None, "f1": None, "support": 0}
