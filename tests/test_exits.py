"""Early exits (`edgetrain export --exit-at`): modules 1..K and head K, verified by
onnxruntime against torch like the whole network; every exit measured; bad values refused
before anything is written."""

from __future__ import annotations

import json
import re

import onnx
import pytest
from typer.testing import CliRunner

from edgetrain.cli import app

TINY = ["--model", "resnet8", "--widths", "8,16,16", "--modules", "3", "--epochs", "1",
        "--train-limit", "256", "--test-limit", "128", "--batch-size", "64", "--threads", "1",
        "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exits") / "run"
    result = CliRunner().invoke(app, ["fit", *TINY, "--method", "vanilla", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def export(*args):
    return CliRunner().invoke(app, ["export", *args])


def test_exit_at_k_exports_modules_1_to_k_and_head_k(run, tmp_path):
    out = tmp_path / "exit2.onnx"
    result = export(str(run), "--exit-at", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(out))
    assert {p.key: p.value for p in graph.metadata_props}["edgetrain.exit"] == "2"
    # The table: one row per exit, the chosen one marked, parameters growing with depth.
    rows = [line for line in result.output.splitlines() if line[:1].isdigit()]
    assert len(rows) == 3 and rows[1].startswith("2 (chosen)")
    params = [int(r.split("|")[1].replace(",", "")) for r in rows]
    assert params == sorted(params) and params[0] < params[2]
    # Exit 2's accuracy in the table is what the exported graph scores in the verification.
    accuracy = re.search(r"test accuracy: torch [0-9.]+%, ONNX ([0-9.]+)%", result.output)[1]
    assert rows[1].split("|")[2].strip() == f"{accuracy}%"


def test_exit_auto_takes_the_smallest_exit_within_the_tolerance(run, tmp_path):
    result = export(str(run), "--exit-at", "auto", "--exit-tolerance", "100",
                    "--out", str(tmp_path / "a.onnx"))
    assert result.exit_code == 0, result.output
    assert "exported exit 1 " in result.output  # everything is within 100 points
    strict = export(str(run), "--exit-at", "auto", "--exit-tolerance", "0",
                    "--out", str(tmp_path / "b.onnx"))
    rows = [line for line in strict.output.splitlines() if line[:1].isdigit()]
    best = max(float(r.split("|")[2].strip().rstrip("%")) for r in rows)
    chosen = next(r for r in rows if "(chosen)" in r)
    assert float(chosen.split("|")[2].strip().rstrip("%")) == best


@pytest.mark.parametrize("value,needle", [("0", "must be a module count"),
                                          ("two", "must be a module count"),
                                          ("4", "out of range: the run has 3 modules")])
def test_bad_exit_is_refused_and_writes_nothing(run, tmp_path, value, needle):
    out = tmp_path / "m.onnx"
    result = export(str(run), "--exit-at", value, "--out", str(out))
    assert result.exit_code == 2 and needle in result.output, result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_exit_of_an_end_to_end_run_is_refused(tmp_path):
    run = tmp_path / "e2e"
    fit = CliRunner().invoke(app, ["fit", *TINY, "--method", "e2e", "--out", str(run)])
    assert fit.exit_code == 0, fit.output
    result = export(str(run), "--exit-at", "1", "--out", str(tmp_path / "e.onnx"))
    assert result.exit_code == 2 and "needs a module-wise run" in result.output
    assert json.loads((run / "report.json").read_text())["method"] == "e2e"
