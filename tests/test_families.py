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


def test_vit_block_energy_is_both_branches():
    spec = ViTSpec(patch=4, dim=16, depth=2, heads=2)
    torch.manual_seed(0)
    embed, block, head = PatchEmbedding(1, 28, spec), ViTBlock(spec), TokenHead(16, 10)
    tokens = embed(torch.randn(3, 1, 28, 28))
    assert tokens.shape == (3, 49, 16)
    out, energy = block(tokens, need_energy=True)
    # By hand, with torch's own multi-head attention as the reference for the attention.
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(block.qkv.weight)
        mha.in_proj_bias.copy_(block.qkv.bias)
        mha.out_proj.weight.copy_(block.proj.weight)
        mha.out_proj.bias.copy_(block.proj.bias)
        n1 = block.norm1(tokens)
        a = mha(n1, n1, n1, need_weights=False)[0]
        m = block.fc2(F.gelu(block.fc1(block.norm2(tokens + a))))
    assert torch.allclose(out, tokens + a + m, atol=1e-5)
    assert torch.allclose(energy, (a ** 2).mean() + (m ** 2).mean(), rtol=1e-4)
    assert head(out).shape == (3, 10)
    assert set(VIT_PRESETS) >= {"vit-tiny"}


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
