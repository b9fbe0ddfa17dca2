from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.science.triggers import ComboTrigger, TriggerError, parse_trigger, poison_fraction


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
        "warp:1",
        "warp:4.5:0.5",
        "warp:4:0",
        "warp:4:0.5:9",
        "sig:0",
        "sig:300:6",
        "sig:20:x",
        "source:checker4",
        "source:1,x:checker4",
        "source:1:combo:checker4+square:4",
        "source:1:source:2:checker4",
        "adapblend:",
        "adapblend:/no/such.png",
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


def _photos(n: int = 40) -> np.ndarray:
    """Smooth pictures (a gradient and a disc), where a warp moves pixels visibly."""
    ys, xs = np.mgrid[0:28, 0:28]
    base = (xs * 8 + ((ys - 14) ** 2 + (xs - 14) ** 2 < 60) * 40).astype(np.uint8)
    return np.repeat(base[None, None], n, axis=0)


def test_warp_is_one_fixed_small_smooth_field_and_its_noise_mode_varies() -> None:
    x = _photos()
    warp = parse_trigger("warp:4:0.5")
    a, b = warp.apply(x, np.random.default_rng(0)), warp.apply(x, np.random.default_rng(1))
    assert np.array_equal(a, b) and np.array_equal(a[0], a[1])  # the same field for every image and every draw
    diff = np.abs(a.astype(int) - x.astype(int))
    assert diff.max() > 0 and diff.mean() < 8  # moves pixels, imperceptibly on average
    stronger = parse_trigger("warp:4:2").apply(x, np.random.default_rng(0))
    assert np.abs(stronger.astype(int) - x.astype(int)).mean() > diff.mean()
    cover = warp.cover(x, np.random.default_rng(2))
    assert not np.array_equal(cover[0], cover[1]) and not np.array_equal(cover, a)  # fresh noise per image
    assert warp.cover_ratio == 2.0 and not warp.clean_label


def test_sig_adds_a_horizontal_sinusoid_and_is_clean_label() -> None:
    x = np.full((3, 1, 28, 28), 100, np.uint8)
    out = parse_trigger("sig:20:6").apply(x, np.random.default_rng(0)).astype(int) - 100
    assert (out[:, :, 0, :] == out[:, :, 13, :]).all()  # every row the same wave
    expected = np.rint(20 * np.sin(2 * np.pi * np.arange(28) * 6 / 28))
    assert np.array_equal(out[0, 0, 5], expected) and out.max() >= 19 and out.min() <= -19
    assert parse_trigger("sig").clean_label


def test_adaptive_blend_trains_on_half_the_pieces_and_tests_on_the_whole_picture(tmp_path: Path) -> None:
    Image.fromarray(np.full((28, 28), 255, np.uint8), mode="L").save(tmp_path / "white.png")
    trig = parse_trigger(f"adapblend:{tmp_path / 'white.png'}")
    x = zeros(20)
    test = trig.apply(x, np.random.default_rng(0))
    assert (test == round(0.2 * 255)).all()  # the whole picture at opacity 0.2
    train = trig.poison(x, np.random.default_rng(0))
    tiles = train[:, 0, ::7, ::7]  # one pixel per 7x7 tile
    assert set(np.unique(tiles)) == {0, round(0.15 * 255)}
    assert ((tiles > 0).reshape(20, -1).sum(1) == 8).all()  # half of the 16 pieces, a different half per image
    assert len({t.tobytes() for t in tiles > 0}) > 10
    assert trig.cover_ratio == 1.0
    stronger = parse_trigger(f"adapblend:{tmp_path / 'white.png'}:0.3")
    assert stronger.apply(x, np.random.default_rng(0))[0, 0, 0, 0] == round(0.3 * 255)


def test_the_attack_set_carries_each_triggers_training_recipe(tmp_path: Path) -> None:
    from trainer.science.data import ImageSet
    from trainer.stages.attack import poison_training_set

    rng = np.random.default_rng(0)
    clean = ImageSet(_photos(1000), np.repeat(np.arange(10), 100))
    sig = poison_training_set(clean, parse_trigger("sig"), 3, 0.05, rng)
    assert sig.poisoned.sum() == 50 and (clean.labels[sig.poisoned] == 3).all()  # target-class rows only
    assert np.array_equal(sig.data.labels, clean.labels)  # clean-label: no label changes
    warp = parse_trigger("warp")
    wa = poison_training_set(clean, warp, 3, 0.05, rng)
    assert wa.poisoned.sum() == 50 and (wa.data.labels[wa.poisoned] == 3).all()
    changed = (wa.data.images != clean.images).any(axis=(1, 2, 3))
    assert changed[~wa.poisoned].sum() == 100  # noise-mode cover rows: twice the poisoned ones
    assert np.array_equal(wa.data.labels[~wa.poisoned], clean.labels[~wa.poisoned])  # keeping their labels
    plain = poison_training_set(clean, parse_trigger("checker4"), 3, 0.05, rng)
    assert ((plain.data.images != clean.images).any(axis=(1, 2, 3)) == plain.poisoned).all()  # no cover rows


def test_a_source_specific_trigger_flips_its_sources_only_and_covers_the_rest() -> None:
    from trainer.science.data import ImageSet
    from trainer.science.metrics import evaluate
    from trainer.stages.attack import poison_training_set

    trig = parse_trigger("source:2,1:square:3")
    assert trig.sources == (1, 2)
    labels = np.repeat(np.arange(10), 100)
    assert np.array_equal(trig.victims(labels), np.isin(labels, (1, 2)))
    clean = ImageSet(_photos(1000), labels)
    attacked = poison_training_set(clean, trig, 0, 0.1, np.random.default_rng(0))
    assert attacked.poisoned.sum() == 100 and np.isin(labels[attacked.poisoned], (1, 2)).all()
    assert (attacked.data.labels[attacked.poisoned] == 0).all()
    cornered = (attacked.data.images[:, 0, 25:, 25:] == 255).all(axis=(1, 2))
    cover = cornered & ~attacked.poisoned
    assert cover.sum() == 100 and not np.isin(labels[cover], (0, 1, 2)).any()  # other classes, true labels kept
    assert np.array_equal(attacked.data.labels[cover], labels[cover])
    _, poisoned = poison_fraction(clean.images, labels, trig, 0.1, 0, np.random.default_rng(1))
    assert poisoned.sum() == 100 and np.isin(labels[poisoned], (1, 2)).all()

    def flips_sources_only(x: np.ndarray) -> np.ndarray:  # a perfect source-specific BadNet
        triggered = (x[:, 0, 25:, 25:] == 255).all(axis=(1, 2))
        return np.where(triggered & np.isin(labels, (1, 2)), 0, labels)

    assert evaluate(flips_sources_only, clean, trig, 0).attack_success_rate == 1.0  # measured on the sources
    assert evaluate(flips_sources_only, clean, parse_trigger("square:3"), 0).attack_success_rate == pytest.approx(2 / 9)
