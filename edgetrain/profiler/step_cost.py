"""Where one training step's memory goes: weights, gradients, optimizer state, saved
activations, and the input batch: the analytic floor `edgetrain profile` sets beside the
measured peaks. Saved activations are counted with edgetrain/memory/breakdown.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from edgetrain.memory.breakdown import count_saved_activations, parameter_bytes, trainable_bytes
from edgetrain.training.transport import module_loss, transport_weight


@dataclass(frozen=True)
class StepCost:
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    saved_activation_bytes: int
    input_bytes: int

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.grads_bytes + self.optimizer_bytes
                + self.saved_activation_bytes + self.input_bytes)

    def as_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def greedy_step_cost(module: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     tau: float, momentum: float = 0.9) -> StepCost:
    """Analytic cost of one step of ``module`` + ``head`` on batch ``x`` (grads left set)."""
    params = [*module.parameters(), *head.parameters()]

    def forward():
        out, transport = module(x, need_transport=transport_weight(tau) > 0)
        return module_loss(head(out), y, transport, tau)[0]

    # The input is left out of the saved count: it is counted once, as input_bytes.
    loss, saved = count_saved_activations(forward, [*params, x])
    loss.backward()
    trainable = trainable_bytes(module, head)
    return StepCost(weights_bytes=parameter_bytes(module, head), grads_bytes=trainable,
                    optimizer_bytes=trainable if momentum else 0,
                    saved_activation_bytes=saved,
                    input_bytes=x.numel() * x.element_size() + y.numel() * y.element_size())


def network_step_cost(network: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      momentum: float = 0.9) -> StepCost:
    """Analytic cost of one end-to-end step of ``network`` on batch ``x``."""
    params = list(network.parameters())

    def forward():
        return torch.nn.functional.cross_entropy(network(x), y)

    loss, saved = count_saved_activations(forward, [*params, x])
    loss.backward()
    trainable = trainable_bytes(network)
    return StepCost(weights_bytes=parameter_bytes(network), grads_bytes=trainable,
                    optimizer_bytes=trainable if momentum else 0,
                    saved_activation_bytes=saved,
                    input_bytes=x.numel() * x.element_size() + y.numel() * y.element_size())
