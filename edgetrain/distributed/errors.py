"""What can go wrong between ranks, said so that a person knows which process to look at.

Two kinds, two exit codes of ``edgetrain fit``:

* :class:`LaunchError` (a :class:`UserInputError`, exit code 2): the job cannot start as
  launched: no torchrun environment, a world size that does not match ``--modules`` x
  ``--replicas``, ranks started with different flags, a rendezvous that does not complete.
  Nothing was trained; fix the launch command.
* :class:`PeerError` (exit code 3, like a diverged run): the job started and a rank died or
  stopped answering within ``--dist-timeout``. The message names this rank and the peer it
  was waiting on. Finished modules and the last epoch checkpoint are in the run folder:
  restart the whole job with ``--resume``.

This module imports no torch: the CLI imports it to map errors to exit codes.
"""

from __future__ import annotations

from edgetrain.errors import UserInputError


class LaunchError(UserInputError):
    """The distributed job cannot start as launched (exit code 2)."""


class PeerError(RuntimeError):
    """A peer rank died or did not answer in time; the job stops (exit code 3)."""

    def __init__(self, rank: int, what: str, cause: str = ""):
        detail = f" ({cause.strip().splitlines()[0][:300]})" if cause.strip() else ""
        super().__init__(
            f"rank {rank}: {what}{detail}. The job stops; the run folder keeps the last epoch "
            "checkpoint and the finished modules. Look at the rank named here (its log, its "
            "machine), then restart the whole job with the same command and --resume.")
        self.rank = rank


def _lost_peer(text: str) -> str | None:
    """A timeout or a lost connection, in words; None for any other error text."""
    lowered = text.lower()
    if "timed out" in lowered or "timeout" in lowered:
        return "no answer within the timeout"
    if "closed" in lowered or "reset" in lowered or "broken pipe" in lowered:
        return "the connection was closed: the peer died or stopped"
    return None


def is_peer_failure(text: str) -> bool:
    """Whether an error's text is a timeout or a lost connection (not, say, a shape error).

    >>> is_peer_failure("Connection closed by peer"), is_peer_failure("shape mismatch")
    (True, False)
    """
    return _lost_peer(text) is not None


def peer_failure(text: str) -> str:
    """How a torch.distributed error reads to a person: a timeout, or a peer gone.

    >>> peer_failure("[pair.cc:561] Connection closed by peer [127.0.0.1]:21393")
    'the connection was closed: the peer died or stopped'
    >>> peer_failure("Timed out waiting 2000ms for send operation to complete")
    'no answer within the timeout'
    """
    return _lost_peer(text) or (text.strip().splitlines()[0][:200] if text.strip()
                                else "unknown failure")
