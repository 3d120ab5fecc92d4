"""How a torch module becomes an ONNX graph here: one exporter, one opset, one set of fixes.

Exporter: ``torch.onnx.export(..., dynamo=False)``, the TorchScript-based exporter. The dynamo
exporter needs the extra onnxscript package and has produced numerically wrong models (ResNet-18
at 0% accuracy, pytorch issue 169178); the TorchScript one is the one ONNX Runtime training's
artifact generation was seen to work with here (../../shared/ENVIRONMENT.md). Every export is
still verified against torch by its caller.

Opset 17: BatchNormalization-15 with its training mode, which ORT 1.19's gradient builder and
the mobile runtimes all support; opset 18 changes ReduceMean's axes to an input, for nothing
we need.

One module is replaced before export: ``nn.AdaptiveAvgPool2d``. The TorchScript exporter refuses
it when the output size does not divide the input size (the DGL head pools 7x7 to 2x2 on 28-px
images), and ONNX Runtime training crashes (SIGFPE) on the AveragePool it exports when a
BatchNorm follows it and the batch axis is dynamic. :class:`MatrixAvgPool2d` computes the same
adaptive average as two products with constant averaging matrices, which both handle.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from edgetrain.models.pooling import MatrixAvgPool2d

OPSET = 17
EXPORTER = "torch.onnx.export(dynamo=False) (TorchScript-based)"


def exportable(model: nn.Module, *example: torch.Tensor) -> nn.Module:
    """A CPU copy of ``model`` with every ``AdaptiveAvgPool2d`` replaced by a
    :class:`MatrixAvgPool2d` for the input size it sees on ``example`` (CPU tensors) and
    activation checkpointing off; parameter and buffer names are unchanged. The original model
    is not touched (export traces a forward pass, which in training mode would update its
    BatchNorm statistics)."""
    # A CPU copy: export traces on the CPU, whatever device the model trains on.
    model = copy.deepcopy(model).cpu()
    for m in model.modules():
        # torch.utils.checkpoint is a torch autograd feature: a graph has nothing to recompute.
        if hasattr(m, "checkpointing"):
            m.checkpointing = False
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: sizes.update(
                 {name: tuple(i[0].shape[-2:])}))
             for name, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    was_training = model.training
    model.eval()  # eval + no_grad: the probing pass changes no BatchNorm statistics
    with torch.no_grad():
        model(*example)
    model.train(was_training)
    for h in hooks:
        h.remove()
    for name, size in sizes.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        pool = getattr(parent, attr)
        out = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2
        out = tuple(s if o is None else o for o, s in zip(out, size))
        setattr(parent, attr, MatrixAvgPool2d(out, size))
    return model


def export_graph(model: nn.Module, args: tuple[torch.Tensor, ...], path: Path,
                 input_names: list[str], output_names: list[str], batch_outputs: list[str],
                 training: bool, overridable_weights: bool = False) -> onnx.ModelProto:
    """Export ``model`` (already :func:`exportable`) to ``path`` and return the loaded graph.

    The batch axis (axis 0) of every input and of ``batch_outputs`` is dynamic; everything else
    is fixed by ``args``. ``training=True`` keeps BatchNorm in training mode (batch statistics,
    running-statistics update) and constant folding off, as ORT's artifact generation needs;
    ``training=False`` exports inference graphs: BatchNorm uses its running statistics.
    Inference graphs get BatchNorm folded into the convolutions (renamed weights), unless
    ``overridable_weights``: then nothing is folded and every weight is also an optional graph
    input named as in the state dict, so a runtime can feed newly trained weights with the batch
    (ONNX IR >= 4 "overridable initializers"; ORT's ``SessionOptions.add_initializer`` was seen
    to leave the graph's own values in use here).
    """
    fold_constants = not training and not overridable_weights
    dynamic = {name: {0: "batch"} for name in [*input_names, *batch_outputs]}
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    model.train(training)
    with warnings.catch_warnings():
        # The exporter warns that it is the legacy one (chosen on purpose, see above) and that
        # it drops BatchNorm's num_batches_tracked counter, which the graphs do not use.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=False, export_params=True,
                          do_constant_folding=fold_constants, training=mode,
                          keep_initializers_as_inputs=overridable_weights,
                          opset_version=OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic)
    return onnx.load(str(path))


def set_initializers(graph: onnx.ModelProto, state: dict[str, torch.Tensor]) -> int:
    """Overwrite the graph's initializers named like entries of ``state`` with their values;
    return how many were set. A traced training-mode forward has already moved the exported
    BatchNorm statistics by one batch: this puts the true ones back."""
    count = 0
    for init in graph.graph.initializer:
        if init.name in state:
            value = state[init.name].detach().cpu().numpy()
            init.CopyFrom(numpy_helper.from_array(value, init.name))
            count += 1
    return count


def set_metadata(graph: onnx.ModelProto, doc: str, props: dict[str, str]) -> None:
    graph.doc_string = doc
    del graph.metadata_props[:]
    for key, value in props.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, str(value)


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Hold back what native code writes to stderr (ORT's graph optimiser logs ~40 INFO lines
    per graph whatever the logger severity); replay it only if the block raises."""
    try:
        fd = os.dup(2)
    except OSError:  # no real stderr (embedded interpreters): nothing to hide
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(fd, 2)
            held.seek(0)
            os.write(2, held.read()[-8000:])
            raise
        finally:
            os.dup2(fd, 2)
            os.close(fd)
