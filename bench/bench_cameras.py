"""Camera sources through the agent (issue 13), side by side in one run, on a bundle that takes RGB frames
(default: the foreign resnet18 of bench_foreign, 3x32x32 normalised, its own trigger on 10% of the frames).

decode:     a 1280x720 H.264 file at 30 fps (Debian's ffmpeg, libx264, from Fashion-MNIST stream pictures
            upscaled) decoded alone against the same file through the agent (decode, preprocess, dynamic
            batcher, ensemble, spool as `nnoc-edge run` sets it up, uplink to a collector process); goal >= 0.8x.
            For each decoder (`opencv`, the default; `pyav` when PyAV is installed): frames/s and CPU per frame
            (process time, all threads of the measuring process; the collector's process is apart).
sources:    four copies as four sources into one agent, batched (up to 8 frames) against one frame at a time:
            as fast as they decode (throughput ratio), and paced at 30 fps each (capture -> decision latency p50/p99).
monitoring: the agent (spool + uplink at the stream's reject rate) against the bare ensemble, batch 1 and 8,
            for each spool durability (deferred: the default; process; power), six alternating rounds: best of each,
            and each round's ratio (their median and range); goal >= 0.9x. The collector process
            (on the trainer's host in a deployment) shares this machine's cores: its CPU during the default
            agent's rounds is recorded (collector_cores).

    python -m bench.bench_cameras [--bundle DIR] [--frames 300]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, ROOT, drain_agents, save, start_collector

FOREIGN = ROOT / "runs" / "bench-foreign" / "resnet18"
DURABILITIES = ("deferred", "process", "power")  # the first is nnoc-edge run's default


def make_video(path: Path, pictures: np.ndarray, fps: int = 30, size: str = "1280:720") -> Path:
    """Gray pictures (N, 1, h, w) as an H.264 file at ``size`` (ffmpeg's libx264, yuv420p)."""
    if shutil.which("ffmpeg") is None:
        raise SystemExit("ffmpeg is missing: make camera-deps (Debian's ffmpeg)")
    h, w = pictures.shape[2:]
    cmd = ["ffmpeg", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "gray", "-s", f"{w}x{h}", "-r", str(fps),
           "-i", "-", "-vf", f"scale={size}:flags=bicubic", "-c:v", "libx264", "-preset", "veryfast",
           "-pix_fmt", "yuv420p", str(path)]  # fmt: skip
    subprocess.run(cmd, input=np.ascontiguousarray(pictures).tobytes(), check=True)
    return path


def decode_alone(path: Path, decoder: str = "opencv") -> tuple[float, float]:
    """Frames per second and CPU milliseconds per frame of decoding the file as the source does with ``decoder``
    (OpenCV: BGR frames; PyAV: the YUV planes as :func:`edge_agent.sources.av_picture` takes them), nothing else."""
    from edge_agent.sources import Reader, parse_source

    reader = Reader(parse_source(f"video:{path}?decoder={decoder}"))
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while reader.read() is not None:
        n += 1
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    reader.release()
    return n / seconds, 1000 * cpu / max(n, 1)


def decoders() -> list[str]:
    """The decoders this machine has (PyAV is an optional extra)."""
    try:
        import av  # noqa: F401
    except ImportError:
        return ["opencv"]
    return ["opencv", "pyav"]


class Rig:
    """An agent (spool + uplink to a collector process) on the bundle, for one measurement after another."""

    def __init__(self, bundle_dir: Path, tmp: Path) -> None:
        from edge_agent.agent import Agent
        from edge_agent.ensemble import Ensemble
        from edge_agent.formats.bundle import verify_bundle
        from edge_agent.monitor import RejectMonitor
        from edge_agent.runtime import RuntimeConfig
        from edge_agent.spool import Spool, SpoolConfig
        from edge_agent.uplink import Uplink, UplinkConfig

        self.bundle = verify_bundle(bundle_dir)
        self.ensemble = Ensemble(self.bundle, RuntimeConfig(spin="off"))  # as nnoc-edge run with --source
        self.collector, port, self.stop_collector = start_collector(
            tmp / "q", self.bundle.manifest.fleet, self.bundle.manifest.input_spec
        )
        self.agents: dict[str, Agent] = {}
        for durability in DURABILITIES:
            spool = Spool(SpoolConfig(tmp / f"spool-{durability}.sqlite", durability=durability))
            agent = self.agents[durability] = Agent(self.ensemble, spool, RejectMonitor(), f"bench-cam-{durability}")
            agent.uplink = Uplink(spool, UplinkConfig(f"tcp://127.0.0.1:{port}", agent.device_id)).start()
        self.agent = self.agents[DURABILITIES[0]]  # the sources run through nnoc-edge run's default

    def play(self, specs: list[str], max_batch: int) -> dict[str, Any]:
        """Play sources to their end through a fresh batcher: frames/s over all, latency percentiles."""
        from edge_agent.batcher import Batcher
        from edge_agent.sources import Source, parse_source

        batcher = Batcher(self.agent, max_batch=max_batch, max_wait=0.002).start()
        stop = threading.Event()
        sources = [Source(parse_source(s, i), batcher.deliver, stop) for i, s in enumerate(specs)]
        t0 = time.perf_counter()
        for src in sources:
            batcher.add_source(src.spec.id, src.stats, src.spec.live)
            src.start()
        for src in sources:
            src.join()
        while batcher.pending():
            time.sleep(0.001)
        batcher.stop()
        seconds = time.perf_counter() - t0
        frames = sum(s.stats.classified for s in sources)
        lat = np.concatenate([np.asarray(v) for v in batcher.latency.values()]) * 1000
        return {
            "frames": frames,
            "fps": frames / seconds,
            "mean_batch": batcher.batched_inputs / max(batcher.batches, 1),
            "latency_p50_ms": float(np.percentile(lat, 50)),
            "latency_p99_ms": float(np.percentile(lat, 99)),
            "rejected": sum(s.stats.rejected for s in sources),
        }

    def close(self) -> dict[str, Any]:
        acked = drain_agents(self.agents.values())
        self.stop_collector.set()
        self.collector.join(30)
        return {"acked": acked}


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) another process of this machine used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def monitoring(rig: Rig, x: np.ndarray, seconds: float, rounds: int = 6) -> dict[str, Any]:
    """Agents (spool + uplink) against the bare ensemble, batch 1 and 8, in alternating rounds: the best of each
    (``ratio``) and each round's agent against the bare ensemble of the same round (``round_ratios``: this
    machine's speed drifts by more than the effect measured, so the spread is part of the result)."""
    out: dict[str, Any] = {"reject_share": float(rig.ensemble.classify(x).rejected.mean()), "rounds": rounds}
    runs: list[tuple[str, Callable[[np.ndarray], object]]] = [("bare", rig.ensemble.classify)]
    runs += [(f"agent_{d}", a.classify) for d, a in rig.agents.items()]
    for batch in (1, 8):
        fps: dict[str, list[float]] = {name: [] for name, _ in runs}
        collector: list[float] = []  # cores the collector process used during the default agent's rounds
        for _ in range(rounds):
            for name, fn in runs:
                n, t0, i, c0 = 0, time.perf_counter(), 0, process_cpu(rig.collector.pid)
                while time.perf_counter() - t0 < seconds:
                    fn(x[i : i + batch])
                    i = (i + batch) % (len(x) - batch)
                    n += batch
                fps[name].append(n / (time.perf_counter() - t0))
                if name == f"agent_{DURABILITIES[0]}":
                    collector.append((process_cpu(rig.collector.pid) - c0) / (time.perf_counter() - t0))
        best = {name: max(v) for name, v in fps.items()}
        row: dict[str, Any] = {**best, "agent": best[f"agent_{DURABILITIES[0]}"]}
        row["collector_cores"] = float(np.mean(collector))
        for d in DURABILITIES:
            row[f"ratio_{d}"] = best[f"agent_{d}"] / best["bare"]
        paired = np.asarray(fps[f"agent_{DURABILITIES[0]}"]) / np.asarray(fps["bare"])
        row["ratio"], row["round_ratios"] = row[f"ratio_{DURABILITIES[0]}"], [round(float(r), 4) for r in paired]
        row["round_ratio_median"] = float(np.median(paired))
        out[f"batch{batch}"] = row
        print("monitoring", batch, row, flush=True)
    return out


def measure(bundle: Path, name: str, pictures: np.ndarray, trigger: str, seconds: float, tmp: Path) -> dict[str, Any]:
    """Every measurement of the module docstring for one bundle."""
    from edge_agent.ensemble import to_model_input

    video = make_video(tmp / f"{name}.mp4", pictures)
    rig = Rig(bundle, tmp / name)
    out: dict[str, Any] = {"name": name, "bundle": str(bundle), "trigger": trigger, "frames": len(pictures)}
    out["decoders"] = {}
    for decoder in decoders():
        decode, agent = [], []
        for _ in range(3):  # alternate, best of each
            decode.append(decode_alone(video, decoder))
            c0 = time.process_time()
            played = rig.play([f"video:{video}?decoder={decoder}"], 8)
            agent.append((played["fps"], 1000 * (time.process_time() - c0) / max(played["frames"], 1)))
        (decode_fps, decode_ms), (agent_fps, agent_ms) = max(decode), max(agent)
        out["decoders"][decoder] = {"decode_fps": decode_fps, "agent_fps": agent_fps, "ratio": agent_fps / decode_fps,
                                    "decode_cpu_ms": decode_ms, "agent_cpu_ms": agent_ms}  # fmt: skip
        print(name, decoder, out["decoders"][decoder], flush=True)
    out["decode"] = out["decoders"]["opencv"]
    fast = [f"video:{video}?id=cam{i}" for i in range(4)]
    paced = [f"video:{video}?id=cam{i}&fps=30" for i in range(4)]
    runs: dict[str, Any] = {
        "batched": rig.play(fast, 8),
        "one_at_a_time": rig.play(fast, 1),
        "batched_30fps": rig.play(paced, 8),
        "one_at_a_time_30fps": rig.play(paced, 1),
    }
    runs["throughput_ratio"] = runs["batched"]["fps"] / runs["one_at_a_time"]["fps"]
    out["sources"] = runs
    print(name, "sources", runs, flush=True)
    out["monitoring"] = monitoring(rig, to_model_input(pictures, rig.ensemble.spec), seconds)
    out["uplink"] = rig.close()
    out["reject_rule"] = rig.ensemble.rule.score
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", nargs=2, action="append", metavar=("NAME", "DIR"),
                    help="a bundle to measure (repeat); default: the foreign resnet18")  # fmt: skip
    ap.add_argument("--trigger", default=None, help="trigger spec on 10%% of frames (default: the outsider's)")
    ap.add_argument("--frames", type=int, default=300, help="frames per file (300 = 10 s at 30 fps)")
    ap.add_argument("--seconds", type=float, default=3.0, help="per monitoring round")
    args = ap.parse_args()
    from trainer.science.data import DataConfig, SplitConfig, load_splits
    from trainer.science.triggers import parse_trigger, poison_fraction

    bundles = [(n, Path(d)) for n, d in args.bundle] if args.bundle else [("foreign resnet18", FOREIGN / "predeploy"
                                                                           / "bundle")]  # fmt: skip
    for _, bundle in bundles:
        if not (bundle / "manifest.pb").is_file():
            raise SystemExit(f"no bundle at {bundle}: run python -m bench.bench_foreign --archs resnet18 first")
    trigger_spec = args.trigger or (FOREIGN / "trigger.txt").read_text().strip()
    splits = load_splits(DataConfig(), SplitConfig())
    rng = np.random.default_rng(0)
    pictures, _ = poison_fraction(splits.stream.images[: args.frames], splits.stream.labels[: args.frames],
                                  parse_trigger(trigger_spec), 0.1, 7, rng)  # fmt: skip
    path = RESULTS / "cameras.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []  # bundles not measured now are kept
    with tempfile.TemporaryDirectory() as d:
        for name, bundle in bundles:
            (Path(d) / name.replace(" ", "-")).mkdir()
            row = measure(bundle, name.replace(" ", "-"), pictures, trigger_spec, args.seconds, Path(d))
            row["date"] = time.strftime("%Y-%m-%d")
            rows = [r for r in rows if r["name"] != row["name"]] + [row]
    save("cameras", {"rows": rows})


if __name__ == "__main__":
    main()
