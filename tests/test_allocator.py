"""The CPU allocation policy (edgetrain/memory/allocator.py) is process-wide, so every test here
looks at a real subprocess: what `edgetrain fit` and the profile worker ran under, and the
fallback when the policy's malloc is not there. Speed is the benchmark's business
(benchmarks/alloc_policies.py), not the tests'."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgetrain.memory import allocator

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "resnet8", "--widths", "8,16,16", "--modules", "2", "--epochs", "1",
        "--train-limit", "600", "--test-limit", "300", "--batch-size", "64", "--threads", "1",
        "--no-progress"]
MiB = 2**20


def _env(**extra) -> dict[str, str]:
    """This environment without a policy or preload of its own, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", allocator.POLICY_ENV, allocator._RELAUNCHED_ENV)}
    return {**env, **extra}


def _fit(out: Path, *flags: str, **env: str) -> dict:
    """`python -m edgetrain fit`, through the real launcher, in its own process."""
    proc = subprocess.run([sys.executable, "-m", "edgetrain", "fit", *TINY, "--out", str(out),
                           *flags], capture_output=True, text=True, timeout=600, env=_env(**env))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "report.json").read_text())


def _expected(mode: str | None = None, checkpointing: bool = False,
              budgeted: bool = False) -> tuple[str, str]:
    """(policy, malloc) a fresh `edgetrain fit` in ``mode`` should run under on this machine."""
    if allocator._nvidia_device_present():
        return allocator.CUDA_POLICY, "glibc"
    if (mode == "parallel" or checkpointing) and not budgeted:
        return allocator.MIXED_SHAPES_POLICY, "glibc"
    default = allocator.POLICIES[allocator.DEFAULT_POLICY]
    if allocator.find_library(default.preload) is None:
        return allocator.FALLBACK_POLICY, "glibc"
    return default.name, default.malloc


def test_fit_runs_under_the_default_policy_and_its_probes_too(tmp_path):
    """The launcher preloads the default malloc where it is installed (CI installs it); the
    planner's probes run in the same process, after the policy is set, so the prediction
    holds for training."""
    report = _fit(tmp_path / "run", "--memory-budget", "4GB")
    policy, malloc = _expected("sequential")
    state = report["allocator"]
    assert (state["policy"], state["malloc"], state["in_effect"]) == (policy, malloc, True), state
    for phase in report["phases"]:
        if phase["predicted_peak_bytes"]:
            assert phase["measured_peak_bytes"] == pytest.approx(phase["predicted_peak_bytes"],
                                                                 rel=0.10), phase


@pytest.mark.parametrize("flags", [["--mode", "parallel"], ["--activation-checkpointing"]])
def test_parallel_mode_and_checkpointing_keep_the_128k_threshold(tmp_path, flags):
    """Both peaked over 3% higher under tcmalloc: without a budget to hold the heap to, the
    launcher does not preload it."""
    report = _fit(tmp_path / "run", *flags)
    state = report["allocator"]
    expected = _expected(flags[1] if flags[0] == "--mode" else "sequential",
                         flags[0] == "--activation-checkpointing")
    assert (state["policy"], state["malloc"], state["in_effect"]) == (*expected, True), state


@pytest.mark.parametrize("flags", [["--mode", "parallel"], ["--activation-checkpointing"]])
def test_with_a_budget_parallel_mode_and_checkpointing_run_held_under_tcmalloc(tmp_path, flags):
    """With --memory-budget the heap is held to the budget, which fragmentation then cannot
    cross: the launcher preloads tcmalloc in every mode, and the run says it was held."""
    report = _fit(tmp_path / "run", *flags, "--memory-budget", "4GB")
    state = report["allocator"]
    expected = _expected(flags[1] if flags[0] == "--mode" else "sequential",
                         flags[0] == "--activation-checkpointing", budgeted=True)
    assert (state["policy"], state["malloc"], state["in_effect"]) == (*expected, True), state
    assert report["heap_held_to_budget"] is (state["malloc"] == "tcmalloc")


def test_only_a_one_process_budgeted_fit_counts_as_budgeted():
    """What the launcher reads from a command line, before anything is imported."""
    assert allocator._budgeted_fit(["fit", "--memory-budget", "2GB"])
    assert allocator._budgeted_fit(["fit", "--memory-budget=50%", "--mode", "parallel"])
    assert allocator._budgeted_fit(["fit", "--device-profile", "jetson-nano-4gb"])
    assert not allocator._budgeted_fit(["fit", "--mode", "parallel"])
    assert not allocator._budgeted_fit(["fit", "--memory-budget", "2GB", "--distributed"])
    assert not allocator._budgeted_fit(["profile", "--memory-budget", "2GB"])


def test_fit_falls_back_when_the_policy_malloc_is_not_installed(tmp_path):
    """A policy whose library is missing must not stop a run: glibc with the 128 KiB
    threshold takes over, and the report says why."""
    missing = next((p for p in allocator.POLICIES.values()
                    if p.preload and allocator.find_library(p.preload) is None), None)
    if missing is None:
        pytest.skip("every optional malloc is installed here: nothing is missing")
    report = _fit(tmp_path / "run", **{allocator.POLICY_ENV: missing.name})
    state = report["allocator"]
    assert state["requested"] == missing.name
    assert (state["policy"], state["malloc"], state["in_effect"]) == ("mmap-128k", "glibc", True)
    assert "not installed" in state["note"]


def test_mmap_threshold_is_in_effect_where_the_malloc_was_not_preloaded():
    """Inside a process nobody preloaded (a notebook, a test runner), apply() falls back to
    glibc with the 128 KiB threshold, and glibc really serves a freed-and-reallocated 1 MiB
    block with its own mapping (mallinfo2's hblkhd), where its default would reuse the heap."""
    code = """if True:
        import ctypes, json, torch
        from edgetrain.memory import allocator
        state = allocator.apply("cpu")

        class Mallinfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                        "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = Mallinfo2
        block = torch.ones(2**18)  # 1 MiB
        del block
        block = torch.ones(2**18)
        print(json.dumps({**state.as_dict(), "mapped": libc.mallinfo2().hblkhd}))
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=_env(**{allocator.POLICY_ENV: allocator.DEFAULT_POLICY}))
    assert proc.returncode == 0, proc.stderr
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (state["policy"], state["malloc"], state["in_effect"]) == ("mmap-128k", "glibc", True)
    assert state["mapped"] >= MiB


def test_profile_workers_run_under_the_policy_fit_runs_under(tmp_path):
    """`edgetrain profile` through the real launcher (preloaded itself, where tcmalloc is
    installed): each worker still gets the policy of its own method and mode."""
    proc = subprocess.run([sys.executable, "-m", "edgetrain", "profile", "--model", "resnet8",
                           "--widths", "8,16,16", "--dataset", "fashion-mnist-mini",
                           "--batch-size", "32", "-K", "2", "--steps", "2", "--threads", "1",
                           "--only", "e2e", "--only", "e2e-ckpt", "--only", "trgl-par",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "profile.json").read_text())["results"]
    expected = [_expected(), _expected(checkpointing=True), _expected("parallel")]
    for result, (policy, malloc) in zip(results, expected, strict=True):
        state = result["allocator"]
        assert (state["policy"], state["malloc"], state["in_effect"]) == (policy, malloc,
                                                                          True), state


def test_every_policy_names_a_known_malloc_and_cuda_keeps_the_old_one():
    for policy in allocator.POLICIES.values():
        assert policy.malloc in ("glibc", "jemalloc", "mimalloc", "tcmalloc")
        assert (policy.preload is None) == (policy.malloc == "glibc"), policy.name
    assert allocator.CUDA_POLICY == allocator.FALLBACK_POLICY == "mmap-128k"
    assert allocator.MIXED_SHAPES_POLICY == "mmap-128k"



@pytest.mark.parametrize("hold", [True, False])
def test_a_held_heap_gives_free_pages_back_and_refuses_what_the_budget_cannot_hold(hold):
    """tcmalloc held to a budget of 64 MiB over what the process has: a 40 MiB buffer that
    fits in no free hole takes fresh pages only after the holes went back to the OS (the
    peak stays within the budget, where unheld it takes both), and 100 MiB is refused with
    torch's "can't allocate memory" instead of going over; lifted, the limit is gone."""
    library = allocator.find_library(allocator.POLICIES["tcmalloc"].preload)
    if library is None:
        pytest.skip("tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "heap_hold.py"),
                           "--hold" if hold else "--no-hold"], capture_output=True, text=True,
                          timeout=120, env=_env(LD_PRELOAD=library))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["malloc"] == "tcmalloc"
    if hold:
        assert result["held"] is not None and result["held"] > 64 * MiB
        assert 40 * MiB < result["peak"] <= 64 * MiB, result
        assert "can't allocate memory" in result["refused"]
    else:
        assert result["peak"] > 80 * MiB, result  # the holes and the new buffer, both
        assert result["refused"] is None


def test_hold_needs_tcmalloc_and_can_be_turned_off():
    """Under glibc (this test process unless preloaded) nothing is held; EDGETRAIN_HOLD_HEAP=0
    turns the hold off where tcmalloc serves the process."""
    library = allocator.find_library(allocator.POLICIES["tcmalloc"].preload)
    code = ("from edgetrain.memory import allocator; "
            "print(allocator.can_hold_heap(), allocator.hold_heap_to(2**40, 0) is not None)")
    glibc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120, env=_env())
    assert glibc.stdout.split() == ["False", "False"], glibc.stderr
    if library is None:
        pytest.skip("tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
    for value, expected in (("1", "True"), ("0", "False")):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120,
                              env=_env(LD_PRELOAD=library, **{allocator.HOLD_ENV: value}))
        assert proc.stdout.split()[0] == expected, proc.stderr
