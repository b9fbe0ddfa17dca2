"""The errors of the shared formats (their own module, so that every format module can raise them)."""

from __future__ import annotations


class BundleError(ValueError):
    """A bundle that must not be loaded; the message says what is wrong."""


class QuarantineError(ValueError):
    """A quarantine message or store that cannot be used; the message says why.

    ``reason`` is one of :data:`edge_agent.formats.wire.REASONS`: a short, bounded label for counting refusals.
    """

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason
