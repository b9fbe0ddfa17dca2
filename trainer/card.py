"""The model card: one fleet's model, preprocessing, class order, clean data, reject budget, rollout and repair
policy, in one commented TOML file (``nnoc-trainer init`` writes it).

``predeploy --card``, ``repair --card``, ``calibrate --card`` and ``demo --card`` take their flags' defaults from it
(a flag given on the command line wins); ``predeploy`` leaves the card, resolved, beside the bundle it writes;
``fleet create`` keeps it in the fleet's record, so that the service's repair jobs of that fleet read that fleet's
own photos and policy. Torch-free: the service reads it.

Layout (every section optional but ``[model]`` and ``[data]`` for ``predeploy``; paths relative to the card)::

    fleet = "cams"
    [model]   file | arch + weights, preprocess, classes = [...], min_clean_accuracy
    [data]    dir, eval_fraction, seed
    [reject]  clean_reject_budget, reject_score, calibration_confidence, calibration_set
    [rollout] policy = "canary=2,steps=10,50,100,bake=2m"
    [repair]  profile, min_quarantine, reject_threshold
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

CARD_FILE = "card.json"  # the resolved card beside a bundle (predeploy's output) and in a fleet's record

# section -> key -> the flag it stands for ("" = not a command flag: read by the fleet and the job runner)
SECTIONS: dict[str, dict[str, str]] = {
    "model": {
        "file": "model",
        "arch": "arch",
        "weights": "weights",
        "preprocess": "preprocess",
        "classes": "class-names",
        "min_clean_accuracy": "min-clean-accuracy",
        "external_data": "external-data",
    },
    "data": {"dir": "data", "eval_fraction": "eval-fraction", "seed": "split-seed"},
    "reject": {
        "clean_reject_budget": "clean-reject-budget",
        "reject_score": "reject-score",
        "calibration_confidence": "calibration-confidence",
        "calibration_set": "calibration-set",
    },
    "rollout": {"policy": ""},
    "repair": {"profile": "profile", "min_quarantine": "", "reject_threshold": ""},
}
PATHS = {("model", "file"), ("model", "weights"), ("model", "preprocess"), ("model", "external_data"), ("data", "dir")}


class CardError(ValueError):
    """A model card that cannot be used; the message names the file, the key and what to do."""


@dataclass(frozen=True)
class ModelCard:
    """A checked model card; paths are absolute (resolved against the card's folder when it was read)."""

    fleet: str | None = None
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""  # where it was read from, for messages

    def get(self, section: str, key: str, default: Any = None) -> Any:
        """One value of the card (``default`` when it does not say)."""
        return self.sections.get(section, {}).get(key, default)

    @property
    def data_dir(self) -> Path | None:
        """The defender's photos the card names."""
        value = self.get("data", "dir")
        return Path(value) if value else None

    def flags(self) -> dict[str, Any]:
        """The card as flag names (without dashes) and values, for every command flag it stands for."""
        out: dict[str, Any] = {}
        for section, keys in SECTIONS.items():
            for key, flag_name in keys.items():
                value = self.get(section, key)
                if flag_name and value is not None and value != "":
                    out[flag_name] = value
        return out

    def repair_config(self) -> dict[str, Any]:
        """What a repair job of this card's fleet reads: its photos and their split (a repair spec's tables)."""
        data = self.data_dir
        if data is None:
            return {}
        split = {key: self.get("data", key) for key in ("eval_fraction", "seed") if self.get("data", key) is not None}
        return {"data": {"path": str(data)}, **({"split": split} if split else {})}

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as the fleet's record keeps it."""
        return {"fleet": self.fleet, **self.sections}

    def write_json(self, path: Path) -> None:
        """The resolved card as JSON (beside a bundle)."""
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str, base: Path | None = None) -> ModelCard:
        """A card from its TOML/JSON mapping, checked; relative paths are resolved against ``base``."""
        if not isinstance(data, dict):
            raise CardError(f"{source}: not a table of sections")
        fleet = data.get("fleet")
        if fleet is not None and not isinstance(fleet, str):
            raise CardError(f"{source}: fleet = {fleet!r}: expected a fleet name")
        unknown = sorted(k for k in data if k != "fleet" and k not in SECTIONS)
        if unknown:
            raise CardError(f"{source}: unknown section(s) {unknown}; a card has {sorted(SECTIONS)}")
        sections: dict[str, dict[str, Any]] = {}
        for name, values in data.items():
            if name == "fleet" or values is None:
                continue
            if not isinstance(values, dict):
                raise CardError(f"{source}: [{name}] must be a table")
            bad = sorted(k for k in values if k not in SECTIONS[name])
            if bad:
                raise CardError(f"{source}: [{name}] has unknown key(s) {bad}; it takes {sorted(SECTIONS[name])}")
            sections[name] = {k: _checked(source, name, k, v, base) for k, v in values.items()}
        return cls(fleet, sections, source)

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        """Read a card: ``.toml`` (as written by ``init``, paths relative to it) or ``.json`` (resolved)."""
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (OSError, UnicodeDecodeError, ValueError) as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
            raise CardError(f"cannot read the model card {path}: {e}") from None
        return cls.from_dict(data, str(path), path.resolve().parent)


def _checked(source: str, section: str, key: str, value: Any, base: Path | None) -> Any:
    where = f"{source}: [{section}] {key} = {value!r}"
    if (section, key) in PATHS:
        if not isinstance(value, str):
            raise CardError(f"{where}: expected a path")
        if value == "":
            return value
        path = Path(value).expanduser()
        return str(path if path.is_absolute() or base is None else (base / path).resolve())
    if key == "classes":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise CardError(f"{where}: expected a list of class names in the model's output order")
        if len(set(value)) != len(value):
            raise CardError(f"{where}: the class names repeat")
        return value
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise CardError(f"{where}: expected a string or a number")
    return value


def render(
    fleet: str,
    model: dict[str, str],
    classes: list[str],
    classes_from: str,
    data: str,
    counts: dict[str, int],
    recommended: int,
) -> str:
    """The commented TOML ``init`` writes: the defender's choices, each with what it means."""

    def q(text: str) -> str:
        return json.dumps(text)

    photos = sum(counts.values())
    lines = [
        f"# Model card of fleet {q(fleet)}: written by 'nnoc-trainer init'. Read it, correct it, then:",
        "#   nnoc-trainer predeploy --card THIS_FILE --out runs/pd     (θ_aug and bundle v1; minutes)",
        f"#   nnoc-trainer fleet create {fleet} --from runs/pd            (the card travels with the bundle)",
        "#   nnoc-trainer serve ...                                     (each fleet's repairs read its own card)",
        "# Paths are relative to this file. A flag given on a command line wins over the card.",
        "",
        f"fleet = {q(fleet)}",
        "",
        "[model]",
        "# The suspect model, as the vendor sent it (.onnx, .pt2 from torch.export, or an nnoc .pt); it is opened",
        "# as data in a contained child, never run as code.",
    ]
    for key in ("file", "arch", "weights"):
        if model.get(key):
            lines.append(f"{key} = {q(model[key])}")
    lines += [
        "# Its preprocessing (JSON: colour, size, resize, interpolation, scale, mean, std, layout); empty: the model",
        "# file's own block.",
        f"preprocess = {q(model.get('preprocess', ''))}",
        "# The model's classes in its OUTPUT order. Your folders are matched to these names, whatever their sort",
        "# order; predeploy scores the model on your photos first and stops, naming the likely order, when these",
        f"# are wrong. Taken from: {classes_from}.",
        "classes = [" + ", ".join(q(c) for c in classes) + "]",
        "",
        "[data]",
        "# Your clean labelled photos: a folder per class (any size; brought to the model's by its preprocessing).",
        f"# All of them are D_valid: cut per class into photos to treat on and photos to evaluate on. {photos} photos",
        f"# found; about {recommended} or more are recommended (BENCHMARKS.md, How many photos).",
        f"dir = {q(data)}",
        "eval_fraction = 0.2",
        "seed = 0",
        "",
        "[reject]",
        "# Share of clean inputs the fleet may refuse: the reject threshold is chosen on your photos to refuse",
        "# about this many.",
        "clean_reject_budget = 0.01",
        "",
        "[rollout]",
        '# How new versions reach the fleet: empty = at once; e.g. "canary=2,steps=10,50,100,bake=2m"',
        "# (keys: nnoc-trainer fleet publish --help).",
        'policy = ""',
        "",
        "[repair]",
        "# When the service repairs this fleet from its quarantine, and how hard it trains (quick, standard, paper).",
        "min_quarantine = 200",
        "reject_threshold = 0.05",
        'profile = "quick"',
        "",
    ]
    return "\n".join(lines)
