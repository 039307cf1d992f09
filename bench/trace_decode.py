"""Timeline of one decode-size layer call (moe_decode with TRACE): when each
program starts, when a gemm2 program's wait ends, when each ends, on which
SM. Prints phase summaries (times in us from the first start).
usage: python3 bench/trace_decode.py PRESET T [QUANT]"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jax_mxfp4_moe.cuda import backend as cuda, config as cuda_config
from jax_mxfp4_moe.tools.bench import PRESETS, random_routings, random_weights


def main(preset, T, quant="a16w4"):
    p = PRESETS[preset]
    w = random_weights(p, jax.random.key(0)).to_layout(cuda.LAYOUT_NAME)
    x = jax.random.normal(jax.random.key(1), (T, p.hidden), jnp.bfloat16)
    ids, tw = random_routings(p, T, 4, seed=0)
    E, I, H, K = p.num_experts, p.intermediate, p.hidden, p.top_k
    n = T * K
    assert n <= cuda_config.DIRECT_MAX, "decode sizes only (one moe_decode launch)"
    cfg = cuda_config.choose_config(T, K, E, H, I, deterministic=False, direct=True)
    grid_m = cuda.max_blocks(n, E, cfg.block_m)
    fmt = cuda._ACT_FORMAT[quant]
    fold = w.scale_max is not None and w.scale_max <= cuda_config.FOLD_MAX_SCALE_BYTE

    def layer(w, x, tw, ids):
        xq = cuda._quant_dequant(x, fp8=fmt == 2) if fmt else x
        return cuda._decode(xq, w, ids.reshape(-1), tw.reshape(-1), cfg, grid_m,
                            cuda.direct_entries(n), 0, fmt, cuda._ACT_CODE[p.activation],
                            fold, True, x.dtype, 1.702, 7.0, trace=True)
    f = jax.jit(layer)
    g1, g2 = cfg.gemm1, cfg.gemm2
    p1 = -(-I // g1.block_n) * grid_m * g1.split_k
    print(f"# {preset} T={T} {quant}: BM {cfg.block_m}, gemm1 {p1} programs (BN {g1.block_n}, "
          f"split {g1.split_k}), gemm2 {-(-H // g2.block_n) * grid_m * g2.split_k} "
          f"(BN {g2.block_n}, split {g2.split_k}), {grid_m} row blocks")
    for r in range(len(ids)):
        _, raw = f(w, x, jnp.asarray(tw[r]), jnp.asarray(ids[r]))
        t = np.asarray(raw).view(np.int64).reshape(-1, 8)
        if os.environ.get("TRACE_DUMP"):  # the raw [programs, 8] table, for offline analysis
            np.save(os.path.join(os.environ["TRACE_DUMP"], f"{preset}_T{T}_{quant}_{r}.npy"), t)
        if r == 0:
            continue  # compile and first-touch
        start, routed, ready, end, sm = t[:, 0], t[:, 1], t[:, 2], t[:, 3], t[:, 4]
        live = end > 0
        t0 = start[live].min()
        us = lambda v: (v - t0) / 1e3
        one, two = np.arange(len(t)) < p1, np.arange(len(t)) >= p1
        idle = live & (end - start < 2000) & two & (ready == 0)  # gemm2 roles of dead blocks
        work1, work2 = one & live, two & live & (ready > 0)
        d1 = (end - start)[work1] / 1e3
        d2 = (end - ready)[work2] / 1e3
        wait = (ready - routed)[work2] / 1e3
        route = (routed - start)[live] / 1e3
        print(f"routing {r}: span {us(end[live].max()):.1f} us | routing (every program) p10/50/90 "
              f"{np.percentile(route, 10):.2f}/{np.percentile(route, 50):.2f}/"
              f"{np.percentile(route, 90):.2f} | gemm1 starts "
              f"{us(start[work1].min()):.1f}..{us(start[work1].max()):.1f}, ends "
              f"{us(end[work1].min()):.1f}..{us(end[work1].max()):.1f}, duration p10/50/90 "
              f"{np.percentile(d1, 10):.1f}/{np.percentile(d1, 50):.1f}/{np.percentile(d1, 90):.1f}"
              f" | gemm2 starts {us(start[work2].min()):.1f}..{us(start[work2].max()):.1f}, ready "
              f"{us(ready[work2].min()):.1f}..{us(ready[work2].max()):.1f}, wait p50 "
              f"{np.percentile(wait, 50):.1f}, work p10/50/90 {np.percentile(d2, 10):.1f}/"
              f"{np.percentile(d2, 50):.1f}/{np.percentile(d2, 90):.1f}, ends "
              f"{us(end[work2].min()):.1f}..{us(end[work2].max()):.1f} | idle roles "
              f"{int(idle.sum())} | programs per SM max {np.bincount(sm[live]).max()}")
        if r == len(ids) - 1:  # a histogram: programs running, 1 us bins
            bins = np.arange(0, us(end[live].max()) + 1)
            run1 = [int(((us(start) <= b) & (us(end) > b) & work1).sum()) for b in bins]
            run2 = [int(((us(ready) <= b) & (us(end) > b) & work2).sum()) for b in bins]
            print("us: gemm1 running / gemm2 running (past its wait)")
            for b, a, c in zip(bins, run1, run2):
                print(f"{b:5.0f} {a:5d} {c:5d}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
