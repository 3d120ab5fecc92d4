"""Build one module (and its head) on its own, and stitch trained modules into one network."""

from __future__ import annotations

import torch
from torch import nn

from edgetrain.models.chain import BlockChain
from edgetrain.models.energy import check_transport_form
from edgetrain.models.heads import make_head
from edgetrain.models.resnet import ResNetSpec, init_weights
from edgetrain.models.split import ModulePlan


def build_module(spec: ResNetSpec, plan: ModulePlan, init: str = "default",
                 gain: float = 0.1) -> BlockChain:
    """Only this module's blocks are instantiated: nothing else of the network is allocated.
    ``spec`` is any family's (edgetrain/models/families.py)."""
    return spec.build_module(plan.start, plan.stop, init, gain)


def build_head(plan: ModulePlan, num_classes: int, init: str = "default",
               gain: float = 0.1) -> nn.Module:
    """The auxiliary head the plan gives module ``plan.index`` (``plan.head``: dgl or light, or
    a transformer's token head)."""
    if plan.head == "token":
        from edgetrain.models.vit import TokenHead

        head: nn.Module = TokenHead(plan.out_channels, num_classes)
    else:
        head = make_head(plan.head, plan.out_channels, num_classes, plan.out_size)
    init_weights(head, init, gain)
    return head


def module_state(module: nn.Module, head: nn.Module) -> dict[str, torch.Tensor]:
    """A module and its head as one state dict, ``module.*`` and ``head.*``: the layout of
    modules/module_K.safetensors and of ONNX Runtime's checkpoints. The tensors share storage
    with the modules (copying into them updates the modules)."""
    state = {f"module.{n}": t for n, t in module.state_dict().items()}
    state.update({f"head.{n}": t for n, t in head.state_dict().items()})
    return state


def load_module_state(module: nn.Module, head: nn.Module | None,
                      state: dict[str, torch.Tensor]) -> None:
    """The inverse of :func:`module_state` (``head`` None: the module alone). Strict: a missing
    or extra tensor raises RuntimeError."""
    for prefix, part in (("module.", module), ("head.", head)):
        if part is not None:
            part.load_state_dict({n[len(prefix):]: t for n, t in state.items()
                                  if n.startswith(prefix)})


class StitchedNetwork(nn.Module):
    """The trained modules in order, then the last module's head: ``x -> logits``.

    This is the network users evaluate, export and deploy; the auxiliary heads of the other
    modules are training scaffolding and are not part of it.
    """

    def __init__(self, modules: list[BlockChain], head: nn.Module):
        super().__init__()
        self.stages = nn.ModuleList(modules)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x, _ = stage(x, need_transport=False)
        return self.head(x)


def set_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn per-block activation checkpointing on or off in every module of ``model``."""
    for m in model.modules():
        if isinstance(m, BlockChain):
            m.checkpointing = enabled


def set_transport_form(model: nn.Module, form: str) -> None:
    """How every block of ``model`` computes its kinetic energy: ``"bn"`` (from its last
    BatchNorm where that uses batch statistics, the default) or ``"direct"`` (from r; keeps r
    for backward). Same values and gradients up to rounding; see edgetrain/models/energy.py."""
    check_transport_form(form)
    for m in model.modules():
        if hasattr(m, "transport_form"):
            m.transport_form = form


def build_network(spec: ResNetSpec, plans: list[ModulePlan], num_classes: int,
                  init: str = "default", gain: float = 0.1) -> StitchedNetwork:
    return StitchedNetwork([build_module(spec, p, init, gain) for p in plans],
                           build_head(plans[-1], num_classes, init, gain))
