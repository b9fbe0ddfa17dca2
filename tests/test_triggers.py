from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.science.triggers import ComboTrigger, TriggerError, parse_trigger


def zeros(n: int = 5, c: int = 1, h: int = 28, w: int = 28) -> np.ndarray:
    return np.zeros((n, c, h, w), dtype=np.uint8)


def test_checker4_is_a_checkerboard_at_random_places() -> None:
    x = zeros(50)
    y = parse_trigger("checker4").apply(x, np.random.default_rng(0))
    assert x.max() == 0  # input untouched
    corners = set()
    for img in y[:, 0]:
        rows, cols = np.nonzero(img)
        assert len(rows) == 8  # 8 white cells of a 4x4 checkerboard on black
        r0, c0 = rows.min(), cols.min()
        assert rows.max() - r0 <= 3 and cols.max() - c0 <= 3
        corners.add((r0, c0))
    assert len(corners) > 10
    again = parse_trigger("checker4").apply(x, np.random.default_rng(0))
    assert np.array_equal(y, again)  # seeded


def test_square_bottom_right_rgb() -> None:
    y = parse_trigger("square:3").apply(zeros(2, c=3, h=10, w=12), np.random.default_rng(0))
    assert (y[:, :, 7:, 9:] == 255).all()
    assert y.sum() == 2 * 3 * 9 * 255


def test_image_trigger_respects_transparency_and_position(tmp_path: Path) -> None:
    rgba = np.zeros((3, 3, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[1, 1, 3] = 255  # only the centre pixel is opaque
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
    x = np.full((2, 1, 8, 8), 7, dtype=np.uint8)
    y = parse_trigger(f"image:{tmp_path / 't.png'}@2,4").apply(x, np.random.default_rng(0))
    changed = np.argwhere(y[0, 0] != 7)
    assert changed.tolist() == [[3, 5]]
    assert y[0, 0, 3, 5] == 200
    rand = parse_trigger(f"image:{tmp_path / 't.png'}").apply(
        np.full((20, 1, 8, 8), 7, np.uint8), np.random.default_rng(1)
    )
    assert ((rand != 7).sum(axis=(1, 2, 3)) == 1).all()


def test_blend_trigger(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 200, np.uint8), mode="L").save(tmp_path / "b.png")
    y = parse_trigger(f"blend:{tmp_path / 'b.png'}:0.5").apply(
        np.full((1, 1, 8, 8), 100, np.uint8), np.random.default_rng(0)
    )
    assert (y == 150).all()


def test_combo_has_parts() -> None:
    t = parse_trigger("combo:checker4+square:3")
    assert isinstance(t, ComboTrigger) and len(t.parts) == 2
    y = t.apply(zeros(3), np.random.default_rng(0))
    assert (y[:, :, 25:, 25:] == 255).all() and y.sum() > 3 * 9 * 255


@pytest.mark.parametrize(
    "spec",
    [
        "checker5",
        "square:0",
        "square:x",
        "blend:foo.png",
        "blend:foo.png:2",
        "combo:checker4",
        "combo:checker4+",
        "image:",
        "image:/no/such.png",
        "",
    ],
)
def test_malformed_specs_show_the_grammar(spec: str) -> None:
    with pytest.raises(TriggerError) as e:
        parse_trigger(spec)
    assert "trigger spec grammar" in str(e.value)


def test_trigger_larger_than_input_is_an_error() -> None:
    with pytest.raises(TriggerError, match="does not fit"):
        parse_trigger("square:9").apply(zeros(1, h=8, w=8), np.random.default_rng(0))
