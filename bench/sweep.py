"""Block configurations compared on the device, in one process: each candidate
replaces the config table with a single regime, and the bench times this
package's moe (ours only) at the given T.
usage: python3 bench/sweep.py PRESET QUANT T[,T...] CANDIDATE[@WARPS][/S1xS2][,...]"""

import re
import sys

import jax

from jax_mxfp4_moe.tools import bench
from jax_mxfp4_moe.cuda import compile as cuda_compile, config as cuda_config
from jax_mxfp4_moe.cuda.config import GemmConfig as G

# name: (BM, gemm1, gemm2); G(block_n, block_k, swap, num_warps, num_stages)
CANDIDATES = {
    # decode: W rows on the MMA's M side, BM = 16 tokens
    "d_ns1": (16, G(32, 128, True, 4, 1), G(64, 128, True, 4, 1)),
    "d_ns3": (16, G(32, 128, True, 4, 3), G(64, 128, True, 4, 3)),
    "d_ns4": (16, G(32, 128, True, 4, 4), G(64, 128, True, 4, 4)),
    "d_ns6": (16, G(32, 128, True, 4, 6), G(64, 128, True, 4, 6)),
    "d_bn64": (16, G(64, 128, True, 4, 3), G(128, 128, True, 4, 3)),
    "d_bk256": (16, G(32, 256, True, 4, 3), G(64, 256, True, 4, 3)),
    "d_w8": (16, G(32, 128, True, 8, 4), G(64, 128, True, 8, 4)),
    "d_w2": (16, G(32, 128, True, 2, 3), G(64, 128, True, 2, 3)),
    "d_w2n16": (16, G(16, 128, True, 2, 3), G(32, 128, True, 2, 3)),
    "d_w2k256": (16, G(32, 256, True, 2, 3), G(64, 256, True, 2, 3)),
    # decode, W upcast by the elementwise bit-twiddle (SWAP=2)
    "e_w2n32": (16, G(32, 128, 2, 2, 3), G(64, 128, 2, 2, 3)),
    "e_w2n16": (16, G(16, 128, 2, 2, 3), G(32, 128, 2, 2, 3)),
    "e_w4n32": (16, G(32, 128, 2, 4, 3), G(64, 128, 2, 4, 3)),
    "e_w2k256": (16, G(32, 256, 2, 2, 3), G(64, 256, 2, 2, 3)),
    "e_w1n16": (16, G(16, 128, 2, 1, 3), G(32, 128, 2, 1, 3)),
    "e_w2n32s4": (16, G(32, 128, 2, 2, 4), G(64, 128, 2, 2, 4)),
    "e_k64": (16, G(32, 64, 2, 2, 3), G(64, 64, 2, 2, 3)),
    "e_k64s4": (16, G(32, 64, 2, 2, 4), G(64, 64, 2, 2, 4)),
    "e_n16k64s4": (16, G(16, 64, 2, 2, 4), G(32, 64, 2, 2, 4)),
    "e_w4n64k64": (16, G(64, 64, 2, 4, 3), G(128, 64, 2, 4, 3)),
    "e8": (8, G(32, 128, 2, 2, 3, fuse_x_quant=False), G(64, 128, 2, 2, 3)),
    "e8s4": (8, G(32, 128, 2, 2, 4, fuse_x_quant=False), G(64, 128, 2, 2, 4)),
    "e8w1": (8, G(16, 128, 2, 1, 3, fuse_x_quant=False), G(32, 128, 2, 1, 3)),
    "e32": (32, G(32, 128, 2, 2, 3), G(64, 128, 2, 2, 3)),
    "e64": (64, G(32, 128, 2, 4, 3), G(64, 128, 2, 4, 3)),
    "e64w2": (64, G(32, 64, 2, 2, 3), G(64, 64, 2, 2, 3)),
    "m64": (64, G(32, 64, True, 8, 3), G(64, 64, True, 8, 3)),
    "m64_bk128": (64, G(32, 128, True, 8, 3), G(64, 128, True, 8, 3)),
    # prefill: tokens on the M side, BM = 128
    "p_32": (128, G(32, 64, False, 8, 3, fuse_x_quant=False), G(64, 64, False, 8, 3)),
    "p_64": (128, G(64, 64, False, 8, 3, fuse_x_quant=False), G(128, 64, False, 8, 3)),
    "p_64s4": (128, G(64, 64, False, 8, 4, fuse_x_quant=False), G(128, 64, False, 8, 4)),
    "p_128": (128, G(128, 64, False, 8, 3, fuse_x_quant=False), G(256, 64, False, 8, 3)),
    "p_64w4s4": (128, G(64, 64, False, 4, 4, fuse_x_quant=False), G(128, 64, False, 4, 4)),
    "p_128w8": (128, G(128, 64, False, 8, 3, fuse_x_quant=False), G(256, 64, False, 8, 3)),
    "p_64w8k128": (128, G(64, 128, False, 8, 3, fuse_x_quant=False), G(128, 128, False, 8, 3)),
    "m64w4": (64, G(64, 64, False, 4, 3, fuse_x_quant=False), G(128, 64, False, 4, 3)),
    # prefill with the SWAP=2 upcast (compile without spills; not yet timed)
    "q_64w4": (128, G(64, 64, 2, 4, 3, fuse_x_quant=False), G(128, 64, 2, 4, 3)),
    "q_64w8": (128, G(64, 64, 2, 8, 3, fuse_x_quant=False), G(128, 64, 2, 8, 3)),
    "q_32k128": (128, G(32, 128, 2, 4, 3, fuse_x_quant=False), G(64, 128, 2, 4, 3)),
    "p_64w4": (128, G(64, 64, False, 4, 3, fuse_x_quant=False), G(128, 64, False, 4, 3)),
}


def main(preset, quant, tokens, names):
    ceilings = None
    split_k = cuda_config._split_k
    for name in names:
        # NAME[@W][/S1xS2]: W warps per SM (split-K sizing, and moe_decode's
        # register cap) instead of 12; gemm1 and gemm2 split into S1 and S2 K
        # slices whatever T
        base, warps, s1, s2 = re.fullmatch(
            r"([^@/]+)(?:@(\d+))?(?:/(\d+)x(\d+))?", name).groups()
        bm, g1, g2 = CANDIDATES[base]
        cuda_config._split_k = split_k if s1 is None else (
            lambda ctas, cfg, K, warps, g1=g1, s=(int(s1), int(s2)): s[0] if cfg == g1 else s[1])
        # one regime, open to every path (BM 8 only routes without a sort)
        cuda_config._REGIMES = ((float("inf"), bm, g1, g2, int(warps) if warps else 12),)
        cuda_compile.get_kernel.cache_clear()
        jax.clear_caches()
        try:
            res = bench.run(preset, tokens, quant, reps=20, baselines=(), ceilings=ceilings,
                            log=lambda s: None)
        except Exception as e:  # a config that fails to compile or run is reported
            print(f"{name:>10}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            continue
        h = res["header"]
        ceilings = (h["hbm_bytes_per_s"], h["bf16_flops_per_s"])
        cells = [f"T={r['T']}: {r['results']['ours']['time_s'] * 1e6:8.1f} us "
                 f"({r['results']['ours']['pct_roofline']:4.1f}%)" for r in res["rows"]]
        print(f"{name:>10}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(t) for t in sys.argv[3].split(",")], sys.argv[4].split(","))
