"""The learning rate ORT's plain SGD gets, step by step, to stand in for torch's SGD.

The torch backend uses SGD with heavy-ball momentum m and a schedule
(``edgetrain.training.sgd.lr_at``): it keeps ``v_t = m v_(t-1) + g_t`` and steps
``lr_t * v_t``. ORT 1.19's SGD op has no momentum (see artifacts.py). For a constant gradient g,
``v_t = (1 - m^(t+1)) / (1 - m) * g``, so plain SGD given

    lr_t * (1 - m^(t+1)) / (1 - m)

takes exactly the heavy ball's steps (tests/test_onnx.py checks it): it starts at ``lr`` and
reaches ``lr / (1 - m)`` (0.5 for the defaults 0.05 and 0.9) after about ``1 / (1 - m)`` steps.
Real gradients change from step to step, so the two backends agree in accuracy, not step by
step. The ramp matters: plain SGD at ``lr / (1 - m)`` from step 0 takes first steps 10x the
heavy ball's, and the BatchNorm running statistics, an average over the last ~10 batches, lag
far behind the weights (seen: 8% aux test accuracy after a 10-step epoch, 46% with the ramp,
47% with torch).
"""

from __future__ import annotations

from edgetrain.training.sgd import lr_at


def momentum_gain(momentum: float, step: int) -> float:
    """How far the heavy ball has moved per unit of a constant gradient at ``step``.

    >>> [round(momentum_gain(0.9, t), 3) for t in (0, 1, 9, 1000)]
    [1.0, 1.9, 6.513, 10.0]
    >>> momentum_gain(0.0, 5)
    1.0
    """
    return (1.0 - momentum ** (step + 1)) / (1.0 - momentum)


def plain_sgd_lr(lr: float, momentum: float, step: int, total: int,
                 schedule: str = "cosine") -> float:
    """ORT's SGD learning rate at ``step`` of ``total``: the schedule x momentum gain.

    >>> round(plain_sgd_lr(0.05, 0.9, 0, 100), 6), round(plain_sgd_lr(0.05, 0.9, 50, 100), 6)
    (0.05, 0.24884)
    """
    return lr_at(schedule, lr, step, total) * momentum_gain(momentum, step)
