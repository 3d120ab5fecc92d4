"""Where one training step's memory goes: weights, gradients, optimizer state, saved
activations, and the input batch.

Saved activations are counted with ``torch.autograd.graph.saved_tensors_hooks``: every tensor
autograd keeps for backward passes through the pack hook; we count each underlying storage once
(views share storage) and leave out the parameters themselves (counted as weights).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

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


def parameter_bytes(*modules: nn.Module) -> int:
    """Weights and buffers (BatchNorm statistics) of the modules."""
    return sum(t.numel() * t.element_size() for m in modules
               for t in (*m.parameters(), *m.buffers()))


def trainable_bytes(*modules: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters()
               if p.requires_grad)


def count_saved_activations(fn, exclude: list[torch.Tensor]):
    """Run ``fn()`` under a pack hook; return ``(fn's result, bytes of saved activations)``."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        # Detached: the same storage, without its grad_fn. Returning ``t`` itself makes a
        # reference cycle (an op's output -> its node -> the saved output) that Python's gc
        # cannot see, so a graph that is never backwarded (the head counted alone) was never
        # freed: `edgetrain profile` carried 16-34 MiB of it into every later module's phase.
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(storages.values())


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
