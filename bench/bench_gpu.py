"""The edge ensemble on a GPU against the CPU, same bundle, same 10,000 test images (run where a GPU is lent).

For each provider setting (CUDA in fp32, the product's default; CUDA with TF32, onnxruntime's own default; the
CPU alone) and each ensemble path (fused, two sessions): inputs per second at batch 1, 32 and 256, and how far
the decisions are from the CPU's two sessions (labels equal, reject flags equal, largest reject-score gap).

Usage: python -m bench.bench_gpu [--bundle DIR] [--seconds 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, save

SETTINGS = (
    ("cuda", None, "off"),
    ("cuda-tf32", None, "on"),
    ("cpu", ("CPUExecutionProvider",), "off"),
)


def main() -> None:
    from edge_agent.ensemble import Ensemble, to_model_input
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.runtime import RuntimeConfig, choose_providers
    from trainer.science.data import DataConfig, SplitConfig, load_splits

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--bundle", type=Path, default=ROOT / "runs" / "bench-field" / "checker4" / "seed0" / "predeploy" / "bundle"
    )
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    import onnxruntime as ort

    bundle = verify_bundle(args.bundle)
    splits = load_splits(DataConfig(), SplitConfig(test=10000))
    x = to_model_input(splits.test.images, bundle.manifest.input_spec)
    rows: list[dict[str, Any]] = []
    decisions = {}
    for name, providers, tf32 in SETTINGS:
        if providers is None and "CUDAExecutionProvider" not in choose_providers():
            print(f"{name}: no CUDA provider loads here; skipped")
            continue
        for path in ("fused", "two-sessions"):
            ens = Ensemble(bundle, RuntimeConfig(providers=providers, ensemble_path=path, tf32=tf32))
            decisions[(name, path)] = ens.classify(x)
            rates = {}
            for bs in (1, 32, 256):
                xb = x[:bs]
                for _ in range(5):
                    ens.classify(xb)
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < args.seconds:
                    ens.classify(xb)
                    n += bs
                rates[str(bs)] = round(n / (time.perf_counter() - t0), 1)
            rows.append({"setting": name, "path": path, "served": ens.path, "provider": ens.provider, "per_s": rates})
            print(rows[-1], flush=True)
    ref = decisions[("cpu", "two-sessions")]
    for row in rows:
        d = decisions[(row["setting"], row["path"])]
        row["labels_equal_cpu"] = int((d.labels == ref.labels).sum())
        row["rejected_equal_cpu"] = int((d.rejected == ref.rejected).sum())
        row["score_max_gap"] = float(np.abs(d.score - ref.score).max())
    save(
        "gpu", {"onnxruntime": ort.__version__, "bundle": str(args.bundle), "inputs": len(x), "runs": [{"rows": rows}]}
    )


if __name__ == "__main__":
    main()
