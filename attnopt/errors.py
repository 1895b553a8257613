"""Errors attnopt raises. Each says what was wrong, where, and what to do."""


class AttnoptError(Exception):
    """Base class of attnopt's errors."""


class CaptureError(AttnoptError):
    """The model (or a submodule) could not be captured as a graph."""


class PassError(AttnoptError):
    """A graph pass failed; the message names the pass and the passes that ran before it."""


class VerificationError(AttnoptError):
    """The rewritten model does not compute what the original does within tolerance."""

    def __init__(self, message: str, table: str = ""):
        super().__init__(message + (f"\n{table}" if table else ""))
        self.table = table


class PolicyError(AttnoptError, ValueError):
    """An unknown policy name, rule key or rewrite."""
