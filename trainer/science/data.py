"""Datasets and the paper's splits.

Images live as uint8 arrays of shape (N, C, H, W) in [0, 255]; labels as int64 arrays of shape (N,).
Models see float32 in [0, 1] (divide by 255, see :data:`InputSpec.scale`).

Two kinds of data. **The defender's own photos** (``--data``, :func:`load_defender`: a folder of class folders,
idx files or a CSV of path,label) are all D_valid: cut, per class and seeded, into D_treat and D_eval; there is no
attacker split, stream or test split on the product's path. **The evaluation harness** (``--dataset``) follows the
paper (§4, §5.2): the dataset's own training file is cut, with a seeded permutation, into
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.formats.preprocess import Preprocess, resize
from edge_agent.options import flag, fraction, image_size, part, positive

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
    # The defender's own set whose labels are output indices (idx files, a CSV of numbers): class_names are
    # placeholders, and the model's own names are taken in :meth:`relabelled`.
    by_index: bool = False

    @property
    def defender(self) -> bool:
        """Whether these are the defender's own photos (D_valid only: no train, stream or test split)."""
        return len(self.test) == 0 and len(self.train) == 0

    @property
    def scored(self) -> ImageSet:
        """The labelled set reports measure on: the test split, or the defender's D_eval when there is none."""
        return self.eval if self.defender else self.test

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
        parts: dict[str, Any] = {
            k: ImageSet(preprocess.image(getattr(self, k).images), getattr(self, k).labels)
            for k in ("train", "valid", "treat", "eval", "stream", "test")
        }
        log.info("data in the model's image space: %s -> %s", self.image_shape, parts["test"].images.shape[1:])
        return Splits(**parts, class_names=self.class_names, preprocess=preprocess, raw=self, by_index=self.by_index)

    def relabelled(self, order: tuple[str, ...]) -> Splits:
        """The same splits with labels in ``order`` (the same class names, another order): a folder's class is
        matched to the model's by name, never by sort order. ValueError naming the classes when the names differ."""
        if tuple(order) == tuple(self.class_names):
            return self
        if self.by_index:
            top = max((int(getattr(self, k).labels.max(initial=-1)) for k in ("valid", "test", "train")), default=-1)
            if top >= len(order):
                raise ValueError(
                    f"your data has labels up to {top}, the model has {len(order)} classes (0 to {len(order) - 1})"
                )
            raw = self.raw.relabelled(order) if self.raw is not None else None
            return replace(self, class_names=tuple(order), by_index=False, raw=raw)
        missing, extra = sorted(set(order) - set(self.class_names)), sorted(set(self.class_names) - set(order))
        if missing or extra or len(order) != len(self.class_names):
            raise ValueError(
                f"the model's classes and the data's differ: the model has {missing[:5] or 'no others'} that the data "
                f"lacks, the data {extra[:5] or 'no others'} that the model lacks; name the folders as the model's "
                "classes, or give --classes FILE with the model's names in its output order"
            )
        to_model = np.array([order.index(name) for name in self.class_names], np.int64)
        parts: dict[str, Any] = {
            k: ImageSet(getattr(self, k).images, to_model[getattr(self, k).labels])
            for k in ("train", "valid", "treat", "eval", "stream", "test")
        }
        raw = self.raw.relabelled(order) if self.raw is not None else None
        return replace(self, **parts, class_names=tuple(order), raw=raw)

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
            f"{dataset.name}: the training file has {n_pool} images, fewer than the {need} that the evaluation "
            f"harness' splits ask for (valid {config.valid} + stream {config.stream} + train); use smaller sizes, or, "
            "for your own photos (all of them your clean D_valid), --data DIR instead of --dataset"
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


# --- the defender's own photos ------------------------------------------------------------------------

# The defender's set, measured (bench/bench_smallest.py, BENCHMARKS.md "How many photos"): below this many photos
# θ_aug and the repair were measured to lose quality, so a smaller set is warned about; below MIN_EVAL images in
# D_eval the heuristic's threshold (CA on D_eval) is noise and the run is refused.
RECOMMENDED_PHOTOS = 1000
MIN_EVAL = 20


@dataclass(frozen=True)
class DefenderData:
    """The defender's own clean labelled photos: all of them are D_valid, cut into D_treat and D_eval."""

    path: Path | None = flag(
        None,
        "your clean labelled photos, all of them D_valid (treat + eval): ROOT/<class>/* (or ROOT/train/<class> and "
        "ROOT/test/<class>, taken together), a folder of MNIST-style idx files, or a CSV of path,label (paths "
        "inside the CSV's folder; labels class names or output indices)",
        name="--data",
        type=Path,
    )


def _read_csv(path: Path) -> tuple[list[np.ndarray], list[str]]:
    """The pictures and labels a CSV of path,label names (a header row is skipped; paths inside its folder)."""
    import csv

    from PIL import Image, UnidentifiedImageError

    root = path.parent.resolve()
    images: list[np.ndarray] = []
    labels: list[str] = []
    try:
        rows = list(csv.reader(path.read_text().splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: cannot read it as a CSV of path,label ({e})") from None
    for n, row in enumerate(rows, 1):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:
            raise DatasetError(f"{path}:{n}: expected two columns path,label, got {len(row)}")
        name, label = row[0].strip(), row[1].strip()
        if n == 1 and label.lower() in ("label", "class"):
            continue
        file = (root / name).resolve()
        if not file.is_relative_to(root) or not file.is_file():
            raise DatasetError(f"{path}:{n}: {name!r} is not a file inside {root}; give paths relative to the CSV")
        try:
            with Image.open(file) as src:
                img = src.convert("L" if src.mode in ("1", "L", "I;16", "I") else "RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise DatasetError(f"{path}:{n}: {name}: not a readable image ({e})") from None
        images.append(np.asarray(img, dtype=np.uint8))
        labels.append(label)
    if not images:
        raise DatasetError(f"{path}: no rows; expected lines of path,label")
    return images, labels


def _defender_set(root: Path, fit: Preprocess | None) -> tuple[ImageSet, tuple[str, ...], bool]:
    """All the defender's photos as one set, its class names (sorted folder names, or placeholders for index
    labels) and whether the labels are output indices."""
    if root.is_file() and root.suffix.lower() == ".csv":
        pictures, names = _read_csv(root)
        images = _stack(pictures, root, fit)
        if all(n.isdigit() for n in names):
            labels = np.asarray([int(n) for n in names], np.int64)
            return ImageSet(images, labels), tuple(str(i) for i in range(int(labels.max()) + 1)), True
        classes = tuple(sorted(set(names)))
        return ImageSet(images, np.asarray([classes.index(n) for n in names], np.int64)), classes, False
    if not root.is_dir():
        raise DatasetError(f"--data {root}: no such folder or .csv file")
    if has_idx_files(root):
        d = load_idx_dir(root, root.name, ())
        both = ImageSet.concat(d.pool, d.test)
        return both, tuple(str(i) for i in range(int(both.labels.max()) + 1)), True
    d = load_image_folder(root, None, test_fraction=0.0, fit=fit)
    return ImageSet.concat(d.pool, d.test) if len(d.test) else d.pool, d.class_names, False


def stratified_eval(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of D_eval: ``fraction`` of each class (at least one where a class has two or more),
    seeded; the rest is D_treat."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = round(len(idx) * fraction)
        mask[idx[: max(n, 1 if len(idx) >= 2 else 0)]] = True
    return mask


def load_defender(root: Path, eval_fraction: float, seed: int, fit: Preprocess | None = None) -> Splits:
    """The defender's photos as D_valid = D_treat + D_eval (stratified, seeded); no train, stream or test split.

    ``fit``: the model's preprocessing block (photos of several sizes are brought to its size with its resize
    rule). A set too small to measure the heuristic's threshold on is refused; one below
    :data:`RECOMMENDED_PHOTOS` is warned about."""
    if not 0.0 < eval_fraction < 1.0:
        raise DatasetError(f"--eval-fraction must lie in (0, 1), got {eval_fraction}")
    photos, class_names, by_index = _defender_set(root, fit)
    eval_mask = stratified_eval(photos.labels, eval_fraction, seed)
    treat, evaluation = photos.subset(np.flatnonzero(~eval_mask)), photos.subset(np.flatnonzero(eval_mask))
    if len(evaluation) < MIN_EVAL or len(treat) < MIN_EVAL:
        raise DatasetError(
            f"--data {root}: {len(photos)} photos give {len(treat)} to treat and {len(evaluation)} to evaluate on; "
            f"at least {MIN_EVAL} of each are needed (about {RECOMMENDED_PHOTOS} photos in all are recommended)"
        )
    counts = np.bincount(photos.labels, minlength=len(class_names))
    if len(photos) < RECOMMENDED_PHOTOS:
        log.warning(
            "%s: %d photos; below %d the treatment and the repair were measured to lose quality "
            "(BENCHMARKS.md, How many photos)", root, len(photos), RECOMMENDED_PHOTOS
        )  # fmt: skip
    few = [class_names[i] for i, n in enumerate(counts) if n < 10]
    if few:
        log.warning("%s: fewer than 10 photos of class(es) %s", root, ", ".join(few[:8]))
    empty = ImageSet(np.empty((0, *photos.images.shape[1:]), np.uint8), np.empty(0, np.int64))
    log.info("your data %s: %d photos of %d classes: %d to treat, %d to evaluate on", root, len(photos),
             len(class_names), len(treat), len(evaluation))  # fmt: skip
    return Splits(
        train=empty,
        valid=ImageSet.concat(treat, evaluation),
        treat=treat,
        eval=evaluation,
        stream=empty,
        test=empty,
        class_names=class_names,
        by_index=by_index,
    )


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


@dataclass(frozen=True, kw_only=True)
class DataParts:
    """A product stage's clean data as parts of its spec: your photos (``[data]``) and how they are cut
    (``[split]``), or instead the evaluation harness named (``[harness]``)."""

    data: DefenderData = part(DefenderData, "your data")
    split: SplitConfig = part(SplitConfig, "how the data is cut")
    harness: DataConfig = part(DataConfig, "evaluation harness data")
