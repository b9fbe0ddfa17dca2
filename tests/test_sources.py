"""Camera sources on the edge: video files encoded here with a real encoder, an RTSP camera (GStreamer's server,
its own process) that is killed mid-stream and restarted, an MJPEG-over-HTTP camera, a camera that accepts and
never sends, and four sources batched into one agent, every file frame accounted for and decided as it would be
one by one."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from conftest import ROOT, free_port, rgb_bundle, wait_for
from edge_agent.formats.preprocess import Preprocess
from edge_agent.sources import SourceError, parse_source

BLOCK = Preprocess(color="rgb", size=(32, 32), resize="letterbox", mean=(0.5,), std=(0.25,))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return rgb_bundle(tmp_path_factory.mktemp("cams"), BLOCK)


def write_video(path: Path, pictures: np.ndarray, size: tuple[int, int] = (640, 480), fps: float = 30.0) -> Path:
    """Gray pictures (N, 1, h, w) upscaled to ``size`` (W, H), encoded as MPEG-4 Part 2 by OpenCV's FFmpeg."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened()
    for p in pictures:
        writer.write(cv2.cvtColor(cv2.resize(p[0], size, interpolation=cv2.INTER_LINEAR), cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def decode_all(path: Path, decoder: str = "opencv") -> list[Any]:
    """Every frame of a video as a batch of one picture: (1, C, H, W) RGB decoded by OpenCV independently of the
    agent, or PyAV's YUV planes (decoder=pyav) as one frame, for the preprocessing to convert."""
    if decoder == "pyav":
        import av

        from edge_agent.sources import av_picture

        with av.open(str(path)) as container:
            return [av_picture(f) for f in container.decode(video=0)]
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        out.append(np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))[None])
    cap.release()
    return out


class Camera:
    """A camera process on a fixed port: start, kill, start again. Default: tests/mjpeg_server.py (MJPEG over
    HTTP); ``rtsp=True``: tests/rtsp_server.py (GStreamer's RTSP server, H.264, under the system python3 whose
    python3-gi the Makefile installs with the GStreamer packages)."""

    def __init__(self, port: int, *flags: str, rtsp: bool = False) -> None:
        self.port, self.flags = port, flags
        self.command = ["/usr/bin/python3", str(ROOT / "tests" / "rtsp_server.py")] if rtsp else [
            sys.executable, str(ROOT / "tests" / "mjpeg_server.py")]  # fmt: skip
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Camera:
        self.proc = subprocess.Popen([*self.command, str(self.port), *self.flags], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def test_source_specs_parse_and_refuse_clearly(tmp_path: Path) -> None:
    (tmp_path / "a.mp4").write_bytes(b"")
    s = parse_source(f"video:{tmp_path / 'a.mp4'}?id=gate-1&fps=5&loop=1", 0)
    assert (s.kind, s.id, s.fps, s.loop, s.live) == ("video", "gate-1", 5.0, True, False)
    s = parse_source("rtsp://10.0.0.5:554/stream1?channel=2&id=dock&stall=3", 3)
    assert s.kind == "rtsp" and s.live and s.target == "rtsp://10.0.0.5:554/stream1?channel=2" and s.stall == 3.0
    assert parse_source("http://cam.local/mjpg", 1).id == "cam-2"
    assert parse_source("v4l2:/dev/video0", 0).live
    assert parse_source("v4l2:/dev/video0?decoder=pyav", 0).decoder == "pyav"
    assert parse_source(f"video:{tmp_path / 'a.mp4'}", 0).decoder == "opencv"  # the default: no GPL codecs
    for bad, says in (
        ("replay:fashion-mnist", "unknown source"),
        (f"video:{tmp_path / 'none.mp4'}", "no such file"),
        (f"video:{tmp_path / 'a.mp4'}?fps=0", "fps"),
        (f"video:{tmp_path / 'a.mp4'}?speed=2", "unknown option"),
        ("http://x/?id=../etc", "id"),
        (f"video:{tmp_path / 'a.mp4'}?decoder=gstreamer", "decoder"),
        (f"dir:{tmp_path}?decoder=pyav", "applies to video files and cameras"),
    ):
        with pytest.raises(SourceError, match=says):
            parse_source(bad, 0)


def _agent(bundle: Path, tmp_path: Path) -> Any:
    from edge_agent.agent import Agent
    from edge_agent.ensemble import Ensemble
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.monitor import RejectMonitor
    from edge_agent.spool import Spool, SpoolConfig

    spool = Spool(SpoolConfig(tmp_path / "spool.sqlite", durability="process"))
    return Agent(Ensemble(verify_bundle(bundle)), spool, RejectMonitor(), "edge-1")


def test_four_sources_batched_account_for_every_frame_and_decide_as_one_by_one(
    bundle: Path, splits: Any, tmp_path: Path
) -> None:
    """Two video files, a folder of stills, an RTSP camera and an MJPEG-over-HTTP camera into one agent, batch 8;
    one file and the RTSP camera decoded by PyAV (its YUV planes), the others by OpenCV."""
    from edge_agent.batcher import Batcher
    from edge_agent.ensemble import to_model_image, to_model_input
    from edge_agent.formats.spec import preprocess_of
    from edge_agent.sources import Source
    from protos.nnoc.v1.quarantine_pb2 import QuarantineHeader

    pictures = splits.test.images[:60]
    a = write_video(tmp_path / "a.mp4", pictures[:40])
    b = write_video(tmp_path / "b.avi", pictures[40:], size=(320, 240), fps=25)
    (tmp_path / "stills").mkdir()
    for i in range(6):
        cv2.imwrite(str(tmp_path / "stills" / f"{i}.png"), cv2.resize(pictures[i, 0], (90, 120)))
    cam, mjpeg = Camera(free_port(), rtsp=True).start(), Camera(free_port()).start()
    agent = _agent(bundle, tmp_path)
    batcher = Batcher(agent, max_batch=8, max_wait=0.005, decisions=tmp_path / "decisions.jsonl").start()
    stop = threading.Event()
    specs = [
        parse_source(f"video:{a}?id=gate&decoder=pyav", 0),
        parse_source(f"video:{b}", 1),
        parse_source(f"dir:{tmp_path / 'stills'}?id=stills", 2),
        parse_source(f"rtsp://127.0.0.1:{cam.port}/cam?id=yard&stall=2&decoder=pyav", 3),
        parse_source(f"http://127.0.0.1:{mjpeg.port}/video.mjpg?id=dock&stall=2", 4),
    ]
    sources = [Source(s, batcher.deliver, stop) for s in specs]
    try:
        for src in sources:
            batcher.add_source(src.spec.id, src.stats, src.spec.live)
            src.start()
        files = sources[:3]
        assert wait_for(lambda: all(s.done.is_set() for s in files), 60)
        assert wait_for(lambda: min(s.stats.classified for s in sources[3:]) >= 20, 30)
        stop.set()
        for src in sources:
            src.join(10)
    finally:
        stop.set()
        cam.kill()
        mjpeg.kill()
        batcher.stop()
    assert [s.stats.read for s in files] == [40, 20, 6]
    for s in sources:
        assert s.stats.classified + s.stats.dropped == s.stats.read, (s.spec.id, s.stats)
        assert s.stats.decode_errors == 0
    assert all(s.stats.dropped == 0 for s in files)  # files wait for the batcher: nothing lost
    assert batcher.batches < sum(s.stats.classified for s in sources)  # frames did share batches
    rows = [json.loads(line) for line in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    by_source: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
    spec = agent.ensemble.spec
    for sid, path, decoder in (("gate", a, "pyav"), ("cam-2", b, "opencv")):
        got = by_source[sid]
        assert [r["position"] for r in got] == list(range(len(got)))  # in order, none missing
        frames = decode_all(path, decoder)
        one_by_one = [int(agent.ensemble.classify(to_model_input(f, spec)).labels[0]) for f in frames]
        assert [r["label"] for r in got] == one_by_one
    # the two decoders give the model the same images (within a grey level or two: rounding of two conversions)
    yuv, bgr = decode_all(a, "pyav"), decode_all(a)
    assert len(yuv) == len(bgr) == 40
    images = [np.abs(to_model_image(p, spec).astype(int) - to_model_image(q, spec)).max()
              for p, q in zip(yuv, bgr, strict=True)]  # fmt: skip
    assert max(images) <= 2, images
    # Quarantined frames carry their source, position and capture time; the image is the model's (uint8 3x32x32).
    spooled = [QuarantineHeader.FromString(item.header) for item in agent.spool.after(0, 10_000)]
    assert spooled and {h.source_id for h in spooled} <= {"gate", "cam-2", "stills", "yard", "dock"}
    assert all(h.dtype == "uint8" and list(h.shape) == [3, 32, 32] and h.HasField("position") for h in spooled)
    rejected = {(r["source"], r["position"]) for r in rows if r["rejected"]}
    assert {(h.source_id, h.position) for h in spooled} == rejected
    assert preprocess_of(spec).size == (32, 32)
    agent.spool.close()


def test_a_picture_the_preprocessing_refuses_costs_that_frame_only(bundle: Path, tmp_path: Path) -> None:
    """Frames are preprocessed in the batching thread: a refused picture is its source's decode error, the other
    frames of its batch are classified, and the batcher goes on; a replaced live frame was never preprocessed."""
    from edge_agent.batcher import Batcher
    from edge_agent.sources import Frame, SourceStats

    agent = _agent(bundle, tmp_path)
    batcher = Batcher(agent, max_batch=8, max_wait=0.05)
    files, live = SourceStats(), SourceStats()
    batcher.add_source("file", files, live=False)
    batcher.add_source("cam", live, live=True)
    rng = np.random.default_rng(0)
    good = [rng.integers(0, 256, (3, 48, 64), np.uint8) for _ in range(3)]
    odd = rng.integers(0, 256, (2, 48, 64), np.uint8)  # two channels: no colour conversion for it
    for i, picture in enumerate([good[0], odd, good[1]]):
        assert batcher.deliver(Frame("file", picture, time.time(), i), True)
    assert batcher.deliver(Frame("cam", odd, time.time(), 0), False)
    assert not batcher.deliver(Frame("cam", good[2], time.time(), 1), False)  # replaced the odd one, unread
    batcher.start()
    try:
        assert wait_for(lambda: batcher.pending() == 0 and files.classified + live.classified == 3, 10)
        assert batcher.deliver(Frame("file", good[0], time.time(), 3), True)  # still serving
        assert wait_for(lambda: files.classified == 3, 10)
    finally:
        batcher.stop()
        agent.spool.close()
    assert (files.classified, files.decode_errors, live.classified, live.decode_errors) == (3, 1, 1, 0)
    assert "1 or 3" in files.last_error and files.classify_errors == 0


def test_a_camera_that_dies_is_reconnected_while_the_endpoint_answers(bundle: Path, tmp_path: Path) -> None:
    """`nnoc-edge run` with an RTSP camera (GStreamer's server, H.264) that is killed mid-stream and started
    again, and a camera that accepts and never sends (read by PyAV: its timeouts too): the agent reconnects by
    itself, counts the outage, answers
    its inference endpoint the whole time, and `nnoc-edge status` shows each source's state."""
    import grpc

    from protos.inference import grpc_predict_v2_pb2 as pb
    from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc

    live, silent = Camera(free_port(), rtsp=True).start(), Camera(free_port(), "--silent").start()
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "--insecure", "--device-id", "edge-2", "--fleet", "cams",
         "--bundle", str(bundle), "--infer-port", "0", "--state-dir", str(state), "--quiet",
         "--source", f"rtsp://127.0.0.1:{live.port}/cam?id=door&stall=2",
         "--source", f"http://127.0.0.1:{silent.port}/video?id=hung&stall=1&decoder=pyav"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def status() -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "edge_agent", "status", "--state-dir", str(state), "--json"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60).stdout  # fmt: skip
        return json.loads(out.strip().splitlines()[-1]) if out.strip() else {}

    def door() -> dict[str, Any]:
        return (status().get("sources") or {}).get("door", {})

    answered, failures = [0], []
    halt = threading.Event()

    def ask() -> None:  # the endpoint, asked all through the outage
        while not halt.is_set():
            try:
                port = json.loads((state / "agent.json").read_text())["infer_port"]
                with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                    req = pb.ModelInferRequest(model_name="cams")
                    req.inputs.add(name="raw_image", datatype="UINT8", shape=[48, 64, 3])
                    req.raw_input_contents.append(bytes(48 * 64 * 3))
                    pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
                    answered[0] += 1
            except (OSError, ValueError, KeyError):
                pass  # agent.json not written yet
            except grpc.RpcError as e:
                failures.append(e.code())
            time.sleep(0.1)

    asker = threading.Thread(target=ask)
    try:
        assert wait_for(lambda: (state / "agent.json").is_file(), 60)
        asker.start()
        assert wait_for(lambda: door().get("classified", 0) >= 10 and door().get("state") == "up", 60)
        live.kill()
        assert wait_for(lambda: door().get("state") in ("stalled", "reconnecting"), 30)
        before = answered[0]
        time.sleep(2)
        live.start()
        assert wait_for(lambda: door().get("reconnects", 0) >= 1 and door().get("state") == "up", 60)
        seen = door()["classified"]
        assert wait_for(lambda: door().get("classified", 0) > seen, 30)
        assert answered[0] > before  # answered while the camera was down
        hung = status()["sources"]["hung"]
        assert hung["state"] in ("reconnecting", "stalled") and hung["read"] == 0 and hung["reconnects"] >= 1
    finally:
        halt.set()
        if asker.is_alive():
            asker.join(15)
        proc.terminate()
        _, err = proc.communicate(timeout=60)
        live.kill()
        silent.kill()
    assert proc.returncode == 0, err[-3000:]
    assert not failures, failures[:5]
    assert "Traceback" not in err


@pytest.mark.parametrize("decoder", ["opencv", "pyav"])
def test_a_truncated_video_ends_that_source_only(bundle: Path, splits: Any, tmp_path: Path, decoder: str) -> None:
    from edge_agent.batcher import Batcher
    from edge_agent.sources import Source

    good = write_video(tmp_path / "good.mp4", splits.test.images[:30])
    data = good.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    agent = _agent(bundle, tmp_path)
    batcher = Batcher(agent, max_batch=4).start()
    stop = threading.Event()
    sources = [
        Source(parse_source(f"video:{p}?decoder={decoder}", i), batcher.deliver, stop)
        for i, p in enumerate((good, tmp_path / "cut.mp4", tmp_path / "noise.mp4"))
    ]
    try:
        for src in sources:
            batcher.add_source(src.spec.id, src.stats, False)
            src.start()
        assert wait_for(lambda: all(s.done.is_set() for s in sources), 60)
        assert wait_for(lambda: batcher.pending() == 0, 30)
    finally:
        stop.set()
        batcher.stop()
        agent.spool.close()
    ok, cut, noise = (s.stats for s in sources)
    assert ok.read == ok.classified == 30 and ok.state == "finished"
    assert cut.read < 30 and cut.classified == cut.read  # what could be decoded was classified
    assert noise.state == "failed" and "cannot open" in noise.last_error and noise.read == 0


def test_pyav_missing_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent without the optional extra refuses decoder=pyav with the install line, not a traceback."""
    from edge_agent.sources import Reader

    write_video(tmp_path / "a.mp4", np.zeros((2, 1, 28, 28), np.uint8))
    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError, as on a box without PyAV
    with pytest.raises(SourceError, match=r"nnoculation-edge\[pyav\]"):
        Reader(parse_source(f"video:{tmp_path / 'a.mp4'}?decoder=pyav"))
