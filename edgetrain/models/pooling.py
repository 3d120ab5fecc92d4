"""Adaptive average pooling as two matrix products, for the light head and for ONNX export.

``nn.AdaptiveAvgPool2d`` to a size that does not divide the input (the light head pools 28 or
14 px to 8) uses overlapping windows, and on the CPU its forward and backward are slow: 9-11 ms
at batch 128 against 3 ms for the same average as ``P_h @ x @ P_w^T`` (one core; the products
run on BLAS). The products keep no activation for backward (``P`` needs no gradient, so autograd
saves only the small matrices), and they export to ONNX as MatMul with constant matrices, which
the TorchScript exporter and ONNX Runtime training handle where they fail on the adaptive pool
(edgetrain/onnx/graphs.py).
"""

from __future__ import annotations

import torch
from torch import nn


class MatrixAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d(out)`` for a fixed input size, as ``P_h @ x @ P_w^T``.

    Row i of ``P`` averages input positions ``floor(i n / o) .. ceil((i + 1) n / o) - 1``,
    exactly PyTorch's adaptive windows (which overlap when o does not divide n). The matrices
    are plain tensors, not buffers: the exporter writes them as constants and they never appear
    in a state dict.
    """

    def __init__(self, output_size: tuple[int, int], input_size: tuple[int, int]):
        super().__init__()
        self.ph = _averaging_matrix(output_size[0], input_size[0])
        self.pw = _averaging_matrix(output_size[1], input_size[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.ph.to(x), self.pw.to(x)
        # Both products as (..., n) @ (n, o), which torch folds into one matrix product each
        # and for which autograd keeps only the small matrix: ``ph @ x`` would broadcast ph
        # over batch and channels and keep that expanded operand for backward (batch x
        # channels x o x n elements, counted as memory by the planner).
        x = torch.matmul(x, pw.t())  # (N, C, H, o_w)
        # A transposed copy (transient): the product below must see a contiguous operand to
        # be folded, or torch would broadcast ph instead.
        x = torch.matmul(x.transpose(-1, -2).contiguous(), ph.t())  # (N, C, o_w, o_h)
        return x.transpose(-1, -2)


def _averaging_matrix(out: int, n: int) -> torch.Tensor:
    """
    >>> _averaging_matrix(2, 3)
    tensor([[0.5000, 0.5000, 0.0000],
            [0.0000, 0.5000, 0.5000]])
    """
    p = torch.zeros(out, n)
    for i in range(out):
        start, stop = (i * n) // out, -(-(i + 1) * n // out)
        p[i, start:stop] = 1.0 / (stop - start)
    return p
