"""`edgetrain fit --backend ort`: train one module through ONNX Runtime's training API.

Same contract as :func:`edgetrain.training.scheduler.train_module_torch`: the same inputs
(``module_inputs``), loss, epochs, cosine schedule, logging and return value; only the
forward/backward and the update run in ONNX Runtime instead of torch autograd::

    export module k + head k with the loss as one training-mode ONNX graph
    generate artifacts (training graph, SGD optimizer graph, checkpoint)      # artifacts.py
    for epoch in 1..E:
        for x, y in inputs_k(epoch):
            set lr (schedule.py); reset grads; forward + backward and SGD step in ORT
        copy weights + BatchNorm statistics back into the torch module and head
        evaluate with torch                        # the same code as the torch backend
    free ORT's state and session; delete the artifacts

Where the memory is: ORT's CheckpointState holds the parameters, one gradient buffer per
parameter and the BatchNorm statistics; its training session holds the module's activations
during a step (in its own CPU arena, which keeps its high-water mark until the session is freed).
The torch module and head keep one copy of the weights, refreshed each epoch, for evaluation
and for what the scheduler does next (freeze, cache, save, stitch).

Evaluation uses torch on the copied-back weights (``evaluate_module``), not an ORT eval graph:
the accuracy then comes from the very code the torch backend uses, and a training-mode
BatchNorm graph gives no loadable ORT eval graph anyway.

BatchNorm statistics: ORT's training-mode BatchNormalization updates the running mean and
variance in the checkpoint state, with momentum 0.1 like torch. The mean matches torch's to
float rounding; the variance is updated with the biased batch variance where torch uses the
unbiased one (a factor (n - 1) / n, n = batch x H x W per channel: 0.2% at batch 128 on the
head's 2x2 map, less elsewhere). They are copied back as ORT computed them, so nothing is
recomputed with torch (tests/test_onnx.py checks both facts).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgetrain.models.network import module_state
from edgetrain.onnx.artifacts import OUTPUTS, build_training_artifacts
from edgetrain.onnx.graphs import quiet_native_stderr
from edgetrain.onnx.runtime import training_api
from edgetrain.onnx.schedule import plain_sgd_lr
from edgetrain.training.phase import Phase
from edgetrain.training.scheduler import (
    Context,
    accumulate_or_stop,
    evaluate_module,
    module_inputs,
    steps_per_epoch,
)
from edgetrain.training.steps import EpochStats


def train_module_ort(ctx: Context, k: int, phase: Phase, frozen: list[nn.Module]
                     ) -> float | None:
    """Train module ``k`` and its head (``phase``'s, built by the scheduler; its torch
    optimiser stays unused) with ONNX Runtime; copy the result back into them; return the
    head's last test accuracy (None if not evaluated)."""
    module, head = phase.model, phase.head
    ort = training_api("--backend ort")
    cfg = ctx.config
    plan = ctx.plans[k]
    folder = ctx.run.root / "ort" / f"module_{k}"
    artifacts = build_training_artifacts(
        module, head, (plan.in_channels, plan.in_size, plan.in_size), ctx.taus[k],
        cfg.label_smoothing, cfg.weight_decay, folder)
    options = _session_options(cfg.threads)
    with quiet_native_stderr():
        state = ort.CheckpointState.load_checkpoint(str(artifacts.checkpoint))
        session = ort.Module(str(artifacts.training_model), state, session_options=options)
        optimizer = ort.Optimizer(str(artifacts.optimizer_model), session)
    if tuple(session.output_names()) != OUTPUTS:  # internal invariant: the loss graph's outputs
        raise RuntimeError(f"unexpected training graph outputs {session.output_names()}")

    total = cfg.epochs * steps_per_epoch(ctx)
    step, test_acc = 0, None
    with ctx.bars.task(f"module {k + 1}/{len(ctx.plans)} (ort)", total=total) as update:
        for epoch in range(cfg.epochs):
            session.train()
            stats = EpochStats()
            for i, (x, y) in enumerate(module_inputs(ctx, k, True, epoch, frozen)):
                optimizer.set_learning_rate(
                    plain_sgd_lr(cfg.lr, cfg.momentum, step, total, cfg.lr_schedule))
                # Gradients accumulate across calls in ORT: reset them (lazily, inside the next
                # forward) before every step.
                session.lazy_reset_grad()
                _, loss, ce, transport, correct = session(_numpy(x), _numpy(y))
                optimizer.step()
                step += 1
                numbers = {"loss": loss, "ce": ce, "transport": transport, "correct": correct}
                accumulate_or_stop(stats, numbers, len(y), k, epoch, i)
                update(status=f"epoch {epoch + 1}/{cfg.epochs}")
            copy_back(state, module, head, steps=step)
            test_acc, test_half = evaluate_module(ctx, k, epoch, module, head, frozen)
            ctx.run.log("epoch", module=k, epoch=epoch,
                        lr=plain_sgd_lr(cfg.lr, cfg.momentum, step, total, cfg.lr_schedule),
                        test_accuracy=test_acc, test_accuracy_half=test_half, backend="ort",
                        **stats.as_dict())
    # Free ORT's copy of the weights, its gradient buffers and its activation arena before the
    # scheduler caches with torch and builds the next module.
    del optimizer, session, state
    # The artifacts hold this module's *initial* weights: stale once trained (the trained ones
    # are saved by the scheduler; `edgetrain export-artifacts` writes trainable ones).
    # Only the artifact files edgetrain wrote are removed (edgetrain/runs/ownership.py).
    ctx.run.remove("ort")
    return test_acc


def copy_back(state, module: nn.Module, head: nn.Module, steps: int) -> None:
    """Copy ORT's parameters and BatchNorm running statistics into the torch module and head.

    ``num_batches_tracked`` (not in the ONNX graph) is set to ``steps`` so the saved state dict
    reads as torch's would after the same number of training steps.
    """
    with torch.no_grad():
        for name, tensor in module_state(module, head).items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(steps)
                continue
            tensor.copy_(torch.from_numpy(state.parameters[name].data).reshape(tensor.shape))


def _numpy(t: torch.Tensor) -> np.ndarray:
    """ORT's CPU build reads host memory: one contiguous CPU copy per batch (none on CPU)."""
    t = t.detach()
    if t.dtype.is_floating_point:
        t = t.to(torch.float32)
    return t.cpu().contiguous().numpy()


def _session_options(threads: int | None):
    from onnxruntime import SessionOptions

    options = SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options
