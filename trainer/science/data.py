"""Datasets and the paper's splits.

Images live as uint8 arrays of shape (N, C, H, W) in [0, 255]; labels as int64 arrays of shape (N,).
Models see float32 in [0, 1] (divide by 255, see :data:`InputSpec.scale`).

Splits follow the paper (§4, §5.2): the dataset's own training file is cut, with a seeded permutation, into
the defender's validation set D_valid (itself cut into D_treat and D_eval), the post-deployment stream and the
attacker's training set; the dataset's test file is D_test. Fashion-MNIST default sizes (seed 0):

==========  =======  =============================================
split       size     who uses it
==========  =======  =============================================
train       50,000   attacker (BadNet training)
valid        5,000   defender: treat 4,000 + eval 1,000
stream       5,000   post-deployment inputs (the edge replays them)
test        10,000   evaluation only (CA, ASR)
==========  =======  =============================================
"""

from __future__ import annotations

import gzip
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.formats.preprocess import Preprocess, resize
from edge_agent.options import flag, fraction, image_size, positive

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MNIST_CLASSES = tuple(str(i) for i in range(10))
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".webp")


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message says what to do."""


@dataclass(frozen=True)
class ImageSet:
    """Images (N, C, H, W) uint8 in [0, 255] and their labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        assert self.images.ndim == 4 and self.images.dtype == np.uint8, self.images.shape
        assert self.labels.shape == (len(self.images),), (self.labels.shape, self.images.shape)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray | slice) -> ImageSet:
        """The examples at ``index`` (a slice or an integer array)."""
        return ImageSet(self.images[index], self.labels[index])

    @staticmethod
    def concat(*parts: ImageSet) -> ImageSet:
        """All parts, in order, as one set."""
        return ImageSet(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


@dataclass(frozen=True)
class Dataset:
    """A dataset as loaded from disk: the training pool (to be split) and the test file."""

    name: str
    pool: ImageSet
    test: ImageSet
    class_names: tuple[str, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.pool.images.shape[1:]
        return int(c), int(h), int(w)


@dataclass(frozen=True)
class SplitConfig:
    """Sizes and seed of the paper's splits (see the module docstring)."""

    valid: int = flag(5000, "defender's D_valid size", name="--valid-size", type=positive)
    eval_fraction: float = flag(0.2, "share of D_valid held out as D_eval", type=fraction)
    stream: int = flag(5000, "post-deployment stream size", name="--stream-size", type=positive)
    # None: the rest of the pool
    train: int | None = flag(None, "cap on the attacker's training set", name="--train-size", type=positive)
    test: int | None = flag(None, "cap on the test set (default: all)", name="--test-size", type=positive)
    seed: int = flag(0, "seed of the train/valid/stream split", name="--split-seed", type=int)


@dataclass(frozen=True)
class Splits:
    """The paper's splits. ``valid`` is ``treat`` followed by ``eval``."""

    train: ImageSet
    valid: ImageSet
    treat: ImageSet
    eval: ImageSet
    stream: ImageSet
    test: ImageSet
    class_names: tuple[str, ...]
    # Set by in_image_space: the block that made these images from ``raw``'s pictures.
    preprocess: Preprocess | None = None
    raw: Splits | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.test.images.shape[1:]
        return int(c), int(h), int(w)

    def in_image_space(self, preprocess: Preprocess) -> Splits:
        """Every split as the model's images (colour and size per ``preprocess``); itself when that changes
        nothing. Triggers are still applied to the raw pictures (see :meth:`to_image`): an attacker pastes
        them on what the camera sees, before any resize."""
        if self.preprocess is not None:
            raise ValueError("the splits are already the model's images")
        c = self.image_shape[0]
        same_colour = preprocess.color in (None, "gray" if c == 1 else "rgb")
        if same_colour and (preprocess.size is None or tuple(preprocess.size) == self.image_shape[1:]):
            return self
        parts = {
            k: ImageSet(preprocess.image(getattr(self, k).images), getattr(self, k).labels)
            for k in ("train", "valid", "treat", "eval", "stream", "test")
        }
        log.info("data in the model's image space: %s -> %s", self.image_shape, parts["test"].images.shape[1:])
        return Splits(**parts, class_names=self.class_names, preprocess=preprocess, raw=self)

    def relabelled(self, order: tuple[str, ...]) -> Splits:
        """The same splits with labels in ``order`` (the same class names, another order): a folder's class is
        matched to the model's by name, never by sort order. ValueError naming the classes when the names differ."""
        if tuple(order) == tuple(self.class_names):
            return self
        missing, extra = sorted(set(order) - set(self.class_names)), sorted(set(self.class_names) - set(order))
        if missing or extra or len(order) != len(self.class_names):
            raise ValueError(
                f"the model's classes and the data's differ: the model has {missing[:5] or 'no others'} that the data "
                f"lacks, the data {extra[:5] or 'no others'} that the model lacks; name the folders as the model's "
                "classes, or give --classes FILE with the model's names in its output order"
            )
        to_model = np.array([order.index(name) for name in self.class_names], np.int64)
        parts = {
            k: ImageSet(getattr(self, k).images, to_model[getattr(self, k).labels])
            for k in ("train", "valid", "treat", "eval", "stream", "test")
        }
        raw = self.raw.relabelled(order) if self.raw is not None else None
        return Splits(**parts, class_names=tuple(order), preprocess=self.preprocess, raw=raw)

    def raw_part(self, name: str) -> ImageSet:
        """Split ``name`` as raw pictures (where triggers go)."""
        return getattr(self.raw if self.raw is not None else self, name)

    def to_image(self, pictures: np.ndarray) -> np.ndarray:
        """Raw pictures (say, triggered ones) -> the model's images, as the splits were made."""
        return self.preprocess.image(pictures) if self.preprocess is not None else pictures

    def sizes(self) -> dict[str, int]:
        """Number of examples per split, for reports."""
        return {k: len(getattr(self, k)) for k in ("train", "valid", "treat", "eval", "stream", "test")}


def split(dataset: Dataset, config: SplitConfig) -> Splits:
    """Cut ``dataset`` into the paper's splits, deterministically for ``config.seed``."""
    n_pool = len(dataset.pool)
    need = config.valid + config.stream + (config.train or 1)
    if need > n_pool:
        raise DatasetError(
            f"{dataset.name}: the training file has {n_pool} images, fewer than the {need} that the "
            f"splits ask for (valid {config.valid} + stream {config.stream} + train); use smaller sizes"
        )
    if not 0.0 < config.eval_fraction < 1.0:
        raise DatasetError(f"eval_fraction must lie in (0, 1), got {config.eval_fraction}")
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(n_pool)
    valid_idx = order[: config.valid]
    stream_idx = order[config.valid : config.valid + config.stream]
    train_idx = order[config.valid + config.stream :]
    if config.train is not None:
        train_idx = train_idx[: config.train]
    n_eval = max(1, round(config.valid * config.eval_fraction))
    valid = dataset.pool.subset(valid_idx)
    test = dataset.test
    if config.test is not None and config.test < len(test):
        test = test.subset(np.random.default_rng(config.seed + 1).permutation(len(test))[: config.test])
    return Splits(
        train=dataset.pool.subset(train_idx),
        valid=valid,
        treat=valid.subset(slice(0, config.valid - n_eval)),
        eval=valid.subset(slice(config.valid - n_eval, config.valid)),
        stream=dataset.pool.subset(stream_idx),
        test=test,
        class_names=dataset.class_names,
    )


# --- idx files (MNIST, Fashion-MNIST) ---------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (optionally gzip-compressed) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise DatasetError(f"{path}: not an idx file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte idx file (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DatasetError(f"{path}: header says {dims} but the file holds {body.size} bytes")
    return body.reshape(dims).copy()  # writable: torch.from_numpy warns on read-only buffers


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def has_idx_files(root: Path) -> bool:
    """Whether ``root`` holds the four MNIST-style idx files."""
    return all(
        _find_idx(root, s) is not None
        for s in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    )


def load_idx_dir(root: Path, name: str, class_names: tuple[str, ...]) -> Dataset:
    """Load ``train-*`` and ``t10k-*`` idx files from ``root``."""
    sets = []
    for prefix in ("train", "t10k"):
        img_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
        lbl_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
        if img_path is None or lbl_path is None:
            raise DatasetError(f"{root}: missing {prefix}-images-idx3-ubyte[.gz] or {prefix}-labels-idx1-ubyte[.gz]")
        images = read_idx(img_path)[:, None, :, :]  # (N, 1, H, W)
        labels = read_idx(lbl_path).astype(np.int64)
        if len(images) != len(labels):
            raise DatasetError(f"{root}: {len(images)} {prefix} images but {len(labels)} labels")
        sets.append(ImageSet(np.ascontiguousarray(images), labels))
    return Dataset(name, sets[0], sets[1], class_names)


# --- ImageFolder trees -------------------------------------------------------------------------------


def _read_folder(root: Path, classes: list[str], size: tuple[int, int] | None) -> tuple[list[np.ndarray], list[int]]:
    from PIL import Image

    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for p in files:
            with Image.open(p) as src:
                img = src.convert("L" if src.mode in ("1", "L", "I;16", "I") else "RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            images.append(np.asarray(img, dtype=np.uint8))
            labels.append(label)
    return images, labels


def _stack(images: list[np.ndarray], root: Path, fit: Preprocess | None) -> np.ndarray:
    """Images of one shape as (N, C, H, W); images of several sizes are brought to ``fit``'s size with its own
    resize rule (letterbox, center-crop or stretch) and, when colours mix, to RGB."""
    shapes = {a.shape for a in images}
    if len(shapes) == 1:
        arr = np.stack(images)
        return arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)  # (N, C, H, W)
    if fit is None or fit.size is None:
        raise DatasetError(
            f"{root}: images have different sizes or modes {sorted(shapes)[:4]}; pass --image-size HxW to resize "
            "them all, or a --preprocess block with the model's size (its resize rule is then used)"
        )
    rgb = any(a.ndim == 3 for a in images)
    out = np.empty((len(images), 3 if rgb else 1, *fit.size), np.uint8)
    for i, a in enumerate(images):
        pic = a[None, None] if a.ndim == 2 else a.transpose(2, 0, 1)[None]
        if rgb and pic.shape[1] == 1:
            pic = np.repeat(pic, 3, axis=1)
        out[i] = pic[0] if pic.shape[2:] == fit.size else resize(pic, fit.size, fit.resize, fit.interpolation)[0]
    return out


def load_image_folder(
    root: Path, size: tuple[int, int] | None = None, test_fraction: float = 0.2, fit: Preprocess | None = None
) -> Dataset:
    """Load an ImageFolder tree: ``root/train/<class>/*`` and ``root/test/<class>/*``, or ``root/<class>/*``.

    Without train/test folders a seeded ``test_fraction`` of the images becomes the test file.
    Gray images stay one channel; anything else becomes RGB. ``size`` resizes every image (stretch); without
    it, images of several sizes need ``fit``, the model's preprocessing block (see :func:`_stack`).
    """
    split_dirs = (root / "train").is_dir() and (root / "test").is_dir()
    base = root / "train" if split_dirs else root
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    if not classes:
        raise DatasetError(f"{root}: no class folders found; expected ROOT/<class>/*.png or ROOT/train/<class>/*")
    imgs, lbls = _read_folder(base, classes, size)
    if not imgs:
        raise DatasetError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    pool = ImageSet(_stack(imgs, root, fit), np.asarray(lbls, dtype=np.int64))
    if split_dirs:
        t_imgs, t_lbls = _read_folder(root / "test", classes, size)
        test = ImageSet(_stack(t_imgs, root, fit), np.asarray(t_lbls, dtype=np.int64))
        if test.images.shape[1:] != pool.images.shape[1:]:
            raise DatasetError(f"{root}: train and test images differ in shape; pass --image-size HxW")
    else:
        order = np.random.default_rng(12345).permutation(len(pool))
        n_test = int(len(pool) * test_fraction)
        test, pool = pool.subset(order[:n_test]), pool.subset(order[n_test:])
    return Dataset(root.name, pool, test, tuple(classes))


# --- registry ---------------------------------------------------------------------------------------


def _fashion_mnist(cfg: DataConfig, fit: Preprocess | None = None) -> Dataset:
    root = cfg.data_dir or FASHION_MNIST_DIR
    if cfg.data_dir is not None and not has_idx_files(root) and root.is_dir():
        return load_image_folder(root, cfg.image_size, fit=fit)
    if not has_idx_files(root):
        raise DatasetError(
            f"Fashion-MNIST not found in {root}. Install Debian's package: "
            "'sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist', "
            "or pass --data-dir with the four idx files or an ImageFolder tree"
        )
    return load_idx_dir(root, "fashion-mnist", FASHION_MNIST_CLASSES)


def _mnist(cfg: DataConfig, fit: Preprocess | None = None) -> Dataset:
    if cfg.data_dir is None or not has_idx_files(cfg.data_dir):
        raise DatasetError("mnist: pass --data-dir with the four MNIST idx files (train-*, t10k-*)")
    return load_idx_dir(cfg.data_dir, "mnist", MNIST_CLASSES)


def _cifar10(cfg: DataConfig, fit: Preprocess | None = None) -> Dataset:
    if cfg.data_dir is None:
        raise DatasetError("cifar10: pass --data-dir with torchvision's cifar-10-batches-py folder inside")
    from torchvision.datasets import CIFAR10

    try:
        train = CIFAR10(str(cfg.data_dir), train=True, download=False)
        test = CIFAR10(str(cfg.data_dir), train=False, download=False)
    except RuntimeError as e:  # torchvision says "Dataset not found or corrupted"
        raise DatasetError(f"cifar10: {e} (looked in {cfg.data_dir}; nothing is downloaded)") from e

    def to_set(ds: CIFAR10) -> ImageSet:
        return ImageSet(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), np.asarray(ds.targets, np.int64))

    return Dataset("cifar10", to_set(train), to_set(test), CIFAR10_CLASSES)


def _image_folder(cfg: DataConfig, fit: Preprocess | None = None) -> Dataset:
    if cfg.data_dir is None or not cfg.data_dir.is_dir():
        raise DatasetError("imagefolder: pass --data-dir with ROOT/<class>/*.png or ROOT/{train,test}/<class>/*")
    return load_image_folder(cfg.data_dir, cfg.image_size, fit=fit)


DATASETS: dict[str, Callable[[DataConfig, Preprocess | None], Dataset]] = {
    "fashion-mnist": _fashion_mnist,
    "mnist": _mnist,
    "cifar10": _cifar10,
    "imagefolder": _image_folder,
}


@dataclass(frozen=True)
class DataConfig:
    """Which dataset to load and from where."""

    name: str = flag("fashion-mnist", "dataset", name="--dataset", choices=tuple(DATASETS))
    data_dir: Path | None = flag(
        None,
        "folder with the dataset's idx files or an ImageFolder tree (default: the Debian package's)",
        type=Path,
    )
    # (H, W), ImageFolder trees only
    image_size: tuple[int, int] | None = flag(None, "resize ImageFolder images to HxW", type=image_size)


def load_dataset(cfg: DataConfig, fit: Preprocess | None = None) -> Dataset:
    """Load the dataset named by ``cfg.name`` (see :data:`DATASETS`). Nothing is downloaded.

    ``fit``: the model's preprocessing block; an ImageFolder of mixed sizes is brought to its size at load.
    """
    try:
        loader = DATASETS[cfg.name]
    except KeyError:
        raise DatasetError(f"unknown dataset {cfg.name!r}; choose one of: {', '.join(DATASETS)}") from None
    dataset = loader(cfg, fit)
    log.info(
        "loaded %s: %d pool + %d test images of shape %s",
        dataset.name,
        len(dataset.pool),
        len(dataset.test),
        dataset.image_shape,
    )
    return dataset


def load_splits(data: DataConfig, splits: SplitConfig, fit: Preprocess | None = None) -> Splits:
    """Load a dataset and cut it into the paper's splits (``fit``: see :func:`load_dataset`)."""
    return split(load_dataset(data, fit), splits)
