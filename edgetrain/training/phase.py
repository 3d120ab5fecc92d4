"""One training phase: what trains together (a module and its auxiliary head, or the whole
network end to end), its optimiser and schedule, and its step.

Every place that trains builds, steps and frees it the same way: the scheduler's three modes
(edgetrain/training/scheduler.py), the planner's probes (training/probes.py), the profiler's
worker (edgetrain/profiler/worker.py); the ONNX Runtime backend takes a phase's module and head
and trains them with its own engine.

    phase = Phase.module(spec, plan, num_classes, device, Optim.of(config), total_steps, tau,
                         seed=seed)
    out, numbers = phase.step(x, y)           # forward, backward, SGD step, schedule step

Memory: a phase holds its parameters, their gradients (between backward and the next
``step``'s ``zero_grad``, which frees them) and the momentum buffers (created at the first
step, as large as the parameters). Dropping the phase frees all three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgetrain.models.network import build_head, build_module, build_network, set_checkpointing
from edgetrain.models.split import ModulePlan
from edgetrain.training.steps import end_to_end_step, greedy_step, make_optimizer


@dataclass(frozen=True)
class Optim:
    """SGD's settings and the learning-rate schedule."""

    lr: float
    momentum: float
    weight_decay: float
    schedule: str = "cosine"

    @classmethod
    def of(cls, config, lr: float | None = None) -> Optim:
        """A run's settings (``lr``: the phase's own, e.g. scaled with its batch)."""
        return cls(config.lr if lr is None else lr, config.momentum, config.weight_decay,
                   config.lr_schedule)


class Phase:
    """``model`` with its ``head`` (None: the model ends in the classifier, end to end), the
    optimiser over both, and the penalty's ``tau`` (inf: none)."""

    def __init__(self, model: nn.Module, head: nn.Module | None, optim: Optim,
                 total_steps: int, tau: float = float("inf"), label_smoothing: float = 0.0):
        self.model, self.head = model, head
        self.tau, self.label_smoothing = tau, label_smoothing
        params = [*model.parameters(), *(head.parameters() if head is not None else ())]
        self.opt, self.sched = make_optimizer(params, optim.lr, optim.momentum,
                                              optim.weight_decay, total_steps, optim.schedule)
        self.step_opt = self.opt
        """What a step's update goes through: the SGD itself, or a wrapper around it (the
        distributed replicas' ReplicaSGD combines their BatchNorm statistics first)."""
        self.ddp: nn.Module | None = None
        """Data-parallel replicas: ``DistributedDataParallel`` around ``Joint(model, head)``,
        which the forward pass goes through (edgetrain/distributed/replicas.py)."""
        self.loss_scale = 1.0
        """What the replicas' loss is multiplied by (their share of the global batch, times
        the replica count that DDP's average divides by)."""

    @classmethod
    def module(cls, spec, plan: ModulePlan, num_classes: int, device: torch.device,
               optim: Optim, total_steps: int, tau: float, *, init: str = "default",
               gain: float = 0.1, seed: int | None = None, checkpointing: bool = False,
               label_smoothing: float = 0.0) -> Phase:
        """Module ``plan`` and its head. Only this module's blocks are built: nothing else of
        the network is allocated. ``seed``: the global RNG is seeded first (module, then head,
        draw their initial weights from it, in that order)."""
        if seed is not None:
            torch.manual_seed(seed)
        module = build_module(spec, plan, init, gain).to(device)
        head = build_head(plan, num_classes, init, gain).to(device)
        set_checkpointing(module, checkpointing)
        return cls(module, head, optim, total_steps, tau, label_smoothing)

    @classmethod
    def end_to_end(cls, spec, plans: list[ModulePlan], num_classes: int,
                   device: torch.device, optim: Optim, total_steps: int, *,
                   init: str = "default", gain: float = 0.1, seed: int | None = None,
                   checkpointing: bool = False, label_smoothing: float = 0.0) -> Phase:
        """The whole network (every module, then the last head), trained by backpropagation."""
        if seed is not None:
            torch.manual_seed(seed)
        network = build_network(spec, plans, num_classes, init, gain).to(device)
        set_checkpointing(network, checkpointing)
        return cls(network, None, optim, total_steps, float("inf"), label_smoothing)

    def step(self, x: torch.Tensor, y: torch.Tensor, micro_batch: int | None = None,
             keep_output: bool = True, tau: float | None = None
             ) -> tuple[torch.Tensor | None, dict]:
        """One update on ``(x, y)`` (the schedule advances): the module's detached output for
        the next module (None end to end, or with ``keep_output=False``) and the step's
        numbers. ``tau``: this step's, where it changes during training (multipliers)."""
        if self.head is None:
            numbers = end_to_end_step(self.model, x, y, self.label_smoothing, self.step_opt,
                                      micro_batch)
            out = None
        else:
            out, numbers = greedy_step(self.model, self.head, x, y,
                                       self.tau if tau is None else tau, self.label_smoothing,
                                       self.step_opt, micro_batch, keep_output, self.ddp,
                                       self.loss_scale)
        self.sched.step()
        return out, numbers

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return self.sched.get_last_lr()[0]

    def train(self) -> None:
        self.model.train()
        if self.head is not None:
            self.head.train()

    def eval(self) -> None:
        self.model.eval()
        if self.head is not None:
            self.head.eval()
