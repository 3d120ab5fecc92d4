"""The kinetic energy of a residual branch, ``mean(r ** 2)``: what TRGL's transport term sums.

Every block of a model family returns ``(output, energy)``; ``energy`` is the block's scalar
kinetic energy (summed over its residual branches), or None when the caller did not ask for it.
The block computes it in the cheapest exact form it has:

* **BatchNorm form** (``"bn"``), for a branch whose last layer is BatchNorm using batch
  statistics (training mode). With z the BatchNorm's input and mu_c, var_c its per-channel batch
  mean and biased variance, ``r = gamma (z - mu) / sqrt(var + eps) + beta``, so per channel
  ``mean_NHW(r^2) = gamma^2 var / (var + eps) + beta^2`` exactly (the cross term vanishes:
  ``mean(z - mu) = 0``), and ``mean(r^2)`` is the mean of that over channels. It is the same
  function of (z, gamma, beta) as the direct form, so its value and gradients are the same up to
  rounding, and it keeps no activation of its own (:func:`batchnorm_branch`).
* **Direct form** (``"direct"``): ``r.pow(2).mean()``. Exact for any branch; costs one saved
  activation per branch (``pow`` keeps ``r`` for backward) and two passes over r forward, three
  backward. Used for a BatchNorm in eval mode (r is then an affine map of z with the running
  statistics, and the identity above does not hold), for branches that do not end in BatchNorm
  (VGG layers written ``id + (T - id)``, transformer attention and MLP branches), and in ONNX
  graphs (see edgetrain/onnx/artifacts.py: ORT's gradient of the BatchNorm form costs more than
  the direct form's).

``transport_form = "bn"`` on a block means "the BatchNorm form where it applies, the direct
form elsewhere"; ``"direct"`` forces the direct form (tests compare the two on the same weights;
``edgetrain profile --transport-form direct`` measures what it costs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from edgetrain.errors import UserInputError

TRANSPORT_FORMS = ("bn", "direct")


def check_transport_form(form: str) -> str:
    if form not in TRANSPORT_FORMS:
        raise UserInputError(f"--transport-form {form!r} is not known; choose one of "
                             f"{', '.join(TRANSPORT_FORMS)}.")
    return form


def uses_batch_statistics(bn: nn.Module) -> bool:
    """Whether ``bn`` normalises with the batch's statistics (as torch's BatchNorm decides)."""
    return isinstance(bn, _BatchNorm) and (
        bn.training or (bn.running_mean is None and bn.running_var is None))


def direct_energy(r: torch.Tensor) -> torch.Tensor:
    """``mean(r ** 2)`` over every element. Memory: autograd keeps ``r`` for backward."""
    return r.pow(2).mean()


def batchnorm_branch(bn: nn.Module, z: torch.Tensor, need_energy: bool, form: str = "bn"
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(r, energy)`` for a residual branch ending in ``bn``: ``r = bn(z)`` and ``mean(r ** 2)``
    (None unless ``need_energy``), in the BatchNorm form where it is exact and allowed
    (``form == "bn"``, ``bn`` using batch statistics, not tracing an ONNX export), in the direct
    form otherwise."""
    if not need_energy:
        return bn(z), None
    if form == "bn" and uses_batch_statistics(bn) and not torch.onnx.is_in_onnx_export():
        r, mean, invstd = _batch_norm_with_stats(bn, z)
        return r, _BatchNormEnergy.apply(z, bn.weight, bn.bias, mean, invstd, bn.eps)
    r = bn(z)
    return r, direct_energy(r)


def _batch_norm_with_stats(bn: _BatchNorm, z: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``bn(z)`` in batch-statistics mode, plus the batch mean and ``1 / sqrt(var + eps)`` it
    normalised with: the per-channel numbers BatchNorm computes (and saves for its backward)
    anyway, so the energy costs no pass over z in the forward.

    Mirrors ``_BatchNorm.forward`` (running statistics: momentum, cumulative average,
    ``num_batches_tracked``) but calls ``torch.native_batch_norm``, which returns those
    statistics; output and running statistics are bitwise equal to ``bn(z)``'s on the CPU
    (tests/test_transport.py). On CUDA this runs torch's native BatchNorm kernel, not cuDNN's.
    Forward hooks registered on ``bn`` do not run (``bn.forward`` is not called).
    """
    bn._check_input_dim(z)
    if z.numel() // z.shape[1] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"size {tuple(z.shape)}")
    factor = 0.0 if bn.momentum is None else bn.momentum
    track = bn.training and bn.track_running_stats
    if track and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
    r, mean, invstd = torch.native_batch_norm(
        z, bn.weight, bn.bias, bn.running_mean if track else None,
        bn.running_var if track else None, True, factor, bn.eps)
    return r, mean, invstd


class _BatchNormEnergy(torch.autograd.Function):
    """``mean_c(gamma_c^2 var_c / (var_c + eps) + beta_c^2)`` from BatchNorm's own batch
    statistics, with the exact gradient of that function of (z, gamma, beta).

    Memory: saves z (the tensor BatchNorm's backward keeps already: a second reference to the
    same storage, not a copy) and per-channel numbers. Time: nothing over z in the forward;
    backward writes one z-sized gradient, ``coef_c (z - mu_c)``, that autograd adds to
    BatchNorm's: two passes over z-sized tensors (the direct form makes five over r).
    """

    @staticmethod
    def forward(ctx, z, weight, bias, mean, invstd, eps):
        ratio = 1.0 - eps * invstd.pow(2)  # var / (var + eps), from 1/sqrt(var + eps)
        per_channel = ratio if weight is None else weight.pow(2) * ratio + bias.pow(2)
        ctx.eps = eps
        ctx.save_for_backward(z, weight, bias, mean, invstd)
        return per_channel.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        z, weight, bias, mean, invstd = ctx.saved_tensors
        channels = invstd.numel()
        grad_z = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # d/dz_i of gamma^2 var / (var + eps) / C, with var = mean_NHW((z - mu)^2):
            # gamma^2 eps / (var + eps)^2 * 2 (z_i - mu) / (M C), M = values per channel
            # (mu's own derivative drops out: sum (z - mu) = 0). Of order eps: tiny unless var
            # is small, but kept, so the gradients are the direct form's.
            scale = ctx.eps * invstd.pow(4) * (2.0 / z.numel())
            coef = grad * (scale if weight is None else weight.pow(2) * scale)
            # (z - mu) * coef in one pass over z, with BatchNorm's inference kernel as a
            # per-channel affine map (running mean mu, running variance 1, eps 0: the scale
            # is exactly 1): on the CPU about 2.5x faster than addcmul with broadcast
            # per-channel operands, which matters because this pass is most of the form's cost.
            grad_z = F.batch_norm(z, mean, torch.ones_like(mean), coef, None, False, 0.0, 0.0)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = grad * (2.0 / channels) * weight * (1.0 - ctx.eps * invstd.pow(2))
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad * (2.0 / channels) * bias
        return grad_z, grad_weight, grad_bias, None, None, None
