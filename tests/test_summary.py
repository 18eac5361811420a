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
