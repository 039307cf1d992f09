"""Decode-regime block configs compared on the device (one process): patches
the config table's first regime and times this package's moe with the bench.
usage: python3 bench/sweep_decode.py [preset] [tokens]"""

import sys

import jax

from jax_mxfp4_moe import bench
from jax_mxfp4_moe.backends import cuda_kernels
from jax_mxfp4_moe.backends.cuda_kernels import GemmConfig

preset = sys.argv[1] if len(sys.argv) > 1 else "gpt-oss-120b"
tokens = [int(t) for t in (sys.argv[2] if len(sys.argv) > 2 else "1,8").split(",")]
CANDIDATES = {
    "shipped": (GemmConfig(32, 128, True, 4, 1), GemmConfig(64, 128, True, 4, 1)),
    "prefetch": (GemmConfig(32, 128, True, 4, 2), GemmConfig(64, 128, True, 8, 2)),
    "g1_8warps": (GemmConfig(32, 128, True, 8, 2), GemmConfig(64, 128, True, 8, 2)),
    "g2_bk256": (GemmConfig(32, 128, True, 4, 2), GemmConfig(64, 256, True, 8, 2)),
    "bk64": (GemmConfig(32, 64, True, 4, 2), GemmConfig(64, 64, True, 4, 2)),
}
ceilings = None
rest = cuda_kernels._REGIMES[1:]
for name, (g1, g2) in CANDIDATES.items():
    cuda_kernels._REGIMES = ((16, 16, g1, g2),) + rest
    cuda_kernels.get_kernel.cache_clear()
    jax.clear_caches()
    try:
        res = bench.run(preset, tokens, "a16w4", reps=20, baselines=(), ceilings=ceilings,
                        log=lambda s: None)
    except Exception as e:  # a config that fails to compile or run is reported
        print(f"{name:>14}: {type(e).__name__}: {str(e)[:120]}")
        continue
    h = res["header"]
    ceilings = (h["hbm_bytes_per_s"], h["bf16_flops_per_s"])
    cells = [f"T={r['T']}: {r['results']['ours']['time_s'] * 1e6:7.1f} us "
             f"({r['results']['ours']['pct_roofline']:4.1f}%)" for r in res["rows"]]
    print(f"{name:>14}: " + " | ".join(cells), flush=True)
