#!/usr/bin/env bash
# Install everything lazyfs needs on a fresh Debian machine: system packages
# (FUSE, nginx for the HTTP-origin tests, iproute2 for network namespaces) and a
# virtualenv at .venv with lazyfs, torch (CPU) and the test tools.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_apt=()
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
[ -e /usr/include/fuse3/fuse_lowlevel.h ] || need_apt+=(libfuse3-dev)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
command -v ip >/dev/null || [ -x /usr/sbin/ip ] || need_apt+=(iproute2)
command -v gcc >/dev/null || need_apt+=(gcc)
# Container images (tests and benchmarks): a Debian root, OCI layers, conversions, a registry.
[ -x /usr/sbin/debootstrap ] || need_apt+=(debootstrap)
command -v umoci >/dev/null || need_apt+=(umoci)
command -v skopeo >/dev/null || need_apt+=(skopeo)
[ -x /usr/bin/docker-registry ] || need_apt+=(docker-registry)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
[ -n "$(python3 -c 'import sysconfig;print(sysconfig.get_config_h_filename())' 2>/dev/null)" ] \
  && [ -e "$(python3 -c 'import sysconfig;print(sysconfig.get_paths()["include"])')/Python.h" ] || need_apt+=(python3-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

stamp=.venv/.lazyfs-setup
want="$(sha256sum pyproject.toml tools/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
# torch 2.13.0 first: the CPU build (an unpinned torch would pull a multi-GB CUDA build).
.venv/bin/pip install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' >&2 || true
.venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/pip install -q torch
.venv/bin/pip install -q -e ".[torch,test]" 2>&1 | grep -v '^WARNING: Location' >&2 || true
.venv/bin/python -c 'import lazyfs, pyfuse3, torch, safetensors, sentence_transformers' 
echo "$want" > "$stamp"
echo "setup: ready (.venv)" >&2
