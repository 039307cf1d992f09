#!/bin/bash
# device call 2: Gluon prefill kernels (dedicated producer, consumer-issued TMA), standalone
export PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
 python3 -c "import triton,torch,jax;print('triton',triton.__version__,'torch',torch.__version__,'jax',jax.__version__)") 2>&1 | tee $OUT/env.log
echo "== check"; timeout 150 python3 bench/wgmma_driver.py check > $OUT/check.log 2>&1; echo "rc=$?"
grep -E "FAIL|CHECK|Error|error" $OUT/check.log | cut -c1-200 | head -20
echo "== time"; timeout 200 python3 bench/wgmma_driver.py time > $OUT/time.log 2>&1; echo "rc=$?"
grep -vE "^\s*$|Warning|warn|SUMMARY" $OUT/time.log | cut -c1-230 | head -24
echo "== memcheck"; timeout 100 compute-sanitizer --tool memcheck --print-limit 20 python3 bench/wgmma_driver.py sanitize > $OUT/memcheck.log 2>&1; echo "rc=$?"
grep -E "ERROR SUMMARY|SANITIZE|FAIL|Invalid|took" $OUT/memcheck.log | head -8
echo "== racecheck"; timeout 120 compute-sanitizer --tool racecheck --print-limit 20 python3 bench/wgmma_driver.py sanitize > $OUT/racecheck.log 2>&1; echo "rc=$?"
grep -E "HAZARD|RACECHECK SUMMARY|ERROR SUMMARY|SANITIZE|FAIL|took" $OUT/racecheck.log | head -8
