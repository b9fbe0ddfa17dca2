"""The preprocessing block (edge_agent/formats/preprocess.py): one numpy implementation for trainer and edge."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_agent.formats.preprocess import Preprocess, PreprocessError, resize

RNG = np.random.default_rng(0)
RAW = RNG.integers(0, 256, (2, 3, 28, 37), dtype=np.uint8)


@pytest.mark.parametrize("size", [(32, 32), (14, 19), (64, 50)])
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic"])
def test_resize_matches_torch_half_pixel_interpolation(size: tuple[int, int], interpolation: str) -> None:
    ours = Preprocess(size=size, interpolation=interpolation).image(RAW).astype(int)
    kwargs = {} if interpolation == "nearest" else {"align_corners": False}
    ref = F.interpolate(torch.from_numpy(RAW).float(), size=size, mode=interpolation, **kwargs)
    ref_int = ref.round().clamp(0, 255).numpy().astype(int)
    assert ours.shape == (2, 3, *size)
    assert np.abs(ours - ref_int).max() <= 1  # rounding of exact halves may differ by one grey level
    assert (ours == ref_int).mean() > 0.99


def test_area_averages_exact_blocks_and_modes_keep_the_aspect() -> None:
    x = RAW[:, :1, :28, :28]
    ours = Preprocess(size=(14, 14), interpolation="area").image(x)
    assert np.array_equal(ours, F.avg_pool2d(torch.from_numpy(x).float(), 2).round().numpy().astype(np.uint8))
    boxed = resize(np.full((1, 1, 10, 20), 200, np.uint8), (20, 20), "letterbox", "bilinear")
    assert boxed.shape == (1, 1, 20, 20) and boxed[0, 0, 0].max() == 0 and boxed[0, 0, 10].min() == 200
    cropped = resize(np.arange(200, dtype=np.uint8).reshape(1, 1, 10, 20), (10, 10), "center-crop", "nearest")
    assert cropped.shape == (1, 1, 10, 10) and cropped[0, 0, 0, 0] == 5  # the centre 10 columns of 20


def test_colour_and_normalisation() -> None:
    gray = RAW[:, :1]
    rgb = Preprocess(color="rgb").image(gray)
    assert rgb.shape == (2, 3, 28, 37) and np.array_equal(rgb[:, 0], rgb[:, 2])
    bgr = Preprocess(color="bgr").image(RAW)
    assert np.array_equal(bgr[:, 0], RAW[:, 2])
    back = Preprocess(color="gray").image(rgb)
    assert np.abs(back.astype(int) - gray.astype(int)).max() <= 1  # the luma weights sum to 1
    p = Preprocess(mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.1), layout="NHWC")
    x = p.model_input(RAW)
    assert x.dtype == np.float32 and x.shape == (2, 28, 37, 3)
    want = (RAW[0, 1, 3, 4] / 255.0 - 0.4) / 0.2
    assert abs(float(x[0, 3, 4, 1]) - want) < 1e-5
    lo, hi = p.input_range()
    assert lo <= x.min() and x.max() <= hi
    assert Preprocess().model_input(RAW).max() <= 1.0  # the default is today's divide-by-255


def test_json_round_trip_and_refusals_name_the_field(tmp_path: Path) -> None:
    p = Preprocess(color="rgb", size=(32, 32), resize="letterbox", mean=(0.286,), std=(0.353,))
    assert Preprocess.from_json(p.to_json()) == p
    assert json.loads(p.to_json())["size"] == [32, 32]
    for text, says in (
        ('{"colour": "rgb"}', "unknown field(s) ['colour']"),
        ('{"size": [32]}', "size: expected [H, W]"),
        ('{"std": [0, 1, 1]}', "std: every value must be above 0"),
        ('{"interpolation": "lanczos"}', "interpolation: 'lanczos' is not one of"),
        ('{"mean": [0.1, 0.2]}', "mean: expected one number or one per channel"),
        ('{"scale": "1/255"}', "scale: expected a number"),
        ("[1, 2]", "expected a JSON object"),
        ("{not json", "not JSON"),
    ):
        (tmp_path / "p.json").write_text(text)
        with pytest.raises(PreprocessError, match=r"p\.json: .*" + re.escape(says)):
            Preprocess.load(tmp_path / "p.json")
    with pytest.raises(PreprocessError, match="cannot read"):
        Preprocess.load(tmp_path / "missing.json")
    with pytest.raises(PreprocessError, match="raw pictures must be uint8"):
        Preprocess().image(RAW.astype(np.float32))


def test_every_bundle_carries_a_golden_pair_the_edge_recomputes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import tiny_bundle
    from edge_agent.formats import preprocess as pp
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.formats.errors import BundleError

    bundle = tiny_bundle(tmp_path / "b", "cams", 1) / "bundle"
    roles = {a.role: a.name for a in verify_bundle(bundle).manifest.artifacts}
    assert roles["golden"] == "golden.npz"
    with np.load(bundle / "golden.npz") as data:
        assert data["picture"].shape == (1, 1, 37, 53) and data["expected"].shape == (1, 1, 28, 28)
    # An edge whose resize drifted (nearest where the trainer used bilinear) refuses the bundle, saying by how much.
    original = pp._resample
    monkeypatch.setattr(pp, "_resample", lambda x, h, w, interpolation, pixel=None: original(x, h, w, "nearest", pixel))
    with pytest.raises(BundleError, match="preprocessing differs from the trainer's"):
        verify_bundle(bundle)


def test_weighted_gathers_match_the_matmul_and_camera_frames_match_contiguous_pictures() -> None:
    """The few-tap path (bilinear, bicubic, nearest) computes what the dense matmul does, and a BGR camera frame
    (a view of an (H, W, 3) buffer, gathered on its own layout) preprocesses to what the same picture as a
    contiguous RGB array does."""
    from edge_agent.formats.preprocess import _apply, _plan, _taps

    rng = np.random.default_rng(3)
    part = rng.uniform(0, 255, (2, 3, 40, 90)).astype(np.float32)
    for interpolation in ("nearest", "bilinear", "bicubic"):
        for dst in (7, 33, 160):
            weights, used = _plan(dst, 90, interpolation)
            taps = _taps(dst, 90, interpolation)
            assert taps is not None and taps[0].shape[1] <= 4
            sub = part[..., used]
            np.testing.assert_allclose(_apply(sub, weights, taps, 3), _apply(sub, weights, None, 3), atol=1e-3)
    assert _taps(28, 1280, "area") is None  # 46 sources per pixel: the matmul
    frame = rng.integers(0, 256, (72, 128, 3), dtype=np.uint8)
    view = frame[:, :, 2::-1].transpose(2, 0, 1)[None]
    rgb = np.ascontiguousarray(view)
    for block in (Preprocess(color="gray", size=(28, 28)), Preprocess(color="rgb", size=(32, 48), resize="letterbox")):
        np.testing.assert_array_equal(block.image(view), block.image(rgb))


def test_yuv_frames_convert_only_what_the_resize_reads_and_match_opencv() -> None:
    """A decoder's 4:2:0 planes (decoder=pyav) give the pictures OpenCV's BGR frames give, within a grey level."""
    import cv2

    from edge_agent.formats.preprocess import Yuv420

    rng = np.random.default_rng(0)
    h, w = 90, 160
    y = rng.integers(16, 236, (h, w), dtype=np.uint8)
    u, v = (rng.integers(16, 241, (h // 2, w // 2), dtype=np.uint8) for _ in range(2))
    frame = Yuv420(y, u, v)
    reference = cv2.cvtColor(np.concatenate([y.ravel(), u.ravel(), v.ravel()]).reshape(h * 3 // 2, w),
                             cv2.COLOR_YUV2RGB_I420).transpose(2, 0, 1)[None]  # fmt: skip
    assert frame.shape == reference.shape
    assert np.abs(frame.rgb().astype(int) - reference).max() <= 1
    for block, shape in (
        (Preprocess(), (1, 28, 28)),  # gray, stretched
        (Preprocess(size=(32, 32), resize="letterbox"), (3, 32, 32)),
        (Preprocess(size=(24, 24), resize="center-crop", interpolation="bicubic"), (3, 24, 24)),
        (Preprocess(size=(h, w)), (3, h, w)),  # no resize: the whole frame converted
    ):
        fitted = block.fitted(shape)
        got, want = fitted.image(frame), fitted.image(np.ascontiguousarray(reference))
        assert got.shape == want.shape == (1, *shape)
        # one level per converted pixel; bicubic's negative lobes can add up two such differences on noise
        assert np.abs(got.astype(int) - want).max() <= (2 if block.interpolation == "bicubic" else 1), block
    # the matrices and ranges: video-range white and black, full-range white, BT.709's red
    ones = np.ones((2, 2), np.uint8)
    assert Yuv420(ones * 235, ones[:1, :1] * 128, ones[:1, :1] * 128).rgb().min() == 255
    assert Yuv420(ones * 16, ones[:1, :1] * 128, ones[:1, :1] * 128).rgb().max() == 0
    assert Yuv420(ones * 255, ones[:1, :1] * 128, ones[:1, :1] * 128, full_range=True).rgb().min() == 255
    red = Yuv420(ones * 63, ones[:1, :1] * 102, ones[:1, :1] * 240, matrix="bt709").rgb()[0, :, 0, 0]
    assert np.abs(red.astype(int) - [255, 0, 0]).max() <= 3
    assert Yuv420(np.ones((3, 5), np.uint8), np.ones((2, 3), np.uint8), np.ones((2, 3), np.uint8)).shape == (1, 3, 3, 5)
    with pytest.raises(PreprocessError, match="chroma planes"):
        Yuv420(y, u[:, :-1], v)
    with pytest.raises(PreprocessError, match="matrix"):
        Yuv420(y, u, v, matrix="bt2020")
