"""Models, split, heads, the regulariser and the stitched network."""

import math
import subprocess
import sys

import pytest
import torch

from edgetrain.errors import UserInputError
from edgetrain.models.catalog import RESNET_DEPTHS
from edgetrain.models.heads import AuxHead
from edgetrain.models.network import (
    build_head,
    build_module,
    build_network,
    set_checkpointing,
    set_transport_form,
)
from edgetrain.models.resnet import resnet_spec
from edgetrain.models.split import balanced_sizes, block_costs, split_network
from edgetrain.training.transport import module_loss, tau_schedule, transport_cost


@pytest.mark.parametrize("name,blocks", [("resnet20", 9), ("resnet32", 15), ("resnet56", 27),
                                         ("resnet110", 54)])
def test_resnet_depths(name, blocks):
    spec = resnet_spec(name, in_channels=3)
    assert len(spec.blocks) == blocks
    # conv layers: stem + 2 per block + the classifier = depth
    assert 1 + 2 * blocks + 1 == RESNET_DEPTHS[name]


def test_network_output_shape_and_params():
    spec = resnet_spec("resnet20", in_channels=3)
    plans = split_network(spec, 1, image_size=32)
    net = build_network(spec, plans, num_classes=10)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # ResNet-20 has about 0.27 M parameters (He et al.); ours adds a 1x1-conv shortcut
    # (option B) and the DGL head's 3x3 conv.
    n = sum(p.numel() for p in net.parameters())
    assert 0.27e6 < n < 0.36e6


@pytest.mark.parametrize("k,sizes", [(1, [9]), (2, [5, 4]), (3, [3, 3, 3]), (4, [3, 2, 2, 2]),
                                     (9, [1] * 9)])
def test_even_split_sizes(k, sizes):
    plans = split_network(resnet_spec("resnet20", 3), k, 32)
    assert [p.num_blocks for p in plans] == sizes
    assert plans[0].start == 0 and plans[-1].stop == 9
    assert all(a.stop == b.start for a, b in zip(plans, plans[1:]))


def test_split_shapes_chain():
    plans = split_network(resnet_spec("resnet20", 1), 4, 28)
    assert plans[0].in_channels == 1 and plans[0].in_size == 28
    for a, b in zip(plans, plans[1:]):
        assert (a.out_channels, a.out_size) == (b.in_channels, b.in_size)
    assert (plans[-1].out_channels, plans[-1].out_size) == (64, 7)


def test_balanced_split_evens_out_memory():
    spec = resnet_spec("resnet110", 3)
    costs = block_costs(spec, 32)
    balanced = split_network(spec, 4, 32, "balanced")
    even = split_network(spec, 4, 32, "even")

    def worst(plans):
        return max(sum(costs[p.start:p.stop]) for p in plans)

    assert worst(balanced) < worst(even)
    sizes = [p.num_blocks for p in balanced]
    assert sizes == sorted(sizes)  # later (cheaper) blocks: more of them per module


def test_balanced_sizes_is_optimal_on_small_case():
    import itertools
    costs = [5, 1, 1, 3, 2, 2, 4]
    best = min(max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, len(costs))))
               for cuts in itertools.combinations(range(1, len(costs)), 2))
    sizes = balanced_sizes(costs, 3)
    bounds = list(itertools.accumulate(sizes))
    assert max(sum(costs[a:b]) for a, b in zip([0, *bounds], bounds)) == best


@pytest.mark.parametrize("k", [0, 10, -1])
def test_split_rejects_bad_k(k):
    with pytest.raises(UserInputError, match="--modules"):
        split_network(resnet_spec("resnet20", 3), k, 32)


def test_unknown_model():
    with pytest.raises(UserInputError, match="--model"):
        resnet_spec("resnet19", 3)


def test_head_shapes():
    head = AuxHead(32, num_classes=7)
    assert head(torch.randn(3, 32, 16, 16)).shape == (3, 7)
    assert head(torch.randn(3, 32, 5, 5)).shape == (3, 7)  # odd sizes pool to 2x2 too
    plans = split_network(resnet_spec("resnet20", 3), 4, 32)
    for p in plans:
        module, head = build_module(resnet_spec("resnet20", 3), p), build_head(p, 10)
        x = torch.randn(2, p.in_channels, p.in_size, p.in_size)
        out, _ = module(x)
        assert out.shape == (2, p.out_channels, p.out_size, p.out_size)
        assert head(out).shape == (2, 10)


def test_transport_matches_hand_computation():
    """The module's penalty is sum over its blocks of mean(r^2), r taken before the skip (eval
    mode here: the direct form; tests/test_transport.py compares the forms in training mode)."""
    torch.manual_seed(0)
    spec = resnet_spec("resnet8", 3)  # 3 blocks
    plans = split_network(spec, 1, 8)
    module = build_module(spec, plans[0]).eval()
    x = torch.randn(2, 3, 8, 8)
    _, transport = module(x)

    expected = 0.0
    h = module.stem(x)
    for block in module.blocks:
        r = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(h)))))
        expected += float((r ** 2).sum().detach() / r.numel())
        h = torch.relu(block.shortcut(h) + r)
    assert transport.detach().item() == pytest.approx(expected, rel=1e-6)
    assert transport_cost([torch.full((2, 3), 2.0), torch.ones(4)]).item() == pytest.approx(5.0)


def test_module_loss_weight():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy(logits, labels)
    transport = torch.tensor(0.3)
    loss, ce_out = module_loss(logits, labels, transport, tau=0.25)
    assert ce_out.item() == pytest.approx(ce.item())
    assert loss.item() == pytest.approx(ce.item() + 0.3 / (2 * 0.25))
    loss_inf, _ = module_loss(logits, labels, transport, tau=math.inf)
    assert loss_inf.item() == pytest.approx(ce.item())


def test_tau_schedule():
    assert tau_schedule(2.0, 4) == [1.0, 1.0, 2.0, 2.0]
    assert tau_schedule(2.0, 1) == [2.0]
    assert tau_schedule(2.0, 3, "constant") == [2.0, 2.0, 2.0]
    with pytest.raises(UserInputError, match="--tau-schedule"):
        tau_schedule(1.0, 2, "linear")


def test_stitched_equals_modules_in_order():
    torch.manual_seed(0)
    spec = resnet_spec("resnet20", 3)
    plans = split_network(spec, 3, 16)
    net = build_network(spec, plans, 10).eval()
    x = torch.randn(4, 3, 16, 16)
    h = x
    for stage in net.stages:
        h, _ = stage(h)
    assert torch.equal(net.head(h), net(x))


def test_module_built_alone_has_only_its_blocks():
    spec = resnet_spec("resnet56", 3)
    plans = split_network(spec, 4, 32)
    whole = sum(p.numel() for p in build_network(spec, plans, 10).stages.parameters())
    parts = [sum(p.numel() for p in build_module(spec, plan).parameters()) for plan in plans]
    assert sum(parts) == whole
    assert all(0 < p < whole for p in parts)


def _one_step(module, head, x, y, tau):
    """Loss, every parameter's gradient, the input's gradient and the BN running stats after one
    training-mode forward/backward."""
    module.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    out, transport = module(x, need_transport=math.isfinite(tau))
    loss, _ = module_loss(head(out), y, transport, tau)
    loss.backward()
    grads = [p.grad.clone() for p in [*module.parameters(), *head.parameters()]]
    stats = [b.clone() for b in module.buffers()]
    return loss.detach(), grads, x.grad, stats


@pytest.mark.parametrize("tau, input_grad, form", [(1.0, True, "bn"), (1.0, True, "direct"),
                                                   (1.0, False, "bn"), (math.inf, False, "bn")])
def test_checkpointing_gives_the_same_step(tau, input_grad, form):
    """Recomputing blocks in backward changes memory, never the numbers: the loss, every gradient
    (also with an input that needs none, as for cached features) and the BatchNorm running
    statistics (updated once, not again by the recompute), with either form of the penalty."""
    spec = resnet_spec("resnet14", 3)
    plan = split_network(spec, 2, 16)[1]  # no stem: cached features in, blocks only
    torch.manual_seed(0)
    module, head = build_module(spec, plan).train(), build_head(plan, 10).train()
    set_transport_form(module, form)
    x = torch.randn(8, plan.in_channels, plan.in_size, plan.in_size, requires_grad=input_grad)
    y = torch.randint(0, 10, (8,))
    state = {k: v.clone() for k, v in module.state_dict().items()}
    plain = _one_step(module, head, x, y, tau)
    module.load_state_dict(state)
    set_checkpointing(module, True)
    recomputed = _one_step(module, head, x, y, tau)
    assert torch.allclose(plain[0], recomputed[0], atol=1e-6)
    for a, b in zip(plain[1] + plain[3], recomputed[1] + recomputed[3]):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert (plain[2] is None) == (recomputed[2] is None) == (not input_grad)
    if input_grad:
        assert torch.allclose(plain[2], recomputed[2], atol=1e-5)


def test_checkpointing_does_not_import_dynamo():
    """torch.utils.checkpoint imports torch._dynamo (about 150 MB resident) on first use; the
    planner turns checkpointing on when memory is tight, so edgetrain's must not."""
    code = ("import sys, torch; from edgetrain.models.network import build_module, "
            "set_checkpointing; from edgetrain.models.resnet import resnet_spec; "
            "from edgetrain.models.split import split_network; spec = resnet_spec('resnet8', 1); "
            "m = build_module(spec, split_network(spec, 1, 8)[0]); set_checkpointing(m, True); "
            "out, t = m(torch.randn(2, 1, 8, 8)); (out.sum() + t).backward(); "
            "print(m.blocks[0].conv1.weight.grad is not None, 'torch._dynamo' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False"]


def test_zero_pad_shortcut_is_option_a_and_parameter_free():
    """--shortcut zero-pad: a downsampling block's skip keeps every other pixel and appends
    zero channels; the network has no shortcut parameters, and the spec counts them right."""
    from edgetrain.models.resnet import ZeroPadShortcut

    spec = resnet_spec("resnet14", 1, (4, 8, 16), shortcut="zero-pad")
    plans = split_network(spec, 1, 16)
    module = build_module(spec, plans[0])
    assert not any("shortcut" in n for n, _ in module.named_parameters())
    assert sum(p.numel() for p in module.parameters()) == spec.parameter_count()
    x = torch.randn(2, 4, 8, 8)
    y = ZeroPadShortcut(4, 8, 2)(x)
    assert y.shape == (2, 8, 4, 4)
    assert torch.equal(y[:, :4], x[:, :, ::2, ::2]) and not y[:, 4:].any()
    # The penalty's BatchNorm form equals the direct form on these blocks too.
    torch.manual_seed(0)
    module = build_module(spec, plans[0]).double().train()
    inp = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    forms = []
    for form in ("bn", "direct"):
        set_transport_form(module, form)
        module.zero_grad()
        _, transport = module(inp)
        transport.backward()
        forms.append((transport.detach(), [p.grad.clone() for p in module.parameters()]))
    assert torch.allclose(forms[0][0], forms[1][0], rtol=1e-10)
    assert all(torch.allclose(a, b, rtol=1e-8, atol=1e-14) for a, b in zip(forms[0][1],
                                                                            forms[1][1]))


def test_orthogonal_init_scales_by_the_gain():
    spec = resnet_spec("resnet8", 3)
    plan = split_network(spec, 1, 32)[0]
    module = build_module(spec, plan, init="orthogonal", gain=0.1)
    head = build_head(plan, 10, init="orthogonal", gain=0.1)
    w = module.blocks[1].conv2.weight.reshape(module.blocks[1].conv2.weight.shape[0], -1)
    assert torch.allclose(w @ w.T, 0.01 * torch.eye(w.shape[0]), atol=1e-6)
    fc = head.fc.weight
    assert torch.allclose(fc @ fc.T, 0.01 * torch.eye(fc.shape[0]), atol=1e-6)
    default = build_module(spec, plan)
    assert default.blocks[1].conv2.weight.std() > 5 * module.blocks[1].conv2.weight.std()
