"""`python -m edgetrain` and the `edgetrain` command.

The process first takes edgetrain's allocation policy: its malloc (tcmalloc, where installed)
must be preloaded before torch loads, so :func:`relaunch` may re-execute the command once with
it (edgetrain/memory/allocator.py). Only then is the CLI, and with it torch, imported.
"""

from edgetrain.memory.allocator import relaunch


def main() -> None:
    relaunch()
    from edgetrain.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
