"""Resident memory that importing each library adds on top of torch, each in a fresh process.

On a device with 2-4 GB, a library a training process imports and never frees is memory the
network cannot use. This measures what edgetrain's design choices rest on (why datasets are not
read through torchvision, why edgetrain has its own SGD):

    python benchmarks/import_costs.py

Each row: a new Python process imports torch, reads its resident set (VmRSS, Linux), runs the
statement, reads it again. Prints a markdown table; the numbers are this machine's.
"""

from __future__ import annotations

import platform
import subprocess
import sys

STATEMENTS = {
    "import torchvision": "import torchvision",
    "construct torch.optim.SGD": "torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)",
    "import torch.utils.checkpoint, first call": (
        "import torch.utils.checkpoint as c; "
        "c.checkpoint(torch.sin, torch.ones(1, requires_grad=True), use_reentrant=False)"),
    "import scipy.io": "import scipy.io",
    "import onnxruntime": "import onnxruntime",
    "import edgetrain.fit (the fit path)": "import edgetrain.fit",
    "edgetrain: load fashion-mnist-mini": (
        "from edgetrain.data import load_dataset; load_dataset('fashion-mnist-mini')"),
}

_PROBE = """
import sys
def rss():
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmRSS'))
import torch
before = rss()
exec(sys.argv[1])
print(before, rss())
"""


def measure(statement: str) -> tuple[int, int]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, statement], capture_output=True,
                          text=True, check=True)
    before, after = proc.stdout.split()[-2:]
    return int(before), int(after)


def main() -> None:
    if not sys.platform.startswith("linux"):
        sys.exit("reads /proc/self/status: Linux only")
    import torch

    print(f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}")
    print("\n| statement | torch alone (MiB) | added (MiB) |\n|---|---|---|")
    for label, statement in STATEMENTS.items():
        try:
            before, after = measure(statement)
        except subprocess.CalledProcessError as err:
            print(f"| {label} | – | failed: {err.stderr.strip().splitlines()[-1]} |")
            continue
        print(f"| {label} | {before / 2**20:.0f} | {(after - before) / 2**20:.0f} |")


if __name__ == "__main__":
    main()
