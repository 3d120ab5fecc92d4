"""A hostile pass over issue 10's promises: each test is a way a user's files were lost or
written over, a command hung or printed a traceback, or a run silently mixed in what was not
its own, found by attacking the real CLI, and fixed. Same tiny runs and helpers as
tests/test_run_folders.py: user files are hashed before and after, errors must be one clean
``error:`` line with the documented exit code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_run_folders import (
    TINY,
    _image_tree,
    _in_small_disk,
    _kill_after,
    events,
    fit,
    invoke,
    needs_namespaces,
    refused,
    same_weights,
    snapshot,
)

from edgetrain.bench import runner as bench_runner


def _edge(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m edgetrain ARGS` in its own process, with a deadline: a hang fails the test
    instead of stopping the suite."""
    return subprocess.run([sys.executable, "-m", "edgetrain", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "250"})


def _clean_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    err = " ".join(proc.stderr.split())
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and err.startswith("error:"), proc.stderr
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    return err


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted TINY run, for comparisons (never modified by a test)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    fit(out)
    return out


@pytest.fixture
def finished(tmp_path, reference) -> Path:
    """A finished run this test may damage: a copy of the reference."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


@pytest.fixture(scope="module")
def other_run(tmp_path_factory) -> Path:
    """A finished TINY run with another seed: same shapes, other weights, other run id."""
    out = tmp_path_factory.mktemp("other") / "run"
    fit(out, "--seed", "1")
    return out


# ---------------------------------------------------------------------------------------------
# Entries of the wrong kind where edgetrain writes: refused up front, never a traceback after
# training (report.json a folder of the user's was found only when the report was written).
# ---------------------------------------------------------------------------------------------

def _folder_with_a_file(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "mine.txt").write_text("the user's")


def _file(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    path.unlink(missing_ok=True)
    path.write_text("the user's")


@pytest.mark.parametrize("flag, entry, make, shown", [
    ("--overwrite", "report.json", _folder_with_a_file, "report.json is a folder"),
    ("--overwrite", "model.safetensors", _folder_with_a_file, "model.safetensors is a folder"),
    ("--overwrite", "cache", _file, "cache is a file, where edgetrain keeps a folder"),
    ("--resume", "modules", _file, "modules is a file, where edgetrain keeps a folder"),
    ("--resume", "modules/module_1.safetensors", _folder_with_a_file,
     "modules/module_1.safetensors is a folder"),
    ("--resume", "metrics.jsonl", _folder_with_a_file, "metrics.jsonl is a folder"),
])
def test_entries_of_the_wrong_kind_are_refused_before_anything_runs(finished, flag, entry,
                                                                    make, shown):
    make(finished / entry)
    if flag == "--resume":
        (finished / "report.json").unlink()  # so that the resumption has work to do
    before = snapshot(finished)
    out = refused(invoke("fit", *TINY, "--out", str(finished), flag), 2, shown,
                  "cannot write over")
    assert "Traceback" not in out
    assert snapshot(finished) == before


def test_a_fifo_in_a_run_folder_or_a_bench_folder_never_hangs(tmp_path, finished):
    for name in ("metrics.jsonl", "report.json", "model.json"):
        kept = (finished / name).read_bytes()
        (finished / name).unlink()
        os.mkfifo(finished / name)  # reading it would wait for a writer forever
        _clean_error(_edge("fit", *TINY, "--out", str(finished), "--resume", timeout=60), 2,
                     f"{name} is a FIFO")
        (finished / name).unlink()
        (finished / name).write_bytes(kept)
    bench = tmp_path / "bench"
    bench.mkdir()
    os.mkfifo(bench / "results.jsonl")
    _clean_error(_edge("bench", "report", str(bench), timeout=60), 2,
                 "results.jsonl is a FIFO")


def test_export_artifacts_refuses_a_folder_where_its_file_should_be(tmp_path, finished):
    pytest.importorskip("onnxruntime.training")
    out = tmp_path / "artifacts"
    result = invoke("export-artifacts", str(finished), "--module", "0", "--out", str(out))
    assert result.exit_code == 0, result.output
    _folder_with_a_file(out / "checkpoint")
    before = snapshot(out)
    refused(invoke("export-artifacts", str(finished), "--module", "0", "--out", str(out)), 2,
            "checkpoint is a folder")
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------
# A module, checkpoint or report of another run, intact (valid checksum), is not this run's
# ---------------------------------------------------------------------------------------------

def test_a_module_file_of_another_run_is_retrained_not_stitched_in(finished, other_run,
                                                                    reference):
    shutil.copy(other_run / "modules" / "module_1.safetensors", finished / "modules")
    (finished / "report.json").unlink()
    (finished / "model.safetensors").unlink()
    fit(finished, "--resume")
    damaged = [e for e in events(finished) if e["event"] == "module_damaged"]
    assert damaged and damaged[0]["module"] == 1 and "another run" in damaged[0]["problem"]
    assert same_weights(finished, reference)  # not a mix of two runs


def test_a_report_of_another_run_is_not_returned_as_this_ones(finished, other_run, reference):
    shutil.copy(other_run / "report.json", finished / "report.json")
    result = fit(finished, "--resume")
    assert any(e["event"] == "outputs_damaged" and "another run" in e["problems"][0]
               for e in events(finished))
    ours = json.loads((finished / "report.json").read_text())
    assert ours["run_id"] == json.loads((finished / "edgetrain-run.json").read_text())["run_id"]
    assert ours["test_accuracy"] == json.loads((reference / "report.json").read_text())[
        "test_accuracy"], result.output


def test_a_checkpoint_of_another_run_is_discarded(tmp_path):
    args = ["--epochs", "2"]
    mine, theirs, whole = tmp_path / "mine", tmp_path / "theirs", tmp_path / "whole"

    def first_epoch(ev: list[dict]) -> bool:
        return any(e["event"] == "epoch" and e["module"] == 0 for e in ev)

    _kill_after(mine, first_epoch, *args)
    _kill_after(theirs, first_epoch, *args, "--seed", "1")
    ckpt = Path("checkpoints") / "0.safetensors"
    if not ((mine / ckpt).exists() and (theirs / ckpt).exists()):
        pytest.skip("a kill landed after module 1 finished")
    shutil.copy(theirs / ckpt, mine / ckpt)
    fit(mine, "--resume", *args)
    assert any(e["event"] == "checkpoint_discarded" and "another run" in e["reason"]
               for e in events(mine))
    fit(whole, *args)
    assert same_weights(mine, whole)


def test_a_config_edited_to_another_network_retrains_instead_of_crashing(finished):
    """config.json edited to other valid widths, resumed with those flags: the saved modules
    do not hold that network; they are retrained (logged), never loaded into it."""
    config = json.loads((finished / "config.json").read_text())
    config["widths"] = [8, 16, 32]
    (finished / "config.json").write_text(json.dumps(config))
    (finished / "report.json").unlink()
    tiny = [a if a != "8,16,16" else "8,16,32" for a in TINY]
    result = invoke("fit", *tiny, "--out", str(finished), "--resume")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    damaged = [e for e in events(finished) if e["event"] == "module_damaged"]
    assert damaged and "does not hold the network" in damaged[0]["problem"]
    from edgetrain.runs.model import load_stitched

    network, info = load_stitched(finished)
    assert info.widths == (8, 16, 32)


# ---------------------------------------------------------------------------------------------
# A run that cannot even be started (full disk) leaves a folder the same command can use
# ---------------------------------------------------------------------------------------------

@needs_namespaces
def test_a_full_disk_at_the_start_leaves_a_folder_the_same_command_reuses(tmp_path):
    tiny = " ".join(TINY)
    script = (f'$PY -m edgetrain fit {tiny} --cache none --out "$DISK/run" 2>"$DISK/../err1"; '
              'echo "first=$?"; ls -A "$DISK/run"; '
              'mount -o remount,size=4m "$DISK" && '
              f'$PY -m edgetrain fit {tiny} --cache none --out "$DISK/run" 2>"$DISK/../err2" '
              '>/dev/null; echo "second=$?"')
    printed = _in_small_disk(tmp_path, "8k", script)
    err1 = " ".join((tmp_path / "err1").read_text().split())
    assert "first=2" in printed and "Traceback" not in err1, err1
    assert "disk space starting the run" in err1 and "--resume" not in err1, err1
    listed = printed.split("first=2")[1].split("second=")[0].split()
    assert listed == [".edgetrain.lock"], printed  # nothing half-made that blocks a new run
    assert "second=0" in printed, (tmp_path / "err2").read_text()


# ---------------------------------------------------------------------------------------------
# Image folders: a link that would silently drop a class or label images twice is refused
# ---------------------------------------------------------------------------------------------

def test_image_folder_links_that_would_lie_are_refused(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    _image_tree(data)
    _image_tree(elsewhere, classes=("c",))
    args = ["--dataset", "imagefolder", "--data-dir", str(data), "--model", "resnet8",
            "--widths", "8,16,16", "--modules", "2", "--epochs", "1", "--batch-size", "4",
            "--threads", "1", "--device", "cpu", "--no-progress"]
    for split in ("train", "test"):  # class c: a link to a folder outside --data-dir
        (data / split / "c").symlink_to(elsewhere / split / "c", target_is_directory=True)
    refused(invoke("fit", *args, "--out", str(tmp_path / "run1")), 2, "train/c",
            "outside --data-dir")
    for split in ("train", "test"):  # class c: the same folder as class a
        (data / split / "c").unlink()
        (data / split / "c").symlink_to(data / split / "a", target_is_directory=True)
    refused(invoke("fit", *args, "--out", str(tmp_path / "run2")), 2, "train/c", "train/a",
            "same folder", "two labels")
    assert not (tmp_path / "run1").exists() and not (tmp_path / "run2").exists()


# ---------------------------------------------------------------------------------------------
# bench run and profile write fixed names: never over a user's folder
# ---------------------------------------------------------------------------------------------

def _fake_fit(cmd, **kwargs):
    """What a finished `edgetrain fit` leaves for the bench (no training: the folder rules are
    under test, not the runs)."""
    from edgetrain.runs.ownership import RUN_KIND, write_marker

    out = Path(cmd[cmd.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    marker = write_marker(out, RUN_KIND)
    (out / "report.json").write_text(json.dumps({
        "run_id": marker.run_id, "test_accuracy": 0.5, "peak_memory_bytes": 2**29,
        "training_memory_bytes": 2**26, "wall_time_s": 1.0, "modules": []}))
    return subprocess.CompletedProcess(cmd, 0, "", "")


def test_bench_run_never_writes_over_a_users_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_runner, "subprocess", SimpleNamespace(run=_fake_fit))
    user = tmp_path / "notes"
    user.mkdir()
    (user / "results.md").write_text("my own results")
    (user / "memory_vs_accuracy.png").write_bytes(b"my own plot")
    before = snapshot(user)
    refused(invoke("bench", "run", "--preset", "smoke", "--out", str(user)), 2,
            "edgetrain-bench.json", "Choose another --out")
    assert snapshot(user) == before
    (user / "results.jsonl").write_text('{"my": "own log"}\n')  # not a bench's results either
    before = snapshot(user)
    refused(invoke("bench", "run", "--preset", "smoke", "--out", str(user)), 2,
            "edgetrain-bench.json")
    assert snapshot(user) == before

    # A bench folder, new or written before folders were marked, is the bench's to go on.
    bench = tmp_path / "bench"
    args = ["bench", "run", "--preset", "smoke", "--only", "e2e", "--out", str(bench)]
    assert invoke(*args).exit_code == 0
    (bench / "edgetrain-bench.json").unlink()  # as an older edgetrain left it
    result = invoke(*args)
    assert result.exit_code == 0 and "done before, skipped" in result.output, result.output
    assert (bench / "edgetrain-bench.json").is_file()


def test_bench_report_checks_every_field_it_uses(tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "results.jsonl").write_text(json.dumps({"run_id": "x", "status": "failed"}) + "\n")
    refused(invoke("bench", "report", str(out)), 2, "results.jsonl line 1", "'method'")
    line = {"run_id": "x", "status": "failed", "method": "trgl", "config": {},
            "machine": {"gpus": [{"no": "name"}]}}
    (out / "results.jsonl").write_text(json.dumps(line) + "\n")
    refused(invoke("bench", "report", str(out)), 2, "results.jsonl line 1", "gpu 0", "'name'")
    assert not (out / "results.md").exists()


def test_profile_never_writes_over_a_users_folder(tmp_path):
    user = tmp_path / "notes"
    user.mkdir()
    (user / "profile.json").write_text("my own profile")
    (user / "profile.png").write_bytes(b"my own plot")
    before = snapshot(user)
    refused(invoke("profile", "--model", "resnet8", "--widths", "8,16,16", "--dataset",
                   "fashion-mnist-mini", "--out", str(user)), 2, "edgetrain-profile.json")
    assert snapshot(user) == before


# ---------------------------------------------------------------------------------------------
# Read back: report.json and the log's module records, every field that is used
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    lambda d: d.update(modules=[{"x": 1}]),
    lambda d: d.pop("method"),
    lambda d: d.update(framework_baseline_bytes="x"),
    lambda d: d.update(memory_measured=["not", "text"]),
])
def test_a_finished_runs_report_is_checked_before_it_is_printed(finished, reference, change):
    report = json.loads((finished / "report.json").read_text())
    change(report)
    (finished / "report.json").write_text(json.dumps(report))
    result = fit(finished, "--resume")  # rebuilt, not a traceback
    assert any(e["event"] == "outputs_damaged" for e in events(finished)), result.output
    assert same_weights(finished, reference)


def test_a_module_record_missing_a_field_is_a_clean_error(finished):
    lines = [json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        if line["event"] == "module" and line["module"] == 0:
            del line["train_peak_memory_bytes"]
    (finished / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (finished / "report.json").unlink()
    refused(invoke("fit", *TINY, "--out", str(finished), "--resume"), 2, "metrics.jsonl",
            "'train_peak_memory_bytes' is missing")


def test_a_vanilla_run_with_infinite_tau_resumes_finished(tmp_path):
    out = tmp_path / "run"
    fit(out, "--method", "vanilla")
    result = fit(out, "--method", "vanilla", "--resume")
    assert not any(e["event"] == "outputs_damaged" for e in events(out)), result.output


# ---------------------------------------------------------------------------------------------
# Names: markup, lengths, other scripts' digits
# ---------------------------------------------------------------------------------------------

def test_a_run_folder_named_like_markup_is_printed_as_written(tmp_path):
    out = tmp_path / "a[/]b"
    result = invoke("fit", *TINY, "--out", str(out))
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert f"runfolder:{out}" in "".join(result.output.split())


def test_names_made_too_long_by_export_are_a_clean_error(tmp_path, finished):
    onnx_out = tmp_path / ("y" * 240 + ".onnx")  # fine itself; its temporary name is not
    refused(invoke("export", str(finished), "--out", str(onnx_out)), 2, "too long")
    per_module = tmp_path / ("m" * 248 + ".onnx")
    refused(invoke("export", str(finished), "--out", str(per_module), "--per-module"), 2,
            "module_0.onnx", "too long")
    pytest.importorskip("onnxruntime.training")
    refused(invoke("export-artifacts", str(finished), "--out", str(tmp_path / ("z" * 250))),
            2, "too long")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_plain_export_removes_what_a_killed_per_module_export_left(tmp_path, finished):
    out = tmp_path / "m.onnx"
    left = [tmp_path / ".m.module_0.onnx.0123abcd.tmp", tmp_path / ".m.onnx.89abcdef.tmp"]
    for path in left:
        path.write_bytes(b"half a graph")
    mine = tmp_path / ".m.module_0.onnx.notes.tmp"  # not a name edgetrain makes
    mine.write_text("the user's")
    result = invoke("export", str(finished), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in left) and mine.read_text() == "the user's"


def test_overwrite_keeps_a_user_file_named_with_other_digits(finished):
    theirs = finished / "modules" / "module_\u0663.safetensors"  # ARABIC-INDIC DIGIT THREE
    theirs.write_text("the user's")
    fit(finished, "--overwrite")
    assert theirs.read_text() == "the user's"


# ---------------------------------------------------------------------------------------------
# Reading a run: without write access, and without trusting model.json's sizes
# ---------------------------------------------------------------------------------------------

@needs_namespaces
def test_a_run_on_read_only_storage_can_still_be_exported(tmp_path, reference):
    script = (f'cp -r "{reference}" "$DISK/run" && mount -o remount,ro "$DISK" && '
              f'$PY -m edgetrain export "$DISK/run" --out "{tmp_path}/model.onnx" '
              '>/dev/null 2>"$DISK/../err"; echo "export=$?"')
    printed = _in_small_disk(tmp_path, "4m", script)
    assert "export=0" in printed, (tmp_path / "err").read_text()
    assert (tmp_path / "model.onnx").is_file()


def test_model_json_sizes_are_checked_before_anything_is_built(tmp_path, finished):
    """model.json edited to a ResNet-110 at 4096 channels (65 GB of weights): refused from the
    weights' header, before a byte is allocated (the child may not use more than 4 GB)."""
    import resource

    info = json.loads((finished / "model.json").read_text())
    info.update(model="resnet110", widths=[4096, 4096, 4096], modules=[[0, 27], [27, 54]])
    (finished / "model.json").write_text(json.dumps(info))

    def small() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))

    for args in (["export", str(finished), "--out", str(tmp_path / "m.onnx")],
                 ["export-artifacts", str(finished), "--out", str(tmp_path / "art")]):
        proc = subprocess.run([sys.executable, "-m", "edgetrain", *args], capture_output=True,
                              text=True, timeout=300, preexec_fn=small)
        if args[0] == "export-artifacts" and "onnxruntime-training" in proc.stderr:
            continue
        _clean_error(proc, 2, "does not hold the network", "model.json")


# ---------------------------------------------------------------------------------------------
# A log line a crash cut short is skipped once, and must not damage the log for good
# ---------------------------------------------------------------------------------------------

def _cut_last_line(path: Path, keep_of_it: int = 12) -> None:
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[:start + keep_of_it])  # power lost while the last line was written


def test_a_torn_log_line_does_not_stop_the_next_resumptions(finished, reference):
    _cut_last_line(finished / "metrics.jsonl")
    for _ in range(2):
        (finished / "report.json").unlink()
        fit(finished, "--resume")
        lines = (finished / "metrics.jsonl").read_text().splitlines()
        assert all(json.loads(line) for line in lines)  # every line whole again
    assert same_weights(finished, reference)


def test_a_torn_bench_result_does_not_stop_the_next_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_runner, "subprocess", SimpleNamespace(run=_fake_fit))
    bench = tmp_path / "bench"
    args = ["bench", "run", "--preset", "smoke", "--only", "e2e", "--out", str(bench)]
    assert invoke(*args).exit_code == 0
    _cut_last_line(bench / "results.jsonl")  # its only line: the run counts as not done
    for _ in range(2):
        result = invoke(*args)
        assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    lines = [json.loads(x) for x in (bench / "results.jsonl").read_text().splitlines()]
    assert [x["status"] for x in lines] == ["ok"]  # rerun once, then skipped


# ---------------------------------------------------------------------------------------------
# Hard links: edgetrain writes in place only to its lock file and its logs
# ---------------------------------------------------------------------------------------------

def test_a_lock_file_that_is_a_users_file_is_never_truncated(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's")
    linked, named = tmp_path / "linked", tmp_path / "named"
    linked.mkdir()
    os.link(precious, linked / ".edgetrain.lock")  # a hard link to the user's file
    named.mkdir()
    (named / ".edgetrain.lock").write_text("my notes")
    for out in (linked, named):
        refused(invoke("fit", *TINY, "--out", str(out)), 2, ".edgetrain.lock",
                "not edgetrain's lock file")
    assert precious.read_text() == "the user's"
    assert (named / ".edgetrain.lock").read_text() == "my notes"


def test_resuming_a_hard_linked_copy_leaves_the_original_as_it_was(tmp_path, finished):
    (finished / "report.json").unlink()
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in finished.rglob("*"):  # cp -al: every file a second name of the same data
        target = copy / path.relative_to(finished)
        target.mkdir() if path.is_dir() else os.link(path, target)
    before = snapshot(finished)
    fit(copy, "--resume")
    assert any(e["event"] == "done" for e in events(copy))
    after = snapshot(finished)
    after.pop(".edgetrain.lock")  # the pid in the shared lock file is the only change
    before.pop(".edgetrain.lock")
    assert after == before
