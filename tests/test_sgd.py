"""edgetrain's SGD makes the same updates as torch.optim.SGD."""

import pytest
import torch

from edgetrain.training.sgd import SGD, LRSchedule


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 5e-4)])
def test_matches_torch_sgd(momentum, weight_decay):
    torch.manual_seed(0)
    a = torch.nn.Linear(5, 3)
    b = torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    ours = SGD(a.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    ref = torch.optim.SGD(b.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    for _ in range(5):
        x = torch.randn(8, 5)
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad(set_to_none=True)
            model(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    if momentum:
        assert ours.state_bytes() == sum(p.numel() * 4 for p in a.parameters())


def test_cosine_schedule_goes_from_peak_to_zero():
    opt = SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = LRSchedule(opt, total_steps=4)
    lrs = [opt.lr]
    for _ in range(4):
        sched.step()
        lrs.append(opt.lr)
    assert lrs[0] == pytest.approx(0.2) and lrs[2] == pytest.approx(0.1)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert lrs == sorted(lrs, reverse=True)
