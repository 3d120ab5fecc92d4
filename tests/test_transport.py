"""The two forms of TRGL's transport penalty (edgetrain/models/energy.py): the BatchNorm form
gives the direct form's numbers and keeps no residue.

Exactness is checked in double precision: both forms are the same function of the weights, so
in float64 they agree to about 1e-13 and the 1e-6 bound leaves no room for a missing term. In
float32 the direct form's gradient reaches the BatchNorm input as a difference of nearly equal
numbers (BatchNorm's backward removes the part of 2r/n that lies along its output), so the two
forms agree only to float32 rounding amplified by that cancellation (about 1e-6 relative after
one step); a separate float32 test bounds that at 1e-4 over several steps.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from edgetrain.errors import UserInputError
from edgetrain.memory.breakdown import count_saved_activations
from edgetrain.models import energy
from edgetrain.models.energy import _batch_norm_with_stats, batchnorm_branch
from edgetrain.models.network import (
    build_head,
    build_module,
    set_checkpointing,
    set_transport_form,
)
from edgetrain.models.resnet import resnet_spec
from edgetrain.models.split import split_network
from edgetrain.profiler.step_cost import greedy_step_cost
from edgetrain.training.steps import greedy_step, make_optimizer

# ResNet-14 at small widths, cut in 3 modules of 2 blocks:
#   module 0: stem + 2 stride-1 blocks with identity shortcuts
#   module 1: a downsampling block (1x1 conv + BN shortcut) + a stride-1 block
#   module 2: the same at the last stage
SPEC = resnet_spec("resnet14", 1, (4, 8, 8))
PLANS = split_network(SPEC, 3, 8)
TAU = 0.5  # transport weight 1: the penalty weighs as much as the cross-entropy
STEPS = 3
BATCH = 12


def _randomise_batchnorms(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Scales and shifts away from (1, 0), so every term of the BatchNorm form is exercised,
    and running statistics away from (0, 1), so eval mode differs from batch statistics."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0.0, 0.3, generator=generator)
                m.running_mean.normal_(0.0, 0.5, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)


def _build(dtype: torch.dtype, small_variance: bool = False):
    """Modules and heads of SPEC, weights fixed by the seed."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    parts = []
    for plan in PLANS:
        module, head = build_module(SPEC, plan), build_head(plan, 10)
        _randomise_batchnorms(module, generator)
        if small_variance:
            # Branch variances near BatchNorm's eps (as with a small-gain init): there the
            # energy's gradient with respect to the BatchNorm input is not negligible.
            for block in module.blocks:
                block.conv2.weight.data.mul_(2e-3)
        parts.append((module.to(dtype).train(), head.to(dtype).train()))
    return parts


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude of the reference."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item()


def _train(parts, mode: str, form: str, micro_batch: int | None, recompute: bool,
           dtype: torch.dtype, steps: int = STEPS):
    """``steps`` greedy steps of every part with edgetrain's SGD; per step the loss and every
    parameter's gradient, and at the end every parameter and buffer."""
    parts = copy.deepcopy(parts)
    optimizers = []
    for module, head in parts:
        set_transport_form(module, form)
        set_checkpointing(module, recompute)
        optimizers.append(make_optimizer([*module.parameters(), *head.parameters()],
                                         lr=0.05, momentum=0.9, weight_decay=5e-4,
                                         total_steps=steps))
    generator = torch.Generator().manual_seed(2)
    log = []
    for _ in range(steps):
        x = torch.randn(BATCH, 1, 8, 8, generator=generator).to(dtype)
        y = torch.randint(0, 10, (BATCH,), generator=generator)
        record = {"loss": [], "transport": [], "grads": []}
        for k, ((module, head), (opt, sched)) in enumerate(zip(parts, optimizers)):
            if mode == "sequential":  # each module alone, on its own fixed-seed features
                shape = (BATCH, PLANS[k].in_channels, PLANS[k].in_size, PLANS[k].in_size)
                x = torch.randn(shape, generator=generator).to(dtype) if k else x
            out, sums = greedy_step(module, head, x, y, TAU, 0.1, opt, micro_batch)
            sched.step()
            record["loss"].append(float(sums["loss"]))
            record["transport"].append(float(sums["transport"]))
            record["grads"] += [p.grad.clone() for p in [*module.parameters(),
                                                         *head.parameters()]]
            x = out  # parallel: the next module trains on this one's detached output
        log.append(record)
    state = [t.clone() for module, head in parts
             for t in (*module.state_dict().values(), *head.state_dict().values())]
    return log, state


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute"])
@pytest.mark.parametrize("micro_batch", [None, 5], ids=["batch", "micro5"])
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_bn_form_equals_direct_form(mode, micro_batch, recompute):
    """Every block type (stem module, identity and downsampling blocks), both training modes,
    with micro-batches (each normalised with its own statistics) and with recompute: the
    BatchNorm form gives the direct form's loss and parameter gradients at every step, and the
    same weights and BatchNorm statistics after several SGD steps (float64, 1e-6 relative)."""
    parts = _build(torch.float64)
    bn_log, bn_state = _train(parts, mode, "bn", micro_batch, recompute, torch.float64)
    direct_log, direct_state = _train(parts, mode, "direct", micro_batch, recompute,
                                      torch.float64)
    for bn, direct in zip(bn_log, direct_log):
        assert min(bn["transport"]) > 0.1  # the penalty is there in every module
        assert bn["loss"] == pytest.approx(direct["loss"], rel=1e-6)
        assert len(bn["grads"]) == len(direct["grads"])
        for a, b in zip(bn["grads"], direct["grads"]):
            assert _rel(a, b) <= 1e-6
    for a, b in zip(bn_state, direct_state):
        assert a.dtype == b.dtype
        if a.is_floating_point():
            assert _rel(a, b) <= 1e-6
        else:  # num_batches_tracked: BatchNorm counted each (micro-)batch once
            assert torch.equal(a, b)
    assert not torch.equal(bn_state[0], parts[0][0].state_dict()["stem.conv.weight"])


def test_bn_form_is_exact_where_the_variance_is_small(monkeypatch):
    """Branch variances near eps, where the energy's gradient through the batch variance is
    not negligible: the BatchNorm form keeps it, so the gradients still agree. The check can
    fail: without that gradient term (z detached) they differ by far more than 1e-6."""
    module, head = _build(torch.float64, small_variance=True)[1]
    plan = PLANS[1]
    x = torch.randn(BATCH, plan.in_channels, plan.in_size, plan.in_size, dtype=torch.float64)
    y = torch.randint(0, 10, (BATCH,))

    def grads(form: str) -> list[torch.Tensor]:
        m, h = copy.deepcopy(module), copy.deepcopy(head)
        set_transport_form(m, form)
        out, transport = m(x)
        F.cross_entropy(h(out), y).add(transport / (2 * TAU)).backward()
        return [p.grad.clone() for p in m.parameters()]

    direct = grads("direct")
    assert max(_rel(a, b) for a, b in zip(grads("bn"), direct)) <= 1e-6
    exact = energy._BatchNormEnergy.apply
    monkeypatch.setattr(energy._BatchNormEnergy, "apply",
                        lambda z, *rest: exact(z.detach(), *rest))
    assert max(_rel(a, b) for a, b in zip(grads("bn"), direct)) > 1e-4


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_bn_form_matches_direct_form_in_float32(mode):
    """In float32, over several steps with micro-batches: within float32 rounding (1e-4)."""
    parts = _build(torch.float32)
    bn_log, bn_state = _train(parts, mode, "bn", 5, False, torch.float32)
    direct_log, direct_state = _train(parts, mode, "direct", 5, False, torch.float32)
    for bn, direct in zip(bn_log, direct_log):
        assert bn["loss"] == pytest.approx(direct["loss"], rel=1e-5)
        for a, b in zip(bn["grads"], direct["grads"]):
            assert _rel(a, b) <= 1e-4
    for a, b in zip(bn_state, direct_state):
        assert _rel(a.double(), b.double()) <= 1e-4


def test_identity_per_channel():
    """The fact the BatchNorm form rests on: per channel, mean over (N, H, W) of bn(z)^2 is
    gamma^2 var / (var + eps) + beta^2, var the biased batch variance."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(6).double()
    _randomise_batchnorms(bn, torch.Generator().manual_seed(0))
    z = torch.randn(5, 6, 7, 3, dtype=torch.float64) * torch.rand(6, 1, 1, dtype=torch.float64)
    r = bn(z)
    var = z.var(dim=(0, 2, 3), unbiased=False)
    expected = bn.weight**2 * var / (var + bn.eps) + bn.bias**2
    torch.testing.assert_close(r.pow(2).mean(dim=(0, 2, 3)), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
def test_batchnorm_with_stats_is_batchnorm(momentum):
    """The BatchNorm call the energy takes its statistics from gives bn(z)'s output and running
    statistics bit for bit (float32), also with a cumulative average (momentum None)."""
    torch.manual_seed(0)
    a = torch.nn.BatchNorm2d(4, momentum=momentum)
    _randomise_batchnorms(a, torch.Generator().manual_seed(0))
    b = copy.deepcopy(a)
    for _ in range(3):
        z = torch.randn(8, 4, 5, 5) * 3 + 1
        r, mean, invstd = _batch_norm_with_stats(b, z)
        assert torch.equal(r, a(z))
        torch.testing.assert_close(mean, z.mean(dim=(0, 2, 3)))
        torch.testing.assert_close(invstd, (z.var(dim=(0, 2, 3), unbiased=False) + a.eps)
                                   .rsqrt())
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        _batch_norm_with_stats(b, torch.randn(1, 4, 1, 1))


def test_eval_mode_uses_the_direct_form():
    """With BatchNorm in eval mode (running statistics) the batch-statistics identity does not
    hold: the block falls back to mean(r^2), which differs from the formula."""
    module, _ = _build(torch.float64)[0]
    module.eval()
    x = torch.randn(BATCH, 1, 8, 8, dtype=torch.float64)
    _, transport = module(x)
    expected, by_formula = 0.0, 0.0
    h = module.stem(x)
    for block in module.blocks:
        z = block.conv2(torch.relu(block.bn1(block.conv1(h))))
        r = block.bn2(z)
        expected += r.pow(2).mean()
        var = z.var(dim=(0, 2, 3), unbiased=False)
        by_formula += (block.bn2.weight**2 * var / (var + block.bn2.eps)
                       + block.bn2.bias**2).mean()
        h = torch.relu(block.shortcut(h) + r)
    transport, expected, by_formula = (float(t.detach()) for t in
                                       (transport, expected, by_formula))
    assert transport == pytest.approx(expected, rel=1e-12)
    assert abs(by_formula / expected - 1) > 1e-2


def test_bn_form_keeps_no_residue():
    """Saved activations (saved_tensors_hooks, each storage once): TRGL with the BatchNorm form
    keeps exactly what vanilla greedy keeps; the direct form one residue per block more. The
    analytic floor of `edgetrain profile` (greedy_step_cost) shows the same."""
    for (module, head), plan in zip(_build(torch.float32), PLANS):
        x = torch.randn(BATCH, plan.in_channels, plan.in_size, plan.in_size)

        def saved(form: str, need: bool, module=module, x=x) -> int:
            m = copy.deepcopy(module)
            set_transport_form(m, form)
            return count_saved_activations(lambda: m(x, need_transport=need),
                                           list(m.parameters()))[1]

        vanilla = saved("bn", False)
        residues = 0
        with torch.no_grad():
            h = module.stem(x) if module.stem is not None else x
            for block in module.blocks:
                h, _ = block(h)
                residues += h.numel() * h.element_size()  # r has the output's shape
        assert saved("bn", True) == vanilla
        assert saved("direct", True) == vanilla + residues
        y = torch.randint(0, 10, (BATCH,))
        floors = {}
        for form in ("bn", "direct"):
            m, h_ = copy.deepcopy(module), copy.deepcopy(head)
            set_transport_form(m, form)
            floors[form] = greedy_step_cost(m, h_, x, y, TAU).saved_activation_bytes
        floors["vanilla"] = greedy_step_cost(copy.deepcopy(module), copy.deepcopy(head), x, y,
                                             math.inf).saved_activation_bytes
        assert floors["bn"] == floors["vanilla"] == floors["direct"] - residues


def test_vanilla_computes_no_energy():
    """need_transport=False: no energy, no statistics call, transport 0."""
    module, _ = _build(torch.float32)[1]
    calls = []
    block = module.blocks[0]
    r, energy = batchnorm_branch(block.bn2, torch.randn(4, 8, 3, 3), False)
    assert energy is None and r.shape == (4, 8, 3, 3)
    block.bn2.register_forward_hook(lambda *a: calls.append(1))
    _, transport = module(torch.randn(4, 4, 8, 8), need_transport=False)
    assert float(transport) == 0.0 and calls == [1]  # the plain nn.BatchNorm2d call


def test_unknown_transport_form():
    module, _ = _build(torch.float32)[0]
    with pytest.raises(UserInputError, match="--transport-form"):
        set_transport_form(module, "fast")


def test_onnx_export_traces_the_direct_form(monkeypatch):
    """While torch.onnx.export traces, blocks compute mean(r^2) from r through the plain
    BatchNorm module (the custom Function of the BatchNorm form has no ONNX equivalent)."""
    module, _ = _build(torch.float32)[1]
    calls = []
    module.blocks[0].bn2.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(4, 4, 8, 8)
    module(x)
    assert calls == []  # training mode, BatchNorm form: statistics from native_batch_norm
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    _, transport = module(x)
    assert calls == [1] and transport.grad_fn is not None
