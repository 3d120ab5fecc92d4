"""Model families beyond the CIFAR ResNets (issue 14): every block returns ``(output, energy)``
with the energy METHOD.md defines for it. Checked against a hand computation or against the
original module's own forward, in training mode (batch statistics) and eval mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgetrain.models.vgg import VGGBlock, VGGLayer, vgg_layers
from edgetrain.models.vit import VIT_PRESETS, PatchEmbedding, TokenHead, ViTBlock, ViTSpec


def test_vgg_penalises_only_layers_that_keep_their_shape():
    layers = vgg_layers("vgg11", 1, 0.25)
    # 16, M, 32, M, 64, 64, M, 128, 128, M, 128, 128, M: penalised where channels repeat.
    assert [layer.penalised for layer in layers] == [False, False, False, True, False, True,
                                                     True, True]
    assert len(vgg_layers("vgg19", 3)) == 16 and len(vgg_layers("vgg16", 3)) == 13
    torch.manual_seed(0)
    block = VGGBlock(VGGLayer(8, 8, pool=True)).train()
    x = torch.randn(4, 8, 7, 7)
    out, energy = block(x, need_energy=True)
    assert out.shape == (4, 8, 4, 4)  # ceil_mode: 7 -> 4
    with torch.no_grad():
        t = F.relu(F.batch_norm(block.conv(x), None, None, block.bn.weight, block.bn.bias,
                                training=True))
    assert torch.allclose(energy, ((t - x) ** 2).mean(), rtol=1e-5)
    widen = VGGBlock(VGGLayer(4, 8, pool=False))
    assert widen(torch.randn(2, 4, 5, 5), need_energy=True)[1] is None
    assert block(x, need_energy=False)[1] is None


def torch_attention(block, dim: int, heads: int) -> torch.nn.MultiheadAttention:
    """torch's own multi-head attention with a transformer block's projections: the
    reference the blocks' attention is checked against."""
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(block.qkv.weight)
        mha.in_proj_bias.copy_(block.qkv.bias)
        mha.out_proj.weight.copy_(block.proj.weight)
        mha.out_proj.bias.copy_(block.proj.bias)
    return mha


def test_vit_block_energy_is_both_branches():
    spec = ViTSpec(patch=4, dim=16, depth=2, heads=2)
    torch.manual_seed(0)
    embed, block, head = PatchEmbedding(1, 28, spec), ViTBlock(spec), TokenHead(16, 10)
    tokens = embed(torch.randn(3, 1, 28, 28))
    assert tokens.shape == (3, 49, 16)
    out, energy = block(tokens, need_energy=True)
    # By hand, with torch's own multi-head attention as the reference for the attention.
    mha = torch_attention(block, 16, 2)
    with torch.no_grad():
        n1 = block.norm1(tokens)
        a = mha(n1, n1, n1, need_weights=False)[0]
        m = block.fc2(F.gelu(block.fc1(block.norm2(tokens + a))))
    assert torch.allclose(out, tokens + a + m, atol=1e-5)
    assert torch.allclose(energy, (a ** 2).mean() + (m ** 2).mean(), rtol=1e-4)
    assert head(out).shape == (3, 10)
    assert set(VIT_PRESETS) >= {"vit-tiny"}


def test_swin_block_attends_within_windows_and_penalises_both_branches():
    """Without a shift, each w x w window is multi-head attention (torch's own, as reference)
    with the learned relative-position bias added to its scores; the energy is both
    branches'."""
    from edgetrain.models.swin import SwinBlock

    torch.manual_seed(0)
    block = SwinBlock(dim=8, heads=2, side=4, window=2, shift=False, mlp_ratio=2)
    with torch.no_grad():
        block.bias_table.normal_()  # a bias that matters
    x = torch.randn(3, 4, 4, 8)
    out, energy = block(x, need_energy=True)
    mha = torch_attention(block, 8, 2)
    with torch.no_grad():
        bias = block.bias_table[block.bias_index].permute(2, 0, 1)  # [heads, T, T]
        normed, a = block.norm1(x), torch.zeros_like(x)
        for y0 in (0, 2):
            for x0 in (0, 2):
                window = normed[:, y0:y0 + 2, x0:x0 + 2].reshape(3, 4, 8)
                # MultiheadAttention adds a float mask of [N x heads, T, T], batch-major.
                got = mha(window, window, window, attn_mask=bias.repeat(3, 1, 1),
                          need_weights=False)[0]
                a[:, y0:y0 + 2, x0:x0 + 2] = got.reshape(3, 2, 2, 8)
        m = block.fc2(F.gelu(block.fc1(block.norm2(x + a))))
    assert torch.allclose(out, x + a + m, atol=1e-5)
    assert torch.allclose(energy, (a ** 2).mean() + (m ** 2).mean(), rtol=1e-4)


def test_swin_shifted_windows_never_mix_tokens_from_opposite_edges():
    """With the shift, the grid is rolled by w/2 before windowing: a window then also holds
    tokens from opposite edges, which must not attend to each other (the mask), while tokens
    of one region still do."""
    from edgetrain.models.swin import SwinBlock

    torch.manual_seed(0)
    block = SwinBlock(dim=8, heads=2, side=4, window=2, shift=True, mlp_ratio=2)
    assert (block.w, block.shift) == (2, 1)
    x = torch.randn(1, 4, 4, 8)
    with torch.no_grad():
        before = block.attention(x)
        # (0, 0) and (3, 3) share a rolled window but come from opposite corners.
        far = x.clone()
        far[0, 0, 0] += 5.0
        assert torch.allclose(block.attention(far)[0, 3, 3], before[0, 3, 3], atol=1e-6)
        # (1, 1) and (2, 2) share a rolled window inside one region: they do attend.
        near = x.clone()
        near[0, 2, 2] += 5.0
        assert not torch.allclose(block.attention(near)[0, 1, 1], before[0, 1, 1], atol=1e-3)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_torchvision_blocks_are_torchvision_with_the_branch_exposed(name):
    """Same output as torchvision's own forward, same BatchNorm statistics after it, the
    energy equal to mean(r^2) of the branch, and torchvision's parameter names."""
    from torchvision import models

    from edgetrain.models.torchvision_blocks import split_torchvision

    torch.manual_seed(0)
    reference = getattr(models, name)(weights=None).train()
    ours = getattr(models, name)(weights=None)
    ours.load_state_dict(reference.state_dict())  # a "pretrained" state dict loads as is
    stem, blocks = split_torchvision(ours)
    # The residual branches of the reference, caught at their last BatchNorm.
    branches = []
    for module in reference.modules():
        last = (getattr(module, "bn3", None) or getattr(module, "bn2", None)
                if hasattr(module, "downsample") else
                module.conv[-1] if getattr(module, "use_res_connect", False) else None)
        if last is not None:
            last.register_forward_hook(lambda m, i, out: branches.append(out.pow(2).mean()))
    x = torch.randn(2, 3, 64, 64)
    expected = (reference.features(x) if name == "mobilenet_v2" else
                reference.layer4(reference.layer3(reference.layer2(reference.layer1(
                    reference.maxpool(reference.relu(reference.bn1(reference.conv1(x)))))))))
    h, energies = stem(x), []
    for block in blocks:
        h, energy = block(h, need_energy=True)
        if energy is not None:
            energies.append(energy)
    assert torch.allclose(h, expected, atol=1e-5)
    assert len(energies) == len(branches) > 0
    assert all(torch.allclose(a, b, rtol=1e-4) for a, b in zip(energies, branches))
    for (k, a), b in zip(reference.state_dict().items(), ours.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k  # BN statistics too
    names = {n for b in blocks for n, _ in b.named_parameters()}
    assert all(n.startswith("block.") for n in names)


# --- The families through edgetrain's own pipeline: split, modules, heads, fit, export. ---

FAMILY_MODELS = ["vgg11", "vit-tiny", "swin-tiny", "tv-resnet18", "tv-mobilenet_v2"]


@pytest.mark.parametrize("name", [*FAMILY_MODELS, "vgg19", "vit-small", "tv-resnet50",
                                  "resnet20"])
def test_every_family_splits_into_modules_that_chain(name):
    """The planner's view of a network (each module's channels and side, from the spec alone)
    is what the built modules really produce, module after module, with the energy a finite
    scalar; the head fits the module's output."""
    from edgetrain.models.families import network_spec
    from edgetrain.models.network import build_head, build_module
    from edgetrain.models.split import split_network

    spec = network_spec(name, 1, 28)
    plans = split_network(spec, 4, 28, "balanced")
    assert [p.stop - p.start for p in plans] and plans[-1].stop == len(spec.blocks)
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    built = 0
    for plan in plans:
        module, head = build_module(spec, plan), build_head(plan, 10)
        built += sum(p.numel() for p in module.parameters())
        y, transport = module(x, need_transport=True)
        assert y.shape == (2, plan.out_channels, plan.out_size, plan.out_size), plan
        assert transport.dim() == 0 and torch.isfinite(transport)
        assert head(y).shape == (2, 10)
        x = y.detach()
    assert built == spec.parameter_count()  # counted on the meta device, equal to the real one


def test_torchvision_module_holds_only_its_own_tensors():
    """A module of tv-resnet50 is cut from a meta-device network: building the first module
    (stem and layer1, 0.2 M of 23.5 M parameters) allocates its own tensors only, initialised
    (no NaN, BatchNorm at unit scale, fresh running statistics)."""
    from edgetrain.models.families import network_spec

    spec = network_spec("tv-resnet50", 3, 64)
    last = spec.build_module(0, 3)
    params = list(last.parameters())
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in params)
    assert sum(p.numel() for p in params) < spec.parameter_count() / 50
    bns = [m for m in last.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in bns)


def _fit(tmp_path, *args):
    from typer.testing import CliRunner

    from edgetrain.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "fit", "--train-limit", "128", "--test-limit", "64", "--epochs", "1", "--modules", "2",
        "--batch-size", "32", "--threads", "1", "--no-progress", "--out", str(out), *args])
    return out, result


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_family_fits_and_exports(tmp_path, name):
    """A tiny TRGL fit of each family on the built-in data, then its ONNX export, which the
    exporter verifies against torch with onnxruntime (a mismatch fails the export)."""
    import json

    from typer.testing import CliRunner

    from edgetrain.cli import app

    # The even split: every module then holds blocks with a penalty (the memory split may give
    # MobileNetV2's last module only blocks without a skip connection, which have none).
    out, result = _fit(tmp_path, "--model", name, "--method", "trgl", "--split", "even")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    model = json.loads((out / "model.json").read_text())
    assert model["model"] == name and model["architecture"] in ("vgg", "vit", "torchvision")
    assert 0.0 <= report["test_accuracy"] <= 1.0
    # The penalty was applied: TRGL's logged transport term is positive in every module.
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    transports = [e["train_transport"] for e in epochs if e.get("event") == "epoch"]
    assert transports and all(t > 0 for t in transports)
    exported = CliRunner().invoke(app, ["export", str(out), "--out",
                                        str(tmp_path / "model.onnx")])
    assert exported.exit_code == 0, exported.output
    assert "onnxruntime vs torch" in exported.output


def test_family_under_a_memory_budget_and_resume(tmp_path):
    """The planner probes a transformer's modules like a ResNet's; a finished run resumes as
    finished (model.json rebuilds the family)."""
    out, result = _fit(tmp_path, "--model", "vit-tiny", "--memory-budget", "1.5GB")
    assert result.exit_code == 0, result.output
    assert "memory plan" in result.output
    again, result = _fit(tmp_path, "--model", "vit-tiny", "--memory-budget", "1.5GB",
                         "--resume")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args,needle", [
    (["--model", "vit-tiny", "--backend", "ort"], "--backend ort cannot train --model vit-tiny"),
    (["--model", "vgg13"], "vgg11, vgg16, vgg19, vit-tiny"),
    (["--model", "vgg11", "--modules", "9"], "vgg11 has 8 blocks"),
    (["--model", "vit-tiny", "--image-size", "30"], "multiple of 4"),
    (["--model", "swin-tiny", "--image-size", "30"], "choose --image-size a multiple of 4"),
])
def test_family_bad_input_is_a_clear_error(tmp_path, args, needle):
    out, result = _fit(tmp_path, *args)
    assert result.exit_code != 0 and needle in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


# --- Your own model from Python (edgetrain.api). ---

def _user_blocks():
    from torch import nn

    def conv(c_in, c_out, stride=1):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                             nn.BatchNorm2d(c_out), nn.ReLU())

    class Residual(nn.Module):
        """Gives its own energy: mean(r^2) of its branch."""

        def __init__(self, c):
            super().__init__()
            self.branch = conv(c, c)

        def forward(self, x):
            r = self.branch(x)
            return x + r, (r ** 2).mean()

    torch.manual_seed(0)
    return [conv(1, 8), conv(8, 8), conv(8, 16, 2), Residual(16)]


def test_user_blocks_train_export_refused_and_reload(tmp_path):
    """A user's CNN trains module-wise with the penalty (its own energy for the residual
    block, the T - id rule for shape-keeping layers); the blocks given are not trained in
    place; the run reloads in Python with the same blocks, and the command line says clearly
    that it cannot rebuild such a run."""
    import json

    from typer.testing import CliRunner

    import edgetrain.api as et
    from edgetrain.cli import app
    from edgetrain.errors import UserInputError

    blocks = _user_blocks()
    before = [t.clone() for b in blocks for t in b.state_dict().values()]
    out = tmp_path / "mine"
    trained = et.fit(blocks, modules=2, epochs=1, train_limit=128, test_limit=64,
                     batch_size=32, threads=1, method="trgl", out=out)
    assert trained.report["model"] == "custom" and 0 <= trained.report["test_accuracy"] <= 1
    assert json.loads((out / "model.json").read_text())["architecture"] == "custom"
    after = [t for b in blocks for t in b.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    epochs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(e["train_transport"] > 0 for e in epochs if e.get("event") == "epoch")
    x = torch.randn(3, 1, 28, 28)
    again = et.load(out, blocks)
    assert torch.equal(again(x), trained.network(x))
    with pytest.raises(UserInputError, match="network given from Python"):
        et.load(out)
    exported = CliRunner().invoke(app, ["export", str(out), "--out",
                                        str(tmp_path / "model.onnx")])
    assert exported.exit_code != 0 and "edgetrain.api.load" in exported.output
    assert "Traceback" not in exported.output


@pytest.mark.parametrize("blocks,needle", [
    ([], "non-empty list"),
    (["not a module"], "non-empty list"),
    ([lambda: 3], "returned int"),
    ([torch.nn.Flatten()], "blocks[0] returns shape"),
    ([torch.nn.Conv2d(3, 4, 3)], "blocks[0] fails on an input"),  # data has 1 channel
])
def test_user_blocks_bad_input(tmp_path, blocks, needle):
    import edgetrain.api as et
    from edgetrain.errors import UserInputError

    with pytest.raises(UserInputError, match=None) as e:
        et.fit(blocks, modules=1, epochs=1, train_limit=64, test_limit=32, threads=1,
               out=tmp_path / "run")
    assert needle in str(e.value)
    assert not (tmp_path / "run").exists()


def test_model_custom_on_the_command_line_is_a_clear_error(tmp_path):
    out, result = _fit(tmp_path, "--model", "custom")
    assert result.exit_code != 0 and "edgetrain.api.fit" in result.output


def test_readme_example_runs(tmp_path, monkeypatch):
    """The README's Python example, as written, on a data subset (the only change)."""
    import re
    from pathlib import Path

    import edgetrain.api as et

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"### Your own model, from Python\n\n```python\n(.*?)```", readme, re.S)[1]
    real_fit = et.fit
    monkeypatch.setattr(et, "fit", lambda *a, **k: real_fit(
        *a, **k, train_limit=128, test_limit=64, threads=1))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "runs/my-cnn/report.json").is_file()


@pytest.mark.parametrize("args,needle", [
    (["--model", "vgg11", "--widths", "8,16,32"], "--widths sets the channels of the CIFAR"),
    (["--model", "vit-tiny", "--shortcut", "zero-pad"], "--shortcut applies to the CIFAR"),
])
def test_resnet_only_flags_are_refused_for_other_families(tmp_path, args, needle):
    out, result = _fit(tmp_path, *args)
    assert result.exit_code == 2 and needle in result.output, result.output
    assert not out.exists()


def test_init_is_refused_for_user_blocks(tmp_path):
    import edgetrain.api as et
    from edgetrain.errors import UserInputError

    with pytest.raises(UserInputError, match="--init does not apply"):
        et.fit(_user_blocks(), modules=2, init="orthogonal", out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --- torchvision weights through fit (--pretrained). ---

@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A torchvision ResNet-18 state dict on disk, as a user would have one (random weights:
    pretrained files cannot be downloaded here; the format is the same)."""
    from torchvision import models

    torch.manual_seed(0)
    net = models.resnet18(weights=None)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return net, path


def test_pretrained_modules_compute_what_torchvision_computes(resnet18_file):
    """Every module built with --pretrained holds the file's tensors: chained, the modules
    give torchvision's own forward of the same network, layer for layer."""
    from edgetrain.models.families import network_spec
    from edgetrain.models.torchvision_blocks import split_torchvision

    net, path = resnet18_file
    spec = network_spec("tv-resnet18", 3, 64, pretrained=path)
    modules = [spec.build_module(a, b).eval() for a, b in ((0, 3), (3, 6), (6, 8))]
    stem, blocks = split_torchvision(net.eval(), 3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = stem(x)
        for block in blocks:
            expected = block(expected)[0]
        got = x
        for module in modules:
            got = module(got, need_transport=False)[0]
    assert torch.allclose(got, expected, atol=1e-5)
    # One input channel (Fashion-MNIST): the first conv gets the sum of the RGB filters.
    grey = network_spec("tv-resnet18", 1, 28, pretrained=path).build_module(0, 1)
    assert torch.allclose(grey.stem[0].weight, net.conv1.weight.sum(1, keepdim=True))


def test_pretrained_fit_and_its_bad_input(tmp_path, resnet18_file):
    _, path = resnet18_file
    out, result = _fit(tmp_path, "--model", "tv-resnet18", "--pretrained", str(path))
    assert result.exit_code == 0, result.output
    for args, needle in [
        (["--model", "resnet20", "--pretrained", str(path)], "into the tv-* models only"),
        (["--model", "tv-resnet18", "--pretrained", str(tmp_path / "none.pth")],
         "no such file"),
        (["--model", "tv-mobilenet_v2", "--pretrained", str(path)],
         "is not a tv-mobilenet_v2 state dict"),
        (["--model", "tv-resnet18", "--pretrained", __file__], "cannot be read as a torch"),
    ]:
        bad = tmp_path / "bad"
        _, result = _fit(bad, *args)
        assert result.exit_code == 2 and needle in result.output, (args, result.output)
        assert "Traceback" not in result.output and not (bad / "run").exists()
