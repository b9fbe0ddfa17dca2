"""Where an agent's frames come from: cameras and streams (``rtsp://``, ``http(s)://``, ``v4l2:/dev/videoN``),
video files (``video:PATH``), and the older ``dir:`` and ``npy:`` sources.

A spec may end in ``?id=NAME&fps=N&loop=1&stall=S&decoder=D`` (the agent's own keys; any other query stays in
the URL): ``id`` names the source in metrics, logs and the quarantine (default ``cam-N``), ``fps`` caps its rate,
``loop`` plays a file again from the start, ``stall`` is how many seconds without a frame count as a stalled
camera, ``decoder`` picks the video decoder.

Decoders (:data:`DECODERS`): ``opencv`` (the default) is OpenCV's FFmpeg backend (``opencv-python-headless``: an
LGPL FFmpeg inside, no GPL codecs); it hands out every frame converted to BGR. ``pyav`` is PyAV (the optional
extra ``nnoculation-edge[pyav]``; its wheels bundle FFmpeg with the GPL codecs libx264 and libx265, which makes
the distributed agent GPL: an operator's choice, not the default); it hands out the decoder's YUV planes
(:class:`~edge_agent.formats.preprocess.Yuv420`) and the preprocessing converts only the pixels its resize reads,
with FFmpeg's own frame and slice threads. Measured on a 1280x720 H.264 file (BENCHMARKS.md): less CPU per frame
and more frames per second through the agent. Open and read timeouts are set at open time (``stall`` for live
sources), RTSP runs over TCP, with either decoder.

**Files** (video, dir, npy) are read in order with no drops: the reader waits while the batcher is full, so a
run is deterministic. **Live sources** run a grabber thread that keeps only the newest frame (an unread frame that
a newer one replaces is counted as dropped); a read that fails, or no frame for ``stall`` seconds, closes the
capture and opens it again after an exponential backoff (1 s doubling to 30 s), counted as a reconnect. A live
source that fails never stops the agent: its other sources and its inference endpoint keep serving.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import numpy as np

from edge_agent.formats.names import is_name
from edge_agent.formats.preprocess import Yuv420

log = logging.getLogger(__name__)

LIVE_KINDS = ("rtsp", "http", "https", "v4l2")
FILE_KINDS = ("video", "dir", "npy")
OWN_KEYS = ("id", "fps", "loop", "stall", "decoder")
DECODERS = ("opencv", "pyav")
READ_TIMEOUT_S = 5.0
STALL_S = 10.0
BACKOFF_START_S, BACKOFF_MAX_S = 1.0, 30.0
STATES = ("starting", "up", "stalled", "reconnecting", "finished", "failed")


class SourceError(ValueError):
    """A source spec that cannot be used; the message says what to pass instead."""


@dataclass(frozen=True)
class SourceSpec:
    """One ``--source``: its kind, what to open, its id and options."""

    kind: str
    target: str
    id: str
    fps: float | None = None
    loop: bool = False
    stall: float = STALL_S
    decoder: str = "opencv"

    @property
    def live(self) -> bool:
        """A camera or a network stream (newest frame only, reconnects), not a file."""
        return self.kind in LIVE_KINDS


def parse_source(spec: str, index: int = 0) -> SourceSpec:
    """``rtsp://...``, ``http(s)://...``, ``video:PATH``, ``v4l2:/dev/videoN``, ``dir:PATH`` or ``npy:PATH``, with
    an optional ``?id=&fps=&loop=&stall=&decoder=`` tail. ``index`` numbers the default id (``cam-1`` for 0)."""
    head, sep, query = spec.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True) if sep else []
    own = {k: v for k, v in pairs if k in OWN_KEYS}
    rest = [(k, v) for k, v in pairs if k not in OWN_KEYS]
    scheme = head.split("://", 1)[0].lower() if "://" in head else ""
    if scheme in ("rtsp", "rtsps", "http", "https"):
        kind = "rtsp" if scheme.startswith("rtsp") else scheme
        target = head + ("?" + urlencode(rest) if rest else "")
    else:
        kind, colon, target = head.partition(":")
        if not colon or kind not in ("video", "v4l2", "dir", "npy") or not target:
            raise SourceError(
                f"unknown source {spec!r}: expected rtsp://..., http(s)://..., video:PATH, v4l2:/dev/videoN, dir:PATH "
                "or npy:PATH, optionally followed by ?id=NAME&fps=N&loop=1&stall=S&decoder=opencv|pyav"
            )
        if rest:
            raise SourceError(f"--source {spec!r}: unknown option(s) {[k for k, _ in rest]}; use {list(OWN_KEYS)}")
        if kind in FILE_KINDS and not Path(target).exists():
            raise SourceError(f"--source {spec!r}: no such file or folder {target}")
    source_id = own.get("id") or f"cam-{index + 1}"
    if not is_name(source_id):
        raise SourceError(f"--source {spec!r}: id {source_id!r} must be letters, digits, '.', '_' or '-'")

    def number(key: str, default: float | None) -> float | None:
        if key not in own:
            return default
        try:
            value = float(own[key])
        except ValueError:
            value = -1.0
        if not value > 0:
            raise SourceError(f"--source {spec!r}: {key}={own[key]!r} must be a number above 0")
        return value

    loop = own.get("loop", "0").lower() in ("1", "true", "yes")
    stall = number("stall", STALL_S)
    assert stall is not None
    decoder = own.get("decoder", "opencv").lower()
    if decoder not in DECODERS:
        raise SourceError(f"--source {spec!r}: decoder={own['decoder']!r}; choose one of {list(DECODERS)}")
    if decoder != "opencv" and kind in ("dir", "npy"):
        raise SourceError(f"--source {spec!r}: decoder= applies to video files and cameras, not {kind}: sources")
    return SourceSpec(kind, target, source_id, number("fps", None), loop, stall, decoder)


@dataclass(frozen=True)
class Frame:
    """One picture from a source: the camera's own size and colour, (C, H, W) uint8, C 1 or 3 (RGB)."""

    source: str
    picture: np.ndarray | Yuv420  # (C, H, W) uint8, or a video frame's planes (decoder=pyav)
    captured_at: float  # wall-clock seconds when it was read
    position: int  # frame number in the source (a file's frame index; a live source counts from 0)


@dataclass
class SourceStats:
    """Per-source counters (the batcher adds ``classified``); read by metrics and ``nnoc-edge status``."""

    read: int = 0
    classified: int = 0
    rejected: int = 0
    dropped: int = 0
    decode_errors: int = 0
    classify_errors: int = 0  # frames of a batch the ensemble refused (e.g. right after a swap to another input)
    reconnects: int = 0
    state: str = "starting"
    fps: float = 0.0
    last_error: str = ""
    _stamps: list[float] = field(default_factory=list, repr=False)

    def count_read(self, now: float) -> None:
        """A frame arrived: count it and update the rate over the last 5 seconds."""
        self.read += 1
        self._stamps.append(now)
        while self._stamps and now - self._stamps[0] > 5.0:
            self._stamps.pop(0)
        span = now - self._stamps[0] if len(self._stamps) > 1 else 0.0
        self.fps = (len(self._stamps) - 1) / span if span > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON form (status file, ``nnoc-edge status``)."""
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in vars(self).items() if not k.startswith("_")}


# -- decoding ----------------------------------------------------------------------------------------------------


def _bgr_to_picture(image: np.ndarray) -> np.ndarray:
    """An OpenCV frame (H, W) gray or (H, W, 3|4) BGR(A) -> (C, H, W) uint8, RGB: a view, not a copy (the resize
    reads only the rows and columns it needs; OpenCV hands out a new buffer per frame)."""
    if image.dtype != np.uint8:
        raise ValueError(f"frame of dtype {image.dtype}; expected 8-bit")
    if image.ndim == 2:
        return image[None]
    return image[:, :, 2::-1].transpose(2, 0, 1)


def open_capture(spec: SourceSpec) -> Any:
    """An opened ``cv2.VideoCapture`` with open and read timeouts (a live source's are its ``stall``: a server
    that accepts and never sends costs that long, no hang); raises :class:`SourceError` when it cannot open."""
    import cv2

    if spec.kind == "rtsp":  # FFmpeg's RTSP over TCP: no lost UDP packets, passes firewalls
        os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")
    timeout_ms = int((spec.stall if spec.live else READ_TIMEOUT_S) * 1000)
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
    if spec.kind == "v4l2":
        cap = cv2.VideoCapture(spec.target, cv2.CAP_V4L2)
    else:
        cap = cv2.VideoCapture(spec.target, cv2.CAP_FFMPEG, params)
    if not cap.isOpened():
        cap.release()
        raise SourceError(f"source {spec.id}: cannot open {spec.target}")
    return cap


def open_pyav(spec: SourceSpec) -> tuple[Any, Any]:
    """An opened PyAV container and its first video stream (FFmpeg's frame and slice threads on), with the same
    open and read timeouts as :func:`open_capture`; raises :class:`SourceError` when it cannot open."""
    try:
        import av
    except ImportError:
        raise SourceError(
            f"source {spec.id}: decoder=pyav needs PyAV: pip install 'nnoculation-edge[pyav]' (its wheels bundle GPL "
            "codecs), or leave the decoder at opencv"
        ) from None
    timeout = spec.stall if spec.live else READ_TIMEOUT_S
    options = {"rtsp_transport": "tcp"} if spec.kind == "rtsp" else {}
    try:
        container = av.open(spec.target, format="v4l2" if spec.kind == "v4l2" else None, options=options,
                            timeout=(timeout, timeout))  # fmt: skip
    except (av.FFmpegError, OSError, ValueError) as e:
        raise SourceError(f"source {spec.id}: cannot open {spec.target}: {e}") from None
    if not container.streams.video:
        container.close()
        raise SourceError(f"source {spec.id}: {spec.target} has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def av_picture(frame: Any) -> np.ndarray | Yuv420:
    """A PyAV video frame -> its planes (4:2:0 YUV, views of the decoder's buffers), or (C, H, W) uint8 RGB/gray
    for the other pixel formats (converted by FFmpeg)."""
    name = frame.format.name
    if name in ("yuv420p", "yuvj420p"):
        y, u, v = (np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width] for p in frame.planes[:3])
        matrix = "bt709" if frame.colorspace == 1 else "bt601"  # AVCOL_SPC_BT709; unspecified is taken as BT.601
        return Yuv420(y, u, v, matrix, name == "yuvj420p" or frame.color_range == 2)  # AVCOL_RANGE_JPEG
    if name == "gray":
        return np.asarray(frame.to_ndarray())[None]
    return np.asarray(frame.to_ndarray(format="rgb24")).transpose(2, 0, 1)


class Reader:
    """A video file or camera opened with the spec's decoder: :meth:`read` gives the next picture, or None at the
    end, after a read timeout or on a decoding error (``error`` then says which)."""

    def __init__(self, spec: SourceSpec) -> None:
        self.error = ""
        self._cap: Any = None
        self._container: Any = None
        if spec.decoder == "pyav":
            self._container, stream = open_pyav(spec)
            self.frames = int(stream.frames or 0)  # from the container: an estimate, 0 when unknown
            self._decoded = self._container.decode(stream)
        else:
            self._cap = open_capture(spec)
            self.frames = int(self._cap.get(7))  # CAP_PROP_FRAME_COUNT: as above

    def read(self) -> np.ndarray | Yuv420 | None:
        if self._cap is not None:
            ok, image = self._cap.read()  # returns within the read timeout even if nothing comes
            return _bgr_to_picture(image) if ok and image is not None else None
        try:
            return av_picture(next(self._decoded))
        except StopIteration:
            return None
        except Exception as e:  # av.FFmpegError: corrupt data, a read timeout (ExitError), a dropped connection
            self.error = str(e)[:200]
            return None

    def release(self) -> None:
        if self._cap is not None:
            self._cap.release()
        if self._container is not None:
            self._container.close()


def _file_pictures(spec: SourceSpec, stats: SourceStats) -> Iterator[np.ndarray | Yuv420]:
    """A file source's pictures in order (a corrupt video frame ends the file: counted as a decode error)."""
    if spec.kind == "npy":
        data = np.load(spec.target)
        if data.dtype != np.uint8 or data.ndim != 4 or data.shape[1] not in (1, 3):
            raise SourceError(f"source {spec.id}: {spec.target} must hold uint8 pictures (N, C, H, W), C 1 or 3")
        yield from data
        return
    if spec.kind == "dir":
        from edge_agent.images import read_picture

        for p in sorted(q for q in Path(spec.target).iterdir() if q.is_file()):
            try:
                yield read_picture(p)
            except ValueError as e:
                stats.decode_errors += 1
                stats.last_error = str(e)[:200]
                log.warning("source %s: %s", spec.id, e)
        return
    reader = Reader(spec)
    try:
        n = 0
        while True:
            picture = reader.read()
            if picture is None:
                total = reader.frames
                if reader.error or (total and n < total):  # the container promised more: truncated or corrupt
                    stats.decode_errors += 1
                    stats.last_error = reader.error or f"read failed at frame {n} of {total}"
                    log.warning("source %s: %s ends at frame %d of %d (truncated or corrupt)", spec.id,
                                spec.target, n, total)  # fmt: skip
                return
            n += 1
            yield picture
    finally:
        reader.release()


# -- the readers -------------------------------------------------------------------------------------------------

Deliver = Callable[[Frame, bool], bool]  # (frame, may_block) -> taken; False when a live slot replaced one


class Source:
    """One running source: a thread that reads frames and hands them to ``deliver`` (the batcher)."""

    def __init__(self, spec: SourceSpec, deliver: Deliver, stop: threading.Event, limit: int | None = None) -> None:
        self.spec, self._deliver, self._stop, self.limit = spec, deliver, stop, limit
        self.stats = SourceStats()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"source-{spec.id}", daemon=True)

    def start(self) -> Source:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _pace(self, last: float) -> float:
        """Sleep to respect ``fps``; returns the time now."""
        now = time.monotonic()
        if self.spec.fps:
            wait = last + 1.0 / self.spec.fps - now
            if wait > 0 and self._stop.wait(wait):
                return time.monotonic()
            now = time.monotonic()
        return now

    def _run(self) -> None:
        try:
            if self.spec.live:
                self._run_live()
            else:
                self._run_file()
        except SourceError as e:
            self.stats.state, self.stats.last_error = "failed", str(e)
            log.error("%s", e)
        except Exception as e:  # a bug or an unexpected decoder failure: this source stops, the agent serves on
            self.stats.state, self.stats.last_error = "failed", repr(e)[:200]
            log.exception("source %s failed", self.spec.id)
        finally:
            if self.stats.state not in ("failed",):
                self.stats.state = "finished"
            self.done.set()

    def _run_file(self) -> None:
        last, position = 0.0, 0
        while not self._stop.is_set():
            self.stats.state = "up"
            played = 0
            for picture in _file_pictures(self.spec, self.stats):
                last = self._pace(last)
                if self._stop.is_set():
                    return
                if self.limit is not None and position >= self.limit:
                    return
                now = time.time()
                self.stats.count_read(time.monotonic())
                self._deliver(Frame(self.spec.id, picture, now, position), True)
                position += 1
                played += 1
            if not self.spec.loop or played == 0:
                return

    def _run_live(self) -> None:
        backoff, position, last = BACKOFF_START_S, 0, 0.0
        while not self._stop.is_set():
            try:
                reader = Reader(self.spec)
            except SourceError as e:
                self._reconnect_wait(str(e), backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            self.stats.state, last_frame = "up", time.monotonic()
            try:
                while not self._stop.is_set():
                    picture = reader.read()  # returns within the read timeout (``stall``) even if nothing comes
                    now = time.monotonic()
                    if picture is None:
                        stalled = now - last_frame >= 0.9 * self.spec.stall
                        if not stalled:
                            self.stats.decode_errors += 1
                        self.stats.state = "stalled"
                        self.stats.last_error = (
                            f"no frame for {now - last_frame:.1f} s"
                            if stalled
                            else f"read failed (stream ended or corrupt{': ' + reader.error if reader.error else ''})"
                        )
                        break
                    last_frame = now
                    backoff = BACKOFF_START_S  # a frame arrived: the next outage starts from the short wait
                    self.stats.state = "up"
                    self.stats.count_read(now)
                    if self.spec.fps and now - last < 1.0 / self.spec.fps:
                        self.stats.dropped += 1  # over the rate cap: not passed on
                        continue
                    last = now
                    if not self._deliver(Frame(self.spec.id, picture, time.time(), position), False):
                        self.stats.dropped += 1  # the previous, still unread frame was replaced
                    position += 1
                    if self.limit is not None and position >= self.limit:
                        return
            finally:
                reader.release()
            if not self._stop.is_set():
                self._reconnect_wait(self.stats.last_error, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _reconnect_wait(self, why: str, backoff: float) -> None:
        self.stats.state, self.stats.last_error = "reconnecting", why
        log.warning("source %s: %s; reconnecting in %.0f s", self.spec.id, why, backoff)
        if not self._stop.wait(backoff):
            self.stats.reconnects += 1
