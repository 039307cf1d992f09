#!/usr/bin/env bash
# Sets up a fresh Debian machine (as root) to build, use and test
# jax_mxfp4_moe:   bash install.sh            install
#                  bash install.sh --example  install, then run the quickstart
set -euo pipefail
cd "$(dirname "$0")"

run_example=0
for arg in "$@"; do
  case "$arg" in
    --example) run_example=1 ;;
    *) echo "install.sh: unknown argument $arg (expected --example)" >&2; exit 2 ;;
  esac
done

# lld-19 links FlyDSL's gfx950 code objects; FlyDSL finds it as
# $ROCM_PATH/llvm/bin/ld.lld (jax_mxfp4_moe.toolchain.rocm_path()).
if ! command -v /usr/lib/llvm-19/bin/ld.lld >/dev/null; then
  apt-get update
  apt-get install -y --no-install-recommends lld-19
fi
mkdir -p .rocm/llvm/bin
ln -sfn /usr/lib/llvm-19/bin/ld.lld .rocm/llvm/bin/ld.lld

# FlyDSL imports torch without declaring it (a CPU build is enough to
# compile kernels).
python -m pip install "torch==2.13.0"
# Build dependencies: the extension is built against the installed jaxlib's
# FFI headers, hence no build isolation.
python -m pip install "scikit-build-core>=0.10" "nanobind>=2.0" "jax>=0.5" "jaxlib>=0.5"
python -m pip install --no-build-isolation -e ".[test,rocm,cuda]"

python -c "import jax_mxfp4_moe.runtime.ffi as f; assert f.available(), 'launcher extension missing'"

if [ "$run_example" = 1 ] && [ -f examples/quickstart.py ]; then
  python examples/quickstart.py
fi
