#!/usr/bin/env bash
# Idempotent set-up of a fresh machine (Debian, Python 3.10+, no GPU needed):
# system library for Open3D, torch, the Python dependencies, then dynkernels
# itself with its C++ extension built against the installed torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! ldconfig -p 2>/dev/null | grep -q "libusb-1.0.so.0"; then
  # Open3D's Python module links libusb at import.
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq libusb-1.0-0 >/dev/null
fi

# torch first (2.13.0: on the CPU machines its CPU build lies on disk); an
# existing torch >= 2.6 is kept, as on the GPU machines.
if ! $PY -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 6))" 2>/dev/null; then
  $PY -m pip install -q torch==2.13.0
fi
$PY -m pip install -q triton pybind11 ninja numpy pytest pytest-benchmark open3d fpsample matplotlib
$PY -m pip install -q --no-build-isolation -e .
$PY -m dynkernels info
