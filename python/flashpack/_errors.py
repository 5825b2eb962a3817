"""The exceptions flashpack raises: one class per exit class of the command line.

``flashpack.ExitClass`` in the Rust library sorts every failure into a check
that failed (exit 1), bad usage or invalid input (exit 2) and a failure of the
environment (exit 3); each class here carries that as ``exit_class`` and
``exit_code``, so a pipeline can treat a damaged file, a bad argument and a
full disk differently.
"""

from typing import Any, Dict, Optional


class FlashpackError(Exception):
    """Any failure reported by flashpack."""

    #: ``"check_failed"``, ``"invalid_input"`` or ``"environment"``.
    exit_class: str = "error"
    #: The exit code the command line gives for the same failure.
    exit_code: int = 1

    def __init__(self, message: str, report: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        #: A failed check's report (``verify``'s keys), else None.
        self.report = report


class CheckFailedError(FlashpackError):
    """A check ran and failed: a hash, a rule about bytes, weights or logits
    against the source, predictor recall (exit 1)."""

    exit_class = "check_failed"
    exit_code = 1


class InvalidInputError(FlashpackError, ValueError):
    """Bad usage or invalid input: a file that does not parse or breaks a rule,
    an option out of range (exit 2)."""

    exit_class = "invalid_input"
    exit_code = 2


class EnvironmentFailureError(FlashpackError, OSError):
    """The environment failed: disk full, permission, a read error (exit 3)."""

    exit_class = "environment"
    exit_code = 3

    def __init__(self, message: str, report: Optional[Dict[str, Any]] = None) -> None:
        # OSError's own constructor would read a one-argument call as errno-less
        # text; keep the message as the only argument, as the other classes do.
        FlashpackError.__init__(self, message, report)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
