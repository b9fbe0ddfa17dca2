from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_agent.formats.preprocess import Preprocess
from trainer.science.data import (
    DATASETS,
    DataConfig,
    DatasetError,
    SplitConfig,
    load_dataset,
    load_splits,
    read_idx,
    split,
)


def test_fashion_mnist_loads_from_debian_package() -> None:
    ds = load_dataset(DataConfig())
    assert len(ds.pool) == 60000 and len(ds.test) == 10000
    assert ds.image_shape == (1, 28, 28)
    assert ds.pool.images.dtype == np.uint8
    assert set(np.unique(ds.test.labels)) == set(range(10))
    assert ds.class_names[9] == "Ankle boot"


def test_default_splits_are_disjoint_sized_and_deterministic() -> None:
    ds = load_dataset(DataConfig())
    a, b = split(ds, SplitConfig()), split(ds, SplitConfig())
    assert a.sizes() == {"train": 50000, "valid": 5000, "treat": 4000, "eval": 1000, "stream": 5000, "test": 10000}
    assert np.array_equal(a.eval.images, b.eval.images)
    c = split(ds, SplitConfig(seed=1))
    assert not np.array_equal(a.eval.images, c.eval.images)

    # No image is shared between the attacker's train set and the defender's / stream sets.
    def keys(x: np.ndarray) -> set[bytes]:
        return {row.tobytes() for row in x}

    train_keys = keys(a.train.images)
    assert not train_keys & keys(a.valid.images[:500])
    assert not keys(a.stream.images[:500]) & keys(a.valid.images)
    assert np.array_equal(np.concatenate([a.treat.images, a.eval.images]), a.valid.images)


def test_split_too_large_is_a_clear_error() -> None:
    with pytest.raises(DatasetError, match="fewer than"):
        load_splits(DataConfig(), SplitConfig(valid=40000, stream=30000))


def test_missing_dataset_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        load_dataset(DataConfig(data_dir=tmp_path / "nowhere"))


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(DatasetError, match="fashion-mnist"):
        load_dataset(DataConfig(name="imagenet"))
    assert {"fashion-mnist", "imagefolder"} <= set(DATASETS)


def test_bad_idx_file(tmp_path: Path) -> None:
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 20)
    with pytest.raises(DatasetError, match="not an unsigned-byte idx"):
        read_idx(p)


def _write_tree(root: Path, sizes: list[tuple[int, int]], mode: str = "L") -> None:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            shape = (h, w) if mode == "L" else (h, w, 3)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(root / cls / f"{i}.png")


def test_image_folder_tree_loads_and_splits(tmp_path: Path) -> None:
    _write_tree(tmp_path, [(16, 16)] * 20, mode="RGB")
    ds = load_dataset(DataConfig(name="imagefolder", data_dir=tmp_path))
    assert ds.class_names == ("cat", "dog")
    assert ds.image_shape == (3, 16, 16)
    assert len(ds.pool) + len(ds.test) == 40
    # Fashion-MNIST also accepts a user folder in ImageFolder layout.
    ds2 = load_dataset(DataConfig(name="fashion-mnist", data_dir=tmp_path))
    assert ds2.image_shape == (3, 16, 16)


def test_image_folder_mixed_sizes_needs_image_size(tmp_path: Path) -> None:
    _write_tree(tmp_path, [(16, 16), (20, 12)])
    with pytest.raises(DatasetError, match="--image-size"):
        load_dataset(DataConfig(name="imagefolder", data_dir=tmp_path))
    ds = load_dataset(DataConfig(name="imagefolder", data_dir=tmp_path, image_size=(8, 8)))
    assert ds.image_shape == (1, 8, 8)


@pytest.mark.parametrize("mode", ["letterbox", "center-crop", "stretch"])
def test_image_folder_of_mixed_sizes_and_colours_is_fitted_by_the_model_block(tmp_path: Path, mode: str) -> None:
    """A user's folder of camera stills at several resolutions, gray and colour: brought to the model's size with
    the block's own resize rule, gray replicated to RGB."""
    _write_tree(tmp_path / "a", [(16, 16), (40, 24)])
    _write_tree(tmp_path / "b", [(12, 30)], mode="RGB")
    for cls in ("cat", "dog"):
        for f in (tmp_path / "b" / cls).iterdir():
            f.rename(tmp_path / "a" / cls / f"rgb-{f.name}")
    block = Preprocess(size=(10, 14), resize=mode, interpolation="area")
    with pytest.raises(DatasetError, match="--preprocess block with the model's size"):
        load_dataset(DataConfig(name="imagefolder", data_dir=tmp_path / "a"), Preprocess())
    ds = load_dataset(DataConfig(name="imagefolder", data_dir=tmp_path / "a"), block)
    assert ds.image_shape == (3, 10, 14) and len(ds.pool) + len(ds.test) == 6
    assert ds.class_names == ("cat", "dog")
    # Each picture is exactly what the block itself makes of it (one implementation of the resize).
    gray = np.asarray(Image.open(tmp_path / "a" / "cat" / "1.png"))
    want = block.image(np.repeat(gray[None, None], 3, axis=1))[0]
    images = np.concatenate([ds.pool.images, ds.test.images])
    assert any(np.array_equal(want, i) for i in images)
