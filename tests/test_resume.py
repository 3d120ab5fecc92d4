"""Runs that survive: SIGKILL mid-run, then --resume, gives the uninterrupted result."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from edgetrain.cache import cache_is_valid
from edgetrain.cli import app
from edgetrain.runs.weights import load_weights

EPOCHS = 3
ARGS = ["--model", "resnet8", "--widths", "8,16,16", "--modules", "3", "--epochs", str(EPOCHS),
        "--train-limit", "1200", "--test-limit", "300", "--batch-size", "64", "--lr", "0.1",
        "--threads", "1", "--no-progress"]


def events(out):
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return lines


def kill_when(out, extra, condition, timeout=240):
    """Start a real `edgetrain fit` process and SIGKILL it once ``condition(events)`` holds."""
    proc = subprocess.Popen([sys.executable, "-m", "edgetrain", "fit", *ARGS, *extra, "--out",
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition(events(out)):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"the run ended (code {proc.returncode}) before the kill point: "
                f"{proc.stderr.read().decode()[-2000:]}")


def fit(*args):
    result = CliRunner().invoke(app, ["fit", *ARGS, *args])
    assert result.exit_code == 0, result.output
    return result


def same_weights(a, b):
    wa, wb = load_weights(a / "model.safetensors"), load_weights(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run per configuration, shared by the tests."""
    runs = {}

    def get(*extra):
        if extra not in runs:
            out = tmp_path_factory.mktemp("ref")
            fit("--out", str(out / "run"), *extra)
            runs[extra] = out / "run"
        return runs[extra]

    return get


@pytest.mark.parametrize("extra,point", [
    ((), "mid-module-2"),          # killed inside module 2: resumes from its epoch checkpoint
    ((), "after-module-1"),        # killed between modules: module 2 starts from cache 1
    # Killed after module 1's last epoch (whose evaluation wrote test cache 1) and before the
    # module was finished: the resumed run trains no epoch, so its cache pass writes the test
    # split itself.
    ((), "last-epoch-module-1"),
    (("--cache", "none"), "mid-module-2"),
    (("--mode", "parallel"), "mid-epochs"),
    (("--method", "e2e"), "mid-epochs"),
    (("--laps", "3"), "mid-lap-2"),    # killed in lap 2: module 1 was retrained, caches rebuilt
    # The multipliers' lambda (updated at step 50 of 57) lives in the epoch checkpoint.
    (("--mode", "parallel", "--tau-schedule", "multipliers"), "mid-epochs"),
], ids=["seq-mid", "seq-between", "seq-last-epoch", "seq-nocache-mid", "parallel", "e2e", "laps",
        "multipliers"])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, reference, extra, point):
    conditions = {
        "mid-module-2": lambda ev: any(e["event"] == "epoch" and e.get("module") == 1
                                       for e in ev),
        "after-module-1": lambda ev: any(e["event"] == "module" and e["module"] == 0
                                         for e in ev),
        "last-epoch-module-1": lambda ev: any(e["event"] == "epoch" and e.get("module") == 0
                                              and e["epoch"] == EPOCHS - 1 for e in ev),
        "mid-epochs": lambda ev: any(e["event"] == "epoch" for e in ev),
        "mid-lap-2": lambda ev: any(e["event"] == "module" and e.get("lap") == 1
                                    and e["module"] == 0 for e in ev),
    }
    out = tmp_path / "run"
    kill_when(out, list(extra), conditions[point])
    assert not (out / "report.json").exists()
    fit("--out", str(out), "--resume", *extra)
    ref = reference(*extra)
    report, expected = (json.loads((d / "report.json").read_text()) for d in (out, ref))
    # Exact: data order and augmentation are seeded per module and epoch, and CPU kernels
    # are deterministic for the same inputs and thread count (--threads 1 in both runs).
    assert report["test_accuracy"] == expected["test_accuracy"]
    assert same_weights(out, ref)
    assert any(e["event"] == "resume" for e in events(out))
    assert not (out / "checkpoints" / "0.safetensors").exists() or "parallel" in str(extra)


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, reference):
    out = tmp_path / "run"
    kill_when(out, [], lambda ev: any(e["event"] == "module" and e["module"] == 0 for e in ev))
    features = out / "cache" / "module_0" / "train_v0" / "features.npy"
    if not features.exists():  # killed after module 2 started and cleaned nothing yet
        pytest.skip("the kill landed before cache 1 was complete")
    with open(features, "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00garbage")
    assert not cache_is_valid(features.parent)
    fit("--out", str(out), "--resume")
    assert any(e["event"] == "cache_rebuild" for e in events(out))
    expected = json.loads((reference() / "report.json").read_text())
    assert json.loads((out / "report.json").read_text())["test_accuracy"] == \
        expected["test_accuracy"]


def test_resume_refuses_a_different_run(tmp_path, reference):
    ref = reference()
    before = (ref / "model.safetensors").read_bytes()
    result = CliRunner().invoke(app, ["fit", *ARGS, "--out", str(ref), "--resume", "--tau",
                                      "3"])
    assert result.exit_code == 2 and "--tau" in result.output
    assert (ref / "model.safetensors").read_bytes() == before
    result = CliRunner().invoke(app, ["fit", *ARGS, "--out", str(tmp_path / "none"),
                                      "--resume"])
    assert result.exit_code == 2 and "--resume" in result.output
    result = CliRunner().invoke(app, ["fit", *ARGS, "--out", str(ref), "--resume",
                                      "--overwrite"])
    assert result.exit_code == 2 and "Choose one" in result.output


def test_resume_of_a_run_started_under_the_old_default_tau(tmp_path, reference):
    """A run an older edgetrain started without --tau ran at its default, 1 (config.json says
    so); resumed by today's edgetrain (default 2) without --tau, it is refused, naming the
    flag, both values and --allow-changes, and nothing in it changes; with --tau 1.0 it
    resumes (finished: nothing to do)."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(reference(), old)
    config = json.loads((old / "config.json").read_text())
    assert config["tau"] == 2.0
    (old / "config.json").write_text(json.dumps({**config, "tau": 1.0}, indent=2))
    before = {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()}
    result = CliRunner().invoke(app, ["fit", *ARGS, "--out", str(old), "--resume"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "--tau 1.0 (now 2.0)" in result.output and "--allow-changes tau" in result.output
    assert {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()} == before
    fit("--out", str(old), "--resume", "--tau", "1.0")
    assert (old / "report.json").read_bytes() == before["report.json"]


def test_resume_of_a_finished_run_changes_nothing(reference):
    ref = reference()
    before = (ref / "report.json").read_text()
    fit("--out", str(ref), "--resume")
    assert (ref / "report.json").read_text() == before
