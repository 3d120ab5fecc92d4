"""Issue 11, items 2-6: counted per-block costs, the layout planner (--split memory, --head,
--modules auto), the light head, per-module batch sizes (--batch-growth) and the profile's
recompute variants and breakdown."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from edgetrain.cli import app
from edgetrain.memory.breakdown import count_saved_activations
from edgetrain.memory.costs import NetworkCosts
from edgetrain.memory.layout import Layout, choose_num_modules, choose_split
from edgetrain.memory.planner import MemoryPlan, PhasePlan, plan_phase
from edgetrain.models.heads import AuxHead, LightHead, make_head
from edgetrain.models.network import build_head, build_module
from edgetrain.models.pooling import MatrixAvgPool2d
from edgetrain.models.resnet import resnet_spec
from edgetrain.models.split import plan_modules, split_network
from edgetrain.profiler.step_cost import greedy_step_cost
from edgetrain.records import RecordError

SMALL = ["--model", "resnet8", "--train-limit", "256", "--test-limit", "128", "--epochs", "1",
         "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def resnet8():
    spec = resnet_spec("resnet8", 1, (8, 16, 16))
    return spec, NetworkCosts.count(spec, 28, 10)


@pytest.fixture(scope="module")
def resnet20():
    spec = resnet_spec("resnet20", 1)
    return spec, NetworkCosts.count(spec, 28, 10)


@pytest.mark.parametrize("sizes", [[1, 2], [2, 1], [3]])
@pytest.mark.parametrize("head", ["dgl", "light"])
@pytest.mark.parametrize("tau", [1.0, float("inf")])
def test_counted_module_costs_match_what_autograd_keeps(resnet8, sizes, head, tau):
    """The counts the planner splits by, against saved_tensors_hooks on the real module and
    head at batch 16: input and state exactly; saved activations to within the loss's own
    saved tensors (log-probabilities and labels: under 1 KiB here), which are not counted."""
    spec, costs = resnet8
    for plan in plan_modules(spec, sizes, 28, [head] * len(sizes)):
        torch.manual_seed(0)
        module, aux = build_module(spec, plan), build_head(plan, 10)
        x = torch.randn(16, plan.in_channels, plan.in_size, plan.in_size)
        step = greedy_step_cost(module, aux, x, torch.randint(0, 10, (16,)), tau)
        count = costs.module_count(plan.start, plan.stop, head, 16)
        assert count.input_bytes == x.numel() * 4
        assert count.state_bytes == step.weights_bytes + step.grads_bytes + step.optimizer_bytes
        counted = count.saved_bytes + count.head_saved_bytes
        # The light head's averaging matrices (a few KiB): autograd keeps them by reference
        # (module attributes, no memory of their own) when the head's input needs a gradient,
        # as in this step and in training; the count runs the head on a detached input.
        matrices = sum(m.ph.numel() * 4 + m.pw.numel() * 4 for m in aux.modules()
                       if isinstance(m, MatrixAvgPool2d))
        assert counted + matrices == pytest.approx(step.saved_activation_bytes, abs=1024)
        assert count.total_bytes > count.floor_bytes > counted


def test_checkpointing_counts_less_for_a_module_of_several_blocks(resnet20):
    _, costs = resnet20
    plain, ckpt = costs.module_count(0, 5, "dgl", 64), costs.module_count(0, 5, "dgl", 64, True)
    assert ckpt.saved_bytes < plain.saved_bytes and ckpt.recompute_bytes > 0
    assert ckpt.total_bytes < plain.total_bytes


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_memory_split_is_never_worse_than_even_or_balanced(resnet20, k):
    spec, costs = resnet20
    peaks = {s: max(choose_split(spec, costs, k, 28, s, "dgl", 128).counted_peak_bytes)
             for s in ("even", "balanced", "memory")}
    assert peaks["memory"] <= min(peaks["even"], peaks["balanced"])
    layout = choose_split(spec, costs, k, 28, "memory", "dgl", 128)
    assert sum(layout.sizes) == len(spec.blocks) and len(layout.sizes) == k
    assert "memory split" in layout.reason and "even split" in layout.reason


def test_auto_heads_go_light_only_where_the_dgl_head_decides_the_peak(resnet20):
    spec, costs = resnet20
    auto = choose_split(spec, costs, 4, 28, "memory", "auto", 128)
    light = choose_split(spec, costs, 4, 28, "memory", "light", 128)
    dgl = choose_split(spec, costs, 4, 28, "memory", "dgl", 128)
    assert max(auto.counted_peak_bytes) == max(light.counted_peak_bytes)
    assert max(auto.counted_peak_bytes) < max(dgl.counted_peak_bytes)
    assert "light" in auto.heads and "dgl" in auto.heads  # mixed at this size
    best = max(auto.counted_peak_bytes)
    for (start, stop), head in zip(_bounds(auto.sizes), auto.heads):
        with_dgl = costs.module_bytes(start, stop, "dgl", 128)
        assert (head == "light") == (with_dgl > best)
    assert "light head on module" in auto.reason


def _bounds(sizes):
    start = 0
    for size in sizes:
        yield start, start + size
        start += size


def test_light_head_pools_first_and_keeps_the_dgl_heads_parameters():
    dgl, light = AuxHead(16, 10), LightHead(16, 10, in_size=28)
    assert {k: v.shape for k, v in dgl.state_dict().items()} == \
        {k: v.shape for k, v in light.state_dict().items()}
    x = torch.randn(4, 16, 28, 28)
    assert light(x).shape == dgl(x).shape == (4, 10)
    saved = [count_saved_activations(lambda h=h: h(x), [*h.parameters(), x])[1]
             for h in (dgl, light)]
    assert saved[1] < saved[0] / 5  # 8x8 of 28x28 positions
    assert isinstance(make_head("light", 16, 10, 7).shrink, torch.nn.Identity)
    with pytest.raises(ValueError, match="unknown head"):
        make_head("tiny", 16, 10, 7)


@pytest.mark.parametrize("size", [28, 14, 9])
def test_light_heads_pool_is_pytorchs_adaptive_average(size):
    """The light head's shrink runs as two matrix products (3x faster on the CPU) but must stay
    PyTorch's adaptive average, overlapping windows included: a light head trained before it
    changed loads the same weights and must give the same outputs and input gradients."""
    torch.manual_seed(0)
    light = LightHead(16, 10, in_size=size)
    reference = copy.deepcopy(light)
    reference.shrink = torch.nn.AdaptiveAvgPool2d(8)
    x = torch.randn(6, 16, size, size)
    outputs, grads = [], []
    for head in (light, reference):
        xi = x.clone().requires_grad_(True)
        y = head(xi)
        y.square().sum().backward()
        outputs.append(y.detach())
        grads.append(xi.grad)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    # Weight gradients sum over every sample and position, in another order: float32 rounding
    # of a few 1e-6 (seen: 3e-6 on a conv weight gradient).
    for a, b in zip(light.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    assert light.state_dict().keys() == AuxHead(16, 10).state_dict().keys()


def test_modules_auto_takes_the_smallest_k_that_fits(resnet20):
    """``--modules auto`` with the probes replaced by a verdict on the counts: the first K
    whose every module fits wins; the reason lists the K tried before."""
    spec, costs = resnet20
    limit = 80 * 2**20
    seen = []

    def verdict(plans, order):
        seen.append(len(plans))
        needs = [costs.module_bytes(p.start, p.stop, p.head, 128) for p in plans]
        return max(needs) <= limit, max(needs), f"largest {max(needs)}"

    layout = choose_num_modules(spec, costs, 28, "memory", "dgl", 128, verdict)
    assert max(layout.counted_peak_bytes) <= limit
    smaller = choose_split(spec, costs, layout.num_modules - 1, 28, "memory", "dgl", 128)
    assert max(smaller.counted_peak_bytes) > limit
    assert seen == list(range(1, layout.num_modules + 1))
    assert layout.modules_reason.startswith(f"K={layout.num_modules} chosen because it is the "
                                            "smallest K")
    assert [c["fits"] for c in layout.candidates] == [False] * (len(seen) - 1) + [True]


def test_modules_auto_without_a_fit_keeps_the_k_that_needs_least(resnet20):
    spec, costs = resnet20
    tried = []

    def verdict(plans, order):  # nothing fits; the need stops falling at K = 5
        tried.append(len(plans))
        need = max(costs.module_bytes(p.start, p.stop, p.head, 128) for p in plans)
        return False, need, "too big"

    layout = choose_num_modules(spec, costs, 28, "memory", "dgl", 128, verdict)
    assert layout.num_modules == 5 and tried == [1, 2, 3, 4, 5, 6, 7, 8]
    assert "no K fits" in layout.modules_reason


def test_layout_round_trips_through_plan_json_and_refuses_a_bad_one(resnet8, tmp_path):
    spec, costs = resnet8
    layout = choose_split(spec, costs, 2, 28, "memory", "auto", 64)
    record = json.loads(json.dumps(layout.as_dict()))
    assert Layout.from_dict(record, tmp_path / "plan.json", 3) == layout
    with pytest.raises(RecordError, match="layout"):
        Layout.from_dict({**record, "sizes": [1, 1]}, tmp_path / "plan.json", 3)
    with pytest.raises(RecordError, match="layout"):
        Layout.from_dict({**record, "heads": ["dgl", "huge"]}, tmp_path / "plan.json", 3)


def test_batch_growth_doubles_while_the_line_fits():
    line = (100, 1.0, [])
    grown = plan_phase("m", None, 16, 100 + 70, None, line=line, growth=8)
    assert (grown.batch_size, grown.micro_batch, grown.accumulation) == (64, 64, 1)
    assert plan_phase("m", None, 16, 10**6, None, line=line, growth=8).batch_size == 128
    assert plan_phase("m", None, 16, 10**6, None, line=line, growth=8,
                      max_batch=40).batch_size == 32
    assert plan_phase("m", None, 16, 10**6, None, line=line).batch_size == 16
    # Too tight for the batch itself: micro-batches at the requested batch, no growth.
    tight = plan_phase("m", None, 16, 100 + 10, None, line=line, growth=8)
    assert tight.batch_size == 16 and tight.micro_batch < 16


def test_a_recorded_plan_with_grown_batches_reads_back_only_with_that_growth(tmp_path):
    phase = PhasePlan("module 1", 64, 64, 1, False, 100, 1.0, 164, [[8, 108], [32, 132]])
    plan = MemoryPlan(10**9, 9 * 10**8, 0.1, "test", [phase], 0.1)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan.as_dict()))
    assert MemoryPlan.read(path, 1, 16, growth=4).phases[0].batch_size == 64
    with pytest.raises(RecordError, match="batch_size"):
        MemoryPlan.read(path, 1, 16, growth=2)


@pytest.mark.parametrize("args,needles", [
    (["--modules", "auto"], ["--modules auto", "--memory-budget"]),
    (["--modules", "auto", "--method", "e2e", "--memory-budget", "50GB"], ["--modules auto"]),
    (["--modules", "auto", "--mode", "parallel", "--memory-budget", "50GB"],
     ["--modules auto", "--mode sequential"]),
    (["--modules", "two"], ["--modules 'two'"]),
    (["--head", "tiny", "--split", "greedy"], ["--head 'tiny'", "--split 'greedy'"]),
    (["--batch-growth", "3"], ["--batch-growth must be a power of 2"]),
    (["--batch-growth", "2"], ["--batch-growth", "--memory-budget"]),
    (["--batch-growth", "2", "--memory-budget", "50GB", "--mode", "parallel"],
     ["--batch-growth applies"]),
])
def test_new_flags_are_checked_before_anything_runs(tmp_path, args, needles):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["fit", *SMALL, "-K", "2", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, text
    assert not out.exists()


def test_fit_with_modules_auto_light_heads_and_batch_growth(tmp_path):
    """The real planner end to end: K chosen under the budget and said why, the light heads
    recorded and rebuilt from model.json (the stitched network scores the reported accuracy),
    the grown batch trained at the scaled lr, and --resume keeping the layout."""
    out = tmp_path / "run"
    args = ["fit", *SMALL, "--modules", "auto", "--memory-budget", "50GB", "--head", "light",
            "--batch-growth", "2", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "edgetrain", *args], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "modules: K=1 chosen because it is the smallest K" in proc.stdout
    layout = json.loads((out / "plan.json").read_text())["layout"]
    assert layout["sizes"] == [3] and layout["heads"] == ["light"]
    report = json.loads((out / "report.json").read_text())
    assert report["num_modules"] == 1 and report["heads"] == ["light"]
    module = report["modules"][0]
    # 256 training images, batch 128, growth 2: the whole set in one batch, lr doubled.
    assert module["batch_size"] == 256 and module["lr"] == pytest.approx(0.1)
    assert json.loads((out / "model.json").read_text())["heads"] == ["light"]

    from edgetrain.data import iterate_batches, load_dataset, normalize
    from edgetrain.models.network import build_network
    from edgetrain.runs.model import ModelInfo
    from edgetrain.runs.weights import load_weights

    info = ModelInfo.read(out / "model.json")
    network = build_network(info.spec(), info.plans(), info.num_classes)
    assert isinstance(network.head, LightHead)
    network.load_state_dict(load_weights(out / "model.safetensors"))
    network.eval()
    data = load_dataset("fashion-mnist-mini", train_limit=256, test_limit=128, seed=0)
    with torch.no_grad():
        correct = sum(int((network(normalize(x, data.info)).argmax(1) == y).sum())
                      for x, y in iterate_batches(data.test, 64, shuffle=False))
    assert correct / len(data.test) == pytest.approx(report["test_accuracy"])

    again = subprocess.run([sys.executable, "-m", "edgetrain", *args, "--resume"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads((out / "plan.json").read_text())["layout"] == layout


def test_fit_reports_the_memory_split_and_its_reason(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["fit", *SMALL, "-K", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    spec = resnet_spec("resnet8", 1)
    costs = NetworkCosts.count(spec, 28, 10, need_transport=True)  # as fit counts for TRGL
    expected = choose_split(spec, costs, 2, 28, "memory", "dgl", 128)
    info = json.loads((out / "model.json").read_text())
    sizes = [b - a for a, b in info["modules"]]
    assert sizes == list(expected.sizes)
    assert sizes != [p.num_blocks for p in split_network(spec, 2, 28)]  # not the even split
    report = json.loads((out / "report.json").read_text())
    assert report["split"] == "memory" and report["layout_reason"] == expected.reason
    assert "split: memory split" in " ".join(result.output.split())


def test_profile_recompute_variants_and_breakdown(tmp_path):
    """Module-wise plus recompute as profile variants, each with its counted floor, its
    tensor-level peak and the breakdown of its peak phase."""
    proc = subprocess.run([sys.executable, "-m", "edgetrain", "profile", "--model", "resnet8",
                           "--widths", "8,16,16", "--dataset", "fashion-mnist-mini",
                           "--batch-size", "32", "-K", "2", "--steps", "2", "--threads", "1",
                           "--only", "vanilla-seq", "--only", "vanilla-seq-ckpt",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "where the peak goes" in proc.stdout
    plain, ckpt = json.loads((tmp_path / "profile.json").read_text())["results"]
    assert (plain["checkpointing"], ckpt["checkpointing"]) == (False, True)
    assert plain["module_sizes"] == [1, 2] and len(plain["phases"]) == 2
    for r in (plain, ckpt):
        parts = r["breakdown"]
        assert r["tensor_peak_bytes"] > 0 and r["floor_bytes"] > 0
        assert parts["state_bytes"] > 0 and parts["saved_bytes"] > 0
    assert ckpt["breakdown"]["recompute_bytes"] > 0 == plain["breakdown"]["recompute_bytes"]
