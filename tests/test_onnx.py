"""ONNX export and ONNX Runtime training, through the real CLI, on a tiny model."""

import copy
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from edgetrain.cli import app
from edgetrain.runs.weights import load_weights

TINY = ["--model", "resnet8", "--widths", "8,16,16", "--modules", "2", "--train-limit", "600",
        "--test-limit", "300", "--batch-size", "64", "--lr", "0.1", "--threads", "2",
        "--no-progress"]


def _has_training_api() -> bool:
    try:
        import onnxruntime.training.api  # noqa: F401
    except ImportError:
        return False
    return True


needs_training = pytest.mark.skipif(not _has_training_api(),
                                    reason="onnxruntime-training is not installed here")


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def without_training_api(mp: pytest.MonkeyPatch) -> None:
    """Make `import onnxruntime.training` fail, as where only plain onnxruntime installs."""
    for name in ("onnxruntime.training", "onnxruntime.training.api",
                 "onnxruntime.training.artifacts"):
        mp.setitem(sys.modules, name, None)


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("torch") / "run"
    # --split even: the shapes the tests below check (module 1's output 16x14x14) are its.
    result = cli("fit", *TINY, "--epochs", "1", "--split", "even", "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def exported(torch_run, tmp_path_factory):
    """`edgetrain export --per-module`, run where onnxruntime-training cannot be imported:
    export must need plain onnxruntime only."""
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    with pytest.MonkeyPatch.context() as mp:
        without_training_api(mp)
        result = cli("export", torch_run, "--out", out, "--per-module")
    assert result.exit_code == 0, result.output
    return out, result.output


def test_export_matches_torch_at_two_batch_sizes(torch_run, exported):
    import onnx
    import onnxruntime

    from edgetrain.data import iterate_batches, load_dataset, normalize
    from edgetrain.runs.model import load_stitched

    path, output = exported
    assert "max abs difference" in output and "opset 17" in output
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    props = {p.key: p.value for p in graph.metadata_props}
    network, info = load_stitched(torch_run)
    assert json.loads(props["edgetrain.mean"]) == list(info.mean)
    assert json.loads(props["edgetrain.std"]) == list(info.std)

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    data = load_dataset("fashion-mnist-mini", train_limit=600, test_limit=300, seed=0)
    correct_torch = correct_onnx = 0
    diffs = {}
    with torch.no_grad():
        for x, y in iterate_batches(data.test, 128, shuffle=False):  # 128, 128, 44
            x = normalize(x, data.info)
            expected = network(x).numpy()
            got = session.run(None, {"input": x.numpy()})[0]
            diffs[len(y)] = float(np.abs(got - expected).max())
            correct_torch += int((expected.argmax(1) == y.numpy()).sum())
            correct_onnx += int((got.argmax(1) == y.numpy()).sum())
    assert len(diffs) == 2 and max(diffs.values()) <= 1e-4, diffs
    assert correct_onnx == correct_torch
    report = json.loads((torch_run / "report.json").read_text())
    assert correct_onnx / 300 == pytest.approx(report["test_accuracy"])
    assert f"ONNX {100 * correct_onnx / 300:.2f}%" in output


def test_per_module_graphs_chain_to_the_whole(exported):
    import onnxruntime

    path, _ = exported
    parts = [path.with_name(f"model.module_{k}.onnx") for k in range(2)]
    sessions = [onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                for p in (path, *parts)]
    x = np.random.default_rng(0).standard_normal((5, 1, 28, 28)).astype(np.float32)
    whole = sessions[0].run(None, {"input": x})[0]
    features = x
    for s in sessions[1:]:
        features = s.run(None, {"input": features})[0]
    assert features.shape == whole.shape == (5, 10)
    np.testing.assert_allclose(features, whole, atol=1e-5)


def test_export_errors_are_clean(tmp_path, torch_run):
    result = cli("export", tmp_path / "nothing", "--out", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "RUN_DIR" in result.output
    result = cli("export", torch_run, "--out", tmp_path / "m.txt")
    assert result.exit_code == 2 and "--out" in result.output
    result = cli("export-artifacts", torch_run, "--module", "7", "--out", tmp_path / "a")
    assert result.exit_code == 2 and "--module 7" in result.output
    assert "Traceback" not in result.output


def test_matrix_pool_is_adaptive_pool():
    from edgetrain.onnx.graphs import MatrixAvgPool2d

    for size in (7, 8, 14, 5):
        x = torch.randn(3, 4, size, size)
        expected = torch.nn.AdaptiveAvgPool2d(2)(x)
        torch.testing.assert_close(MatrixAvgPool2d((2, 2), (size, size))(x), expected,
                                   rtol=0, atol=1e-6)


def test_plain_sgd_schedule_follows_torch_sgd_with_momentum():
    """For a constant gradient, plain SGD with plain_sgd_lr moves exactly as the torch
    backend's optimizer (SGD, momentum, cosine schedule) does."""
    from edgetrain.onnx.schedule import plain_sgd_lr
    from edgetrain.training.sgd import lr_at
    from edgetrain.training.steps import make_optimizer

    w = torch.zeros(1, requires_grad=True)
    opt, sched = make_optimizer([w], 0.1, 0.9, 0.0, 7)
    plain = 0.0
    for step in range(8):
        assert lr_at("cosine", 0.1, step, 7) == pytest.approx(sched.get_last_lr()[0], abs=1e-12)
        opt.zero_grad()
        w.sum().backward()  # gradient 1
        opt.step()
        sched.step()
        plain -= plain_sgd_lr(0.1, 0.9, step, 7) * 1.0
        assert plain == pytest.approx(w.item(), rel=1e-6)


@needs_training
def test_ort_loss_equals_torch_loss(tmp_path):
    """The exported training graph's forward gives torch's TRGL loss, cross-entropy (label
    smoothing included) and transport on the same weights and batch (rtol 1e-5), and ORT
    updates BatchNorm's running statistics like torch (the variance with the biased batch
    variance). Torch computes the transport in the BatchNorm form (training mode), the graph in
    the direct form (edgetrain/onnx/artifacts.py): the same numbers."""
    from onnxruntime.training.api import CheckpointState, Module

    from edgetrain.models.network import build_head, build_module
    from edgetrain.models.resnet import resnet_spec
    from edgetrain.models.split import split_network
    from edgetrain.onnx.artifacts import build_training_artifacts
    from edgetrain.training.transport import module_loss

    torch.manual_seed(0)
    spec = resnet_spec("resnet8", 1, (8, 16, 16))
    plan = split_network(spec, 2, 28)[0]
    module, head = build_module(spec, plan), build_head(plan, 10)
    tau, smoothing, wd = 0.5, 0.1, 5e-4
    art = build_training_artifacts(module, head, (1, 28, 28), tau, smoothing, wd, tmp_path)
    state = CheckpointState.load_checkpoint(str(art.checkpoint))
    session = Module(str(art.training_model), state)
    session.train()
    x, y = torch.randn(12, 1, 28, 28), torch.randint(0, 10, (12,))
    objective, loss, ce, transport, correct = session(x.numpy(), y.numpy())

    m, h = copy.deepcopy(module).train(), copy.deepcopy(head).train()
    assert {b.transport_form for b in m.blocks} == {"bn"}
    with torch.no_grad():
        out, t_transport = m(x)
        logits = h(out)
        t_loss, t_ce = module_loss(logits, y, t_transport, tau, smoothing)
        squares = sum(p.pow(2).sum() for p in [*m.parameters(), *h.parameters()])
    assert float(transport) == pytest.approx(float(t_transport), rel=1e-5)
    assert float(ce) == pytest.approx(float(F.cross_entropy(logits, y, label_smoothing=0.1)),
                                      rel=1e-5)
    assert float(ce) == pytest.approx(float(t_ce), rel=1e-5)
    assert float(loss) == pytest.approx(float(t_loss), rel=1e-5)
    assert float(objective) == pytest.approx(float(t_loss + 0.5 * wd * squares), rel=1e-5)
    assert int(correct) == int((logits.argmax(1) == y).sum())

    # One training-mode forward moved the running statistics as torch's did.
    bn, name = m.stem.bn, "module.stem.bn"
    np.testing.assert_allclose(state.parameters[f"{name}.running_mean"].data,
                               bn.running_mean.numpy(), atol=1e-6)
    n = 12 * 28 * 28  # values per channel in the batch
    unbiased_update = bn.running_var.numpy() - 0.9  # 0.1 * unbiased batch variance
    np.testing.assert_allclose(state.parameters[f"{name}.running_var"].data,
                               0.9 + unbiased_update * (n - 1) / n, rtol=1e-5)


@needs_training
def test_fit_with_ort_backend(tmp_path):
    out = tmp_path / "run"
    result = cli("fit", *TINY, "--epochs", "2", "--backend", "ort", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["test_accuracy"] > 0.2  # 10 classes: chance is 0.1
    epochs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "epoch"]
    assert len(epochs) == 4 and all(r["backend"] == "ort" for r in epochs)
    for k in range(2):
        losses = [r["train_loss"] for r in epochs if r["module"] == k]
        assert losses[1] < losses[0], losses
    assert not (out / "ort").exists()  # the artifacts of initial weights are cleaned up
    # ORT's trained weights and BatchNorm statistics reached the saved modules.
    state = load_weights(out / "modules" / "module_0.safetensors")
    assert state["module.stem.bn.running_var"].ne(1).all()
    assert state["module.stem.bn.num_batches_tracked"].item() == 20
    assert report["modules"][-1]["aux_test_accuracy"] == pytest.approx(
        report["test_accuracy"], abs=0.02)


@needs_training
def test_export_artifacts_train_on_device(torch_run, tmp_path):
    import onnxruntime
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    from edgetrain.runs.model import load_module

    out = tmp_path / "artifacts"
    result = cli("export-artifacts", torch_run, "--module", "1", "--out", out)
    assert result.exit_code == 0, result.output
    for name in ("training_model.onnx", "optimizer_model.onnx", "checkpoint",
                 "inference_model.onnx", "README.txt", "artifacts.json"):
        assert (out / name).exists(), name
    description = json.loads((out / "artifacts.json").read_text())
    assert description["inputs"]["x"].startswith("float32 [batch, 16, 14, 14]")

    state = CheckpointState.load_checkpoint(str(out / "checkpoint"))
    trained = load_weights(torch_run / "modules" / "module_1.safetensors")
    for name, param in state.parameters:  # initialised from the run's trained module
        np.testing.assert_array_equal(param.data, trained[name].numpy())
    session = Module(str(out / "training_model.onnx"), state)
    optimizer = Optimizer(str(out / "optimizer_model.onnx"), session)
    x = np.random.default_rng(0).standard_normal((8, 16, 14, 14)).astype(np.float32)
    y = np.arange(8, dtype=np.int64)
    optimizer.set_learning_rate(0.1)
    session.lazy_reset_grad()
    first = session(x, y)
    optimizer.step()
    assert np.isfinite(first[0])
    assert not np.array_equal(state.parameters["head.fc.weight"].data,
                              trained["head.fc.weight"].numpy())

    # The inference graph runs the weights the device has just trained, fed in by name.
    weights = {name: p.data for name, p in state.parameters}
    inference = onnxruntime.InferenceSession(str(out / "inference_model.onnx"),
                                             providers=["CPUExecutionProvider"])
    features, logits = inference.run(None, {"x": x, **weights})
    module, head, _ = load_module(torch_run, 1)
    module.load_state_dict({n[7:]: torch.from_numpy(v) for n, v in weights.items()
                            if n.startswith("module.")}, strict=False)
    head.load_state_dict({n[5:]: torch.from_numpy(v) for n, v in weights.items()
                          if n.startswith("head.")}, strict=False)
    with torch.no_grad():
        t_features, _ = module.eval()(torch.from_numpy(x))
        t_logits = head.eval()(t_features)
    np.testing.assert_allclose(features, t_features.numpy(), atol=1e-4)
    np.testing.assert_allclose(logits, t_logits.numpy(), atol=1e-4)


def test_missing_training_api_is_a_clean_error(tmp_path, monkeypatch, torch_run):
    without_training_api(monkeypatch)
    result = cli("fit", *TINY, "--epochs", "1", "--backend", "ort", "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert "onnxruntime-training" in result.output and "--backend torch" in result.output
    assert "Traceback" not in result.output
    result = cli("export-artifacts", torch_run, "--module", "0", "--out", tmp_path / "a")
    assert result.exit_code == 2 and "onnxruntime-training" in result.output
