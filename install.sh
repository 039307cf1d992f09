#!/usr/bin/env bash
# Sets up a Debian machine (as root) with everything the TEST SUITE needs:
# the package (editable) with its [test,flax,cuda,rocm] extras, the CPU build
# of torch (FlyDSL imports it), lld-19 (links gfx950 code objects).  About
# 2.5 GB, most of it triton, torch and flydsl, which compile the GPU kernels
# in the tests even on a machine without a GPU.
#
#   bash install.sh            install
#   bash install.sh --example  install, then run the quickstart
#
# To USE the layer, install only what your machine runs (README, Install):
#   CPU:    pip install .                       (jax, numpy, ml_dtypes)
#   NVIDIA: pip install -U "jax[cuda13]" && pip install ".[cuda]"
#   AMD:    pip install -U "jax[rocm7-local]" && the CPU torch (below) && pip install ".[rocm]"
#   Flax:   pip install ".[flax]"
set -euo pipefail
cd "$(dirname "$0")"

run_example=0
for arg in "$@"; do
  case "$arg" in
    --example) run_example=1 ;;
    *) echo "install.sh: unknown argument $arg (expected --example)" >&2; exit 2 ;;
  esac
done
echo "install.sh: installing everything the test suite needs (see the header of this file for a lean install)"

# lld-19 links FlyDSL's gfx950 code objects; FlyDSL finds it as
# $ROCM_PATH/llvm/bin/ld.lld (jax_mxfp4_moe.runtime.toolchain.rocm_path()).
if ! command -v /usr/lib/llvm-19/bin/ld.lld >/dev/null; then
  apt-get update
  apt-get install -y --no-install-recommends lld-19
fi
mkdir -p .rocm/llvm/bin
ln -sfn /usr/lib/llvm-19/bin/ld.lld .rocm/llvm/bin/ld.lld

# FlyDSL imports torch without declaring it; the CPU build is enough.  PyPI's
# Linux torch wheel is the CUDA build (with ~3 GB of nvidia-* wheels); the CPU
# build is "torch==2.13.0+cpu" from an index that has it, by default PyTorch's:
#   pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# An installed torch is kept.  (torch requires setuptools>=77: pip upgrades an
# older one; nothing else here upgrades what is already installed.)
if python -c "import torch" 2>/dev/null; then
  echo "install.sh: keeping the installed torch $(python -c 'import torch; print(torch.__version__)')"
elif ! python -m pip install "torch==2.13.0+cpu"; then
  echo "install.sh: no torch==2.13.0+cpu on the configured indexes; trying PyTorch's CPU index"
  python -m pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
# Build dependencies: the extension is built against the installed jaxlib's
# FFI headers, hence no build isolation.
python -m pip install "scikit-build-core>=0.10" "nanobind>=2.0" "jax>=0.10.2" "jaxlib>=0.10.2"
python -m pip install --no-build-isolation -e ".[test,flax,rocm,cuda]"

python -c "import jax_mxfp4_moe.runtime.ffi as f; assert f.available(), 'launcher extension missing'"
echo "install.sh: done; run the tests with: python -m pytest -q"

if [ "$run_example" = 1 ] && [ -f examples/quickstart.py ]; then
  python examples/quickstart.py
fi
