"""The machine edgetrain runs on: what it is (machine.py: CPU, board, memory, GPUs, without
importing torch) and the device profiles that describe targets (profiles.py: the files in
devices/, their checks, and applying one to a run)."""
