"""``nnoc-trainer quarantine show|export``: let an operator see what the fleet refused.

``show`` writes a contact sheet (PNG) of the stored images, each captioned with its device, source and frame,
capture time and both models' labels; ``export`` writes every image as a PNG plus ``index.csv``. A quarantine is
named by fleet (and version; default: the newest one collected) under the service's state folder, or given as a
folder (``--quarantine``, e.g. ``nnoc-trainer stream --out``). Class names come from the version's bundle in
the model store when it is there.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Any

import numpy as np

from trainer.service.collector import quarantine_dir
from trainer.service.quarantine import STORE_NAME, QuarantineStore
from trainer.service.store import ModelStore, StoreError

TILE = 112  # pixels of the image in a contact-sheet cell
CAPTION = 4  # caption lines under it


class InspectError(ValueError):
    """No such quarantine, or nothing to show: the message says what to pass."""


def locate(args: argparse.Namespace) -> tuple[Path, int | None]:
    """The quarantine folder and its version (None when given as a folder)."""
    if args.quarantine is not None:
        if not (args.quarantine / STORE_NAME).is_file():
            raise InspectError(f"{args.quarantine} holds no {STORE_NAME}; pass a quarantine folder")
        return args.quarantine, None
    if args.fleet is None:
        raise InspectError("pass --fleet NAME (and --version V) or --quarantine FOLDER")
    root = args.state_dir / "quarantine" / args.fleet
    versions = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
    if args.version is None:
        if not versions:
            raise InspectError(f"fleet {args.fleet} has no quarantine under {root} (is --state-dir the service's?)")
        return quarantine_dir(args.state_dir / "quarantine", args.fleet, versions[-1]), versions[-1]
    folder = quarantine_dir(args.state_dir / "quarantine", args.fleet, args.version)
    if not (folder / STORE_NAME).is_file():
        raise InspectError(f"fleet {args.fleet} v{args.version} has no quarantine; versions with one: {versions}")
    return folder, args.version


def class_names(store_root: Path, fleet: str | None, version: int | None) -> list[str]:
    """The bundle's class names, when the model store has that version (else labels stay numbers)."""
    if fleet is None or version is None or not store_root.is_dir():
        return []
    try:
        return list(ModelStore(store_root, create=False).manifest(fleet, version).class_names)
    except (StoreError, OSError, ValueError):
        return []


def _read(args: argparse.Namespace) -> tuple[Path, int | None, np.ndarray, list[dict[str, Any]], list[str]]:
    folder, version = locate(args)
    with QuarantineStore(folder, create=False) as store:
        entries = store.entries()
        images = store.load(store.stored_preprocess()).images
    if not entries:
        raise InspectError(f"the quarantine in {folder} is empty")
    names = class_names(args.store, args.fleet, version)
    return folder, version, images, entries, names


def _label(value: int, names: list[str]) -> str:
    return f"{value} {names[value]}" if 0 <= value < len(names) else str(value)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _picture(image: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(
        image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0), "L" if image.shape[0] == 1 else "RGB"
    )


def show(args: argparse.Namespace) -> dict[str, Any]:
    """A contact sheet of up to ``--limit`` images (the newest first), captioned."""
    from PIL import Image, ImageDraw, ImageFont

    folder, version, images, entries, names = _read(args)
    picked = list(range(len(entries)))[::-1][: args.limit]
    cols = min(len(picked), args.columns)
    rows = (len(picked) + cols - 1) // cols
    font = ImageFont.load_default()
    line = 12
    cell_w, cell_h = max(TILE, 150), TILE + CAPTION * line + 8
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h + 2 * line), "white")
    draw = ImageDraw.Draw(sheet)
    name = f"{args.fleet} v{version}" if version is not None else folder.name
    title = f"{name}: {len(entries)} stored, newest {len(picked)} (P primary, M monitor)"
    draw.text((4, 2), title, fill="black", font=font)
    for k, i in enumerate(picked):
        e = entries[i]
        x0, y0 = (k % cols) * cell_w, (k // cols) * cell_h + 2 * line
        tile = _picture(images[i]).convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST)
        sheet.paste(tile, (x0 + (cell_w - TILE) // 2, y0))
        source = e["source_id"] or "endpoint"
        where = f"{source}#{e['position']}" if e["position"] is not None else source
        caption = [
            e["device_id"][:24],
            where[:24],
            _when(e["captured_at"])[5:],
            f"P {_label(e['primary_label'], names)[:10]} M {_label(e['monitor_label'], names)[:10]}",
        ]
        for j, text in enumerate(caption):
            draw.text((x0 + 3, y0 + TILE + 2 + j * line), text, fill="black", font=font)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    return {"quarantine": str(folder), "version": version, "stored": len(entries), "shown": len(picked),
            "sheet": str(args.out), "text": f"wrote {args.out}: {len(picked)} of {len(entries)} images"}  # fmt: skip


def export(args: argparse.Namespace) -> dict[str, Any]:
    """Every image as ``DEVICE-SEQ.png`` plus ``index.csv`` with what its header says."""
    folder, version, images, entries, names = _read(args)
    out: Path = args.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    fields = ["file", "device_id", "seq", "source_id", "position", "captured_at", "received_at", "bundle_version",
              "primary_label", "primary_class", "monitor_label", "monitor_class"]  # fmt: skip
    with (out / "index.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for image, e in zip(images, entries, strict=True):
            name = f"images/{e['device_id']}-{e['seq']}.png"
            _picture(image).save(out / name)
            row = {k: e.get(k) for k in fields}
            row.update(
                file=name,
                captured_at=_when(e["captured_at"]),
                received_at=_when(e["received_at"]),
                primary_class=names[e["primary_label"]] if 0 <= e["primary_label"] < len(names) else "",
                monitor_class=names[e["monitor_label"]] if 0 <= e["monitor_label"] < len(names) else "",
            )
            writer.writerow(row)
    return {"quarantine": str(folder), "version": version, "exported": len(entries), "out": str(out),
            "text": f"wrote {len(entries)} images and index.csv to {out}"}  # fmt: skip


def quarantine_command(args: argparse.Namespace) -> dict[str, Any]:
    """Dispatch ``quarantine show|export``."""
    return show(args) if args.action == "show" else export(args)
