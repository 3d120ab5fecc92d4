"""`edgetrain fit` through the real CLI, in a temp dir, on a tiny model and data subset."""

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from edgetrain.cli import app
from edgetrain.config import FitConfig
from edgetrain.runs.weights import load_weights

TINY = ["--model", "resnet8", "--widths", "8,16,16", "--modules", "2", "--epochs", "2",
        "--train-limit", "600", "--test-limit", "300", "--batch-size", "64", "--lr", "0.1",
        "--threads", "1", "--no-progress"]
RUN_FILES = ["config.json", "metrics.jsonl", "model.json", "model.safetensors", "report.json",
             "modules/module_0.safetensors", "modules/module_1.safetensors"]


def run_cli(*args):
    result = CliRunner().invoke(app, ["fit", *args])
    return result


def fit_ok(tmp_path, name, *extra):
    out = tmp_path / name
    result = run_cli(*TINY, "--out", str(out), *extra)
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("extra", [
    ["--method", "trgl", "--mode", "sequential", "--cache", "disk"],
    ["--method", "trgl", "--mode", "sequential", "--cache", "none"],
    ["--method", "vanilla", "--mode", "sequential", "--cache", "disk",
     "--cache-dtype", "float16", "--cache-views", "2"],
    ["--method", "trgl", "--mode", "parallel"],
    ["--method", "vanilla", "--mode", "parallel"],
    ["--method", "e2e"],
], ids=["trgl-seq-disk", "trgl-seq-none", "vanilla-seq-fp16-2views", "trgl-par", "vanilla-par",
        "e2e"])
def test_fit_each_method_and_mode(tmp_path, extra):
    out, report = fit_ok(tmp_path, "run", *extra)
    method = extra[1]
    files = RUN_FILES if method != "e2e" else [f for f in RUN_FILES if "modules/" not in f]
    for name in files:
        assert (out / name).is_file(), name
    assert not (out / "cache").exists()  # the disk cache is cleaned up after training
    assert report["method"] == method
    assert report["test_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert report["peak_memory_bytes"] > 0 and report["wall_time_s"] > 0
    if method != "e2e":
        assert len(report["modules"]) == 2
        assert all(m["aux_test_accuracy"] > 0.2 for m in report["modules"])
        # The last module's head is the network's classifier: same accuracy, up to the cache.
        assert report["modules"][-1]["aux_test_accuracy"] == pytest.approx(
            report["test_accuracy"], abs=0.02)
        taus = [m["tau"] for m in report["modules"]]
        tau = FitConfig().tau  # the default, halved for the first half of the modules
        assert taus == ([tau / 2, tau] if method == "trgl" else [float("inf")] * 2)
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "epoch"]
    assert len(epochs) == (2 if method == "e2e" else 4)
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["epochs"] == 2


def test_same_seed_same_result(tmp_path):
    _, a = fit_ok(tmp_path, "a", "--seed", "3")
    _, b = fit_ok(tmp_path, "b", "--seed", "3")
    _, c = fit_ok(tmp_path, "c", "--seed", "4")
    assert a["test_accuracy"] == b["test_accuracy"]
    wa, wb = load_weights(tmp_path / "a/model.safetensors"), load_weights(
        tmp_path / "b/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    wc = load_weights(tmp_path / "c/model.safetensors")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_stitched_weights_reproduce_accuracy(tmp_path):
    """model.safetensors + model.json rebuild the network, which scores the reported accuracy."""
    from edgetrain.data import iterate_batches, load_dataset, normalize
    from edgetrain.models.network import build_network
    from edgetrain.models.resnet import resnet_spec
    from edgetrain.models.split import plan_modules

    out, report = fit_ok(tmp_path, "run")
    info = json.loads((out / "model.json").read_text())
    spec = resnet_spec(info["model"], info["in_channels"], tuple(info["widths"]))
    # The split is recorded (the default --split memory plans it from counted costs).
    plans = plan_modules(spec, [b - a for a, b in info["modules"]], info["image_size"],
                         info["heads"])
    net = build_network(spec, plans, info["num_classes"])
    net.load_state_dict(load_weights(out / "model.safetensors"))
    net.eval()
    data = load_dataset("fashion-mnist-mini", test_limit=300, train_limit=600, seed=0)
    correct = 0
    with torch.no_grad():
        for x, y in iterate_batches(data.test, 100, shuffle=False):
            correct += int((net(normalize(x, data.info)).argmax(1) == y).sum())
    assert correct / len(data.test) == pytest.approx(report["test_accuracy"])


@pytest.mark.parametrize("args,flags", [
    (["--method", "magic"], ["--method"]),
    (["--epochs", "0", "--batch-size", "-3", "--lr", "0"], ["--epochs", "--batch-size", "--lr"]),
    (["--mode", "diagonal", "--cache", "ram"], ["--mode", "--cache"]),
    (["--memory-budget", "lots"], ["--memory-budget"]),
    (["--memory-budget", "2 potatoes"], ["--memory-budget"]),
    (["--modules", "99"], ["--modules"]),
    (["--model", "resnet19"], ["--model"]),
    (["--dataset", "imagenet-22k"], ["--dataset"]),
    (["--cache-dtype", "int8"], ["--cache-dtype"]),
    (["--widths", "a,b"], ["--widths"]),
    (["--tau", "-1"], ["--tau"]),
])
def test_bad_input_is_a_clean_error(tmp_path, args, flags):
    result = run_cli("--out", str(tmp_path / "run"), "--no-progress", *args)
    assert result.exit_code == 2, result.output
    for flag in flags:
        assert flag in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "report.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_requested_without_gpu(tmp_path):
    result = run_cli(*TINY, "--out", str(tmp_path / "run"), "--device", "cuda")
    assert result.exit_code == 2
    assert "--device cuda" in result.output and "--device cpu" in result.output


def test_existing_run_is_not_overwritten_silently(tmp_path):
    out, report = fit_ok(tmp_path, "run")
    before = (out / "model.safetensors").read_bytes()
    result = run_cli(*TINY, "--out", str(out), "--seed", "5")
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "model.safetensors").read_bytes() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    result = run_cli(*TINY, "--out", str(tmp_path / "other"), "--overwrite")
    assert result.exit_code == 2 and "not an edgetrain run" in result.output
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    out2, _ = fit_ok(tmp_path, "run", "--overwrite", "--seed", "5")
    assert (out2 / "model.safetensors").read_bytes() != before


def test_real_subprocess_entry_point(tmp_path):
    """The installed console script, in its own process, as a user runs it."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "edgetrain", "fit", *TINY, "--out", str(out),
                           "--memory-budget", "2GB"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["memory_budget_bytes"] == 2_000_000_000


def test_tables_are_whole_when_output_is_not_a_terminal(tmp_path):
    """Piped into a file (a log, CI), rich used to assume 80 columns and cut headers to
    `micro-ba…`: every header and number must arrive whole."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run(
        [sys.executable, "-m", "edgetrain", "fit", "--model", "resnet8", "--widths", "8,16,16",
         "--modules", "2", "--epochs", "1", "--train-limit", "200", "--test-limit", "100",
         "--threads", "1", "--memory-budget", "8GB", "--no-progress", "--out",
         str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for header in ("micro-batch x steps", "checkpointing", "predicted peak", "aux test acc",
                   "measured peak", "within budget"):
        assert header in proc.stdout, header
    assert "…" not in proc.stdout


def test_fit_flags_are_fitconfigs_fields():
    """FitConfig is the single source of `fit`'s options: every field (but the library-only
    ones) is a flag with the field's default and the docstring under the field as its help."""
    import dataclasses
    import inspect

    from edgetrain.cli.fit import FLAGS, LIBRARY_ONLY, fit
    from edgetrain.config import FitConfig, field_docs

    params = inspect.signature(fit).parameters
    docs = field_docs(FitConfig)
    for field in dataclasses.fields(FitConfig):
        if field.name in LIBRARY_ONLY:
            assert field.name not in params
            continue
        param = params[field.name]
        default = (field.default if field.default is not dataclasses.MISSING
                   else field.default_factory())
        flag = FLAGS.get(field.name)
        if flag is not None and flag.parse is not None and default is not None:
            default = flag.show(default)
        assert param.default == default, field.name
        assert param.annotation.__metadata__[0].help == docs[field.name], field.name
    result = CliRunner().invoke(app, ["fit", "--help"], env={"COLUMNS": "300"})
    for field in dataclasses.fields(FitConfig):
        if field.name not in LIBRARY_ONLY:
            assert "--" + field.name.replace("_", "-") in result.output, field.name


def test_the_bench_driver_and_config_checks_never_load_torch():
    """A bench validates every run of a preset before the first one starts; on a
    unified-memory board a CUDA context in the driver would eat into the runs' memory."""
    import subprocess
    import sys

    code = ("import sys; from edgetrain.bench import prepare_bench; "
            "from edgetrain.config import FitConfig; FitConfig().validate(); "
            "prepare_bench('fidelity'); prepare_bench('smoke', 'jetson-nano-4gb'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
