"""edgetrain: module-wise (TRGL) training of neural networks where memory is short."""

__version__ = "0.1.0"
