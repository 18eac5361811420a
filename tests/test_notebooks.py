"""The notebooks, run top to bottom in a fresh kernel as a user runs them (nbclient, headless).

Each runs in its own empty working directory with the test session's empty torch cache; the kernel
is the interpreter running the tests (its `python3` kernel), so it imports the package under test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def stdout(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream" and o.name == "stdout")


def pngs(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if o.output_type in ("display_data", "execute_result"))


@pytest.fixture
def kernel_env(tmp_path, monkeypatch, torch_home) -> Path:
    """Set before the kernel starts, so the kernel inherits it: the empty torch cache, temporary files
    (the quickstart's work directory) inside tmp_path, and no sweep named by the caller's shell."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("SWEEP_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_quickstart_notebook(kernel_env):
    nb = execute("01_quickstart.ipynb", kernel_env)
    text = stdout(nb)

    trainer_acc, reloaded_acc = map(float, re.search(r"test accuracy: trainer (\S+), reloaded (\S+)", text).groups())
    assert trainer_acc == reloaded_acc
    workdir = Path(re.search(r"work directory: (\S+)", text).group(1))
    assert workdir.parent == kernel_env
    for name in ("digits.ckpt", "curves.png", "confusion_matrix.png"):
        assert (workdir / name).stat().st_size > 0, name
    assert pngs(nb) >= 2  # the curves and the confusion matrix, shown inline

    # the predictions table: one line per written file with its true and predicted class and confidence
    table = re.findall(r"^(digit_\d\d\.png)\s+(\d)\s+(\d)\s+([0-9.]+)  ", text, re.M)
    assert sorted(row[0] for row in table) == sorted(p.name for p in (workdir / "digits").glob("*.png"))
    assert len(table) == 12
    assert all(0.0 < float(confidence) <= 1.0 for *_, confidence in table)
    right = sum(true == predicted for _, true, predicted, _ in table)
    assert f"files predicted correctly: {right}/12" in text
    assert "file predictions match the test split's predictions" in text


def test_sweep_notebook(kernel_env, monkeypatch, sweep):
    monkeypatch.setenv("SWEEP_DIR", str(sweep))
    nb = execute("02_sweep_analysis.ipynb", kernel_env)
    text = stdout(nb)

    scores = {}
    for run in ("0", "1"):
        report = json.loads((sweep / run / "metrics.json").read_text())
        scores[run] = report["optimized_metric"]["value"]
    lr = {"0": "0.02", "1": "0.05"}
    header = re.search(r"^\s*run\s+optim\.lr\s+val/acc \(max\)\s+test/acc\s+epochs\s+fit s$", text, re.M)
    assert header, text
    rows = re.findall(r"^\s*([01])\s+(0\.0[25])\s+([0-9.]+)\s", text[header.end():], re.M)
    assert {(run, value) for run, value, _ in rows} == {("0", "0.02"), ("1", "0.05")}
    assert [float(score) for *_, score in rows] == sorted((float(f"{s:.4g}") for s in scores.values()), reverse=True)
    assert "swept: optim.lr" in text
    assert pngs(nb) >= 2  # metric against lr, validation curves

    command = re.search(r"^python -m lightning_project\.train (.+)$", text, re.M).group(1)
    best = max(scores, key=lambda run: scores[run])  # ties: the first, as the notebook's stable sort
    assert f"optim.lr={lr[best]}" in command.split()
    assert "data=imagefolder" in command.split()
    assert "ensemble of 0, 1" in text


def test_sweep_notebook_without_a_sweep(kernel_env):
    repo_sweeps = NOTEBOOKS.parent / "logs" / "train" / "multiruns"
    if repo_sweeps.is_dir() and any(repo_sweeps.iterdir()):
        pytest.skip(f"{repo_sweeps} holds sweeps: the notebook would (rightly) find the newest")
    with pytest.raises(CellExecutionError, match=r"no sweep found: run one first, e\.g\. `python -m lightning_project"):
        execute("02_sweep_analysis.ipynb", kernel_env)
