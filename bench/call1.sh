#!/bin/bash
# device call 1: Gluon prefill kernels, standalone (triton launcher + torch)
export PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
 python3 -c "import triton,torch,jax;print('triton',triton.__version__,'torch',torch.__version__,'jax',jax.__version__)") 2>&1 | tee $OUT/env.log
echo "== check"; timeout 170 python3 bench/wgmma_driver.py check > $OUT/check.log 2>&1; echo "rc=$?"
grep -E "PASS|FAIL|CHECK|Error|error" $OUT/check.log | cut -c1-220 | head -40
echo "== time"; timeout 230 python3 bench/wgmma_driver.py time > $OUT/time.log 2>&1; echo "rc=$?"
grep -vE "^\s*$|Warning|warn" $OUT/time.log | cut -c1-250 | tail -32
echo "== memcheck"; timeout 130 compute-sanitizer --tool memcheck --print-limit 20 python3 bench/wgmma_driver.py sanitize > $OUT/memcheck.log 2>&1; echo "rc=$?"
grep -E "ERROR SUMMARY|SANITIZE|PASS|FAIL|Invalid|took" $OUT/memcheck.log | head -12
