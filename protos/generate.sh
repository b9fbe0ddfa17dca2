#!/usr/bin/env bash
# Regenerates the Python modules from protos/**/*.proto. Generated files are committed and never edited.
# The generator is pinned (grpcio-tools 1.81.1, bundling protoc for protobuf 6.33): generated code must not
# be newer than the protobuf runtime the project allows (<7, because tritonclient does not accept 7 yet).
# Usage: protos/generate.sh [--check]   (--check: regenerate into a temp dir and fail on any drift)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
want="1.81.1"
have=$("$PY" -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))')
if [ "$have" != "$want" ]; then
  echo "protos/generate.sh: grpcio-tools $want is required, found $have; run: $PY -m pip install grpcio-tools==$want" >&2
  exit 2
fi
out=.
if [ "${1:-}" = "--check" ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
mapfile -t files < <(find protos -name '*.proto' | sort)
"$PY" -m grpc_tools.protoc -I . --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" "${files[@]}"
if [ "${1:-}" = "--check" ]; then
  status=0
  for f in "${files[@]}"; do
    base=${f%.proto}
    for suffix in _pb2.py _pb2.pyi _pb2_grpc.py; do
      if ! diff -q "$out/$base$suffix" "$base$suffix" >/dev/null 2>&1; then
        echo "protos drift: $base$suffix differs from $f; run protos/generate.sh and commit" >&2
        status=1
      fi
    done
  done
  exit $status
fi
