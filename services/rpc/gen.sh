#!/usr/bin/env bash
# Regenerate the Python stubs for services/rpc/*.proto (grpcio-tools; no make needed).
# protoc emits absolute imports ("import nitsum_pb2"); they are rewritten to package-relative ones.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
cd "$here"
"$py" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. ./*.proto
for f in ./*_pb2.py ./*_pb2_grpc.py ./*_pb2.pyi; do
  sed -i -E 's/^import ([a-zA-Z0-9_]+_pb2)( as [a-zA-Z0-9_]+)?$/from . import \1\2/' "$f"
  sed -i "1i # ruff: noqa" "$f"
done
echo "generated: $(ls ./*_pb2*.py* | tr '\n' ' ')"
