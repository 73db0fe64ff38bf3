#!/usr/bin/env bash
# Prepare what bench/gpu_check.py's mount stage needs on the GPU machine, which has Python 3.12,
# torch and safetensors but not the daemon's packages (DESIGN.md, "GPU checks"):
#
#   .gpu/whl/   cp312 wheels of pyfuse3 (built here against libfuse3-dev), lmdb, zstandard, blake3,
#               trio, outcome, sniffio (the rest is already there: aiohttp, uvloop, xxhash, msgpack, ...)
#   .gpu/deb/   the Debian libfuse3-3 and fuse3 packages (unpacked there with dpkg -x)
#   .gpu/src/   lazyfs/ and bench/ of HEAD (git archive), so helpers editing the working tree
#               cannot change what runs
#
# Run from the repository root: bash bench/gpu_bundle.sh.  Needs a Python 3.12 (pyenv's, or
# PYTHON312=...), libfuse3-dev and network access to PyPI/Debian.  Then, on the GPU machine,
# with .gpu carried (the device tool's carry=[".gpu"]), from the repository root:
#
#   cd .gpu/src && python3 -m pip install -q --no-index --no-deps --target /tmp/site ../whl/*.whl &&
#   for f in ../deb/*.deb; do dpkg -x "$f" /tmp/fuse; done &&
#   PYTHONPATH=/tmp/site:$PWD LD_LIBRARY_PATH=/tmp/fuse/lib/x86_64-linux-gnu PATH=/tmp/fuse/usr/bin:$PATH \
#     python3 bench/gpu_check.py --json $OUT/gpu_check.json
set -euo pipefail

py312=${PYTHON312:-$(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python 2>/dev/null | tail -1)}
[ -x "$py312" ] || { echo "gpu_bundle: no Python 3.12 found (set PYTHON312)" >&2; exit 2; }
# Versions the project is tested with here; the GPU machine's own aiohttp/uvloop/xxhash/msgpack are used.
pins=(blake3==1.0.11 zstandard==0.25.0 lmdb==3.0.0 trio==0.35.0 outcome==1.3.0.post0 sniffio==1.3.1)

grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl .gpu/deb .gpu/src
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_28_x86_64; do platforms+=(--platform "$p"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .gpu/whl "${pins[@]}"
"$py312" -m pip wheel -q --no-deps pyfuse3==3.5.0 -w .gpu/whl
(cd .gpu/deb && apt-get download libfuse3-3 fuse3 2>/dev/null)
git archive HEAD lazyfs bench pyproject.toml | tar -x -C .gpu/src
du -sh .gpu
