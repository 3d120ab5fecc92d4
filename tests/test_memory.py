"""The meter, budget parsing, the step breakdown, the planner and the guard."""

import json

import pytest
import torch
from typer.testing import CliRunner

from edgetrain.cli import app
from edgetrain.errors import UserInputError
from edgetrain.memory.breakdown import count_saved_activations
from edgetrain.memory.meter import MemoryMeter
from edgetrain.memory.planner import BudgetError, budget_for, make_plan
from edgetrain.models.network import build_head, build_module, set_transport_form
from edgetrain.models.resnet import resnet_spec
from edgetrain.models.split import split_network
from edgetrain.profiler.step_cost import greedy_step_cost
from edgetrain.training.steps import greedy_step, make_optimizer
from edgetrain.units import MemorySize

MiB = 2**20

TINY = ["--model", "resnet8", "--widths", "8,16,16", "--modules", "2", "--epochs", "1",
        "--train-limit", "600", "--test-limit", "300", "--batch-size", "64", "--threads", "1",
        "--no-progress"]


@pytest.mark.parametrize("text,expected", [
    ("2GB", 2 * 10**9), ("1.5GiB", 3 * 2**29), ("512MB", 512 * 10**6),
    ("2000000000", 2 * 10**9), ("300 MiB", 300 * 2**20), ("1gb", 10**9), ("64KiB", 65536),
])
def test_budget_parsing(text, expected):
    assert MemorySize.parse(text).bytes == expected


@pytest.mark.parametrize("text", ["", "GB", "2 GBs", "-1GB", "0", "two GB", "1e9", "2 G B",
                                  "nan", "1.5.2GB"])
def test_budget_parsing_rejects(text):
    with pytest.raises(UserInputError, match="--memory-budget"):
        MemorySize.parse(text)


def test_cpu_meter_sees_a_200mb_tensor():
    meter = MemoryMeter(torch.device("cpu"))
    meter.reset()
    before = meter.read().peak_bytes
    block = torch.ones(50_000_000)  # 200 MB of float32, touched by the fill
    grown = meter.read().peak_bytes - before
    del block
    # Tolerance 5%: the allocation itself plus page-table and allocator slack.
    assert grown == pytest.approx(200_000_000, rel=0.05), meter.description
    meter.reset()
    assert meter.read().peak_bytes < before + 100_000_000  # the reset forgot the old peak


def test_saved_activation_count_is_exact_for_a_linear_layer():
    lin = torch.nn.Linear(100, 50)
    x = torch.randn(32, 100)
    _, saved = count_saved_activations(lambda: lin(x).relu().sum(), list(lin.parameters()))
    # addmm keeps its input (32x100 floats) for the weight gradient; relu keeps its output.
    assert saved == (32 * 100 + 32 * 50) * 4


def test_breakdown_of_a_module_step():
    spec = resnet_spec("resnet8", 1, (8, 16, 16))
    plan = split_network(spec, 2, 28)[0]
    module, head = build_module(spec, plan), build_head(plan, 10)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    with_penalty = greedy_step_cost(module, head, x, y, tau=1.0)
    module.zero_grad(), head.zero_grad()
    without = greedy_step_cost(module, head, x, y, tau=float("inf"))
    params = sum(p.numel() * 4 for p in (*module.parameters(), *head.parameters()))
    assert with_penalty.grads_bytes == params == with_penalty.optimizer_bytes
    assert with_penalty.input_bytes == 16 * 28 * 28 * 4 + 16 * 8
    # The penalty in the BatchNorm form keeps nothing more than vanilla greedy; in the direct
    # form it keeps each block's residue for backward.
    assert with_penalty.saved_activation_bytes == without.saved_activation_bytes > 0
    set_transport_form(module, "direct")
    module.zero_grad(), head.zero_grad()
    direct = greedy_step_cost(module, head, x, y, tau=1.0)
    with torch.no_grad():  # each block's r has the shape of the block's output
        h, residues = module.stem(x), 0
        for block in module.blocks:
            h, _ = block(h)
            residues += h.numel() * 4
    assert direct.saved_activation_bytes == without.saved_activation_bytes + residues


def test_micro_batches_give_the_same_update():
    """Gradient accumulation over micro-batches equals the whole-batch step (BN in eval mode,
    where it does not depend on the batch)."""
    spec = resnet_spec("resnet8", 1, (8, 16, 16))
    plan = split_network(spec, 1, 12)[0]
    torch.manual_seed(0)
    a, ha = build_module(spec, plan).eval(), build_head(plan, 10).eval()
    b, hb = build_module(spec, plan).eval(), build_head(plan, 10).eval()
    b.load_state_dict(a.state_dict()), hb.load_state_dict(ha.state_dict())
    x, y = torch.randn(12, 1, 12, 12), torch.randint(0, 10, (12,))
    for model, head, micro in ((a, ha, None), (b, hb, 4)):
        opt, _ = make_optimizer([*model.parameters(), *head.parameters()], 0.1, 0.9, 5e-4, 1)
        out, numbers = greedy_step(model, head, x, y, 1.0, 0.0, opt, micro)
        assert out.shape[0] == 12
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _module_phase(batch_size=64):
    from edgetrain.training.probes import module_prober
    from edgetrain.training.scheduler import Context

    spec = resnet_spec("resnet8", 1, (8, 16, 16))
    plans = split_network(spec, 2, 28)

    class Data:  # only what a module prober reads
        class info:
            num_classes = 10

    class Config:
        lr, momentum, weight_decay, lr_schedule = 0.05, 0.9, 5e-4, "cosine"

    ctx = Context.__new__(Context)
    ctx.__dict__.update(config=Config, data=Data, spec=spec, plans=plans, taus=[0.5, 1.0],
                        device=torch.device("cpu"))
    return [("module 1", module_prober(ctx, 0))]


def test_planner_keeps_the_batch_when_it_fits_and_shrinks_it_when_not():
    meter = MemoryMeter(torch.device("cpu"))
    roomy = make_plan(_module_phase(), 64, 50 * 10**9, meter)
    phase = roomy.phases[0]
    assert (phase.micro_batch, phase.accumulation, phase.checkpointing) == (64, 1, False)
    assert phase.per_sample_bytes > 0 and phase.fixed_bytes > 0
    # A budget with room for about a quarter of the batch's activations.
    tight = int((phase.fixed_bytes + phase.per_sample_bytes * 16) / 0.9)
    planned = make_plan(_module_phase(), 64, tight, meter).phases[0]
    assert planned.micro_batch < 64 and planned.accumulation > 1
    assert planned.micro_batch * planned.accumulation >= 64
    assert planned.predicted_peak_bytes <= tight * 0.9


def test_planner_refuses_an_impossible_budget_with_the_named_error():
    meter = MemoryMeter(torch.device("cpu"))
    with pytest.raises(BudgetError) as err:
        make_plan(_module_phase(), 64, 300 * 10**6, meter, framework_bytes=500 * 10**6,
                  budget_text="300MB")
    message = str(err.value)
    assert "--memory-budget 300MB" in message and "module 1 needs at least" in message
    assert "framework alone" in message


def _fit_subprocess(out, *flags, model=None):
    """`edgetrain fit` in its own process: a clean peak, free of what other tests left behind.
    ``model``: the fit flags of the network and data (default TINY)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "edgetrain", "fit", *(model or TINY), "--out",
                           str(out), *flags], capture_output=True, text=True, timeout=600)


def test_fit_under_a_tight_budget_stays_under_it(tmp_path):
    """Learn the run's costs from a roomy plan, then ask for a budget that forces
    micro-batches: the run must plan them, and its measured peak must stay within it."""
    roomy = tmp_path / "roomy"
    proc = _fit_subprocess(roomy, "--memory-budget", "50GB")
    assert proc.returncode == 0, proc.stderr
    phases = json.loads((roomy / "plan.json").read_text())["phases"]
    assert [p["micro_batch"] for p in phases] == [64, 64]
    # Room for ~24 of module 1's 64 samples of activations (the costlier module) over its
    # fixed cost, which holds the framework, the data and the weights, after the margin the
    # planner keeps (smaller where tcmalloc's heap is held to the budget).
    first, roomy_report = phases[0], json.loads((roomy / "report.json").read_text())
    budget = budget_for(int(first["fixed_bytes"] + first["per_sample_bytes"] * 24),
                        roomy_report["framework_baseline_bytes"],
                        roomy_report["heap_held_to_budget"])
    out = tmp_path / "run"
    proc = _fit_subprocess(out, "--memory-budget", str(budget))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert (out / "plan.json").exists()
    assert report["memory_plan"]["phases"][0]["micro_batch"] < 64
    assert report["budget_exceeded"] is False
    assert all(p["measured_peak_bytes"] <= budget for p in report["phases"])
    assert report["test_accuracy"] > 0.2
    # Under tcmalloc (CI installs it) the heap was held to the budget, and the limit left
    # room for what the process had resident outside the heap.
    held = report["allocator"]["malloc"] == "tcmalloc"
    assert report["heap_held_to_budget"] is held
    assert (report["heap_limit_bytes"] is not None) is held
    if held:
        assert 0 < report["heap_limit_bytes"] < budget


def test_impossible_budget_stops_before_training(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["fit", *TINY, "--out", str(out), "--memory-budget",
                                      "100MB"])
    assert result.exit_code == 5
    assert "--memory-budget 100MB" in result.output and "module 1" in result.output
    assert not out.exists()  # nothing was written: there was nothing to keep


def test_fit_keeps_the_long_lived_heap_out_of_each_collection_and_hands_it_back(
        tmp_path, monkeypatch):
    """The collection before every phase skips what existed before training (gc.freeze); a
    program that called the library gets its collector back whole, cycles made before the
    call included."""
    import gc
    import weakref

    from edgetrain import api

    class Node:
        pass

    cycle = Node()  # alive while fit runs (so frozen with the rest), garbage after it
    cycle.self = cycle
    gone = weakref.ref(cycle)

    seen: list[int] = []
    real_reset = MemoryMeter.reset

    def reset(self, release=True):
        seen.append(gc.get_freeze_count())
        real_reset(self, release)

    monkeypatch.setattr(MemoryMeter, "reset", reset)
    try:
        api.fit(model="resnet8", widths=(4, 8, 8), modules=2, epochs=1, train_limit=64,
                test_limit=32, batch_size=32, threads=1, method="trgl", mode="sequential",
                out=tmp_path / "run")
        frozen_after = gc.get_freeze_count()
        del cycle  # a reference cycle: only the collector frees it, and only if unfrozen
        gc.collect()
        freed = gone() is None
    finally:
        gc.unfreeze()  # whatever happened, the rest of the test session is not frozen
    assert seen and all(count > 0 for count in seen)  # every phase ran with the heap frozen
    assert frozen_after == 0 and freed


WIDE = ["--model", "resnet8", "--widths", "64,64,64", "--modules", "2", "--epochs", "1",
        "--train-limit", "256", "--test-limit", "128", "--batch-size", "64", "--threads", "1",
        "--no-progress"]
"""Wide enough that a batch of 64 holds over 100 MiB of activations: far more than any margin."""


def test_a_run_held_to_its_budget_stops_with_the_budget_named_and_loses_nothing(tmp_path):
    """A plan that does not fit the budget (plan.json changed by hand to full batches, which a
    resumed run trains by) meets tcmalloc's heap held to the budget: training stops with exit
    4 and an error naming --memory-budget and how to go on, everything written is kept, and
    the run then finishes with --resume and a larger budget."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def fit(out, *flags):
        return _fit_subprocess(out, *flags, model=WIDE)

    roomy = fit(tmp_path / "roomy", "--memory-budget", "50GB")
    assert roomy.returncode == 0, roomy.stderr
    report = json.loads((tmp_path / "roomy" / "report.json").read_text())
    if not report["heap_held_to_budget"]:
        pytest.skip("tcmalloc is not installed here: nothing holds the heap "
                    "(apt-get install libtcmalloc-minimal4)")
    first = json.loads((tmp_path / "roomy" / "plan.json").read_text())["phases"][0]
    assert first["per_sample_bytes"] * 64 > 100 * MiB
    budget = budget_for(int(first["fixed_bytes"] + first["per_sample_bytes"] * 16),
                        report["framework_baseline_bytes"], True)

    # Start the budgeted run and stop it as soon as its plan is written.
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "edgetrain", "fit", *WIDE, "--out", str(out),
                             "--memory-budget", str(budget)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if (out / "plan.json").exists():
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    plan = json.loads((out / "plan.json").read_text())
    assert all(p["micro_batch"] < 64 for p in plan["phases"])  # the planner needed micro-batches
    for p in plan["phases"]:
        p.update(micro_batch=64, accumulation=1)
    (out / "plan.json").write_text(json.dumps(plan))
    before = {p.relative_to(out) for p in out.rglob("*")}

    held = fit(out, "--memory-budget", str(budget), "--resume")
    assert held.returncode == 4, held.stdout + held.stderr
    message = " ".join((held.stdout + held.stderr).split())
    assert f"--memory-budget {budget}" in message and "--resume" in message
    assert "Traceback" not in held.stdout + held.stderr
    assert before <= {p.relative_to(out) for p in out.rglob("*")}  # nothing removed
    stopped = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if '"stopped"' in line]
    assert stopped and "can't allocate memory" in stopped[-1]["reason"]

    done = fit(out, "--resume", "--allow-changes", "memory-budget", "--memory-budget", "50GB")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((out / "report.json").read_text())["test_accuracy"] > 0
