"""Config dataclasses that are also command lines: one field, one flag, one default, one help text.

A field made with :func:`flag` carries its command-line form in its metadata. :func:`add_flags` adds those
flags to a parser and :func:`from_args` builds the dataclass back from the parsed namespace, so a setting is
written down once, on the field (the pattern of ``simple-parsing`` and ``tyro``, kept to the few lines this
project needs). The value parsers below check what a flag (or a TOML key standing for one) may hold.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import MISSING, Field, field, fields
from pathlib import PurePath
from typing import Any

FLAG = "flag"


def flag(default: Any, help: str, *, name: str | None = None, **kwargs: Any) -> Any:
    """A dataclass field with ``default`` that is also the flag ``name`` (default ``--field-name``).

    ``kwargs`` go to ``add_argument`` (``type``, ``choices``, ``action``, ``nargs`` ...). A bool field becomes a
    switch (``store_true``; ``store_false`` when it defaults to True, so name the flag for what it turns off).
    Tuple fields take lists on the command line (``nargs`` or ``action="append"``) and get tuples.
    """
    if isinstance(default, list | dict | set):
        raise TypeError("flag defaults must be immutable (use a tuple)")
    return field(default=default, metadata={FLAG: {"name": name, "help": help, **kwargs}})


def _flagged(cls: type) -> list[Field[Any]]:
    return [f for f in fields(cls) if FLAG in f.metadata]


def _flag_name(f: Field[Any]) -> str:
    return f.metadata[FLAG]["name"] or "--" + f.name.replace("_", "-")


def _dest(f: Field[Any]) -> str:
    """Where argparse keeps the field's value: the flag's name (two configs may both have a ``seed``)."""
    return _flag_name(f).lstrip("-").replace("-", "_")


def add_flags(parser: argparse.ArgumentParser | Any, cls: type, *, only: tuple[str, ...] | None = None) -> None:
    """Add the flags of dataclass ``cls`` (its fields made with :func:`flag`; of those named in ``only``)."""
    taken = {a.dest for a in getattr(parser, "_actions", ())}
    for f in _flagged(cls):
        if only is not None and f.name not in only:
            continue
        if _dest(f) in taken:
            raise ValueError(f"two flags would set {_dest(f)!r} ({cls.__name__}.{f.name})")
        kwargs = dict(f.metadata[FLAG])
        del kwargs["name"]
        name = _flag_name(f)
        if f.default is MISSING:
            kwargs.setdefault("required", True)
        elif isinstance(f.default, bool) and "action" not in kwargs:
            kwargs["action"] = "store_false" if f.default else "store_true"
        elif isinstance(f.default, tuple):
            kwargs["default"] = None  # argparse appends to a list default; None stands for the field's default
        else:
            kwargs["default"] = f.default
        if kwargs.get("action") not in ("store_true", "store_false") and "choices" not in kwargs:
            kwargs.setdefault("metavar", name.lstrip("-").upper().replace("-", "_"))
        shown = kwargs.get("default")
        if shown is not None and shown is not False and "default" not in kwargs["help"]:
            kwargs["help"] += f" (default {shown})"
        parser.add_argument(name, dest=_dest(f), **kwargs)


def from_args(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """``cls`` built from the parsed flags that :func:`add_flags` added, plus the fields ``given`` here."""
    values: dict[str, Any] = {}
    for f in _flagged(cls):
        if f.name in given or not hasattr(args, _dest(f)):
            continue
        value = getattr(args, _dest(f))
        if value is None and isinstance(f.default, tuple):
            continue
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values, **given)


def short_help(parser: argparse.ArgumentParser, shown: tuple[str, ...], everything: bool) -> None:
    """Help that fits a screen: only the flags whose dest is in ``shown`` are listed (the others keep working),
    unless ``everything``; adds ``--help-all``, and says so in the description."""
    parser.add_argument("--help-all", action="help", help="show every flag")
    if everything:
        return
    hidden = 0
    for action in parser._actions:
        if action.option_strings and action.dest not in shown and action.dest != "help_all":
            action.help = argparse.SUPPRESS
            hidden += 1
    note = f"{hidden} more flags: --help-all, or set them in a --config file"
    parser.description = f"{parser.description}\n\n{note}" if parser.description else note


def read_toml(path: PurePath) -> dict[str, Any]:
    """A TOML file of flag values, its tables flattened: ``[spool] max-items = 5`` is ``spool-max-items``; a key
    stays as written when the flag has no such prefix (see :func:`flag_defaults`). ValueError naming the file."""
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"cannot read config {path}: {e}") from e

    def flat(table: dict[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in table.items():
            name = f"{prefix}{key}".replace("_", "-")
            if isinstance(value, dict):
                out.update(flat(value, name + "."))
            else:
                out[name] = value
        return out

    return flat(data, "")


def flag_defaults(
    parser: argparse.ArgumentParser, data: dict[str, Any], source: str, only_known: bool = False
) -> dict[str, Any]:
    """``data`` (flag names without dashes -> values; ``table.key`` from a TOML table: the flag ``table-key``, else
    ``key``) checked and converted as ``parser``'s flags would be; ``only_known``: keys the parser lacks are left
    out (else they are an error)."""
    actions = {
        a.option_strings[-1].lstrip("-"): a
        for a in parser._actions
        if a.option_strings and a.dest not in ("help", "config", "card")
    }

    def name_of(key: str) -> str:
        name = key.replace("_", "-")
        if "." not in name:
            return name
        joined = name.replace(".", "-")
        return joined if joined in actions else name.rsplit(".", 1)[1]

    unknown = sorted(k for k in data if name_of(k) not in actions)
    if unknown and not only_known:
        raise ValueError(f"{source}: unknown keys {unknown}; keys are the flags of '{parser.prog} --help'")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if name_of(key) not in actions:
            continue
        action = actions[name_of(key)]
        action.required = False  # the file gives it
        flag = action.option_strings[-1]

        def convert(v: Any, action: argparse.Action = action, key: str = key, flag: str = flag) -> Any:
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                raise ValueError(f"{source}: {key} = {v!r}: expected a value as {flag} takes it")
            try:
                converted = action.type(str(v)) if callable(action.type) else str(v)
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                raise ValueError(f"{source}: {key} = {v!r}: {e}") from None
            if action.choices is not None and converted not in action.choices:
                raise ValueError(f"{source}: {key} = {v!r}: choose from {sorted(action.choices)}")
            return converted

        if action.nargs == 0:  # store_true
            if not isinstance(value, bool):
                raise ValueError(f"{source}: {key} = {value!r}: expected true or false")
            out[action.dest] = action.const if value else not action.const  # --no-jobs = true: enabled False
        elif action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
            out[action.dest] = [convert(v) for v in (value if isinstance(value, list) else [value])]
        else:
            out[action.dest] = convert(value)
    return out


def option_value(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``argv`` (the last one given), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.partition("=")[2]
    return value


def as_flags(cfg: Any) -> dict[str, Any]:
    """The flagged fields of dataclass instance ``cfg`` that are set, keyed by flag name without dashes (a config
    file's keys); paths become strings."""
    out: dict[str, Any] = {}
    for f in _flagged(type(cfg)):
        value = getattr(cfg, f.name)
        if value is not None:
            out[_flag_name(f).lstrip("-")] = str(value) if isinstance(value, PurePath) else value
    return out


def as_argv(cfg: Any) -> list[str]:
    """The flagged fields of ``cfg`` that differ from their defaults, as a command line (to hand a config on to
    a child command)."""
    out: list[str] = []
    for f in _flagged(type(cfg)):
        value = getattr(cfg, f.name)
        if value == f.default:
            continue
        name = _flag_name(f)
        if isinstance(value, bool):
            out.append(name)  # a switch: only a value other than its default reaches here
        elif isinstance(value, tuple):
            out += [name, *map(str, value)]
        else:
            out += [name, str(value)]
    return out


# Value parsers: each names the rule its value broke.


def whole(low: int) -> Callable[[str], int]:
    """A parser of whole numbers of at least ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {low}, got {value}")
        return value

    parse.__name__ = "positive" if low == 1 else "nonnegative"
    return parse


positive = whole(1)
nonnegative = whole(0)


def real(name: str, ok: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """A parser of numbers that ``ok`` accepts; ``rule`` says which ("above 0", "in [0, 1]")."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {rule}, got {text!r}") from None
        if not ok(value):  # NaN fails every rule
            raise argparse.ArgumentTypeError(f"expected a number {rule}, got {text}")
        return value

    parse.__name__ = name
    return parse


positive_float = real("positive_float", lambda v: v > 0, "above 0")
nonnegative_float = real("nonnegative_float", lambda v: v >= 0, "at or above 0")
fraction = real("fraction", lambda v: 0.0 <= v <= 1.0, "in [0, 1]")


def image_size(text: str) -> tuple[int, int]:
    """``HxW`` (e.g. ``32x32``) -> (H, W), both at least 1."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 32x32, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"expected HxW with both at least 1, got {text!r}")
    return h, w


def safe_name(text: str) -> str:
    """A fleet or device name (letters, digits, ``._-``; see :mod:`edge_agent.formats.names`)."""
    from edge_agent.formats.names import check_name

    try:
        return check_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
