#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine (run as root): apt data packages, a virtual
# environment in .venv, and the package with its dependencies. A second run skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="dataset-fashion-mnist fonts-noto-color-emoji fonts-dejavu-core"
missing=""
for pkg in $APT_PACKAGES; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  echo "[setup] apt-get install$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing
fi

PY=${PYTHON:-python3}
if ! "$PY" -m venv --help >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi

stamp=.venv/.peft_dp_saliency_installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  # CPU torch first: a bare `torch` requirement would otherwise pull a multi-GB CUDA build.
  # GPU users install their own torch (see README) before running this script.
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  .venv/bin/pip install -q -e ".[dev]"
  touch "$stamp"
fi
