#!/bin/bash
# One device call for the derivative's grouped matmuls (issue 19): build the
# launcher, GPU tests of gmm and jax.grad with compute-sanitizer memcheck
# and racecheck beside them, then the forward against the forward + backward
# (bench/grad_session.py, per-kernel profile). A code cache
# compiled ahead with the device's triton (grad_session.py warm), carried as
# .jmcache.tgz, is unpacked first. Each step is bounded (timeout) so that the
# finished ones always come back.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_MXFP4_MOE_CACHE_DIR=/tmp/jmcache XLA_PYTHON_CLIENT_PREALLOCATE=false
cd "$(dirname "$0")/.."
mkdir -p /tmp/jmcache && [ -f .jmcache.tgz ] && tar xzf .jmcache.tgz -C /tmp/jmcache
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import jax, triton; print('jax', jax.__version__, 'triton', triton.__version__)"; } \
  2>&1 | tee "$OUT/device.txt"
echo "=== build $(date +%T)"
if ! ls jax_mxfp4_moe/_launcher*.so > /dev/null 2>&1; then
  ( cmake -S . -B /tmp/build -DSKBUILD_PROJECT_NAME=jax_mxfp4_moe -DCMAKE_BUILD_TYPE=Release \
      -Dnanobind_DIR="$(python3 -m nanobind --cmake_dir)" -DPython_EXECUTABLE="$(command -v python3)" \
    && cmake --build /tmp/build -j16 && cp /tmp/build/_launcher*.so jax_mxfp4_moe/ ) \
    > "$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
fi
export PYTHONPATH=$PWD:$PWD/tests
if [ "${TESTS:-1}" = 1 ]; then
  # correctness runs side by side: the GPU tests, and memcheck and racecheck
  # of a short run of every grouped-matmul kernel (grad_session.py sanitize)
  echo "=== tests + memcheck + racecheck $(date +%T)"
  OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
  timeout ${T_TEST:-110} python3 -m pytest -v -rf -n ${WORKERS:-8} -p no:cacheprovider \
    tests/test_cuda_grad_gpu.py > "$OUT/test.log" 2>&1 &
  tests=$!
  timeout ${T_MEMCHECK:-110} compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 bench/grad_session.py sanitize > "$OUT/memcheck.log" 2>&1 &
  memcheck=$!
  timeout ${T_RACECHECK:-110} compute-sanitizer --tool racecheck --error-exitcode 9 \
    python3 bench/grad_session.py sanitize > "$OUT/racecheck.log" 2>&1 &
  racecheck=$!
  wait $tests; echo "tests rc $?: $(grep -c PASSED "$OUT/test.log") passed, $(grep -c FAILED "$OUT/test.log") failed"
  grep -E "FAILED|Error" "$OUT/test.log" | head -8 | cut -c1-300
  wait $memcheck; echo "memcheck rc $?"; tail -4 "$OUT/memcheck.log" | cut -c1-300
  wait $racecheck; echo "racecheck rc $?"; tail -4 "$OUT/racecheck.log" | cut -c1-300
fi
echo "=== time $(date +%T)"
timeout ${T_TIME:-120} python3 bench/grad_session.py time --preset gpt-oss-120b --tokens 4096 \
  --reps 10 --profile ${COMPARE:+--compare $COMPARE} --hlo "$OUT/grad_hlo.txt" \
  --json "$OUT/grad_time.json" 2>&1 | grep -v Warn | tee "$OUT/time.log" | cut -c1-200
echo "=== done $(date +%T)"
