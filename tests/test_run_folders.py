"""Never lose a user's files (issue 10): run-folder ownership, one writer, resume means the
same run, verified weights, atomic export. Every case goes through the real CLI or real
`edgetrain` processes, in real folders; "nothing lost" is checked by hashing every file of
the user's before and after.

The runs are tiny: ResNet-8 at widths 8,16,16 on 200 built-in training images.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from edgetrain.cli import app
from edgetrain.runs.weights import (
    CHECKSUM_KEY,
    RUN_ID_KEY,
    load_weights,
    read_metadata,
    save_weights,
    tensors_checksum,
)

TINY = ["--model", "resnet8", "--widths", "8,16,16", "--modules", "2", "--epochs", "1",
        "--train-limit", "200", "--test-limit", "100", "--batch-size", "50", "--lr", "0.1",
        "--threads", "1", "--device", "cpu", "--no-progress"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def text(result) -> str:
    return " ".join(result.output.split())


def refused(result, code: int = 2, *needles: str) -> str:
    out = text(result)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and out.startswith("error:"), result.output
    for needle in needles:
        assert needle in out, f"{needle!r} not in: {result.output}"
    return out


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and link under ``folder`` (links not followed) with its content or target."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_file():
            found[key] = path.read_bytes().hex()
    return found


def fit(out: Path, *args: str, check: bool = True):
    result = invoke("fit", *TINY, "--out", str(out), *args)
    if check:
        assert result.exit_code == 0, result.output
    return result


def events(out: Path) -> list[dict]:
    lines = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return lines


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_weights(a / "model.safetensors"), load_weights(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


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


# ---------------------------------------------------------------------------------------------
# 1. Ownership
# ---------------------------------------------------------------------------------------------

def test_overwrite_refuses_a_folder_edgetrain_did_not_write(tmp_path):
    """The issue's reproduction: a project with a config.json was deleted by --overwrite."""
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "config.json").write_text("{}")
    (proj / "src" / "main.py").write_text("code")
    before = snapshot(proj)
    refused(fit(proj, "--overwrite", check=False), 2, "no edgetrain-run.json",
            "Choose another --out")
    refused(fit(proj, "--resume", check=False), 2, "no edgetrain-run.json")
    assert snapshot(proj) == before


def test_overwrite_refuses_protected_places_even_when_they_are_runs(tmp_path, monkeypatch):
    """`--out .`, a parent of it, a home folder and a repository root: refused for --overwrite
    even if an edgetrain run sits there (they once were not)."""
    here = tmp_path / "project"
    here.mkdir()
    monkeypatch.chdir(here)
    fit(Path("."))  # a run started in the current folder: allowed, it was empty
    (here / "notes.txt").write_text("mine")
    before = snapshot(here)
    refused(fit(Path("."), "--overwrite", check=False), 2, "is the current folder",
            "--overwrite is refused")
    refused(invoke("fit", *TINY, "--out", str(here), "--overwrite"), 2, "current folder")
    assert snapshot(here) == before

    home = tmp_path / "home"
    shutil.copytree(here, home)
    monkeypatch.setenv("HOME", str(home))
    refused(fit(home, "--overwrite", check=False), 2, "is a home folder")

    repo = tmp_path / "repo"
    shutil.copytree(here, repo)
    (repo / ".git").mkdir()
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main")
    before = snapshot(repo)
    refused(fit(repo, "--overwrite", check=False), 2, "root of a repository")
    assert snapshot(repo) == before


def test_overwrite_deletes_only_what_edgetrain_wrote(finished):
    """User files inside a run folder, even inside edgetrain's own subfolders and under
    edgetrain-like names, survive --overwrite; edgetrain's files are replaced."""
    old_id = json.loads((finished / "edgetrain-run.json").read_text())["run_id"]
    mine = {"notes.txt": "mine", "modules/my_module.pt": "mine",
            "modules/module_0.safetensors.backup": "mine", ".config.json.backup": "mine",
            "checkpoints/keep.txt": "mine"}
    for name, content in mine.items():
        (finished / name).parent.mkdir(parents=True, exist_ok=True)
        (finished / name).write_text(content)
    fit(finished, "--overwrite")
    for name, content in mine.items():
        assert (finished / name).read_text() == content, name
    new_id = json.loads((finished / "edgetrain-run.json").read_text())["run_id"]
    assert new_id != old_id
    assert json.loads((finished / "report.json").read_text())["run_id"] == new_id
    starts = [e for e in events(finished) if e["event"] == "start"]
    assert len(starts) == 1  # the old run's log went with it


def test_symlinked_run_folder_and_links_inside_are_never_followed(tmp_path, finished):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("mine")
    before = snapshot(outside)

    link = tmp_path / "link"
    link.symlink_to(finished, target_is_directory=True)
    for flags in (["--overwrite"], ["--resume"]):
        refused(fit(link, *flags, check=False), 2, "is a symbolic link")

    # A link planted where edgetrain writes: modules/ pointing outside, or the log.
    shutil.rmtree(finished / "checkpoints", ignore_errors=True)
    (finished / "checkpoints").symlink_to(outside, target_is_directory=True)
    for flags in (["--overwrite"], ["--resume"]):
        refused(fit(finished, *flags, check=False), 2, "symbolic links", "checkpoints")
    (finished / "checkpoints").unlink()
    (finished / "metrics.jsonl").rename(tmp_path / "log")
    (finished / "metrics.jsonl").symlink_to(outside / "precious.txt")
    refused(fit(finished, "--resume", check=False), 2, "metrics.jsonl")
    assert snapshot(outside) == before


def test_resume_refuses_unmarked_and_damaged_markers(tmp_path, finished):
    legacy = tmp_path / "legacy"
    shutil.copytree(finished, legacy)
    (legacy / "edgetrain-run.json").unlink()
    refused(fit(legacy, "--resume", check=False), 2, "older edgetrain")
    (finished / "edgetrain-run.json").write_text('{"kind": "edgetrain-run", "run_id": 3}')
    refused(fit(finished, "--resume", check=False), 2, "edgetrain-run.json", "format_version")
    (finished / "edgetrain-run.json").write_text("garbage")
    refused(fit(finished, "--overwrite", check=False), 2, "edgetrain-run.json",
            "not valid JSON")


def test_leftover_temporary_files_are_removed_and_nothing_else(finished):
    """A kill mid-write leaves `.NAME.<random>.tmp`; the next run in the folder removes it.
    Look-alikes of the user's stay."""
    (finished / "report.json").unlink()  # so that --resume does some work
    stale = [".config.json.k2j4h1.tmp", "modules/.module_1.safetensors.ab12cd.tmp",
             ".model.safetensors.zz99.tmp"]
    kept = [".config.json.mine", "modules/.module_1.safetensors.notes", "config.json.tmp.txt"]
    for name in stale + kept:
        (finished / name).write_text("x")
    fit(finished, "--resume")
    assert not any((finished / name).exists() for name in stale)
    assert all((finished / name).read_text() == "x" for name in kept)


# ---------------------------------------------------------------------------------------------
# 2. One writer
# ---------------------------------------------------------------------------------------------

def _start_fit(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgetrain", "fit", *TINY, "--out",
                             str(out), *extra], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(out: Path, proc: subprocess.Popen, condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and condition(events(out)):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) too early: "
                        f"{proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("timed out")


def test_a_second_process_is_refused_while_the_first_writes(tmp_path):
    out = tmp_path / "run"
    # Enough epochs that the first run outlives the three refused starts, even under tcmalloc
    # (about 3x faster on the CPU than glibc with the 128 KiB threshold: 30 epochs were not).
    first = _start_fit(out, "--epochs", "300")
    try:
        _wait_for(out, first, lambda ev: any(e["event"] == "epoch" for e in ev))
        before = (out / "config.json").read_bytes()
        for flags in (["--resume"], ["--overwrite"], []):
            second = subprocess.run(
                [sys.executable, "-m", "edgetrain", "fit", *TINY, "--epochs", "300", "--out",
                 str(out), *flags], capture_output=True, text=True, timeout=120)
            message = " ".join(second.stderr.split())
            assert second.returncode == 2, second.stderr
            if flags:  # without a flag, the occupied folder is refused before the lock
                assert f"in use by another edgetrain process (pid {first.pid})" in message
            assert "Traceback" not in second.stderr
        assert (out / "config.json").read_bytes() == before
        assert first.poll() is None  # the first one was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel released the dead process's lock: the run resumes.
    fit(out, "--resume", "--allow-changes", "epochs")
    assert (out / "report.json").exists()


# ---------------------------------------------------------------------------------------------
# 3. Resume means the same run
# ---------------------------------------------------------------------------------------------

def test_resume_checks_threads_and_data(tmp_path, finished):
    before = snapshot(finished)
    refused(fit(finished, "--resume", "--threads", "2", check=False), 2,
            "--threads 1 (now 2)", "--allow-changes threads")
    refused(fit(finished, "--resume", "--train-limit", "300", check=False), 2,
            "--train-limit 200 (now 300)", "another --out")
    refused(fit(finished, "--resume", "--memory-budget", "3GB", check=False), 2,
            "--memory-budget", "--allow-changes memory-budget")
    refused(fit(finished, "--resume", "--allow-changes", "seed", check=False), 2,
            "--allow-changes seed: not a setting --resume may change")
    assert snapshot(finished) == before
    # A flag that cannot change the result may differ: here --out, spelled another way.
    fit(finished / ".." / finished.name, "--resume")


def test_resume_refuses_other_data_in_the_same_folder(tmp_path):
    from PIL import Image

    data = tmp_path / "images"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (data / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (12, 12), (i * 40, 0, 0) if c == "a" else (0, i * 40, 0)).save(
                    data / split / c / f"{i}.png")
    args = ["--dataset", "imagefolder", "--data-dir", str(data), "--image-size", "16",
            "--train-limit", "8", "--test-limit", "8", "--batch-size", "4"]
    out = tmp_path / "run"
    result = invoke("fit", *TINY, *args, "--out", str(out))
    assert result.exit_code == 0, result.output
    Image.new("RGB", (12, 12)).save(data / "train" / "a" / "9.png")  # the folder changed
    before = snapshot(out)
    refused(invoke("fit", *TINY, *args, "--out", str(out), "--resume"), 2,
            "not the data the run", "fingerprint differs")
    assert snapshot(out) == before


def _kill_after(out: Path, condition, *extra: str) -> None:
    proc = _start_fit(out, *extra)
    _wait_for(out, proc, condition)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _module_done(k: int):
    return lambda ev: any(e["event"] == "module" and e["module"] == k for e in ev)


def test_resume_trains_as_planned_in_plan_json(tmp_path):
    """The plan is read back, not measured again: an edited (valid) plan.json is what the
    resumed module trains with; a damaged one is made again, and the log says why."""
    out = tmp_path / "run"
    budget = ["--memory-budget", "64GB", "--epochs", "3"]
    _kill_after(out, _module_done(0), *budget)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["phases"][1]["micro_batch"] == 50
    plan["phases"][1].update(micro_batch=25, accumulation=2)
    (out / "plan.json").write_text(json.dumps(plan))
    fit(out, "--resume", *budget)
    modules = json.loads((out / "report.json").read_text())["modules"]
    assert [m["micro_batch"] for m in modules] == [50, 25]

    out2 = tmp_path / "run2"
    _kill_after(out2, _module_done(0), *budget)
    (out2 / "plan.json").write_text('{"phases": "garbage"}')
    fit(out2, "--resume", *budget)
    assert any(e["event"] == "plan_remade" for e in events(out2))


# ---------------------------------------------------------------------------------------------
# 4. Verified weights
# ---------------------------------------------------------------------------------------------

def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # in the last tensor's bytes: the header still parses
    path.write_bytes(bytes(data))


def test_a_damaged_finished_module_is_retrained_before_training_goes_on(tmp_path, reference):
    out = tmp_path / "run"
    _kill_after(out, _module_done(0), "--epochs", "1")
    if (out / "modules" / "module_1.safetensors").exists():
        pytest.skip("the kill landed after module 2 was saved")
    _flip_a_byte(out / "modules" / "module_0.safetensors")
    fit(out, "--resume")
    damaged = [e for e in events(out) if e["event"] == "module_damaged"]
    assert damaged and damaged[0]["module"] == 0 and "checksum" in damaged[0]["problem"]
    assert same_weights(out, reference)  # retrained exactly: seeded, --threads 1


def test_a_damaged_or_inconsistent_checkpoint_is_discarded(tmp_path, reference):
    out = tmp_path / "run"
    args = ["--epochs", "3"]
    ref = tmp_path / "ref"
    fit(ref, *args)
    _kill_after(out, lambda ev: any(e["event"] == "epoch" and e["module"] == 0 for e in ev),
                *args)
    ckpt = out / "checkpoints" / "0.safetensors"
    if not ckpt.exists():
        pytest.skip("the kill landed after module 1 finished")
    _flip_a_byte(ckpt)
    fit(out, "--resume", *args)
    assert any(e["event"] == "checkpoint_discarded" and "checksum" in e["reason"]
               for e in events(out))
    assert same_weights(out, ref)

    # A checkpoint with a valid checksum but metadata that does not fit this run.
    out2 = tmp_path / "run2"
    _kill_after(out2, lambda ev: any(e["event"] == "epoch" and e["module"] == 0 for e in ev),
                *args)
    ckpt = out2 / "checkpoints" / "0.safetensors"
    if not ckpt.exists():
        pytest.skip("the kill landed after module 1 finished")
    tensors = load_weights(ckpt)
    run_id = read_metadata(ckpt)[RUN_ID_KEY]  # this run's checkpoint, its metadata edited
    save_file(tensors, str(ckpt), metadata={"epoch": "99", "schedule_steps": "{}",
                                            CHECKSUM_KEY: tensors_checksum(tensors),
                                            RUN_ID_KEY: run_id})
    fit(out2, "--resume", *args)
    assert any(e["event"] == "checkpoint_discarded" and "outside" in e["reason"]
               for e in events(out2))
    assert same_weights(out2, ref)


def test_resume_of_a_finished_run_checks_its_outputs(finished, reference):
    (finished / "model.safetensors").unlink()
    fit(finished, "--resume")
    assert same_weights(finished, reference)
    assert any(e["event"] == "outputs_damaged" for e in events(finished))
    _flip_a_byte(finished / "modules" / "module_1.safetensors")
    fit(finished, "--resume")
    assert same_weights(finished, reference)
    assert json.loads((finished / "report.json").read_text())["test_accuracy"] == \
        json.loads((reference / "report.json").read_text())["test_accuracy"]
    assert not (finished / "checkpoints").exists()  # removed at the end, as the README says


# ---------------------------------------------------------------------------------------------
# 6. Export is atomic and honest
# ---------------------------------------------------------------------------------------------

def test_export_replaces_only_its_own_files_and_cleans_its_leftovers(tmp_path, finished):
    target = tmp_path / "model.onnx"
    target.write_text("not an onnx file of edgetrain's")
    before = snapshot(tmp_path / "run")
    refused(invoke("export", str(finished), "--out", str(target)), 2,
            "not an ONNX file edgetrain exported")
    assert target.read_text() == "not an onnx file of edgetrain's"
    target.unlink()
    (tmp_path / ".model.onnx.deadbeef.tmp").write_text("killed export")
    (tmp_path / ".model.onnx.notes").write_text("mine")
    for _ in range(2):  # the second export replaces the first's file
        result = invoke("export", str(finished), "--out", str(target))
        assert result.exit_code == 0, result.output
    assert not (tmp_path / ".model.onnx.deadbeef.tmp").exists()
    assert (tmp_path / ".model.onnx.notes").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    assert snapshot(tmp_path / "run") == before


def test_export_of_a_network_with_nan_fails_and_leaves_no_file(tmp_path, finished):
    """NaN compares false with everything: a verification written `diff > tol` passed it."""
    state = load_weights(finished / "model.safetensors")
    name = next(k for k in state if k.endswith("head.fc.bias"))
    state[name][0] = float("nan")
    save_weights(finished / "model.safetensors", state)  # edgetrain's writer: valid checksum
    target = tmp_path / "model.onnx"
    refused(invoke("export", str(finished), "--out", str(target)), 5, "NaN or infinite")
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if p.suffix in (".onnx", ".tmp")] == []


def test_export_artifacts_owns_its_folder(tmp_path, finished):
    pytest.importorskip("onnxruntime.training")
    out = tmp_path / "art"
    out.mkdir()
    (out / "artifacts.json").write_text("{}")  # a user's file of that name
    (out / "data.csv").write_text("mine")
    before = snapshot(out)
    refused(invoke("export-artifacts", str(finished), "--out", str(out)), 2,
            "not an earlier `edgetrain export-artifacts`")
    assert snapshot(out) == before

    fresh = tmp_path / "fresh"
    for _ in range(2):  # the second replaces the first's files, and keeps the user's
        result = invoke("export-artifacts", str(finished), "--out", str(fresh))
        assert result.exit_code == 0, result.output
        (fresh / "mine.txt").write_text("mine")
    assert (fresh / "edgetrain-artifacts.json").is_file()
    assert (fresh / "mine.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fresh.")]


# ---------------------------------------------------------------------------------------------
# 6. A full disk, for real: a 1-2 MB tmpfs in a user and mount namespace
# ---------------------------------------------------------------------------------------------

def _namespaces_work() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                           capture_output=True)
    return probe.returncode == 0


needs_namespaces = pytest.mark.skipif(not _namespaces_work(),
                                      reason="needs unshare --user --mount (a real tiny tmpfs)")


def _in_small_disk(tmp_path: Path, size: str, script: str) -> str:
    """Run ``script`` (sh) with $DISK a fresh tmpfs of ``size``; its output."""
    disk = tmp_path / "disk"
    disk.mkdir()
    env = {**os.environ, "DISK": str(disk), "PY": sys.executable}
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           f'mount -t tmpfs -o size={size} tmpfs "$DISK" && {script}'],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@needs_namespaces
def test_full_disk_keeps_module_1_and_the_documented_way_finishes(tmp_path):
    """Module 1 trains, its float32 cache does not fit the disk: a clean error; then
    `--resume --cache-dtype float16 --allow-changes cache-dtype` finishes the run without
    training module 1 again (its last epoch checkpoint holds it). The disk is sized for the
    even split's module 1 output (14x14x16; --split memory's 1|2 caches 28x28x8, twice that)."""
    tiny = " ".join([*TINY, "--split", "even"])
    out = tmp_path / "copied"
    script = (
        f'$PY -m edgetrain fit {tiny} --out "$DISK/run" 2>"$DISK/../err1"; echo "first=$?"; '
        f'$PY -m edgetrain fit {tiny} --out "$DISK/run" --resume --cache-dtype float16 '
        f'--allow-changes cache-dtype 2>"$DISK/../err2"; echo "second=$?"; '
        f'cp -r "$DISK/run" "{out}"')
    printed = _in_small_disk(tmp_path, "2400k", script)
    err1 = " ".join((tmp_path / "err1").read_text().split())
    assert "first=2" in printed, err1
    assert "disk space" in err1 and "--allow-changes cache-dtype" in err1, err1
    assert "Traceback" not in err1
    assert "second=0" in printed, (tmp_path / "err2").read_text()
    log = events(out)
    assert len([e for e in log if e["event"] == "epoch" and e["module"] == 0]) == 1
    assert {"event": "resume", "phase": "0", "epoch": 1}.items() <= \
        next(e for e in log if e["event"] == "resume" and "phase" in e).items()
    config = json.loads((out / "config.json").read_text())
    assert config["cache_dtype"] == "float16"
    assert config["resume_changes"][0]["finished_modules"] == []


@needs_namespaces
def test_full_disk_while_writing_weights_or_exporting_is_a_clean_error(tmp_path, reference):
    tiny = " ".join(TINY)
    script = (f'$PY -m edgetrain fit {tiny} --cache none --out "$DISK/run" 2>"$DISK/../err1"; '
              'echo "fit=$?"; ls -a "$DISK/run" "$DISK/run/checkpoints" 2>/dev/null; '
              f'$PY -m edgetrain export "{reference}" --out "$DISK/model.onnx" '
              '2>"$DISK/../err2" >/dev/null; echo "export=$?"; ls -a "$DISK"')
    printed = _in_small_disk(tmp_path, "40k", script)
    for name, key in (("err1", "fit=2"), ("err2", "export=2")):
        err = " ".join((tmp_path / name).read_text().split())
        assert key in printed and "disk space" in err and "Traceback" not in err, err
    assert ".tmp" not in printed  # no half-written file left behind
    assert "model.onnx" not in printed


# ---------------------------------------------------------------------------------------------
# 7. Data that cannot hang or lie
# ---------------------------------------------------------------------------------------------

def _image_tree(root: Path, classes=("a", "b"), per_class: int = 3) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (10, 10), (30 * i, 0, 0)).save(root / split / c / f"{i}.png")


def test_image_folder_walk_is_safe(tmp_path):
    """Links out of the data root are refused, naming them (not followed, and not silently
    left out either); link loops and FIFOs are not followed or read; a link to a folder inside
    the root is; a training set with one class is refused."""
    from edgetrain.data import load_dataset
    from edgetrain.errors import UserInputError

    root = tmp_path / "data"
    _image_tree(root)
    outside = tmp_path / "elsewhere"
    _image_tree(outside, per_class=5)
    (root / "train" / "a" / "out").symlink_to(outside / "train" / "a",
                                              target_is_directory=True)
    (root / "train" / "a" / "loop").symlink_to(root / "train", target_is_directory=True)
    os.mkfifo(root / "train" / "b" / "pipe.png")  # opening it would block forever
    (root / "train" / "b" / "dangling.png").symlink_to(tmp_path / "nothing.png")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "extra").mkdir()
    _image_tree(root / "extra", classes=("a",), per_class=2)
    (root / "train" / "b" / "more").symlink_to(root / "extra" / "train" / "a",
                                               target_is_directory=True)
    with pytest.raises(UserInputError, match="train/a/out is a symbolic link to .*outside"):
        load_dataset("imagefolder", data_dir=root, image_size=8)
    (root / "train" / "a" / "out").unlink()
    bundle = load_dataset("imagefolder", data_dir=root, image_size=8)
    names = sorted(os.path.relpath(p, root) for p, _ in bundle.train.samples)
    assert bundle.train.classes == ["a", "b"]
    assert names == ["train/a/0.png", "train/a/1.png", "train/a/2.png", "train/b/0.png",
                     "train/b/1.png", "train/b/2.png", "train/b/more/0.png",
                     "train/b/more/1.png"]
    assert [x.shape for x, _ in bundle.train][0] == (3, 8, 8)

    single = tmp_path / "single"
    _image_tree(single, classes=("only",))
    with pytest.raises(UserInputError, match="single class"):
        load_dataset("imagefolder", data_dir=single)


def test_a_data_file_whose_header_promises_more_is_refused_unread(tmp_path):
    from edgetrain.data.formats import read_idx

    path = tmp_path / "train-images-idx3-ubyte"
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (60000, 28, 28))
    path.write_bytes(header + bytes(28 * 28))  # one image where 60,000 are promised
    with pytest.raises(ValueError, match=r"header says \(60000, 28, 28\).*784 bytes"):
        read_idx(path, 3)
    fifo = tmp_path / "t10k-images-idx3-ubyte"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        read_idx(fifo, 3)


@pytest.mark.parametrize("args,needles", [
    (["--widths", "4096,4096,4096", "--model", "resnet110"], ["parameters", "narrower --widths"]),
    (["--widths", "9999"], ["--widths", "at most 4096"]),
    (["--batch-size", str(10**12)], ["--batch-size", "smaller --batch-size"]),
    (["--cache-views", "5", "--epochs", "2"], ["--cache-views 5", "at most --epochs"]),
])
def test_sizes_that_cannot_fit_are_refused_before_allocation(tmp_path, args, needles):
    out = tmp_path / "run"
    refused(fit(out, *args, check=False), 2, *needles)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 8. Every file edgetrain reads back is validated
# ---------------------------------------------------------------------------------------------

def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("name,change,needles", [
    ("config.json", lambda d: d.update(epochs="three"), ["config.json", "'epochs'", "integer"]),
    ("config.json", lambda d: d.update(widths=[8, "x"]), ["config.json", "'widths'"]),
    ("config.json", lambda d: d.update(resolved=[]), ["config.json", "'resolved'"]),
    ("config.json", None, ["config.json", "not valid JSON"]),
    ("metrics.jsonl", None, ["metrics.jsonl line 1", "damaged"]),
    ("metrics.jsonl", "module-record", ["metrics.jsonl", "'module'"]),
], ids=["config-type", "config-widths", "config-resolved", "config-garbage",
        "metrics-garbage", "metrics-module-type"])
def test_resume_reads_back_checked_files(tmp_path, reference, name, change, needles):
    """An unfinished run whose files were damaged or edited: a clean error naming the file
    and the field, and nothing else touched."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "report.json").unlink()
    path = out / name
    if change is None:
        path.write_text("{ garbage\n" + path.read_text())
    elif change == "module-record":
        with open(path, "a") as f:
            f.write(json.dumps({"event": "module", "module": "zero"}) + "\n")
            f.write(json.dumps({"event": "done"}) + "\n")
    else:
        _edit_json(path, change)
    before = snapshot(out)
    refused(fit(out, "--resume", check=False), 2, *needles)
    assert snapshot(out) == before


@pytest.mark.parametrize("change,needles", [
    (lambda d: d.update(model="resnet999"), ["model.json", "'model'"]),
    (lambda d: d.update(widths=[10**9, 8, 8]), ["model.json", "'widths'"]),
    (lambda d: d.update(modules=[[0, 1], [2, 3]]), ["model.json", "'modules'", "contiguous"]),
    (lambda d: d.update(std=[0.0]), ["model.json", "'std'"]),
    (lambda d: d.pop("num_classes"), ["model.json", "'num_classes' is missing"]),
], ids=["model", "widths", "modules", "std", "missing"])
def test_export_validates_model_json_before_building(tmp_path, finished, change, needles):
    _edit_json(finished / "model.json", change)
    refused(invoke("export", str(finished), "--out", str(tmp_path / "m.onnx")), 2, *needles)
    assert not (tmp_path / "m.onnx").exists()


def test_a_finished_run_with_a_garbled_report_is_rebuilt(finished, reference):
    (finished / "report.json").write_text('{"test_accuracy": "high"}')
    fit(finished, "--resume")
    assert json.loads((finished / "report.json").read_text())["test_accuracy"] == \
        json.loads((reference / "report.json").read_text())["test_accuracy"]
    assert any(e["event"] == "outputs_damaged" for e in events(finished))


def test_bench_results_are_validated(tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    good = {"run_id": "a", "status": "failed", "method": "trgl", "config": {}}
    (out / "results.jsonl").write_text(json.dumps(good) + "\n"
                                       + json.dumps({**good, "run_id": "b", "status": "ok"})
                                       + "\n")
    refused(invoke("bench", "report", str(out)), 2, "results.jsonl line 2",
            "'test_accuracy' is missing")
    (out / "results.jsonl").write_text("[1, 2]\n" + json.dumps(good) + "\n")
    refused(invoke("bench", "report", str(out)), 2, "results.jsonl line 1", "not a JSON object")
