"""Files from outside read as data, never as code or paths: ONNX external data, and the regular-file rule.

An ONNX tensor may keep its bytes in another file (``data_location: EXTERNAL``, a ``location`` relative to the
model). onnx's checker, onnx2torch and onnxruntime resolve a relative location against the *current* folder when the
model is given as bytes, so a vendor's model that names ``keys/signing.key`` reads whatever the operator keeps there
and carries it on into every export. Here such a model is refused unless the user names the folder that holds its
data; then every location must resolve (symlinks followed) to a regular file inside that folder, its offset and
length must lie inside the file, and the bytes are inlined: what the rest of the system sees is one self-contained
model, and no path of the vendor's is ever opened again.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import onnx

from edge_agent.formats.errors import BundleError

MAX_INLINE_BYTES = (2 << 30) - (64 << 20)  # protobuf's 2 GiB message limit, with room for the graph itself


class UntrustedFileError(ValueError):
    """A file from outside that is refused as it is; the message says what is wrong and what to do."""


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for g in attr.graphs:
            yield from _graph_tensors(g)


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``model``: initializers (sparse too), node attributes, subgraphs and local functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The tensors of ``model`` whose bytes live in another file."""
    return [t for t in all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]


def _external_info(tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    info = {e.key: e.value for e in tensor.external_data}
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise UntrustedFileError(
            f"tensor {tensor.name!r}: offset/length of its external data are not numbers"
        ) from None
    if offset < 0 or (length is not None and length < 0):
        raise UntrustedFileError(f"tensor {tensor.name!r}: negative offset or length of its external data")
    return info.get("location", ""), offset, length


def inside(folder: Path, location: str) -> Path:
    """``location`` (relative, as a vendor wrote it) resolved inside ``folder``, symlinks followed; a
    :class:`UntrustedFileError` when it leaves the folder or is not a regular file."""
    root = folder.resolve()
    if not location or os.path.isabs(location) or "\x00" in location:
        raise UntrustedFileError(f"external data location {location[:200]!r} is not a relative file name")
    target = (root / location).resolve()
    if not target.is_relative_to(root):
        raise UntrustedFileError(f"external data location {location[:200]!r} resolves outside {folder}")
    try:
        mode = target.stat().st_mode
    except OSError as e:
        raise UntrustedFileError(f"external data file {location[:200]!r} in {folder}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise UntrustedFileError(f"external data location {location[:200]!r} is not a regular file")
    return target


def self_contained_onnx(data: bytes, where: str, external_dir: Path | None = None) -> bytes:
    """``data`` (a vendor's ONNX model) with no external data: as it is when it has none; refused when it has some
    and ``external_dir`` is None; else with every external tensor's bytes read from inside ``external_dir`` and
    inlined. Raises :class:`UntrustedFileError` naming what is wrong and what to do."""
    try:
        model = onnx.load_from_string(data)  # reads no external data (only a path-based load does)
    except Exception as e:  # protobuf's DecodeError and others
        raise UntrustedFileError(f"{where} is not a loadable ONNX model: {e}") from None
    tensors = external_tensors(model)
    if not tensors:
        return data
    if external_dir is None:
        first = _external_info(tensors[0])[0]
        raise UntrustedFileError(
            f"{where} keeps {len(tensors)} tensor(s) in external data files (e.g. {first[:120]!r}); a model's data is "
            "not read from paths it names: pass --external-data DIR, the folder that holds its data files"
        )
    total = len(data)
    for tensor in tensors:
        location, offset, length = _external_info(tensor)
        path = inside(external_dir, location)
        size = path.stat().st_size
        if offset > size or (length is not None and offset + length > size):
            raise UntrustedFileError(
                f"tensor {tensor.name!r}: bytes {offset}..{offset + (length or 0)} lie outside {location!r} "
                f"({size} bytes)"
            )
        take = size - offset if length is None else length
        total += take
        if total > MAX_INLINE_BYTES:
            raise UntrustedFileError(f"{where} with its external data exceeds {MAX_INLINE_BYTES} bytes")
        with path.open("rb") as f:
            f.seek(offset)
            tensor.raw_data = f.read(take)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    return model.SerializeToString()


def regular_file(path: Path, max_bytes: int | None = None) -> int:
    """The size of ``path`` when it is a regular file (not a symlink, device or folder) of at most ``max_bytes``;
    a :class:`BundleError` otherwise. Checked with lstat, before anything reads it."""
    try:
        st = path.lstat()
    except OSError as e:
        raise BundleError(f"{path.name} is missing ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise BundleError(f"{path.name} is a symbolic link; bundle files must be regular files")
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{path.name} is not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise BundleError(f"{path.name} has {st.st_size} bytes, more than the {max_bytes} its manifest allows")
    return int(st.st_size)
