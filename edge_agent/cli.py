"""``nnoc-edge``: the edge agent's command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_agent.console import write_out
from edge_agent.options import (
    add_flags,
    add_spec_flag,
    config_values,
    flag_defaults,
    from_args,
    option_value,
    short_help,
)

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
    from edge_agent.ensemble import Ensemble, to_model_input
    from edge_agent.formats.bundle import verify_bundle
    from edge_agent.formats.signing import load_trusted_keys
    from edge_agent.runtime import RuntimeConfig

    trusted = load_trusted_keys(args.trusted_key) if args.trusted_key else None
    if trusted is None:
        log.warning("no --trusted-key: the bundle's hashes are checked, not who signed it")
    bundle = verify_bundle(args.bundle, trusted)
    ensemble = Ensemble(bundle, from_args(RuntimeConfig, args))
    spec = bundle.manifest.input_spec
    from edge_agent.formats.spec import image_shape_of, preprocess_of
    from edge_agent.images import load_images

    images = load_images(args.images, image_shape_of(spec), preprocess_of(spec))
    decision = ensemble.classify(to_model_input(images, spec))
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

    cfg = from_args(RunConfig, args)
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
    """All subcommands and their flags (``run``'s are the fields of ``RunConfig`` and ``RuntimeConfig``)."""
    from edge_agent.app import RunConfig
    from edge_agent.runtime import RuntimeConfig

    parser = argparse.ArgumentParser(prog="nnoc-edge", description="NNoculation edge agent")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="verify a bundle's manifest, sizes and hashes")
    p.add_argument("--bundle", type=Path, required=True)
    add_flags(p, RunConfig, only=("trusted_keys",))
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("classify", help="classify image files with a bundle's ensemble (rejects print label -1)")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("images", type=Path, nargs="+")
    add_flags(p, RunConfig, only=("trusted_keys",))
    add_flags(p, RuntimeConfig)
    p.set_defaults(func=cmd_classify)
    p = sub.add_parser("run", help="serve the ensemble: inference endpoint, quarantine uplink, model updates")
    add_flags(p, RunConfig)  # its parts too: the spool's and the runtime's
    add_spec_flag(p, "[spool] max_items = 5000 is --spool-max-items 5000")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("status", help="what the agent serves, its spool, and where it listens")
    add_flags(p, RunConfig, only=("state_dir",))
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("rollback", help="return to the previous bundle (a running agent swaps at once)")
    add_flags(p, RunConfig, only=("state_dir",))
    p.set_defaults(func=cmd_rollback)
    for sp in sub.choices.values():
        sp.add_argument("--json", action="store_true", help="print one JSON object as the last line")
        sp.add_argument("--quiet", action="store_true", help="warnings only")
    return parser


RUN_FLAGS = (  # what `nnoc-edge run --help` shows; the rest under --help-all
    "device_id", "fleet", "state_dir", "model_service", "collector", "source", "infer_port", "metrics_port",
    "trusted_key", "tls_ca", "tls_cert", "tls_key", "curve_key", "curve_server_key", "insecure", "bundle", "config",
    "json", "quiet", "help",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``nnoc-edge`` and ``python -m edge_agent``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    run = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    short_help(run, RUN_FLAGS, "--help-all" in argv)
    argv = ["--help" if a == "--help-all" else a for a in argv]
    try:
        config = option_value(argv, "--spec") or option_value(argv, "--config")
        if argv[:1] == ["run"] and config is not None:
            from edge_agent.app import RunConfig

            run.set_defaults(**flag_defaults(run, config_values(Path(config), RunConfig), config))
    except ValueError as e:
        logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        log.error("%s", e)
        if "--json" in argv:
            write_out(json.dumps({"error": str(e)}))
        return 2
    args = parser.parse_args(argv)
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
            write_out(json.dumps({"error": str(e)}))
        return 2
    if args.json:
        write_out(json.dumps(result))
    elif "results" in result:
        for r in result["results"]:
            write_out(f"{r['image']}: {'REJECTED' if r['rejected'] else r['class'] or r['label']}")
    else:
        write_out(json.dumps(result, indent=2))
    return 0
