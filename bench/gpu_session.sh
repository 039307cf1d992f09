#!/bin/bash
# One device call: build, GPU tests, bench, sanitizer. Logs go to $OUT (the
# device tool returns at most 8 files: run few steps per call).
# usage: bench/gpu_session.sh STEP... (steps: build test test_all bench_prefill grad_time presets bench bench_full bench_mx
#   bench_oss bench_ds sweep trace breakdown host_profile sanitize ncu cache_out)
# A code cache brought back by cache_out (.jmcache.tgz, carried) is unpacked first.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_MXFP4_MOE_CACHE_DIR=/tmp/jmcache XLA_PYTHON_CLIENT_PREALLOCATE=false
cd "$(dirname "$0")/.."
[ -f .jmcache.tgz ] && tar xzf .jmcache.tgz -C /tmp
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    build)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
      python3 -c "import jax, triton; print('jax', jax.__version__, 'triton', triton.__version__, jax.devices())" | tee -a "$OUT/device.txt"
      python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
      ;;
    test)  # launcher + CUDA backend, small shapes
      timeout ${T_TEST:-420} python3 -m pytest -q -rf -n 8 -m gpu tests/test_ffi_gpu.py tests/test_cuda_gpu.py \
        -k "not presets" 2>&1 | tee "$OUT/test.log" | tail -25
      ;;
    test_all)  # every GPU test file (forward, launcher, gradients, selfcheck) on 14
      # workers with one BLAS thread each (their float64 oracles), beside
      # memcheck of every grouped-matmul kernel (grad_session.py sanitize)
      PYTHONPATH=$PWD:$PWD/tests timeout ${T_MEMCHECK:-330} compute-sanitizer --tool memcheck \
        --error-exitcode 9 python3 bench/grad_session.py sanitize > "$OUT/memcheck_grad.log" 2>&1 &
      memcheck=$!
      OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 timeout ${T_TEST:-330} \
        python3 -m pytest -q -rfE -n ${WORKERS:-14} -p no:cacheprovider -m gpu --junitxml "$OUT/tests.xml" \
        tests/test_ffi_gpu.py tests/test_cuda_gpu.py tests/test_cuda_grad_gpu.py tests/test_selfcheck.py \
        -k "not presets" > "$OUT/test.log" 2>&1
      echo "tests rc $?"; tail -15 "$OUT/test.log" | cut -c1-300
      wait $memcheck; echo "memcheck rc $?"; grep -E "rel err|ERROR SUMMARY|grad:" "$OUT/memcheck_grad.log" | tail -16
      ;;
    bench_prefill)  # the Gluon prefill path, both presets, per-kernel profile
      timeout ${T_BENCH:-80} python3 -m jax_mxfp4_moe.tools.bench --preset gpt-oss-120b,deepseek-v3 \
        --tokens ${TOKENS:-512,4096,16384} --quant a16w4 --baselines none --reps 3 --routings 1 \
        --warmup 1 --profile --json "$OUT/bench_prefill.json" 2>&1 | grep -v Warn \
        | tee "$OUT/bench_prefill.log" | cut -c1-400
      ;;
    grad_time)  # forward against forward + backward (bench/grad_session.py), kernel profile
      timeout ${T_TIME:-120} python3 bench/grad_session.py time --preset gpt-oss-120b \
        --tokens ${TOKENS:-4096} --reps 10 --profile --hlo "$OUT/grad_hlo.txt" \
        --json "$OUT/grad_time.json" 2>&1 | grep -v Warn | tee "$OUT/grad_time.log" | cut -c1-200
      ;;
    presets)  # one process: each preset's weights take up to 6 GB of the GPU (deepseek-v3)
      timeout ${T_PRESETS:-170} python3 -m pytest -q -rf -m gpu tests/test_cuda_gpu.py -k presets 2>&1 \
        | tee "$OUT/presets.log" | tail -30
      ;;
    bench)  # ours only, both presets
      timeout ${T_BENCH:-300} python3 -m jax_mxfp4_moe.tools.bench --preset gpt-oss-120b,deepseek-v3 \
        --tokens ${TOKENS:-1,8,64} --baselines none --layout ${LAYOUT:-auto} \
        --json "$OUT/bench_quick_${LAYOUT:-auto}.json" 2>&1 | grep -v Warn | tee -a "$OUT/bench_quick.log"
      ;;
    bench_full)  # each run bounded, so the finished ones always come back. Up to
      # T=512 a rep runs 8 layer calls per jit: Mosaic-GPU compiles 8 layers.
      B="python3 -m jax_mxfp4_moe.tools.bench"
      timeout ${T_OSS:-290} $B --preset gpt-oss-120b --quant a16w4 --tokens 1,8,64,512,4096,16384 \
        --json "$OUT/b_oss120_a16.json" 2>&1 | grep -v Warn | tee "$OUT/bench.log"
      timeout ${T_DS:-250} $B --preset deepseek-v3 --quant a16w4 --tokens 1,8,64,512,4096 \
        --json "$OUT/b_ds_a16.json" 2>&1 | grep -v Warn | tee -a "$OUT/bench.log"
      ;;
    bench_mx)  # MX activations (ours only), and gpt-oss-120b without command buffers
      B="python3 -m jax_mxfp4_moe.tools.bench"
      timeout 150 $B --preset gpt-oss-120b,deepseek-v3 --quant a8w4,a4w4 --tokens 1,64,4096 \
        --baselines none --json "$OUT/b_mx.json" 2>&1 | grep -v Warn | tee -a "$OUT/bench.log"
      XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 60 $B --preset gpt-oss-120b \
        --tokens 1,8 --baselines none 2>&1 | grep -v Warn | sed 's/^/[no command buffers] /' \
        | tee -a "$OUT/bench.log"
      ;;
    sweep)
      # SWEEP="PRESET QUANT T,... CANDIDATE,..." (bench/sweep.py); appends to sweep.log
      timeout ${T_SWEEP:-240} python3 bench/sweep.py ${SWEEP:-gpt-oss-120b a16w4 1,8,64 d_ns1,d_ns3,d_ns4} 2>&1 \
        | grep -v Warn | tee -a "$OUT/sweep.log" | tail -20
      ;;
    bench_oss)
      timeout ${T_BENCH:-170} python3 -m jax_mxfp4_moe.tools.bench --preset gpt-oss-120b --quant a16w4 \
        --tokens 1,8,64,512,4096,16384 --json "$OUT/b_oss120_a16.json" 2>&1 | grep -v Warn \
        | grep "T=\|#" | tee "$OUT/bench_oss.log"
      ;;
    bench_ds)
      timeout ${T_BENCH:-130} python3 -m jax_mxfp4_moe.tools.bench --preset deepseek-v3 --quant a16w4 --tokens 1,64,4096 \
        --json "$OUT/b_ds_a16.json" 2>&1 | grep -v Warn | grep "T=\|#" | tee "$OUT/bench_ds.log"
      ;;
    trace)  # TRACES="PRESET:T[:QUANT] ..." (bench/trace_decode.py): moe_decode's timeline
      for c in ${TRACES:-gpt-oss-120b:1}; do
        timeout ${T_TRACE:-90} python3 bench/trace_decode.py ${c//:/ } 2>&1 | grep -v Warn \
          | tee -a "$OUT/trace.log" | grep -v "^ "
      done
      ;;
    breakdown)  # BREAKDOWN="PRESET QUANT T,... [N]" (bench/breakdown.py)
      timeout ${T_BREAKDOWN:-120} python3 bench/breakdown.py ${BREAKDOWN:-gpt-oss-120b a16w4 1,8,64} 2>&1 \
        | grep -v Warn | tee -a "$OUT/breakdown.log"
      ;;
    host_profile)  # HOSTPROF="PRESET QUANT T [N] [FORMS]"; also without command buffers
      timeout ${T_HOSTPROF:-150} python3 bench/host_profile.py ${HOSTPROF:-gpt-oss-120b a16w4 1 8} 2>&1 \
        | grep -v Warn > "$OUT/host_profile.log"; grep "^#\|^==" "$OUT/host_profile.log"
      XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout ${T_HOSTPROF:-150} python3 bench/host_profile.py \
        ${HOSTPROF:-gpt-oss-120b a16w4 1 8} 2>&1 | grep -v Warn > "$OUT/host_profile_nocb.log"
      grep "^#\|^==" "$OUT/host_profile_nocb.log"
      ;;
    sanitize)
      timeout ${T_MEMCHECK:-150} compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x -m gpu \
        tests/test_cuda_gpu.py -k "${MEMCHECK_K:-not presets and (sort_kernel_matches or quantize or (moe_small and a8w4-silu-separated-True-7) or edge or nan or every_config)}" \
        2>&1 | tee "$OUT/memcheck.log" | tail -15
      timeout ${T_RACECHECK:-70} compute-sanitizer --tool racecheck --error-exitcode 9 python3 -m pytest -q -x -m gpu \
        tests/test_cuda_gpu.py -k "test_moe_small_matches_reference and a16w4-silu-separated-True-7" \
        2>&1 | tee "$OUT/racecheck.log" | tail -8
      ;;
    ncu)  # per-kernel time, DRAM throughput, tensor-pipe use, occupancy of one call
      for cfg in ${NCU_CASES:-gpt-oss-120b:1:a16w4}; do  # PRESET:T:QUANT ...
        set -- ${cfg//:/ }
        timeout ${T_NCU:-90} ncu --launch-skip-before-match 0 -k "regex:moe_" --launch-count 12 \
          --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
          --section SchedulerStats \
          --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio,smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_not_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_dispatch_stall_per_issue_active.ratio,smsp__average_warps_issue_stalled_no_instruction_per_issue_active.ratio,smsp__average_warps_issue_stalled_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_tex_throttle_per_issue_active.ratio \
          python3 bench/profile_decode.py $1 $2 $3 > "$OUT/ncu_$1_$2.txt" 2>&1
        grep -E "moe_|gpu__time_duration|dram__throughput|tensor_op_hmma|warps_active|issue_active|inst_executed|stalled|Achieved Occupancy|Registers Per|Grid Size" "$OUT/ncu_$1_$2.txt" | head -80
      done
      ;;
    cache_out)  # the compiled kernels, for the next call to carry as .jmcache.tgz
      tar czf "$OUT/jmcache.tgz" -C /tmp jmcache
      ;;
  esac
done
