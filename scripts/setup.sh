#!/usr/bin/env bash
# Idempotent set-up of a fresh machine (Debian, Python 3.10+, no GPU needed):
# system library for Open3D, a torch + torchvision pair (so that timm, the
# anchor of the dynamic-network families, imports), the Python dependencies,
# then dynkernels itself with its C++ extension built against that torch.
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

# torch and torchvision: an installed pair that imports together (torch >= 2.6)
# is kept, as on the GPU machines; otherwise torch 2.14.1 with torchvision
# 0.29.1, a pair that loads here on CPU (torchvision's registry wheels do not
# load against torch 2.13.0+cpu).
if ! $PY -c "import torch, torchvision, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 6))" 2>/dev/null; then
  $PY -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
# triton comes with a CUDA build of torch, pinned to its version: keep that one.
$PY -c "import triton" 2>/dev/null || $PY -m pip install -q triton
$PY -m pip install -q timm pybind11 ninja numpy pytest pytest-benchmark open3d fpsample matplotlib spconv kornia
# No NVIDIA driver here: build the CPU kernels only (a CUDA build of torch
# would otherwise compile every CUDA kernel, minutes of work that cannot run).
if ! { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; then
  export DYNKERNELS_CUDA=0
fi
$PY -m pip install -q --no-build-isolation -e .
$PY -m dynkernels info
