#!/usr/bin/env bash
# Set everything up, then run the linters and the whole test suite (unit, contract,
# integration against real nginx and an S3-API server, real FUSE mounts).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff" >&2
ruff check lazyfs tests tools bench
echo "== mypy --strict" >&2
mypy
echo "== pytest" >&2
exec pytest -q "$@"
