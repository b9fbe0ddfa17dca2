"""Outcomes the CLI turns into exit codes: a quality gate refused (3), a demo step failed (1). torch-free, so
that the CLI can catch them without loading the stages that raise them."""

from __future__ import annotations

EXIT_FAILED = 1  # a demo step failed
EXIT_BAD_INPUT = 2  # bad input: the message says what to fix
EXIT_GATE = 3  # a quality gate refused (no candidate, or the repaired model)


class NoCandidateError(RuntimeError):
    """No pre-deployment candidate reached the clean-accuracy threshold within the budget."""


class GateError(RuntimeError):
    """The repaired model failed the publish gate; no bundle was written."""


class DemoError(RuntimeError):
    """A step of the demo failed or timed out; the message is one line that names the step, why, and its log."""
