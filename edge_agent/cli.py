"""``nnoc-edge``: the edge agent's command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("edge_agent")


def cmd_verify(args: argparse.Namespace) -> dict:
    """Check a bundle's manifest and hashes."""
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.formats.signing import load_trusted_keys

    trusted = load_trusted_keys(args.trusted_key) if args.trusted_key else None
    b = verify_bundle(args.bundle, trusted)
    return {
        "bundle": str(b.path),
        "fleet": b.manifest.fleet,
        "version": b.version,
        "hashes": "ok",
        "signature": f"ok, signed by {b.manifest.signature.key_id}"
        if trusted is not None
        else "not checked (pass --trusted-key KEY.pub to check who signed it)",
    }


def cmd_classify(args: argparse.Namespace) -> dict:
    """One-off classification of image files through the ensemble."""
    from edge_agent.ensemble import Ensemble, scale_raw
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.formats.signing import load_trusted_keys
    from edge_agent.runtime import RuntimeConfig

    trusted = load_trusted_keys(args.trusted_key) if args.trusted_key else None
    if trusted is None:
        log.warning("no --trusted-key: the bundle's hashes are checked, not who signed it")
    bundle = verify_bundle(args.bundle, trusted)
    runtime = RuntimeConfig(
        providers=tuple(args.providers) if args.providers else None, ensemble_path=args.ensemble_path
    )
    ensemble = Ensemble(bundle, runtime)
    shape = tuple(int(d) for d in bundle.manifest.input_spec.shape)
    from edge_agent.images import load_images

    raw = load_images(args.images, shape)
    decision = ensemble.classify(scale_raw(raw, bundle.manifest.input_spec))
    names = list(bundle.manifest.class_names)
    results = [
        {
            "image": str(p),
            "label": int(lbl),
            "class": names[lbl] if lbl >= 0 and lbl < len(names) else None,
            "rejected": bool(rej),
        }
        for p, lbl, rej in zip(args.images, decision.labels, decision.rejected, strict=True)
    ]
    return {"bundle_version": bundle.version, "provider": ensemble.provider, "path": ensemble.path, "results": results}


def cmd_run(args: argparse.Namespace) -> dict:
    """Serve until SIGTERM."""
    from edge_agent.app import RunConfig, run
    from edge_agent.runtime import RuntimeConfig

    cfg = RunConfig(
        device_id=args.device_id,
        fleet=args.fleet,
        state_dir=args.state_dir,
        bundle=args.bundle,
        model_service=args.model_service,
        collector=args.collector,
        host=args.host,
        infer_port=args.infer_port,
        metrics_port=args.metrics_port,
        source=args.source,
        source_batch=args.source_batch,
        source_limit=args.source_limit,
        window=args.window,
        reject_threshold=args.reject_threshold,
        spool_max_items=args.spool_max_items,
        spool_policy=args.spool_policy,
        spool_durability=args.spool_durability,
        spool_max_bytes=args.spool_max_bytes,
        stats_interval=args.stats_interval,
        max_batch=args.max_batch,
        runtime=RuntimeConfig(
            providers=tuple(args.providers) if args.providers else None,
            intra_op_threads=args.threads,
            graph_optimization=args.graph_optimization,
            ensemble_path=args.ensemble_path,
        ),
        trusted_keys=tuple(args.trusted_key or ()),
        curve_key=args.curve_key,
        curve_server_key=args.curve_server_key,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        infer_client_ca=args.infer_client_ca,
        insecure=args.insecure,
    )
    return run(cfg)


def cmd_status(args: argparse.Namespace) -> dict:
    """Cache, spool and the running agent."""
    from edge_agent.app import status

    return status(args.state_dir)


def cmd_rollback(args: argparse.Namespace) -> dict:
    """Return to the previous bundle."""
    from edge_agent.app import rollback

    return rollback(args.state_dir)


def build_parser() -> argparse.ArgumentParser:
    """All subcommands and their flags."""
    from edge_agent.inference import DEFAULT_MAX_BATCH

    parser = argparse.ArgumentParser(prog="nnoc-edge", description="NNoculation edge agent")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="verify a bundle's manifest, sizes and hashes")
    p.add_argument("--bundle", type=Path, required=True)
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("classify", help="classify image files with a bundle's ensemble (rejects print label -1)")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--providers", nargs="+", default=None, help="onnxruntime providers, in order (default: best)")
    p.add_argument("images", type=Path, nargs="+")
    p.set_defaults(func=cmd_classify)
    p = sub.add_parser("run", help="serve the ensemble: inference endpoint, quarantine uplink, model updates")
    p.add_argument("--device-id", required=True)
    p.add_argument("--fleet", required=True, help="fleet name: the model name on the inference endpoint")
    p.add_argument("--model-service", default=None, help="HOST:PORT of the trainer's model service")
    p.add_argument("--collector", default=None, help="tcp://HOST:PORT of the trainer's quarantine collector")
    p.add_argument("--bundle", type=Path, default=None, help="a bundle to serve when the cache has nothing newer")
    p.add_argument("--host", default="127.0.0.1", help="address the endpoints bind to")
    p.add_argument("--infer-port", type=int, default=8001, help="Open Inference Protocol gRPC port (0: any)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (default: off)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help=f"inputs per inference request at most; more get RESOURCE_EXHAUSTED (default {DEFAULT_MAX_BATCH})",
    )
    p.add_argument(
        "--source",
        default=None,
        help="play inputs: npy:PATH (uint8 images or model inputs, N first) or dir:PATH (image files)",
    )
    p.add_argument("--source-batch", type=int, default=1)
    p.add_argument("--source-limit", type=int, default=None, help="stop playing after this many inputs")
    p.add_argument("--window", type=int, default=1000, help="requests per reject-rate window (paper §7)")
    p.add_argument("--reject-threshold", type=float, default=0.05, help="windowed reject rate that raises the alarm")
    p.add_argument("--spool-max-items", type=int, default=100_000)
    p.add_argument("--stats-interval", type=float, default=10.0, help="seconds between stats messages")
    p.add_argument("--spool-policy", choices=("drop-oldest", "reject-new"), default="drop-oldest")
    p.add_argument(
        "--spool-durability",
        choices=("power", "process"),
        default="power",
        help="power: an fsync per reject, survives power loss (default); process: survives kill -9, ~20%% faster",
    )
    p.add_argument("--spool-max-bytes", type=int, default=512 << 20, help="spool bound in bytes")
    p.add_argument("--providers", nargs="+", default=None, help="onnxruntime providers, in order (default: best)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: one per core)")
    p.add_argument("--graph-optimization", choices=("disable", "basic", "extended", "all"), default="all")
    p.add_argument("--tls-ca", type=Path, default=None, help="CA of the model service's certificate (TLS)")
    p.add_argument("--tls-cert", type=Path, default=None, help="this agent's certificate: endpoint TLS, client mTLS")
    p.add_argument("--tls-key", type=Path, default=None, help="this agent's TLS key")
    p.add_argument("--infer-client-ca", type=Path, default=None, help="inference endpoint: require client certs")
    p.add_argument("--insecure", action="store_true", help="allow plaintext gRPC where TLS is not configured")
    p.add_argument("--curve-key", type=Path, default=None, help="this agent's CURVE .key_secret file (uplink)")
    p.add_argument("--curve-server-key", type=Path, default=None, help="the collector's CURVE public .key file")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("status", help="what the agent serves, its spool, and where it listens")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("rollback", help="return to the previous bundle (a running agent swaps at once)")
    p.set_defaults(func=cmd_rollback)
    for name in ("run", "verify", "classify"):
        sub.choices[name].add_argument(
            "--trusted-key",
            type=Path,
            action="append",
            default=None,
            help="Ed25519 public key (PEM) whose signature a bundle must carry (repeat for several)",
        )
    for name in ("run", "classify"):
        sub.choices[name].add_argument(
            "--ensemble-path",
            choices=("fused", "two-sessions", "timed"),
            default="fused",
            help="run both models in one fused graph (default), in two sessions, or time both at load",
        )
    for name in ("run", "status", "rollback"):
        sub.choices[name].add_argument(
            "--state-dir",
            type=Path,
            default=Path("nnoc-edge-state"),
            help="bundle cache, spool and agent.json (default ./nnoc-edge-state)",
        )
    for sp in sub.choices.values():
        sp.add_argument("--json", action="store_true", help="print one JSON object as the last line")
        sp.add_argument("--quiet", action="store_true", help="warnings only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``nnoc-edge`` and ``python -m edge_agent``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args.func(args)
    except (ValueError, OSError) as e:  # bad bundles, inputs, files and taken ports: one line, exit 2
        log.error("%s", e)
        if args.json:
            print(json.dumps({"error": str(e)}))
        return 2
    if args.json:
        print(json.dumps(result))
    elif "results" in result:
        for r in result["results"]:
            print(f"{r['image']}: {'REJECTED' if r['rejected'] else r['class'] or r['label']}")
    else:
        print(json.dumps(result, indent=2))
    return 0
