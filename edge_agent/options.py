"""Config dataclasses that are also command lines and spec files: one field, one flag, one key, one default, one help.

A field made with :func:`flag` carries its command-line form in its metadata. :func:`add_flags` adds those
flags to a parser and :func:`from_args` builds the dataclass back from the parsed namespace, so a setting is
written down once, on the field (the pattern of ``simple-parsing`` and ``tyro``, kept to the few lines this
project needs). A field made with :func:`part` holds a nested config: a stage's *spec* is a frozen dataclass of
such parts (data, model, train, reject, spool ...). Its flags are the parts' flags (a part's ``prefix`` names
those that have no name of their own: the CycleGAN's ``width`` is ``--gan-width``), and its TOML file has a table
per part whose keys are the fields' names (:func:`spec_flags` reads one, :func:`spec_toml` writes one). The value
parsers below check what a flag (or a key standing for one) may hold.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import MISSING, Field, field, fields, is_dataclass
from pathlib import Path, PurePath
from typing import Any

FLAG = "flag"
PART = "part"


def flag(default: Any, help: str, *, name: str | None = None, **kwargs: Any) -> Any:
    """A dataclass field with ``default`` that is also the flag ``name`` (default ``--field-name``).

    ``kwargs`` go to ``add_argument`` (``type``, ``choices``, ``action``, ``nargs`` ...). A bool field becomes a
    switch (``store_true``; ``store_false`` when it defaults to True, so name the flag for what it turns off).
    Tuple fields take lists on the command line (``nargs`` or ``action="append"``) and get tuples.
    ``default=MISSING``: a required flag (a spec file may give it).
    """
    if isinstance(default, list | dict | set):
        raise TypeError("flag defaults must be immutable (use a tuple)")
    meta = {FLAG: {"name": name, "help": help, **kwargs}}
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


def part(cls: type, title: str, *, prefix: str = "") -> Any:
    """A field holding the nested config ``cls`` (a part of a spec), default ``cls()``. Its flags are ``cls``'s,
    listed under ``title``; those without a name of their own are ``--{prefix}-{field}`` (``--{field}`` when no
    ``prefix``). In a spec file it is the table named as the field."""
    return field(default_factory=cls, metadata={PART: {"title": title, "prefix": prefix}})


def _flagged(cls: type) -> list[Field[Any]]:
    return [f for f in fields(cls) if FLAG in f.metadata]


def _parts(cls: type) -> list[Field[Any]]:
    return [f for f in fields(cls) if PART in f.metadata]


def _flag_name(f: Field[Any], prefix: str = "") -> str:
    own = f.metadata[FLAG]["name"]
    if own:
        return str(own)
    return "--" + (f"{prefix}-" if prefix else "") + f.name.replace("_", "-")


def _dest(f: Field[Any], prefix: str = "") -> str:
    """Where argparse keeps the field's value: the flag's name (two configs may both have a ``seed``)."""
    return _flag_name(f, prefix).lstrip("-").replace("-", "_")


def add_flags(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    *,
    only: tuple[str, ...] | None = None,
    prefix: str = "",
    skip: tuple[str, ...] = (),
    _root: Any = None,
) -> None:
    """Add the flags of dataclass ``cls`` (its fields made with :func:`flag`; of those named in ``only``), and of
    its parts (each under its title; not with ``only``, nor those named in ``skip``: the caller adds theirs)."""
    root = parser if _root is None else _root
    taken = {a.dest for a in getattr(root, "_actions", ())}
    for f in _flagged(cls):
        if only is not None and f.name not in only:
            continue
        if _dest(f, prefix) in taken:
            raise ValueError(f"two flags would set {_dest(f, prefix)!r} ({cls.__name__}.{f.name})")
        kwargs = dict(f.metadata[FLAG])
        del kwargs["name"]
        name = _flag_name(f, prefix)
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
        parser.add_argument(name, dest=_dest(f, prefix), **kwargs)
    if only is not None:
        return
    for f in _parts(cls):
        if f.name in skip:
            continue
        meta = f.metadata[PART]
        # each part a group of the parser's own (argparse does not nest groups)
        group = root.add_argument_group(meta["title"]) if isinstance(root, argparse.ArgumentParser) else root
        add_flags(group, _part_type(cls, f), prefix=meta["prefix"], _root=root)


def _part_type(cls: type, f: Field[Any]) -> type:
    """The config class a part field holds (its default factory's)."""
    factory = f.default_factory
    if not (isinstance(factory, type) and is_dataclass(factory)):
        raise TypeError(f"{cls.__name__}.{f.name}: a part's default factory must be its dataclass")
    return factory


def from_args(cls: type, args: argparse.Namespace, /, _prefix: str = "", **given: Any) -> Any:
    """``cls`` built from the parsed flags that :func:`add_flags` added (its parts too, from theirs), plus the
    fields ``given`` here."""
    values: dict[str, Any] = {}
    for f in _flagged(cls):
        if f.name in given or not hasattr(args, _dest(f, _prefix)):
            continue
        value = getattr(args, _dest(f, _prefix))
        if value is None and isinstance(f.default, tuple):
            continue
        values[f.name] = tuple(value) if isinstance(value, list) else value
    for f in _parts(cls):
        if f.name not in given:
            values[f.name] = from_args(_part_type(cls, f), args, f.metadata[PART]["prefix"])
    return cls(**values, **given)


def spec_flags(cls: type, data: dict[str, Any], source: str, _prefix: str = "", _at: str = "") -> dict[str, Any]:
    """A spec file's values (``data``: parsed TOML, a table per part, keys the fields' names; a flag's name is
    taken for its field too) as flag names without dashes -> values, for :func:`flag_defaults` to check and
    convert. ValueError naming a key ``cls`` has no field for, and the keys it has there."""
    out: dict[str, Any] = {}
    flags = {f.name: f for f in _flagged(cls)}
    flags |= {_flag_name(f, _prefix).lstrip("-").replace("-", "_"): f for f in flags.values()}
    parts = {f.name: f for f in _parts(cls)}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in parts and isinstance(value, dict):
            p = parts[name]
            out |= spec_flags(_part_type(cls, p), value, source, p.metadata[PART]["prefix"], f"{_at}{name}.")
        elif name in flags and not isinstance(value, dict):
            f = flags[name]
            switch_off = f.default is True and "action" not in f.metadata[FLAG]  # --no-jobs: enabled = false
            out[_flag_name(f, _prefix).lstrip("-")] = (not value) if switch_off and name == f.name else value
        else:
            known = sorted({f.name for f in _flagged(cls)} | {f"[{_at}{p}]" for p in parts})
            raise ValueError(f"{source}: unknown key {_at}{key}; keys there: {', '.join(known)}")
    return out


def spec_dict(spec: Any) -> dict[str, Any]:
    """The flagged fields of ``spec`` that are set, and its parts as tables: the spec file's form of it (paths as
    strings, tuples as lists; a part with nothing set is left out)."""

    def plain(value: Any) -> Any:
        if isinstance(value, PurePath):
            return str(value)
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    out: dict[str, Any] = {}
    for f in _flagged(type(spec)):
        value = getattr(spec, f.name)
        meta = f.metadata[FLAG]
        if value is None or value == ():
            continue
        if isinstance(value, tuple) and "nargs" not in meta and meta.get("action") != "append":
            out[f.name] = "x".join(map(str, value))  # one value that parses to a tuple: an image size, HxW
        else:
            out[f.name] = plain(value)
    for f in _parts(type(spec)):
        table = spec_dict(getattr(spec, f.name))
        if table:
            out[f.name] = table
    return out


def spec_toml(spec: Any, header: str = "") -> str:
    """``spec`` as a TOML spec file (see :func:`spec_dict`); ``header``: comment lines above it."""
    import tomli_w

    lines = "".join(f"# {line}\n" for line in header.splitlines())
    return lines + tomli_w.dumps(spec_dict(spec))


def merge_tables(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s keys on top, tables merged key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            merge_tables(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def add_spec_flag(parser: argparse.ArgumentParser, example: str | None) -> None:
    """``--spec FILE`` (alias ``--config``, dest ``config``): the command's spec as TOML, its values the defaults
    (read before parsing: :func:`config_values`). ``example``: how a part's key stands for a flag; None for a
    command whose flags are not a spec yet (its keys are flag names)."""
    parser.add_argument(
        "--spec",
        "--config",
        dest="config",
        type=Path,
        default=None,
        metavar="FILE",
        help=(
            f"the command's spec as TOML: a table per part, keys the fields' names ({example}); flag names work as "
            "keys too; a flag given on the command line wins"
            if example is not None
            else "TOML file whose keys are this command's flag names (tables group them); a flag given on the "
            "command line wins"
        ),
    )


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
    note = f"{hidden} more flags: --help-all, or set them in a --spec file"
    parser.description = f"{parser.description}\n\n{note}" if parser.description else note


def load_toml(path: PurePath) -> dict[str, Any]:
    """A TOML file as parsed (ValueError naming the file when it cannot be read)."""
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"cannot read config {path}: {e}") from e


def flat_keys(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A TOML table of flag values with its tables flattened: ``[spool] max-items = 5`` is ``spool.max-items``
    (the flag ``spool-max-items``, else ``max-items``: see :func:`flag_defaults`)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}".replace("_", "-")
        if isinstance(value, dict):
            out.update(flat_keys(value, name + "."))
        else:
            out[name] = value
    return out


def read_toml(path: PurePath) -> dict[str, Any]:
    """A TOML file of flag values, its tables flattened (:func:`flat_keys`)."""
    return flat_keys(load_toml(path))


def config_values(path: PurePath, spec: type | None = None) -> dict[str, Any]:
    """A ``--spec``/``--config`` file as flag names -> values: ``spec``'s TOML form (a table per part, keys the
    fields' names; :func:`spec_flags`) where its keys are the spec's, and flag names (tables flattened) for the
    rest, so that files of flag names keep working."""
    data = load_toml(path)
    if spec is None:
        return flat_keys(data)
    parts = {f.name for f in _parts(spec)}
    named = {f.name for f in _flagged(spec)} | {_flag_name(f).lstrip("-").replace("-", "_") for f in _flagged(spec)}

    def ours(key: str, value: Any) -> bool:  # a part's table, or a field of the spec's own
        name = key.replace("-", "_")
        return (name in parts and isinstance(value, dict)) or (name in named and not isinstance(value, dict))

    mine = {k: v for k, v in data.items() if ours(k, v)}
    rest = {k: v for k, v in data.items() if not ours(k, v)}
    return spec_flags(spec, mine, str(path)) | flat_keys(rest)


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


def out_folder(text: str) -> Path:
    """An output folder (created when missing): a file there is an error."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder (it is created when missing)")
    return path


def safe_name(text: str) -> str:
    """A fleet or device name (letters, digits, ``._-``; see :mod:`edge_agent.formats.names`)."""
    from edge_agent.formats.names import check_name

    try:
        return check_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
