"""`--memory-budget 50%`: a share of what end-to-end training of the same network at the same
batch needs, probed by fit itself, then planned like any size."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgetrain.cli import app
from edgetrain.errors import UserInputError
from edgetrain.units import MemorySize

TINY = ["--train-limit", "512", "--test-limit", "256", "--epochs", "1", "--threads", "1",
        "--no-progress"]


def fit(*args):
    return CliRunner().invoke(app, ["fit", *TINY, *args])


def test_parse_and_equality():
    half = MemorySize.parse("50%")
    assert (half.fraction, half.bytes, str(half)) == (0.5, 0, "50%")
    assert half == MemorySize.parse(" 50 % ") and half != MemorySize.parse("25%")
    assert half.resolved(10**9) == half and half.resolved(10**9).bytes == 10**9
    assert half != MemorySize.parse("2GB")
    for bad in ("0%", "-5%", "2000%", "%", "50%%"):
        with pytest.raises(UserInputError, match="--memory-budget"):
            MemorySize.parse(bad)


def test_a_share_of_e2e_is_resolved_planned_and_recorded(tmp_path):
    """100% of end-to-end's probed need: e2e itself is planned inside it (the planner's 10%
    margin may cost it micro-batches); TRGL at the same share fits with room; the report keeps
    the share, the bytes and the probed reference, and a resume with the same share is the
    same run."""
    out = tmp_path / "trgl"
    result = fit("--memory-budget", "100%", "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    reference = report["memory_budget_reference"]
    assert report["memory_budget"] == "100%"
    assert report["memory_budget_bytes"] == reference["budget_bytes"]
    assert reference["base_bytes"] < reference["budget_bytes"] <= \
        reference["e2e_predicted_peak_bytes"] + 1
    assert report["budget_exceeded"] is False
    again = fit("--memory-budget", "100%", "--out", str(out), "--resume")
    assert again.exit_code == 0, again.output
    other = fit("--memory-budget", "50%", "--out", str(out), "--resume")
    assert other.exit_code == 2 and "--allow-changes memory-budget" in other.output


def test_a_share_too_small_for_e2e_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "e2e"
    result = fit("--method", "e2e", "--memory-budget", "5%", "--out", str(out))
    assert result.exit_code == 5 and "--memory-budget 5%" in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


def test_where_a_share_cannot_apply(tmp_path):
    from pathlib import Path

    import edgetrain
    from edgetrain.hardware.profiles import load_profile_file

    shipped = Path(edgetrain.__file__).parents[1] / "devices" / "generic-cpu.toml"
    profile = tmp_path / "generic-cpu.toml"
    profile.write_text(shipped.read_text().replace('memory_budget = "4.5GB"',
                                                   'memory_budget = "50%"'))
    with pytest.raises(UserInputError, match="must be a size such as 2GB"):
        load_profile_file(profile)
    result = fit("--distributed", "--memory-budget", "50%", "--out", str(tmp_path / "d"))
    assert result.exit_code == 2 and "give each rank's budget as a size" in result.output
