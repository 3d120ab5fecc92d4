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


def _expected(mode: str | None = None, checkpointing: bool = False) -> tuple[str, str]:
    """(policy, malloc) a fresh `edgetrain fit` in ``mode`` should run under on this machine."""
    if allocator._nvidia_device_present():
        return allocator.CUDA_POLICY, "glibc"
    if mode == "parallel" or checkpointing:
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
    """Both peaked over 3% higher under tcmalloc: the launcher does not preload it."""
    report = _fit(tmp_path / "run", *flags)
    state = report["allocator"]
    expected = _expected(flags[1] if flags[0] == "--mode" else "sequential",
                         flags[0] == "--activation-checkpointing")
    assert (state["policy"], state["malloc"], state["in_effect"]) == (*expected, True), state


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
