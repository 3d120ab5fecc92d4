"""`edgetrain bench`: presets expand into the right grid, runs resume, failures are recorded, and
the table and plot are rebuilt from results.jsonl. One test runs the smoke preset for real."""

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from edgetrain.bench import expand, load_preset
from edgetrain.bench import runner as bench_runner
from edgetrain.bench.grid import parse_preset
from edgetrain.bench.report import latest_results, pareto_front
from edgetrain.bench.runner import plan, training_memory_bytes
from edgetrain.cli import app
from edgetrain.errors import UserInputError
from edgetrain.hardware.profiles import load_profile

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MiB = 2**20


def invoke(*args):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def preset(grid, fit=None, **extra):
    data = {"name": "t", "description": "test", "estimate": "instant",
            "fit": fit or {"dataset": "fashion-mnist-mini"}, "grid": grid, **extra}
    return parse_preset(data, Path("t.toml"))


def test_shipped_presets_expand_to_their_grids():
    smoke = expand(load_preset("smoke"))
    assert [r.label for r in smoke] == [
        "fashion-mnist-mini-e2e", "fashion-mnist-mini-vanilla-K2-seq-disk",
        "fashion-mnist-mini-trgl-K2-seq-disk", "fashion-mnist-mini-trgl-K1-seq-disk",
        "fashion-mnist-mini-trgl-K2-par"]
    cpu = expand(load_preset("cpu"))
    assert len(cpu) == 2 + 2 * 3  # e2e and e2e-ckpt once; vanilla and trgl at K 2/4/8
    assert all(r.fit["dataset"] == "fashion-mnist" and r.fit["model"] == "resnet20" for r in cpu)
    ckpt = [r for r in cpu if r.method == "e2e-ckpt"]
    assert len(ckpt) == 1 and ckpt[0].fit["activation_checkpointing"] is True
    paper = expand(load_preset("paper"))
    assert len(paper) == 2 * (2 + 2 * 4)
    assert {r.fit["batch_size"] for r in paper if r.fit["dataset"] == "stl10"} == {64}
    assert {r.fit["lr"] for r in paper if r.method.startswith("e2e")} == {0.1}
    assert {r.fit["lr"] for r in paper if r.method in ("vanilla", "trgl")} == {0.003}
    # Every run of every preset is a valid `edgetrain fit` configuration.
    for name in ("smoke", "cpu", "paper"):
        assert len(plan(load_preset(name))) == len(expand(load_preset(name)))


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "benchmarks"
                                          / "presets").glob("*.toml")), ids=lambda p: p.stem)
def test_every_preset_in_the_repo_plans_valid_runs(path):
    """The measured presets the README quotes (budget, fidelity, tau, ...) are read by path:
    each expands to at least one run, every run a valid `edgetrain fit` configuration, and no
    two runs share a label."""
    runs = expand(load_preset(str(path)))
    assert runs and len(plan(load_preset(str(path)))) == len(runs)
    assert len({r.label for r in runs}) == len(runs)


def test_k_only_for_greedy_and_cache_only_for_sequential():
    runs = expand(preset([
        {"methods": ["e2e", "e2e-ckpt", "vanilla", "trgl"], "modules": [2, 4],
         "modes": ["sequential", "parallel"], "caches": ["disk", "none"]},
        {"methods": ["trgl"], "modules": [2], "modes": ["parallel"]},  # a duplicate: runs once
    ]))
    assert len(runs) == 2 + 2 * 2 * (2 + 1)
    for r in runs:
        if r.method.startswith("e2e"):
            assert (r.modules, r.mode, r.cache) == (None, None, None) and r.fit["modules"] == 1
        else:
            assert r.modules in (2, 4) and r.fit["modules"] == r.modules
        if r.mode == "parallel":
            assert r.cache is None and "cache" not in r.fit
        if r.mode == "sequential":
            assert r.cache in ("disk", "none") and r.fit["cache"] == r.cache
    assert len({r.label for r in runs}) == len(runs)


def test_bad_presets_list_every_problem():
    with pytest.raises(UserInputError) as err:
        preset([{"methods": ["e2e", "sgd"], "modules": [0], "modes": ["diagonal"]}],
               fit={"epochs": "two", "method": "trgl", "out": "x", "colour": 1},
               method_fit={"adam": {"lr": 0.1}})
    message = str(err.value)
    for needle in ("t.toml", "'sgd'", "K must be", "'diagonal'", "epochs = 'two'",
                   "'method' is set by the grid", "'out' is not a field", "'colour'",
                   "[method_fit.adam]"):
        assert needle in message
    # Values are checked as `edgetrain fit` checks them, before anything runs.
    with pytest.raises(UserInputError, match="--epochs must be at least 1"):
        plan(preset([{"methods": ["e2e"]}], fit={"epochs": 0}))


def test_bad_preset_on_the_command_line(tmp_path):
    result = invoke("bench", "run", "--preset", "nightly", "--dry-run")
    assert result.exit_code == 2 and "--preset 'nightly'" in result.output
    assert "smoke" in result.output and "Traceback" not in result.output
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\ndescription = "x"\nestimate = "x"\nfit = { lr = -1.0 }\n'
                    '[[grid]]\nmethods = ["trgl"]\nmodules = [2]\n')
    result = invoke("bench", "run", "--preset", str(path), "--dry-run")
    assert result.exit_code == 2 and "mine.toml" in result.output and "--lr" in result.output


def test_profile_applies_to_bench_runs_unless_the_preset_sets_the_field():
    p = preset([{"methods": ["e2e", "trgl"], "modules": [2]}],
               fit={"dataset": "fashion-mnist-mini", "cache_dtype": "float32"})
    nano = load_profile("jetson-nano-4gb")
    runs = plan(p, nano, simulated=True)
    for run in runs:
        assert run.args[run.args.index("--memory-budget") + 1] == "3.2GB"
        assert run.args[run.args.index("--cache-dtype") + 1] == "float32"  # the preset's
        assert run.args[run.args.index("--device") + 1] == "auto"  # simulated: no forced cuda
        assert run.memory_budget.bytes == 3_200_000_000
    # Run ids follow the flags: another profile is another run, never skipped as finished.
    plain = plan(p)
    assert "--memory-budget" not in plain[0].args
    assert {r.run_id for r in plain}.isdisjoint(r.run_id for r in runs)
    assert [r.run_id for r in plan(p)] == [r.run_id for r in plain]


def test_fit_flags_exist():
    """Every flag the bench generates, for every preset and a device profile, is an option of
    the real `edgetrain fit` command."""
    import typer.main

    fit = typer.main.get_command(app).commands["fit"]
    options = {o for p in fit.params for o in [*p.opts, *p.secondary_opts]}
    nano = load_profile("jetson-nano-4gb")
    for name in ("smoke", "cpu", "paper"):
        for run in plan(load_preset(name), nano, simulated=True) + plan(load_preset(name)):
            flags = {a for a in run.args if a.startswith("--")}
            assert flags <= options, flags - options


def test_dry_run_prints_commands_and_runs_nothing(tmp_path):
    result = invoke("bench", "run", "--preset", "smoke", "--out", str(tmp_path / "b"),
                    "--dry-run", "--only", "trgl-K2")
    assert result.exit_code == 0, result.output
    assert "edgetrain fit" in result.output and "--method trgl" in result.output
    assert "[2/2]" in result.output and "e2e" not in result.output.split("numbers")[1]
    assert not (tmp_path / "b").exists()
    result = invoke("bench", "run", "--preset", "smoke", "--only", "K16", "--dry-run")
    assert result.exit_code == 2 and "--only" in result.output


def write_fake_run(out: Path, report: dict) -> None:
    """What a finished `edgetrain fit` leaves for the bench: a marked run folder whose
    report.json carries the marker's run id."""
    from edgetrain.runs.ownership import RUN_KIND, write_marker

    out.mkdir(parents=True, exist_ok=True)
    marker = write_marker(out, RUN_KIND)
    (out / "report.json").write_text(json.dumps({**report, "run_id": marker.run_id}))


def fake_report(accuracy: float) -> dict:
    return {"test_accuracy": accuracy, "peak_memory_bytes": 700 * MiB,
            "training_memory_bytes": 80 * MiB, "framework_baseline_bytes": 620 * MiB,
            "memory_backend": "linux-vmhwm", "wall_time_s": 12.5, "epochs": 1,
            "dataset": "fashion-mnist-mini", "model": "resnet8", "modules": [],
            "device": "cpu", "device_name": "x86_64", "torch_version": "2.14.1"}


def test_failed_run_is_recorded_the_grid_goes_on_and_a_rerun_retries_it(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        if "vanilla" in str(out) and len(calls) < 3:
            return subprocess.CompletedProcess(cmd, 2, "", "error: --data-dir has no files\n")
        out.mkdir(parents=True, exist_ok=True)
        write_fake_run(out, fake_report(0.5 + len(calls) / 100))
        return subprocess.CompletedProcess(cmd, 0, "test accuracy 50%", "")

    monkeypatch.setattr(bench_runner, "subprocess", SimpleNamespace(run=fake_run))
    out = tmp_path / "bench"
    args = ["bench", "run", "--preset", "smoke", "--out", str(out), "--only", "e2e",
            "--only", "vanilla"]
    result = invoke(*args)
    assert result.exit_code == 1, result.output  # a failed run fails the command...
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [x["status"] for x in lines] == ["ok", "failed"]  # ...but not the grid
    assert "--data-dir has no files" in lines[1]["stderr_tail"] and lines[1]["returncode"] == 2
    assert "failed (exit 2)" in (out / "results.md").read_text()
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert len(calls) == 3  # only the failed run ran again
    assert "done before, skipped" in result.output
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [x["status"] for x in lines] == ["ok", "failed", "ok"]
    assert [x["status"] for x in latest_results(lines)] == ["ok", "ok"]
    assert "failed" not in (out / "results.md").read_text()


def test_over_budget_and_does_not_fit_are_results_not_failures(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        if "vanilla" in str(out):  # the planner refuses it before training: no report
            return subprocess.CompletedProcess(cmd, 5, "", "error: --memory-budget 3.2GB (2.98 "
                                               "GiB) is too small: module 1 needs at least 4 GiB")
        out.mkdir(parents=True, exist_ok=True)
        write_fake_run(out, fake_report(0.6))
        return subprocess.CompletedProcess(cmd, 4, "", "error: the measured peak memory "
                                           "exceeded --memory-budget")

    monkeypatch.setattr(bench_runner, "subprocess", SimpleNamespace(run=fake_run))
    out = tmp_path / "bench"
    args = ["bench", "run", "--preset", "smoke", "--out", str(out), "--only", "e2e",
            "--only", "vanilla", "--device-profile", "jetson-nano-4gb"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [x["status"] for x in lines] == ["over_budget", "does_not_fit"]
    assert lines[0]["test_accuracy"] == 0.6 and "test_accuracy" not in lines[1]
    table = (out / "results.md").read_text()
    assert "| over budget |" in table and "| does not fit |" in table
    assert "Memory budget 3.2GB (2.98 GiB)" in table and "module 1 needs at least 4 GiB" in table
    assert invoke(*args).exit_code == 0 and len(calls) == 2  # finished: not run again


def test_a_report_that_contradicts_the_flags_fails_the_run(tmp_path, monkeypatch):
    """e2e-ckpt must really have run with checkpointing, or its memory is e2e's under the wrong
    label."""
    def fake_run(cmd, **kwargs):
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        report = {**fake_report(0.8), "method": "e2e", "num_modules": 1,
                  "activation_checkpointing": False}
        write_fake_run(out, report)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bench_runner, "subprocess", SimpleNamespace(run=fake_run))
    out = tmp_path / "bench"
    result = invoke("bench", "run", "--preset", "cpu", "--out", str(out), "--only", "e2e")
    assert result.exit_code == 1, result.output
    lines = {x["method"]: x for x in map(json.loads, (out / "results.jsonl").open())}
    assert lines["e2e"]["status"] == "ok"
    assert lines["e2e-ckpt"]["status"] == "failed"
    assert "activation_checkpointing=True" in lines["e2e-ckpt"]["stderr_tail"]


def test_training_memory_from_a_report():
    report = {"peak_memory_bytes": 900, "framework_baseline_bytes": 600,
              "train_peak_memory_bytes": 850, "memory_backend": "linux-vmhwm"}
    assert training_memory_bytes(report) == 300  # older reports: peak minus framework
    assert training_memory_bytes({**report, "training_memory_bytes": 250}) == 250
    # On a discrete GPU the allocator's peak is all training: no host baseline to subtract.
    assert training_memory_bytes({**report, "memory_backend": "cuda",
                                  "training_memory_bytes": 0}) == 850


def test_pareto_front():
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 50.0)]) == [0]
    # (memory, accuracy): 3 is dominated by 1 (less memory, same accuracy), 2 by 0.
    points = [(100, 80), (300, 90), (150, 75), (400, 90), (50, 60)]
    assert pareto_front(points) == [4, 0, 1]
    assert pareto_front([(10, 5), (10, 7)]) == [1]  # same memory: the more accurate


HAND_WRITTEN = [  # method, K, training MiB, accuracy: the shape of a cpu-preset result
    ("e2e", None, 820, 0.884), ("e2e-ckpt", None, 430, 0.884),
    ("vanilla", 2, 470, 0.872), ("vanilla", 4, 300, 0.861), ("vanilla", 8, 230, 0.830),
    ("trgl", 2, 480, 0.879), ("trgl", 4, 310, 0.875), ("trgl", 8, 240, 0.862),
]


def hand_written_results(folder: Path) -> None:
    folder.mkdir()
    lines = []
    machine = {"cpu": "AMD EPYC", "board": None, "memory_bytes": 24 * 2**30, "gpus": [],
               "torch": "2.14.1", "platform": "Linux", "python": "3.11.7"}
    for method, k, mib, acc in HAND_WRITTEN:
        lines.append({
            "run_id": f"fashion-mnist-{method}-K{k}", "status": "ok", "method": method,
            "modules": k, "mode": "sequential" if k else None, "cache": "disk" if k else None,
            "config": {"dataset": "fashion-mnist"}, "dataset": "fashion-mnist",
            "model": "resnet20", "test_accuracy": acc, "training_memory_bytes": mib * MiB,
            "peak_memory_bytes": (mib + 640) * MiB, "wall_time_s": 400.0 + mib,
            "preset": "cpu", "device_profile": "raspberry-pi-5-8gb", "simulated": True,
            "machine": machine})
    lines.append({**lines[-1], "run_id": "fashion-mnist-trgl-K16", "modules": 16,
                  "status": "failed", "returncode": 137, "stderr_tail": "Killed"})
    (folder / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines)
                                          + '{"run_id": "cut sh')  # a line a kill cut short


def test_report_rebuilds_table_and_plot_from_results(tmp_path):
    out = tmp_path / "bench"
    hand_written_results(out)
    result = invoke("bench", "report", str(out))
    assert result.exit_code == 0, result.output
    table = (out / "results.md").read_text()
    assert "# edgetrain bench: cpu" in table and "raspberry-pi-5-8gb (simulated" in table
    assert "| trgl | 8 | sequential | disk | 86.20% | 880.0 MiB | 240.0 MiB | 0.29 |" in table
    assert "| e2e | – | – | – | 88.40% |" in table and "| 1.00 |" in table
    assert "failed (exit 137)" in table and "Killed" in table
    assert "Accuracy as K grows: fashion-mnist / resnet20, sequential, cache disk" in table
    assert "| 4 | 86.10% | 87.50% | +1.40 |" in table
    assert ("vanilla -4.20 points (K=2 to K=8); trgl -1.70 points (K=2 to K=8)." in table)
    png = (out / "memory_vs_accuracy.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 20_000
    points = [(mib, acc) for _, _, mib, acc in HAND_WRITTEN]
    front = [HAND_WRITTEN[i][:2] for i in pareto_front(points)]
    assert front == [("vanilla", 8), ("trgl", 8), ("trgl", 4), ("e2e-ckpt", None)]


def test_report_of_an_empty_folder_is_a_clean_error(tmp_path):
    result = invoke("bench", "report", str(tmp_path))
    assert result.exit_code == 2 and "results.jsonl" in result.output


@pytest.mark.parametrize("name", ["results.md", "memory_vs_accuracy.png",
                                  "accuracy_over_time.png", "fidelity.png"])
def test_report_never_writes_through_a_planted_link(tmp_path, name):
    """A link planted in a bench folder where the report writes a file is refused, naming it;
    the file it points to keeps its bytes (the report used to write through it)."""
    out = tmp_path / "bench"
    hand_written_results(out)
    victim = tmp_path / "precious.txt"
    victim.write_text("mine")
    (out / name).symlink_to(victim)
    result = invoke("bench", "report", str(out))
    assert result.exit_code == 2, result.output
    assert "symbolic link" in result.output and name in result.output
    assert victim.read_text() == "mine" and (out / name).is_symlink()


def test_report_refuses_a_folder_of_the_users(tmp_path):
    """A folder of the user's, with their own results.md: refused, nothing written. Its
    results.jsonl (not a bench's lines) is named by line; without one, the folder is named as
    not edgetrain's."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.jsonl").write_text('{"epoch": 1, "loss": 0.5}\n')
    (mine / "results.md").write_text("my notes")
    result = invoke("bench", "report", str(mine))
    assert result.exit_code == 2 and "results.jsonl line 1" in result.output, result.output
    (mine / "results.jsonl").unlink()
    (mine / "data.csv").write_text("1,2\n")
    result = invoke("bench", "report", str(mine))
    assert result.exit_code == 2 and "did not write" in result.output, result.output
    assert (mine / "results.md").read_text() == "my notes"
    assert sorted(p.name for p in mine.iterdir()) == ["data.csv", "results.md"]


def fidelity_results(folder: Path, method: str, seeds: list[int], accuracy: float,
                     tau: float | None = None) -> None:
    """A bench folder holding finished runs of one method (results.jsonl as `bench run`
    writes it, plus its marker)."""
    from edgetrain.runs.ownership import BENCH_KIND, mark_folder

    mark_folder(folder, BENCH_KIND)
    lines = []
    for seed in seeds:
        config = {"method": method, "modules": 4, "mode": "parallel", "seed": seed,
                  **({"tau": tau} if tau else {})}
        lines.append({"run_id": f"x-{method}-seed{seed}-{folder.name}", "status": "ok",
                      "method": method, "modules": 4, "mode": "parallel", "cache": None,
                      "config": config, "preset": folder.name, "dataset": "fashion-mnist",
                      "model": "resnet32", "test_accuracy": accuracy + seed / 100,
                      "train_accuracy": 0.99, "peak_memory_bytes": 700 * MiB,
                      "training_memory_bytes": 100 * MiB, "wall_time_s": 60.0})
    (folder / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_report_combines_several_benches_into_a_new_folder(tmp_path):
    """Vanilla measured in one bench, TRGL in another: one table pairs them by seed. The
    combined results go to a new or empty --out only; the sources are only read."""
    a, b, both = tmp_path / "a", tmp_path / "b", tmp_path / "both"
    fidelity_results(a, "vanilla", [0, 1, 2], 0.80)
    fidelity_results(b, "trgl", [0, 1, 2], 0.82, tau=2.0)
    sources = {p: p.read_bytes() for f in (a, b) for p in f.iterdir()}

    result = invoke("bench", "report", str(a), str(b))
    assert result.exit_code == 2 and "--out" in result.output
    result = invoke("bench", "report", str(a), str(b), "--out", str(both))
    assert result.exit_code == 0, result.output
    table = (both / "results.md").read_text()
    assert "# edgetrain bench: a + b" in table
    assert "| 2.0 | 3 | 81.00% | 83.00% | +2.00 ± 0.00 | yes | 99.0% |" in table
    combined = bench_runner.read_results(both / "results.jsonl")
    assert [line["source"] for line in combined] == [str(a)] * 3 + [str(b)] * 3
    assert (both / "fidelity.png").read_bytes().startswith(PNG_MAGIC)
    assert {p: p.read_bytes() for f in (a, b) for p in f.iterdir()} == sources

    # Never merged into, never written over: the same --out again, a source, a user's folder.
    kept = (both / "results.jsonl").read_bytes()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for target in (both, a, mine):
        result = invoke("bench", "report", str(a), str(b), "--out", str(target))
        assert result.exit_code == 2 and str(target) in result.output, result.output
    assert (both / "results.jsonl").read_bytes() == kept
    assert {p: p.read_bytes() for f in (a, b) for p in f.iterdir()} == sources
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    # A source without results names its results.jsonl, and nothing is created.
    result = invoke("bench", "report", str(a), str(tmp_path / "none"), "--out",
                    str(tmp_path / "new"))
    assert result.exit_code == 2 and "results.jsonl" in result.output
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_smoke_preset_end_to_end_and_resume(tmp_path, monkeypatch):
    """The real thing: 5 `edgetrain fit` subprocesses on 600 images, then a rerun that runs
    nothing. About a minute on 2 idle cores. (No device profile: its budget would add the
    planner's probes to every run; test_fit_flags_exist covers the flags a profile adds.)"""
    out = tmp_path / "smoke"
    args = ["bench", "run", "--preset", "smoke", "--out", str(out)]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and all(x["status"] == "ok" for x in lines)
    for x in lines:
        assert 0.1 < x["test_accuracy"] <= 1
        assert x["peak_memory_bytes"] > x["training_memory_bytes"] > 0
        assert x["wall_time_s"] > 0 and x["epochs"] == 1
        assert x["machine"]["cpu"] and x["torch_version"] and x["device_profile"] is None
        report = json.loads((Path(x["run_dir"]) / "report.json").read_text())
        assert report["method"] == x["config"]["method"]
        assert report["num_modules"] == x["config"]["modules"]
    assert [x["modules"] for x in lines] == [None, 2, 2, 1, 2]
    for x in lines:  # every evaluated network, with its time and exit, from metrics.jsonl
        curve = x["accuracy_curve"]
        assert curve and all(0 < acc <= 1 for _, acc, _ in curve)
        assert [t for t, _, _ in curve] == sorted(t for t, _, _ in curve)
        assert curve[-1][0] <= x["wall_time_s"] + 0.1  # curve times are rounded to 0.1 s
        exits = {e for _, _, e in curve}
        assert exits == ({None} if x["modules"] is None else set(range(1, x["modules"] + 1)))
    e2e = lines[0]
    assert e2e["accuracy_curve"][-1][1] == e2e["test_accuracy"]
    table = (out / "results.md").read_text()
    assert table.count("| ok |") == 5
    assert "## Time to end-to-end's accuracy" in table
    assert (out / "accuracy_over_time.png").read_bytes().startswith(PNG_MAGIC)
    assert f"| e2e | – | – | {100 * e2e['test_accuracy']:.2f}% |" in table
    assert (out / "memory_vs_accuracy.png").read_bytes().startswith(PNG_MAGIC)

    # Resume: everything is finished, so nothing runs (no subprocess at all).
    def no_subprocess(*a, **k):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(bench_runner, "subprocess", SimpleNamespace(run=no_subprocess))
    before = (out / "results.jsonl").read_text()
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert result.output.count("done before, skipped") == 5
    assert (out / "results.jsonl").read_text() == before


def test_grid_vary_and_tag_expand_and_label_runs(tmp_path):
    """`vary` multiplies a block's runs; tau varies TRGL only (vanilla ignores it); `tag` and
    the varied values are in the labels, so --only can pick them."""
    from edgetrain.bench.grid import expand, parse_preset

    preset = parse_preset({
        "name": "x", "description": "d", "estimate": "e", "fit": {"epochs": 1},
        "grid": [{"tag": "authors", "methods": ["e2e", "vanilla", "trgl"], "modules": [2],
                  "modes": ["parallel"], "vary": {"seed": [0, 1], "tau": [0.5, 2.0]}}]},
        tmp_path / "x.toml")
    runs = expand(preset)
    labels = [r.label for r in runs]
    assert labels == [
        "fashion-mnist-mini-authors-e2e-seed0", "fashion-mnist-mini-authors-e2e-seed1",
        "fashion-mnist-mini-authors-vanilla-K2-par-seed0",
        "fashion-mnist-mini-authors-vanilla-K2-par-seed1",
        "fashion-mnist-mini-authors-trgl-K2-par-seed0-tau0.5",
        "fashion-mnist-mini-authors-trgl-K2-par-seed0-tau2.0",
        "fashion-mnist-mini-authors-trgl-K2-par-seed1-tau0.5",
        "fashion-mnist-mini-authors-trgl-K2-par-seed1-tau2.0"]
    assert all("tau" not in r.fit for r in runs if r.method != "trgl")
    with pytest.raises(UserInputError, match="vary: tau must be a non-empty list"):
        parse_preset({"name": "x", "description": "d", "estimate": "e",
                      "grid": [{"methods": ["trgl"], "vary": {"tau": 3}}]}, tmp_path / "x.toml")


def test_fidelity_pairs_trgl_with_vanilla_by_seed(tmp_path):
    from edgetrain.bench.fidelity import paired_gaps, plot_fidelity

    def line(method, seed, acc, tau=None):
        config = {"seed": seed, "method": method, "modules": 4, **({"tau": tau} if tau else {})}
        return {"method": method, "config": config, "test_accuracy": acc,
                "train_accuracy": 0.99}

    results = [line("vanilla", 0, 0.80), line("vanilla", 1, 0.82), line("vanilla", 2, 0.81),
               line("trgl", 0, 0.83, 1.0), line("trgl", 1, 0.84, 1.0), line("trgl", 2, 0.83, 1.0),
               line("trgl", 0, 0.79, 9.0), line("trgl", 1, 0.83, 9.0)]
    gaps = {g.cell["tau"]: g for g in paired_gaps(results)}
    assert gaps[1.0].differences == pytest.approx((3.0, 2.0, 2.0))
    assert gaps[1.0].beyond_spread is True
    assert gaps[9.0].seeds == (0, 1) and gaps[9.0].beyond_spread is False
    # The plot: written where pairs exist (a real PNG), nothing where none do.
    assert plot_fidelity(results, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_fidelity(results[:3], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    # A TRGL run that left tau out ran with the default of its day: 1 for a line without its
    # resolved settings (written before 2026-11-30), else the settings' own.
    old, new = line("trgl", 0, 0.81), line("trgl", 0, 0.85)
    new["settings"] = {"tau": 2.0, "seed": 0}
    gaps = {g.cell["tau"]: g for g in paired_gaps(results[:3] + [old, new])}
    assert sorted(gaps) == [1.0, 2.0]
    assert gaps[1.0].differences == pytest.approx((1.0,))
    assert gaps[2.0].differences == pytest.approx((5.0,))
    # The table names the schedule where it is not the default (halved).
    from edgetrain.bench.fidelity import fidelity_table

    const, mult = line("trgl", 0, 0.84, 2.0), line("trgl", 0, 0.83)
    const["config"]["tau_schedule"] = "constant"
    mult["config"]["tau_schedule"] = "multipliers"
    rows = [r.split(" | ")[0] for r in fidelity_table(results[:3] + [new, const, mult])
            if r.startswith("| ") and not r.startswith("| tau")]
    assert rows == ["| 2.0", "| 2.0 constant", "| multipliers"]


def test_vs_e2e_is_set_against_the_e2e_run_of_the_same_budget():
    """The budget preset varies --memory-budget: each row's *vs e2e* is over the e2e run of the
    same budget (tau, which e2e has not, does not separate them), and a budget where e2e did
    not fit gives none."""
    from edgetrain.bench.report import markdown_report

    def line(method, budget, training_mib, status="ok"):
        config = {"memory_budget": budget, "method": method, "seed": 0,
                  **({"tau": 1.0} if method == "trgl" else {})}
        measured = status == "ok"
        return {"method": method, "modules": 4 if method == "trgl" else None,
                "mode": "sequential" if method == "trgl" else None, "cache": None,
                "config": config, "status": status, "preset": "budget",
                "dataset": "fashion-mnist", "model": "resnet32",
                "test_accuracy": 0.88 if measured else None,
                "peak_memory_bytes": (600 + training_mib) * 2**20 if measured else None,
                "training_memory_bytes": training_mib * 2**20 if measured else None,
                "wall_time_s": 100.0 if measured else None, "memory_budget": budget,
                "memory_budget_bytes": 700 * 2**20 if measured else None}

    table = markdown_report([line("e2e", "50%", 100), line("trgl", "50%", 150),
                             line("e2e", "100%", 200), line("trgl", "100%", 180),
                             line("e2e", "25%", 0, "does_not_fit"), line("trgl", "25%", 40)])
    rows = {tuple(c.strip() for c in row.split("|")[1:6:4]): row.split("|")
            for row in table.splitlines() if row.startswith("| e2e") or row.startswith("| trgl")}
    vs = {key: cells[-4].strip() for key, cells in rows.items()}
    assert vs == {("e2e", "50%"): "1.00", ("trgl", "50%"): "1.50", ("e2e", "100%"): "1.00",
                  ("trgl", "100%"): "0.90", ("e2e", "25%"): "–", ("trgl", "25%"): "–"}


def test_a_preset_edited_to_vary_a_setting_keeps_its_finished_runs(tmp_path, monkeypatch):
    """A block given `vary = { seed = [0, 1] }` renames its seed-0 run (the label gains
    "seed0") but runs it with the same flags: a rerun into the same folder skips it and runs
    seed 1 only. Runs are matched by their settings' digest, not their label."""
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        write_fake_run(out, fake_report(0.6))
        return subprocess.CompletedProcess(cmd, 0, "test accuracy 60%", "")

    monkeypatch.setattr(bench_runner, "subprocess", SimpleNamespace(run=fake_run))
    base = ('name = "v"\ndescription = "d"\nestimate = "e"\n[fit]\n'
            'dataset = "fashion-mnist-mini"\nepochs = 1\nseed = 0\n'
            '[[grid]]\nmethods = ["vanilla"]\nmodules = [2]\nmodes = ["parallel"]\n')
    (tmp_path / "one.toml").write_text(base)
    (tmp_path / "both.toml").write_text(base + "vary = { seed = [0, 1] }\n")
    out = tmp_path / "bench"
    first = invoke("bench", "run", "--preset", str(tmp_path / "one.toml"), "--out", str(out))
    assert first.exit_code == 0, first.output
    again = invoke("bench", "run", "--preset", str(tmp_path / "both.toml"), "--out", str(out))
    assert again.exit_code == 0, again.output
    assert "seed0: done before, skipped" in again.output
    assert len(calls) == 2
    seed = calls[1][calls[1].index("--seed") + 1]
    assert seed == "1"


def test_a_moved_default_reruns_the_runs_that_relied_on_it(tmp_path, monkeypatch):
    """Run ids digest the resolved settings, not the flags: a preset that leaves tau out ran
    with the default of its day, so a later edgetrain with another default reruns it (and says
    so, keeping the earlier line); a preset that pins the value keeps its finished run, with or
    without the flag written out."""
    import dataclasses

    from edgetrain.config import FitConfig

    default = FitConfig().tau
    moved = default + 1.0
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        write_fake_run(Path(cmd[cmd.index("--out") + 1]), fake_report(0.6))
        return subprocess.CompletedProcess(cmd, 0, "test accuracy 60%", "")

    monkeypatch.setattr(bench_runner, "subprocess", SimpleNamespace(run=fake_run))
    base = ('name = "d"\ndescription = "d"\nestimate = "e"\n[fit]\n'
            'dataset = "fashion-mnist-mini"\nepochs = 1\n{tau}'
            '[[grid]]\nmethods = ["trgl"]\nmodules = [2]\nmodes = ["parallel"]\n')
    (tmp_path / "default.toml").write_text(base.format(tau=""))
    (tmp_path / "pinned.toml").write_text(base.format(tau=f"tau = {default}\n"))
    out = tmp_path / "bench"

    def bench(name):
        result = invoke("bench", "run", "--preset", str(tmp_path / name), "--out", str(out))
        assert result.exit_code == 0, result.output
        return result.output

    bench("default.toml")
    assert "done before, skipped" in bench("pinned.toml")  # "--tau 2.0" is the same run
    assert len(calls) == 1
    # Another edgetrain, whose default tau is another: the unpinned preset's run is stale.
    real = bench_runner.to_fit_config
    monkeypatch.setattr(bench_runner, "to_fit_config",
                        lambda fit: dataclasses.replace(real(fit), tau=fit.get("tau", moved)))
    output = bench("default.toml")
    assert len(calls) == 2 and "--tau" not in calls[1]
    assert "1 finished run(s)" in output and "ran with other settings" in output
    assert "done before, skipped" in bench("pinned.toml")
    lines = bench_runner.read_results(out / "results.jsonl")
    assert [line["settings"]["tau"] for line in lines] == [default, moved]
    assert len({line["run_id"] for line in lines}) == 2
    assert all("out" not in line["settings"] for line in lines)  # where, not what


def test_time_to_accuracy_table_sets_each_run_against_its_e2e_run(tmp_path):
    """The e2e run's final accuracy is the target; each run's first evaluated network at or
    above it (any exit) is reported with the ratio to e2e's own time. A run that never gets
    there says so with its best; a row without a curve (written before curves were kept, its
    run folder gone) is left out instead of failing the report."""
    from edgetrain.bench.report import markdown_report, plot_accuracy_over_time

    def line(method, seed, accuracy, curve, run_dir=None):
        return {"method": method, "modules": None if method == "e2e" else 4,
                "mode": None if method == "e2e" else "sequential", "cache": None,
                "config": {"method": method, "seed": seed}, "status": "ok",
                "preset": "t", "dataset": "fashion-mnist", "model": "resnet20",
                "test_accuracy": accuracy, "peak_memory_bytes": 700 * MiB,
                "training_memory_bytes": 100 * MiB, "wall_time_s": 500.0,
                "accuracy_curve": curve, "run_dir": run_dir}

    lines = [
        line("e2e", 0, 0.88, [[100.0, 0.85, None], [200.0, 0.89, None], [300.0, 0.88, None]]),
        line("trgl", 0, 0.885, [[50.0, 0.80, 1], [120.0, 0.881, 2], [250.0, 0.885, 4]]),
        line("e2e", 1, 0.90, [[400.0, 0.90, None]]),
        line("vanilla", 1, 0.89, [[90.0, 0.85, 1], [180.0, 0.89, 2]]),
        line("trgl", 1, 0.91, None, run_dir=str(tmp_path / "gone")),
    ]
    table = markdown_report(lines)
    section = table.split("## Time to end-to-end's accuracy", 1)[1]
    rows = [r for r in section.splitlines() if r.startswith("| e2e") or r.startswith("| trgl")
            or r.startswith("| vanilla")]
    # e2e first reached its own final 88% after 200 s (it dipped after): that is its time.
    assert rows == [
        "| e2e | – | – | 0 | 88.00% | 200.0 s | whole network | 1.00 |",
        "| trgl | 4 | sequential | 0 | 88.00% | 120.0 s | module 2 | 0.60 |",
        "| e2e | – | – | 1 | 90.00% | 400.0 s | whole network | 1.00 |",
        "| vanilla | 4 | sequential | 1 | 90.00% | not reached (best 89.00%) | – | – |",
    ]
    # The same curves as a picture; none at all, no file (and no empty plot).
    assert plot_accuracy_over_time(lines, tmp_path / "time.png")
    assert (tmp_path / "time.png").read_bytes().startswith(PNG_MAGIC)
    assert not plot_accuracy_over_time(lines[-1:], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
