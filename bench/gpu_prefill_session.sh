#!/bin/bash
# One device call for the Gluon prefill kernels: build, bench (both presets,
# a16w4, per-kernel profile), GPU tests of the wgmma path. A code cache
# compiled ahead with the device's triton (bench/warm_cache.py), carried as
# .jmcache.tgz, is unpacked first. Each step is bounded (timeout) so that
# the finished ones always come back.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_MXFP4_MOE_CACHE_DIR=/tmp/jmcache XLA_PYTHON_CLIENT_PREALLOCATE=false
cd "$(dirname "$0")/.."
mkdir -p /tmp/jmcache && [ -f .jmcache.tgz ] && tar xzf .jmcache.tgz -C /tmp/jmcache
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import jax, triton; print('jax', jax.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
echo "=== build $(date +%T)"
timeout ${T_BUILD:-90} python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -20 "$OUT/build.log"; exit 1; }
echo "=== bench $(date +%T)"
timeout ${T_BENCH:-80} python3 -m jax_mxfp4_moe.tools.bench --preset gpt-oss-120b,deepseek-v3 \
  --tokens ${TOKENS:-512,4096,16384} --quant a16w4 --baselines none --reps 3 --routings 1 --warmup 1 \
  --profile --json "$OUT/bench.json" 2>&1 | grep -v Warn | tee "$OUT/bench.log" | cut -c1-400
echo "=== test $(date +%T)"
timeout ${T_TEST:-75} python3 -m pytest -q -rf -n 16 -m gpu tests/test_cuda_gpu.py \
  -k "${TESTS:-prefill or (small and 257)}" > "$OUT/test.log" 2>&1
tail -12 "$OUT/test.log" | cut -c1-300
echo "=== done $(date +%T)"
