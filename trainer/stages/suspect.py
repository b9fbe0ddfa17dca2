"""The suspect model, whichever door it comes in by, checked before any treatment (paper §4.1: the defender
receives a model it did not train).

``--model FILE`` takes an ``.onnx`` (any exporter), a ``.pt2`` (torch.export) or one of our ``.pt`` checkpoints;
``--arch torchvision:NAME --weights FILE`` builds an architecture by name. ``--preprocess FILE.json`` says how the
data becomes the model's input (else the ONNX file's own ``nnoc.preprocess``, else divide by 255).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from edge_agent.formats.preprocess import META_KEY as PREPROCESS_KEY
from edge_agent.formats.preprocess import Preprocess
from edge_agent.formats.spec import InputSpec
from edge_agent.formats.untrusted import UntrustedFileError, self_contained_onnx
from edge_agent.options import flag, positive, positive_float
from trainer.science.data import Splits
from trainer.science.importers import (
    PARITY_INPUTS,
    ModelImportError,
    arch_module,
    check_backward,
    check_parity,
    load_weights,
    onnx_module,
    onnxruntime_logits,
    pt2_module,
    read_onnx,
    read_weights,
)
from trainer.science.models import Checkpoint, eval_mode
from trainer.science.sandbox import ContainedError, Limits, run_contained

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """Where the suspect model comes from (``--model`` and its companions on every command that takes one)."""

    model: Path | None = flag(
        None,
        "the suspect model: .onnx (any exporter, opset 13+), .pt2 (torch.export), or .pt (nnoc checkpoint)",
        type=Path,
    )
    arch: str | None = flag(None, "instead of --model: torchvision:NAME or timm:NAME, with --weights")
    weights: Path | None = flag(None, "--arch's weights: .safetensors or a state-dict .pth", type=Path)
    num_classes: int | None = flag(None, "--arch's classes (default: the dataset's)", type=positive)
    preprocess: Path | None = flag(
        None,
        "JSON preprocessing block (color, size, resize, interpolation, scale, mean, std, layout); default: the "
        "model file's own, else the data's size and colour divided by 255",
        type=Path,
    )
    train_norm: bool = flag(False, "fine-tune an outside model with BatchNorm/Dropout in train mode (default: frozen)")
    classes: Path | None = flag(
        None,
        "the model's class names in its output order, one per line (default: the model file's own "
        "nnoc.class_names; else the data's order); data folders are matched to them by name",
        type=Path,
    )
    class_names: tuple[str, ...] = flag(
        (), "instead of --classes FILE: the model's class names in its output order", nargs="+"
    )
    min_clean_accuracy: float | None = flag(
        None,
        "the suspect's least accuracy on your clean data before any treatment (default: twice chance); below it is "
        "exit 2 (wrong classes, preprocessing or data); 0 turns the check off",
        type=float,
    )
    external_data: Path | None = flag(
        None,
        "the folder holding an ONNX model's external data files (default: such a model is refused); every location "
        "must resolve inside it",
        type=Path,
    )
    contained: bool = flag(
        True,
        "run the checks of a foreign model file (.onnx, .pt2) in this process only, not first in a contained child "
        "(no network, a folder of its own, memory and time limits)",
        name="--no-contained",
    )
    import_seconds: float = flag(600.0, "the contained import's time limit, seconds", type=positive_float)
    import_memory_mb: int = flag(6144, "the contained import's memory limit, MiB", type=positive)

    @property
    def path(self) -> Path:
        """The file the model came in (the weights for --arch)."""
        path = self.model if self.arch is None else self.weights
        assert path is not None
        return path

    def block(self) -> Preprocess | None:
        """The ``--preprocess`` block, read and checked (None without the flag)."""
        return Preprocess.load(self.preprocess) if self.preprocess is not None else None

    def declared_block(self) -> Preprocess | None:
        """The preprocessing block the model comes with: ``--preprocess``, else an ONNX file's own
        ``nnoc.preprocess`` or a project checkpoint's (None when it declares none). For loading data of mixed sizes
        before the model itself is imported."""
        block = self.block()
        if block is not None or self.arch is not None or self.model is None or not self.model.is_file():
            return block
        try:  # an unreadable file is reported when the model itself is loaded, as every command does
            if self.model.suffix == ".onnx":
                meta = onnx_metadata(read_onnx(vendor_bytes(self), str(self.model)))
                text = meta.get(PREPROCESS_KEY)
                return None if text is None else Preprocess.from_json(text, f"{self.model}: {PREPROCESS_KEY}")
            if self.model.suffix == ".pt":
                return Checkpoint.load(self.model).input_spec.preprocess
        except (ModelImportError, OSError, ValueError, RuntimeError):
            return None
        return None

    def check(self) -> None:
        """A complete source and a readable preprocessing block, or a one-line error saying what to fix (before
        any data is loaded)."""
        if self.arch is not None:
            if self.model is not None:
                raise ModelImportError("give --model FILE or --arch NAME with --weights FILE, not both")
            if self.weights is None:
                raise ModelImportError(f"--arch {self.arch} needs --weights FILE (.safetensors or .pth)")
        elif self.model is None:
            raise ModelImportError("no model: pass --model FILE (.onnx, .pt2, .pt) or --arch NAME --weights FILE")
        elif self.model.suffix not in (".onnx", ".pt2", ".pt"):
            raise ModelImportError(
                f"--model {self.model}: expected .onnx, .pt2 or .pt; for a state dict use --arch NAME --weights FILE"
            )
        if not self.path.is_file():
            raise ModelImportError(f"model file {self.path} does not exist")
        self.block()


def declared_classes(src: ModelSource, where: str) -> tuple[str, ...] | None:
    """The model's own class order: ``--classes FILE`` (one name per line), else an ONNX file's
    ``nnoc.class_names``; None when neither says (the data's order is then taken as the model's, and checked)."""
    if src.class_names:
        if src.classes is not None:
            raise ModelImportError("give the model's classes once: --classes FILE or --class-names (a card's classes)")
        if len(set(src.class_names)) != len(src.class_names):
            raise ModelImportError("--class-names: the class names repeat")
        return tuple(src.class_names)
    if src.classes is not None:
        try:
            names = tuple(line.strip() for line in src.classes.read_text().splitlines() if line.strip())
        except (OSError, UnicodeDecodeError) as e:
            raise ModelImportError(f"--classes {src.classes}: cannot read it ({e})") from None
        if len(set(names)) != len(names) or not names:
            raise ModelImportError(f"--classes {src.classes}: expected one distinct class name per line")
        return names
    if src.arch is None and src.model is not None and src.model.suffix == ".onnx":
        meta = onnx_metadata(read_onnx(vendor_bytes(src), where))
        if "nnoc.class_names" in meta:
            try:
                return tuple(str(n) for n in json.loads(meta["nnoc.class_names"]))
            except (ValueError, TypeError):
                raise ModelImportError(f"{where}: its nnoc.class_names is not a JSON list of names") from None
    return None


def check_clean_accuracy(
    predicted: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...], floor: float, where: str
) -> float:
    """The suspect's accuracy on the defender's clean images before any treatment; under ``floor`` a
    :class:`ModelImportError` that says so and, when the confusion matrix reads as a permutation of the labels,
    names the likely mapping. Returns the accuracy."""
    k = len(class_names)
    accuracy = float((predicted == labels).mean()) if len(labels) else 0.0
    if floor <= 0:  # the check is off (an untrained model, a smoke test)
        return accuracy
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (labels, np.clip(predicted, 0, k - 1)), 1)
    from scipy.optimize import linear_sum_assignment

    _, mapping = linear_sum_assignment(confusion, maximize=True)  # data class i -> model output mapping[i]
    mapped = float(confusion[np.arange(k), mapping].sum() / max(1, len(labels)))
    # A reordering explains the data when it makes the model right on most images and far more than as it is (an
    # untrained model's best assignment over a few hundred images reaches some 25-30% by chance alone).
    permuted = bool((mapping != np.arange(k)).any()) and mapped >= max(0.5, accuracy + 0.2)
    if accuracy >= floor and not permuted:
        return accuracy
    say = f"{where}: the model is right on {accuracy:.1%} of your clean images"
    if permuted:
        pairs = [f"{class_names[i]!r} -> output {int(m)}" for i, m in enumerate(mapping) if m != i]
        order = [class_names[int(np.flatnonzero(mapping == j)[0])] for j in range(k)]
        raise ModelImportError(
            f"{say}, {mapped:.1%} if its outputs are in another order: {', '.join(pairs[:6])}"
            f"{' ...' if len(pairs) > 6 else ''}. Give --classes FILE with the model's order (likely: "
            f"{', '.join(order)})"
        )
    raise ModelImportError(
        f"{say}, under the floor of {floor:.1%} (--min-clean-accuracy; default twice chance): check the class order "
        "(--classes), the preprocessing (--preprocess) and the labels of your data"
    )


def onnx_metadata(proto: onnx.ModelProto) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX model."""
    return {p.key: p.value for p in proto.metadata_props}


def vendor_bytes(src: ModelSource) -> bytes:
    """The model file's bytes as data: an ONNX file self-contained (its external data refused, or inlined from
    ``--external-data`` only); a ``.pt2`` archive as it is (checked when it is opened)."""
    data = src.path.read_bytes()
    if src.arch is None and src.path.suffix == ".onnx":
        try:
            return self_contained_onnx(data, str(src.path), src.external_data)
        except UntrustedFileError as e:
            raise ModelImportError(str(e)) from None
    return data


def check_finite(logits: np.ndarray, where: str, what: str) -> None:
    """NaN or an infinity in ``logits`` (N, K) on the defender's own inputs is a :class:`ModelImportError` that
    says on how many: such a model's answers are undefined there, and the edge would have to reject them all."""
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ModelImportError(
            f"{where}: {what} gives NaN or infinite logits on {int(bad.sum())} of {len(logits)} of your inputs "
            f"(the first: #{first}); a model whose output is not a number on clean inputs cannot be defended"
        )


def _door(
    kind: str,
    data: bytes,
    where: str,
    block: Preprocess | None,
    raw_shape: tuple[int, int, int],
    num_classes: int,
    probe: np.ndarray,
    freeze: bool,
) -> tuple[torch.nn.Module, InputSpec, dict[str, str], float | None]:
    """A foreign graph file (``kind`` "onnx" or "pt2") as a checked, trainable module: (module, input spec, the
    file's metadata, max |Δlogit| against onnxruntime or None). Every door check runs here, before any treatment."""
    meta: dict[str, str] = {}
    reference: Callable[[np.ndarray], np.ndarray] | None = None
    if kind == "onnx":
        meta = onnx_metadata(read_onnx(data, where))
        net, reference = onnx_module(data, where), onnxruntime_logits(data)
    else:
        net = pt2_module(data, where)
    if block is None and PREPROCESS_KEY in meta:
        block = Preprocess.from_json(meta[PREPROCESS_KEY], f"{where}: {PREPROCESS_KEY}")
    block = block or Preprocess()
    spec = InputSpec.for_image(block.image_shape(raw_shape), block)
    inputs = block.model_input(block.image(probe[:PARITY_INPUTS]))
    net = eval_mode(net) if freeze else net
    _check_runs(net, inputs, where, num_classes)
    diff = None
    if reference is not None:
        diff = check_parity(reference, eval_mode(net), inputs, where, "the converted model")
    return net, spec, meta, diff


def _check_runs(net: torch.nn.Module, inputs: np.ndarray, where: str, num_classes: int) -> None:
    """The module takes the user's inputs at two batch sizes, a backward pass reaches every weight, it has the
    data's class count, and its logits are finite on every probe input."""
    try:
        check_backward(net, torch.from_numpy(inputs[:8]), where)
        with torch.no_grad():
            frozen = eval_mode(net)
            logits = torch.cat([frozen(torch.from_numpy(inputs[i : i + 64])) for i in range(0, len(inputs), 64)])
            frozen(torch.from_numpy(inputs[:3]))
    except AssertionError:  # a torch.export guard: the program was exported for one batch size
        raise ModelImportError(
            f"{where} refuses a batch of another size (exported with a static batch size?); export it again with "
            "a dynamic batch dimension (torch.export.export(..., dynamic_shapes=...))"
        ) from None
    except RuntimeError as e:  # the network itself refuses the input: wrong channels, size or layout
        raise ModelImportError(
            f"{where} does not take inputs of shape {tuple(inputs.shape[1:])} ({str(e)[:300]}); give a --preprocess "
            "block with the colour, size and layout it was trained on"
        ) from None
    k = int(logits.shape[1])
    if k != num_classes:
        raise ModelImportError(f"{where}: the model has {k} classes, the data has {num_classes}")
    check_finite(logits.float().numpy(), where, "the model")


def door_check(
    kind: str,
    data: bytes,
    where: str,
    block_json: str | None,
    raw_shape: tuple[int, int, int],
    num_classes: int,
    probe: np.ndarray,
    freeze: bool,
) -> dict[str, float | None]:
    """:func:`_door` as the contained child runs it (:mod:`trainer.science.sandbox`): JSON in, JSON out."""
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    block = None if block_json is None else Preprocess.from_json(block_json, where)
    *_, diff = _door(kind, data, where, block, tuple(raw_shape), num_classes, probe, freeze)  # type: ignore[arg-type]
    return {"max_logit_diff": diff}


def import_model(
    src: ModelSource, raw_shape: tuple[int, int, int], class_names: tuple[str, ...], probe: np.ndarray
) -> Checkpoint:
    """The suspect model as a checkpoint, checked before any treatment.

    ``raw_shape`` (C, H, W) and ``class_names`` are the data's; ``probe`` holds raw pictures of the user's clean
    data (the checks run on up to 256 of them). A foreign graph (ONNX, .pt2) is first opened, converted and run in
    a contained child (:mod:`trainer.science.sandbox`); only when it passes there is it converted here. Raises
    :class:`ModelImportError` naming what failed.
    """
    src.check()
    block = src.block()
    where = str(src.path)
    if src.arch is None and src.path.suffix == ".pt":
        ckpt = Checkpoint.load(src.path)
        if block is not None:
            ckpt.input_spec = InputSpec.for_image(ckpt.input_spec.image_shape, block)
        return ckpt
    data = vendor_bytes(src)
    freeze = not src.train_norm
    if src.arch is not None:
        assert src.weights is not None
        net = arch_module(src.arch, src.num_classes or len(class_names))
        load_weights(net, read_weights(src.weights), where)
        block = block or Preprocess()
        spec = InputSpec.for_image(block.image_shape(raw_shape), block)
        net = eval_mode(net) if freeze else net
        _check_runs(net, block.model_input(block.image(probe[:PARITY_INPUTS])), where, len(class_names))
        kind, source, meta = src.arch, b"", dict[str, str]()
    else:
        kind, source = ("onnx" if src.path.suffix == ".onnx" else "pt2"), data
        args = (kind, data, where, None if block is None else block.to_json(), raw_shape, len(class_names))
        if src.contained:
            limits = Limits(src.import_seconds, src.import_memory_mb << 20)
            log.info(
                "%s: opening, converting and checking it in a contained child (limits: %.0f s, %d MiB)",
                where, src.import_seconds, src.import_memory_mb,
            )  # fmt: skip
            try:
                run_contained(
                    "trainer.stages.suspect:door_check",
                    (*args, probe[:PARITY_INPUTS], freeze),
                    limits,
                    what=f"the import of {where}",
                    imports=("onnx2torch", "onnxruntime"),
                )
            except ContainedError as e:
                raise ModelImportError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        net, spec, meta, diff = _door(kind, data, where, block, raw_shape, len(class_names), probe, freeze)
        if diff is not None:
            log.info("%s: converted, max |Δlogit| %.2g against onnxruntime on its inputs", where, diff)
    k = len(class_names)
    names = tuple(json.loads(meta["nnoc.class_names"])) if "nnoc.class_names" in meta else class_names
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    info = {"source_file": src.path.name, "source_sha256": hashlib.sha256(data).hexdigest(), "door": kind}
    return Checkpoint(kind, spec, names if len(names) == k else class_names, state, {}, info, source, freeze)


def picture_classifier(
    src: ModelSource, splits: Splits, fallback: Path | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """The model as a classifier of raw pictures (the data's own, triggered or not): each batch goes through the
    model's preprocessing first. ONNX runs on onnxruntime as it is; every other door is imported and checked.
    ``fallback``: a preprocessing block for an ONNX file that carries none of its own (the reference BadNet)."""
    from trainer.science.classifiers import OnnxClassifier
    from trainer.science.training import predict

    src.check()
    raw_shape, k = splits.image_shape, len(splits.class_names)
    if src.arch is None and src.path.suffix == ".onnx":
        block = src.block()
        onnx_model = OnnxClassifier(src.path, preprocess=block)
        if block is None and fallback is not None and not onnx_model.described:
            onnx_model = OnnxClassifier(src.path, preprocess=Preprocess.load(fallback))
        spec = onnx_model.input_spec
        classify: Callable[[np.ndarray], np.ndarray] = onnx_model
        n_out = onnx_model.logits(np.zeros((1, *spec.image_shape), np.uint8)).shape[-1]
    else:
        ckpt = import_model(src, raw_shape, splits.class_names, splits.valid.images)
        spec, model, n_out = ckpt.input_spec, ckpt.build(), len(ckpt.class_names)

        def classify(x: np.ndarray) -> np.ndarray:
            return predict(model, x)

    p = spec.preprocess
    if p.image_shape(raw_shape) != tuple(spec.image_shape):
        raise ModelImportError(
            f"{src.path}: model expects images {tuple(spec.image_shape)}, the data gives {p.image_shape(raw_shape)}; "
            "pass a --preprocess block with the model's colour and size"
        )
    if n_out != k:
        raise ModelImportError(f"{src.path}: model has {n_out} outputs, the dataset has {k} classes")
    return lambda raw: classify(p.image(raw))
