"""The pieces every training mode shares: optimiser, one update of a module, evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from edgetrain.training.sgd import SGD, LRSchedule
from edgetrain.training.transport import module_loss, transport_weight


class NonFiniteLossError(RuntimeError):
    """Training diverged (the loss, or the weights, became NaN or infinite): training stops,
    nothing diverged is saved, finished modules are kept."""

    def __init__(self, module: int | None, epoch: int, step: int | None, value,
                 detail: str = ""):
        where = f"module {module + 1}" if module is not None else "the network"
        at = f"epoch {epoch + 1}" + (f", step {step + 1}" if step is not None else "")
        what = (f"The weights of {where} became NaN or infinite" if value == "non-finite weights"
                else f"The loss of {where} became {value}")
        super().__init__(
            f"{what} at {at}{f' ({detail})' if detail else ''}. Training stopped; nothing "
            "diverged was saved, and modules finished before it are kept in the run folder. "
            "To train it again with a smaller learning rate: the same command with --resume "
            "--lr SMALLER --allow-changes lr (with TRGL, another --tau may help too: "
            "--allow-changes tau)."
        )
        self.module, self.epoch, self.step = module, epoch, step


def make_optimizer(params: Iterable[nn.Parameter], lr: float, momentum: float,
                   weight_decay: float, total_steps: int, schedule: str = "cosine"
                   ) -> tuple[SGD, LRSchedule]:
    """SGD with momentum; the learning rate follows ``schedule`` from ``lr`` over the steps."""
    opt = SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return opt, LRSchedule(opt, total_steps, schedule)


@dataclass
class EpochStats:
    """Running sums over an epoch, as tensors so the hot loop does not synchronise per step."""

    loss: float = 0.0
    ce: float = 0.0
    transport: float = 0.0
    correct: int = 0
    seen: int = 0

    def as_dict(self) -> dict:
        n = max(self.seen, 1)
        return {"train_loss": self.loss / n, "train_ce": self.ce / n,
                "train_transport": self.transport / n, "train_accuracy": self.correct / n}


class Joint(nn.Module):
    """A module and its auxiliary head as one ``nn.Module``: ``forward(x, need_transport)``
    returns ``(output, transport, logits)``. What ``DistributedDataParallel`` wraps when a
    module trains on several replicas (edgetrain/distributed/replicas.py); it holds no state of
    its own."""

    def __init__(self, module: nn.Module, head: nn.Module):
        super().__init__()
        self.module, self.head = module, head

    def forward(self, x: torch.Tensor, need_transport: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, transport = self.module(x, need_transport=need_transport)
        return out, transport, self.head(out)


def greedy_step(module: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor, tau: float,
                label_smoothing: float, opt: SGD, micro_batch: int | None = None,
                keep_output: bool = True, ddp: nn.Module | None = None,
                loss_scale: float = 1.0) -> tuple[torch.Tensor | None, dict]:
    """One update of one module and its head on input ``x``; returns the module's output,
    detached, for the next module (parallel mode; None with ``keep_output=False``) and the
    step's numbers.

    With ``micro_batch`` smaller than the batch, gradients are accumulated over micro-batches
    (each loss weighted by its share of the batch), so the update is that of the whole batch
    up to BatchNorm, which normalises each micro-batch on its own.

    Peak memory of the step is at the end of each micro-batch's forward pass: the module's and
    the head's saved activations are alive until ``backward`` frees them. The transport term
    adds none in training mode (BatchNorm form, edgetrain/models/energy.py); only the direct
    form keeps each block's residue.

    ``ddp``: a ``DistributedDataParallel`` around ``Joint(module, head)`` (data-parallel
    replicas): the forward pass goes through it, its gradient all-reduce runs during the last
    micro-batch's backward (the others accumulate under ``no_sync``), and every loss is
    multiplied by ``loss_scale`` first (DDP averages over the replicas; the scale turns that
    into each replica's share of the global batch).
    """
    # Flush last step's gradients before the forward pass: set_to_none frees their memory,
    # so it is not held while activations pile up.
    opt.zero_grad(set_to_none=True)
    n = len(y)
    size = micro_batch if micro_batch and micro_batch < n else n
    outputs, sums = [], {"loss": 0.0, "ce": 0.0, "transport": 0.0, "correct": 0}
    need = transport_weight(tau) > 0
    pieces = list(zip(x.split(size), y.split(size)))
    for i, (xs, ys) in enumerate(pieces):
        # Replicas: only the last micro-batch's backward all-reduces the accumulated gradients.
        with ddp.no_sync() if ddp is not None and i < len(pieces) - 1 else nullcontext():
            if ddp is not None:
                out, transport, logits = ddp(xs, need)
            else:
                out, transport = module(xs, need_transport=need)
                logits = head(out)
            loss, ce = module_loss(logits, ys, transport, tau, label_smoothing)
            share = len(ys) / n
            weight = share * loss_scale
            (loss * weight if weight != 1 else loss).backward()
        if keep_output:
            # The output goes on without its graph: the next module must not backpropagate
            # here. (Sequential mode does not keep it: it would outlive the step's peak.)
            outputs.append(out.detach())
        sums["loss"] += loss.detach() * share
        sums["ce"] += ce.detach() * share
        sums["transport"] += transport.detach() * share
        sums["correct"] += (logits.argmax(1) == ys).sum()
        del out, logits, loss, ce, transport  # this micro-batch's graph is gone after backward
    opt.step()
    if not keep_output:
        return None, sums
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)), sums


def end_to_end_step(network: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    label_smoothing: float, opt, micro_batch: int | None) -> dict:
    """One end-to-end update, accumulated over micro-batches if the planner asked for it."""
    opt.zero_grad(set_to_none=True)
    n = len(y)
    size = micro_batch if micro_batch and micro_batch < n else n
    sums = {"loss": 0.0, "ce": 0.0, "transport": torch.zeros(()), "correct": 0}
    for xs, ys in zip(x.split(size), y.split(size)):
        # Peak memory: every layer's activations are alive here, at the end of forward.
        logits = network(xs)
        loss, _ = module_loss(logits, ys, logits.new_zeros(()), float("inf"), label_smoothing)
        share = len(ys) / n
        (loss * share if share < 1 else loss).backward()
        sums["loss"] += loss.detach() * share
        sums["ce"] += loss.detach() * share
        sums["correct"] += (logits.argmax(1) == ys).sum()
        del logits, loss
    opt.step()
    return sums


def accumulate(stats: EpochStats, numbers: dict, batch: int) -> None:
    loss = float(numbers["loss"])
    if not math.isfinite(loss):
        raise FloatingPointError(loss)
    stats.loss += loss * batch
    stats.ce += float(numbers["ce"]) * batch
    stats.transport += float(numbers["transport"]) * batch
    stats.correct += int(numbers["correct"])
    stats.seen += batch


@dataclass
class Evaluation:
    """Test accuracy of each head: on the whole test set, and on its fixed random half (the
    authors' metric; see :func:`test_half`). None where a head was not given."""

    full: list[float | None]
    half: list[float | None]


def test_half(n: int, seed: int) -> torch.Tensor:
    """A fixed random half of ``n`` test samples (bool mask), seeded by the run's seed: the
    authors report the best accuracy over epochs and modules on a random half of the test
    split; edgetrain reports that beside its own metric, never instead of it."""
    g = torch.Generator().manual_seed(seed * 7919 + 4)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[: n // 2]] = True
    return mask


@torch.inference_mode()
def evaluate(stages: list[nn.Module], heads: list[nn.Module | None],
             batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
             half: torch.Tensor | None = None,
             sink: Callable[[torch.Tensor, torch.Tensor], object] | None = None) -> Evaluation:
    """Test accuracy of each head on the output of its stage, stages applied in order.

    ``heads[k]`` may be None where only the output matters. Batches come in test-set order
    (unshuffled), so sample i of the stream is test sample i of ``half``. inference_mode keeps
    no autograd state, so evaluation costs weights plus one batch's activations.
    ``sink(output, labels)``, if given, receives the last stage's output of every batch (the
    scheduler writes the next module's test cache with it: one forward pass, two uses).
    """
    correct = [0] * len(stages)
    correct_half = [0] * len(stages)
    seen = seen_half = 0
    for x, y in batches:
        in_half = half[seen:seen + len(y)].to(y.device) if half is not None else None
        for k, stage in enumerate(stages):
            x, _ = stage(x, need_transport=False)
            if heads[k] is not None:
                right = heads[k](x).argmax(1) == y
                correct[k] += int(right.sum())
                if in_half is not None:
                    correct_half[k] += int((right & in_half).sum())
        if sink is not None:
            sink(x, y)
        seen += len(y)
        seen_half += int(in_half.sum()) if in_half is not None else 0
    full = [c / max(seen, 1) if h is not None else None for c, h in zip(correct, heads)]
    halves = [c / max(seen_half, 1) if h is not None and half is not None else None
              for c, h in zip(correct_half, heads)]
    return Evaluation(full, halves)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm uses its running statistics, which stop updating) and no grads."""
    module.eval()
    module.requires_grad_(False)
    return module


def set_train(*modules: nn.Module) -> None:
    for m in modules:
        m.train()
