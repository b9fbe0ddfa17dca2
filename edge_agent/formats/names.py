"""Names that become paths or keys on both sides: fleets and device ids (one rule, checked everywhere).

A fleet name becomes a folder of the model store and of the quarantine; a device id becomes a spool key, a
ZeroMQ identity, a CURVE key file's name and a certificate name. Both are 1-64 characters from letters,
digits, ``.``, ``_`` and ``-``, starting with a letter or digit: no path separators, no ``..``, nothing a
shell or a file system treats specially.
"""

from __future__ import annotations

import functools
import re

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class NameError_(ValueError):
    """A fleet or device name outside the allowed form; the message says what is allowed."""


@functools.lru_cache(maxsize=8192)
def is_name(value: str) -> bool:
    """Whether ``value`` is a valid fleet or device name (cached: the collector asks for every message)."""
    return bool(NAME.match(value))


def check_name(value: str, what: str = "name") -> str:
    """``value`` when it is a valid name; otherwise :class:`NameError_` saying what is allowed."""
    if not isinstance(value, str) or not NAME.match(value):
        shown = value if isinstance(value, str) and len(value) <= 80 else f"{str(value)[:80]}..."
        raise NameError_(
            f"{what} {shown!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value
