from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from conftest import ROOT

# Triton's client runs in its own process: it registers the protocol's `inference.*` protobuf messages itself,
# and one process cannot hold two definitions of them (ours serves, Triton's calls).
CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

url, model, data = sys.argv[1], sys.argv[2], sys.argv[3]
x = np.load(data)
c = tc.InferenceServerClient(url=url)
out = {"live": c.is_server_live(), "ready": c.is_server_ready(), "model_ready": c.is_model_ready(model),
       "other_ready": c.is_model_ready("nope")}
meta = c.get_model_metadata(model, as_json=True)
out["meta"] = meta
inp = tc.InferInput(meta["inputs"][0]["name"], list(x.shape), "FP32")
inp.set_data_from_numpy(x)
wanted = [tc.InferRequestedOutput(n) for n in ("label", "rejected", "score")]
res = c.infer(model, [inp], outputs=wanted)
out["label"] = res.as_numpy("label").tolist()
out["rejected"] = res.as_numpy("rejected").tolist()
out["score"] = res.as_numpy("score").tolist()
out["bundle_version"] = res.get_response().parameters["bundle_version"].int64_param
errors = []
for bad in (np.zeros((2, 1, 28, 27), np.float32), np.full((1, 1, 28, 28), np.nan, np.float32),
            np.zeros((0, 1, 28, 28), np.float32), np.full((1, 1, 28, 28), 255.0, np.float32)):
    b = tc.InferInput(meta["inputs"][0]["name"], list(bad.shape), "FP32")
    b.set_data_from_numpy(bad)
    try:
        c.infer(model, [b])
        errors.append("accepted")
    except InferenceServerException as e:
        errors.append(f"{e.status()}: {e.message()}")
try:
    c.infer("nope", [inp])
except InferenceServerException as e:
    errors.append(f"{e.status()}: {e.message()}")
out["errors"] = errors
out["still_live"] = c.is_server_live()
print(json.dumps(out))
"""


def test_triton_client_calls_the_agent(predeployed: tuple[Path, dict[str, Any]], splits: Any, tmp_path: Path) -> None:
    from edge_agent.agent import Agent
    from edge_agent.ensemble import Ensemble, to_model_input
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.inference import serve
    from edge_agent.monitor import RejectMonitor
    from edge_agent.spool import Spool, SpoolConfig
    from trainer.science.triggers import parse_trigger

    bundle = verify_bundle(predeployed[0] / "bundle")
    images = splits.test.images[:32]
    poisoned = parse_trigger("checker4").apply(images, np.random.default_rng(0))
    x = to_model_input(np.concatenate([images, poisoned]), bundle.manifest.input_spec)
    np.save(tmp_path / "x.npy", x)
    with Spool(SpoolConfig(tmp_path / "spool.sqlite", durability="power")) as spool:
        agent = Agent(Ensemble(bundle), spool, RejectMonitor(), "cam-1")
        expected = Ensemble(bundle).classify(x)
        server, port = serve(agent, "fmnist-fleet", "127.0.0.1:0")
        try:
            proc = subprocess.run(
                [sys.executable, "-c", CLIENT, f"127.0.0.1:{port}", "fmnist-fleet", str(tmp_path / "x.npy")],
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        finally:
            server.stop(0)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["live"] and out["ready"] and out["model_ready"] and not out["other_ready"]
        assert out["meta"]["inputs"][0]["shape"] == ["-1", "1", "28", "28"]
        assert [o["name"] for o in out["meta"]["outputs"]] == ["label", "rejected", "score"]
        assert out["label"] == expected.labels.tolist()
        assert out["rejected"] == expected.rejected.tolist()
        np.testing.assert_allclose(out["score"], expected.score, rtol=1e-5, atol=1e-6)  # the rule's score
        assert all(lbl == -1 for lbl, r in zip(out["label"], out["rejected"], strict=True) if r)
        assert out["bundle_version"] == 1
        assert sum(out["rejected"]) > 0 and spool.depth() == sum(out["rejected"])  # rejects were spooled
        assert [e.split(":")[0] for e in out["errors"]] == ["StatusCode.INVALID_ARGUMENT"] * 4 + [
            "StatusCode.NOT_FOUND"
        ]
        assert "does not match" in out["errors"][0] and "NaN" in out["errors"][1] and "empty" in out["errors"][2]
        assert out["still_live"]
