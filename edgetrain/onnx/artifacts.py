"""Training artifacts of one module: what ONNX Runtime's training API needs to train it.

    folder/training_model.onnx   forward + backward of (x, y) -> TRGL loss, BatchNorm in
                                 training mode; gradients accumulate in the checkpoint state
    folder/optimizer_model.onnx  ORT's SGD step (w -= lr * grad)
    folder/checkpoint            parameters and BatchNorm running statistics
    folder/inference_model.onnx  module + head in eval mode: x -> (features, logits), weights
                                 overridable as inputs (written by `edgetrain export-artifacts`)

The loss is exported as one torch graph, not assembled from ORT's loss blocks: ORT's built-in
losses are MSE, cross-entropy, BCE and L1, and a custom onnxblock adding the transport term failed
to build its gradient graph here (../../shared/ENVIRONMENT.md). :class:`TrainingLoss` returns the
whole objective first (ORT backpropagates from the first output) and the numbers worth logging
after it.

The transport term is exported in the direct form, ``mean(r ** 2)`` (edgetrain/models/energy.py
switches to it while ``torch.onnx.export`` traces): the torch backend's BatchNorm form is a custom
autograd Function that an ONNX graph cannot hold, and written in ONNX ops (ReduceMean of
(z - mean(z))^2) ORT's gradient builder keeps the centred copy of z and several z-sized
broadcast gradients per block. Measured on module 1 of ResNet-20 (K = 4, batch 256, 28x28;
`python benchmarks/ort_transport_forms.py`): training peak over vanilla's +37 MiB with the
direct form (the 3 residues), +217 MiB with the BatchNorm form in ONNX ops. Same loss either way.

Optimizer: ORT 1.19's artifact generator offers SGD and AdamW. SGD is used: it is the
optimiser of the torch backend and of the paper. ORT's SGD op (SGDOptimizerV2) has neither
momentum nor weight decay, so:

* weight decay is put into the exported objective as ``wd / 2 * sum ||p||^2``, whose gradient
  ``wd * p`` is exactly what torch's SGD adds (coupled L2, on every parameter, as the torch
  backend does);
* momentum is not available; the learning rate of each step makes up for it (schedule.py:
  the heavy ball's step for a constant gradient, ramping from lr to lr / (1 - momentum)).

AdamW would bring moments, but its update is normalised per parameter: a different optimiser
with a different good learning rate, so the two backends would no longer be comparable.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgetrain.errors import UserInputError
from edgetrain.models.network import module_state
from edgetrain.onnx.graphs import (
    EXPORTER,
    OPSET,
    export_graph,
    exportable,
    quiet_native_stderr,
    set_initializers,
    set_metadata,
)
from edgetrain.onnx.runtime import training_api
from edgetrain.paths import path_problem, shown
from edgetrain.records import RecordError
from edgetrain.runs.files import write_text_atomic
from edgetrain.runs.lock import LOCK_FILE, RunLock
from edgetrain.runs.ownership import (
    ARTIFACTS_KIND,
    ARTIFACTS_LAYOUT,
    ARTIFACTS_MARKER,
    folder_entries,
    protected_folder_problem,
    read_marker,
    write_marker,
)
from edgetrain.training.transport import module_loss, transport_weight

OUTPUTS = ("objective", "loss", "ce", "transport", "correct")


@dataclass(frozen=True)
class TrainingArtifacts:
    folder: Path

    @property
    def training_model(self) -> Path:
        return self.folder / "training_model.onnx"

    @property
    def optimizer_model(self) -> Path:
        return self.folder / "optimizer_model.onnx"

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint"

    @property
    def inference_model(self) -> Path:
        return self.folder / "inference_model.onnx"


class TrainingLoss(nn.Module):
    """``(x, y) -> (objective, loss, ce, transport, correct)`` for one module and its head.

    ``loss`` is TRGL's loss, exactly as :func:`edgetrain.training.transport.module_loss`
    computes it for the torch backend; ``objective`` adds the weight decay term (see the module
    docstring). ``correct`` counts the batch's right predictions. Parameter names are
    ``module.*`` and ``head.*``, as in modules/module_K.safetensors.
    """

    def __init__(self, module: nn.Module, head: nn.Module, tau: float, label_smoothing: float,
                 weight_decay: float):
        super().__init__()
        self.module, self.head = module, head
        self.tau, self.label_smoothing, self.weight_decay = tau, label_smoothing, weight_decay

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out, transport = self.module(x, need_transport=transport_weight(self.tau) > 0)
        logits = self.head(out)
        # The TorchScript exporter cannot export cross_entropy's label_smoothing, so the
        # smoothing is added by hand: CE_eps = (1 - eps) CE + eps * mean_c(-log p_c), the same
        # quantity torch computes (checked in tests/test_onnx.py).
        loss, ce = module_loss(logits, y, transport, self.tau, 0.0)
        if self.label_smoothing > 0:
            uniform = -torch.log_softmax(logits, dim=1).mean(dim=1).mean()
            smoothing = self.label_smoothing * (uniform - ce)
            loss, ce = loss + smoothing, ce + smoothing
        objective = loss
        if self.weight_decay > 0:
            squares = torch.stack([p.pow(2).sum() for p in self.parameters()]).sum()
            objective = loss + 0.5 * self.weight_decay * squares
        correct = (logits.argmax(dim=1) == y).sum()
        return objective, loss, ce, transport, correct


def build_training_artifacts(module: nn.Module, head: nn.Module, input_shape: tuple[int, ...],
                             tau: float, label_smoothing: float, weight_decay: float,
                             folder: Path) -> TrainingArtifacts:
    """Write the training, optimizer and checkpoint artifacts of ``module`` + ``head`` to
    ``folder``, initialised from their current weights and BatchNorm statistics.

    ``input_shape`` is one sample's [C, H, W]; the batch axis is dynamic, so the last, smaller
    batch of an epoch runs through the same graph. Memory: the export traces one forward pass of
    a 2-sample batch on a CPU copy of the module; the ONNX protos (weights included) live only in
    this call.
    """
    ort = training_api("Training through ONNX Runtime")
    folder.mkdir(parents=True, exist_ok=True)  # generate_artifacts needs it to exist
    paths = TrainingArtifacts(folder)
    state = module_state(module, head)
    x = torch.randn(2, *input_shape)
    y = torch.zeros(2, dtype=torch.long)
    wrapper = TrainingLoss(module, head, tau, label_smoothing, weight_decay)
    wrapper = exportable(wrapper, x, y)
    forward = folder / "forward.onnx"
    graph = export_graph(wrapper, (x, y), forward, ["x", "y"], list(OUTPUTS), [],
                         training=True)
    forward.unlink()
    set_initializers(graph, state)
    params = [n for n, _ in wrapper.named_parameters()]
    initializers = {i.name for i in graph.graph.initializer}
    # BatchNorm running statistics become non-trainable checkpoint entries (not constants in
    # the graph): ORT updates them in place during training and we read them back.
    buffers = [n for n, _ in wrapper.named_buffers() if n in initializers]
    missing = [n for n in params if n not in initializers]
    if missing:  # an internal invariant: every parameter must be a graph weight
        raise RuntimeError(f"parameters missing from the exported graph: {missing}")
    with quiet_native_stderr():
        ort.artifacts.generate_artifacts(graph, requires_grad=params, frozen_params=buffers,
                                         loss=None, optimizer=ort.artifacts.OptimType.SGD,
                                         artifact_directory=folder)
    # The eval graph ORT derives from a training-mode BatchNorm graph does not load ("number of
    # op outputs should be 1 when Training_mode = False"); inference graphs are exported in eval
    # mode separately instead.
    (folder / "eval_model.onnx").unlink(missing_ok=True)
    return paths


def export_inference_graph(module: nn.Module, head: nn.Module, input_shape: tuple[int, ...],
                           path: Path) -> None:
    """Module + head in eval mode: ``x -> (features, logits)``; batch axis dynamic.

    Every weight and BatchNorm statistic is also an optional graph input with the checkpoint's
    name, defaulting to the exported value: a device runs the weights it has just trained by
    feeding them beside ``x``, with no exporter on the device.
    """
    x = torch.randn(2, *input_shape)
    model = exportable(_ModuleAndHead(module, head), x)
    export_graph(model, (x,), path, ["x"], ["features", "logits"], ["features", "logits"],
                 training=False, overridable_weights=True)


class _ModuleAndHead(nn.Module):
    def __init__(self, module: nn.Module, head: nn.Module):
        super().__init__()
        self.module, self.head = module, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, _ = self.module(x, need_transport=False)
        return out, self.head(out)


# ---------------------------------------------------------------------------------------------
# `edgetrain export-artifacts`
# ---------------------------------------------------------------------------------------------

def export_training_artifacts(run_dir: Path, k: int, out: Path) -> dict:
    """Write module ``k``'s training artifacts, initialised from the run's trained weights,
    plus its inference graph and a description (README.txt, artifacts.json) to ``out``;
    check they load; return the description.

    Atomic and owned: everything is built in a temporary folder beside ``out`` and checked
    there; only then are the files of an earlier export in ``out`` (a folder holding
    edgetrain's artifacts marker; nothing else is ever replaced) removed, the new ones moved
    in and the marker written, under ``out``'s lock.
    """
    from edgetrain.runs.model import load_module, open_run, reading_run

    ort = training_api("`edgetrain export-artifacts`")
    with reading_run(run_dir):
        _, info, config = open_run(run_dir)
        module, head, plan = load_module(run_dir, k)
    _check_artifacts_out(out)
    build = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    if path_problem("--out", build):  # out itself passed: the build folder's name is longer
        raise UserInputError(f"--out {shown(out)}: the folder export-artifacts builds beside it "
                             f"({shown(build.name)}) gets a name too long for this "
                             "filesystem. Choose a shorter --out.")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out)
    build.mkdir()
    try:
        description = _build_artifacts(ort, build, k, module, head, plan, info, config)
        out.mkdir(exist_ok=True)
        with RunLock(out, "--out"):
            _check_artifacts_out(out)  # again, under the lock
            ARTIFACTS_LAYOUT.remove(out, keep=(LOCK_FILE,))
            for name in os.listdir(build):
                os.replace(build / name, out / name)
            write_marker(out, ARTIFACTS_KIND)
    finally:
        ARTIFACTS_LAYOUT.remove(build)
        with contextlib.suppress(OSError):
            build.rmdir()
    return description


def _check_artifacts_out(out: Path) -> None:
    """Raise unless ``out`` is new, empty, or an earlier export-artifacts folder (marked)."""
    if problem := ARTIFACTS_LAYOUT.symlink_problem("--out", out):
        raise UserInputError(problem)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} is a file. Choose a folder.")
    if not out.exists() or not folder_entries(out):
        return
    try:
        marker = read_marker(out, ARTIFACTS_KIND)
    except RecordError as e:
        raise UserInputError(f"--out: {e}") from None
    if marker is None:
        raise UserInputError(f"--out {out} holds other files (no {ARTIFACTS_MARKER}: not an "
                             "earlier `edgetrain export-artifacts`). Choose an empty or new "
                             "folder.")
    if problem := protected_folder_problem("--out", out, "replacing artifacts"):
        raise UserInputError(problem)


def _remove_stale_builds(out: Path) -> None:
    """Build folders a killed export-artifacts left beside ``out`` (``.NAME.<hex>.tmp``):
    only the artifact files in them are removed, then the folder if it is empty."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.[0-9a-f]{{8}}\.tmp")
    for entry in os.scandir(out.parent):
        if pattern.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
            if not ARTIFACTS_LAYOUT.remove(Path(entry.path)):
                os.rmdir(entry.path)


def _build_artifacts(ort, folder: Path, k: int, module: nn.Module, head: nn.Module, plan,
                     info, config) -> dict:
    """Write and check every artifact of module ``k`` in ``folder``."""
    import onnx

    from edgetrain.training.scheduler import tau_for

    tau = tau_for(config, len(info.modules))[k]
    input_shape = (plan.in_channels, plan.in_size, plan.in_size)
    paths = build_training_artifacts(module, head, input_shape, tau, config.label_smoothing,
                                     config.weight_decay, folder)
    export_inference_graph(module, head, input_shape, paths.inference_model)
    graph = onnx.load(str(paths.inference_model))
    description = describe(k, len(info.modules), plan, info, config, tau)
    set_metadata(graph, f"edgetrain module {k} + its head, eval mode",
                 {"edgetrain.module": k, "edgetrain.inputs": description["inputs"]["x"],
                  "edgetrain.mean": json.dumps(list(info.mean)),
                  "edgetrain.std": json.dumps(list(info.std))})
    onnx.save(graph, str(paths.inference_model))
    onnx.checker.check_model(str(paths.inference_model))
    # Loading proves the artifacts are consistent (names, shapes, IR version) for this ORT.
    with quiet_native_stderr():
        state = ort.CheckpointState.load_checkpoint(str(paths.checkpoint))
        session = ort.Module(str(paths.training_model), state)
        ort.Optimizer(str(paths.optimizer_model), session)
    write_text_atomic(folder / "artifacts.json", json.dumps(description, indent=2) + "\n")
    write_text_atomic(folder / "README.txt", readme_text(description))
    return description


def describe(k: int, num_modules: int, plan, info, config, tau: float) -> dict:
    c, s = plan.in_channels, plan.in_size
    source = ("images normalised per channel: (pixel / 255 - mean) / std"
              if k == 0 else f"the 'features' output of module {k - 1}'s inference_model.onnx")
    return {
        "module": k,
        "num_modules": num_modules,
        "blocks": [plan.start, plan.stop],
        "files": {"training_model": "training_model.onnx",
                  "optimizer_model": "optimizer_model.onnx", "checkpoint": "checkpoint",
                  "inference_model": "inference_model.onnx"},
        "inputs": {"x": f"float32 [batch, {c}, {s}, {s}]: {source}",
                   "y": f"int64 [batch]: class labels 0..{info.num_classes - 1}"},
        "training_outputs": {
            "objective": "float32 scalar: loss + weight_decay / 2 * sum of squared parameters "
                         "(what the gradients are taken of)",
            "loss": "float32 scalar: cross-entropy + transport_weight * transport",
            "ce": "float32 scalar: cross-entropy of the head (label smoothing included)",
            "transport": "float32 scalar: sum over the module's blocks of mean(r ** 2)",
            "correct": "int64 scalar: right predictions in the batch",
        },
        "inference_outputs": {
            "features": f"float32 [batch, {plan.out_channels}, {plan.out_size}, {plan.out_size}]"
                        ": the module's output, the next module's input",
            "logits": f"float32 [batch, {info.num_classes}]: the head's class scores"
                      + (" (the network's classifier)" if k == num_modules - 1 else
                         " (auxiliary head)"),
        },
        "loss": {"tau": "inf" if tau == float("inf") else tau,
                 "transport_weight": transport_weight(tau),
                 "label_smoothing": config.label_smoothing,
                 "weight_decay": config.weight_decay},
        "optimizer": {"type": "SGD (ORT SGDOptimizerV2: w -= lr * grad, no momentum)",
                      "lr_at_step_t": "run_lr * (1 - run_momentum ** (t + 1)) / "
                                      "(1 - run_momentum) * cosine factor (see edgetrain/onnx/"
                                      "schedule.py); fine-tuning may want less",
                      "run_lr": config.lr, "run_momentum": config.momentum},
        "normalisation": {"mean": list(info.mean), "std": list(info.std)},
        "dataset": info.dataset,
        "opset": OPSET,
        "exporter": EXPORTER,
        "batchnorm": "training_model.onnx uses batch statistics and updates the running mean "
                     "and variance in the checkpoint (momentum 0.1, biased batch variance); "
                     "inference_model.onnx uses the running statistics it was exported with",
    }


def readme_text(d: dict) -> str:
    k = d["module"]
    loss = d["loss"]
    return f"""edgetrain training artifacts: module {k} of {d['num_modules']} \
(blocks {d['blocks'][0]}..{d['blocks'][1] - 1}), dataset {d['dataset']}

Files
  training_model.onnx   (x, y) -> objective, loss, ce, transport, correct; forward + backward
  optimizer_model.onnx  SGD step: w -= lr * grad (no momentum)
  checkpoint            trained parameters and BatchNorm running statistics
  inference_model.onnx  x [, weights] -> features, logits (eval mode); plain onnxruntime runs it
  artifacts.json        this description, machine-readable

Inputs (batch axis dynamic)
  x  {d['inputs']['x']}
  y  {d['inputs']['y']}
  mean = {d['normalisation']['mean']}, std = {d['normalisation']['std']}

Loss (built into training_model.onnx; gradients are taken of `objective`)
  loss      = CE(head(module(x)), y; label smoothing {loss['label_smoothing']})
              + {loss['transport_weight']:g} * transport      (1 / (2 tau), tau = {loss['tau']})
  transport = sum over the module's residual blocks of mean(r ** 2)
  objective = loss + {loss['weight_decay']:g} / 2 * sum of squared parameters (weight decay)

Train with onnxruntime-training (Python shown; the C, C++, C# and mobile APIs have the same
CheckpointState / Module / Optimizer objects):

  from onnxruntime.training.api import CheckpointState, Module, Optimizer
  state = CheckpointState.load_checkpoint("checkpoint")
  model = Module("training_model.onnx", state)
  opt = Optimizer("optimizer_model.onnx", model)
  model.train()
  for x, y in batches:                      # numpy float32 / int64
      opt.set_learning_rate(lr)             # see artifacts.json "optimizer"
      model.lazy_reset_grad()               # gradients accumulate otherwise
      objective, loss, ce, transport, correct = model(x, y)
      opt.step()
  CheckpointState.save_checkpoint(state, "checkpoint")

BatchNorm: training updates the running mean and variance in the checkpoint
(momentum 0.1; the batch variance is the biased one, torch uses the unbiased one).

Inference with the newly trained weights: every weight and BatchNorm statistic of
inference_model.onnx is also an optional input named as in the checkpoint (module.*, head.*,
as in module_{k}.safetensors); fed, it replaces the exported value:

  import onnxruntime
  session = onnxruntime.InferenceSession("inference_model.onnx")
  weights = {{name: p.data for name, p in state.parameters}}
  features, logits = session.run(None, {{"x": x, **weights}})

eval_model.onnx is not shipped: ORT's eval graph of a training-mode BatchNorm graph does
not load ("number of op outputs should be 1 when Training_mode = False").

Exported by {d['exporter']}, ONNX opset {d['opset']}.
"""
