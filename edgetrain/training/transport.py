"""TRGL's loss: cross-entropy of the module's auxiliary head plus the transport regulariser.

    loss_k = CE(head_k(T_k(x)), y) + 1 / (2 tau_k) * sum_b mean(r_b ** 2)

where r_b is the residual-branch output of block b of module k and the mean runs over
batch x C x H x W (../shared/METHOD.md). tau = infinity is vanilla greedy learning.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edgetrain.config import TAU_SCHEDULES
from edgetrain.errors import UserInputError


def tau_schedule(tau: float, num_modules: int, schedule: str = "halved") -> list[float]:
    """tau_k for each module.

    ``halved`` (the authors' choice): the first half of the modules use tau/2, a stronger
    penalty early where greedy modules overfit most; the rest use tau. With an odd K the middle
    module counts in the second half. ``constant``: tau everywhere.

    >>> tau_schedule(1.0, 4)
    [0.5, 0.5, 1.0, 1.0]
    >>> tau_schedule(1.0, 3)
    [0.5, 1.0, 1.0]
    >>> tau_schedule(math.inf, 2)
    [inf, inf]
    """
    if schedule == "constant":
        return [tau] * num_modules
    if schedule == "multipliers":
        return [Multipliers.LAMBDA0 / 2] * num_modules  # the starting weight 1/lambda0
    if schedule == "halved":
        return [tau / 2 if k < num_modules // 2 else tau for k in range(num_modules)]
    raise UserInputError(
        f"--tau-schedule {schedule!r} is not known; choose one of {', '.join(TAU_SCHEDULES)}."
    )


def transport_weight(tau: float) -> float:
    """The coefficient 1/(2 tau); 0 for tau = infinity (vanilla greedy).

    >>> transport_weight(0.5), transport_weight(math.inf)
    (1.0, 0.0)
    """
    return 0.0 if math.isinf(tau) else 1.0 / (2.0 * tau)


def transport_cost(residues: list[torch.Tensor]) -> torch.Tensor:
    """sum over blocks of the per-element mean of squared residues (the kinetic energy)."""
    return torch.stack([r.pow(2).mean() for r in residues]).sum()


def module_loss(logits: torch.Tensor, labels: torch.Tensor, transport: torch.Tensor, tau: float,
                label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(loss, cross_entropy)``; ``transport`` is the module's summed mean(r^2)."""
    ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    weight = transport_weight(tau)
    loss = ce + weight * transport if weight > 0 else ce
    return loss, ce


class Multipliers(torch.nn.Module):
    """The method of multipliers (Uzawa) variant of the penalty weight, as in the authors'
    code (``--tau-schedule multipliers``): the weight is ``1 / lambda``, starting from
    ``lambda0 = 1``; every ``EVERY`` steps ``lambda += H * CE`` of that step, so the penalty
    relaxes as the module's cross-entropy is paid for. ``--tau`` is not used.

    One per module, with its state in buffers so that an epoch checkpoint restores it (a
    resumed run continues with the same weight). The update is applied after the step whose
    cross-entropy it uses (the authors apply it to that step's own loss: one step apart).

    >>> m = Multipliers()
    >>> for _ in range(50):
    ...     m.update(0.5)
    >>> float(m.weight), m.tau
    (0.6666666666666666, 0.75)
    """

    LAMBDA0, H, EVERY = 1.0, 1.0, 50

    def __init__(self):
        super().__init__()
        self.register_buffer("lam", torch.tensor(self.LAMBDA0, dtype=torch.float64))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))

    @property
    def weight(self) -> float:
        return 1.0 / float(self.lam)

    @property
    def tau(self) -> float:
        """The tau whose weight 1/(2 tau) equals 1/lambda."""
        return float(self.lam) / 2

    def update(self, ce: float) -> None:
        self.steps += 1
        if int(self.steps) % self.EVERY == 0:
            self.lam += self.H * ce
