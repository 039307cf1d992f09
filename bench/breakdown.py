"""Where a layer call's time goes on the CUDA backend, at one T: N layer calls
(each with its own routing) in one jit, in three forms, in us per layer:
  outputs: every layer's output is a result of the jit (the bench's form);
  chained: each layer's output is the next one's input, as in a model;
  gpu:     chained, behind a long matmul that the jit runs first, minus that
           matmul alone: the host has queued every launch by the time the
           layers start, so this is the GPU's time per layer.
plus the sort alone, and an f32 zeros + cast per layer.
usage: python3 bench/breakdown.py PRESET QUANT T[,T...] [N]"""

import statistics
import sys

import jax
import jax.numpy as jnp

from jax_mxfp4_moe.tools import bench
from jax_mxfp4_moe.cuda import backend as cuda, config as cuda_config


def _median(fn, *args):
    return statistics.median(bench._time(jax.jit(fn), *args, reps=20, warmup=3))


def main(preset, quant, tokens, n):
    p = bench.PRESETS[preset]
    w = bench.random_weights(p, jax.random.key(42))
    a = jax.random.normal(jax.random.key(0), (4096, 4096), jnp.bfloat16)
    print(f"# {jax.devices()[0].device_kind}: {preset} {quant}, N={n}, us per layer call")
    for T in tokens:
        x = jax.random.normal(jax.random.key(T), (T, p.hidden), jnp.bfloat16)
        ids, tw = bench.random_routings(p, T, n, seed=T)
        ids, tw = jnp.asarray(ids), jnp.asarray(tw)
        bm = cuda_config.choose_config(T, p.top_k, p.num_experts, p.hidden, p.intermediate,
                                        deterministic=False).block_m
        layer = lambda w, x, tw, ids: cuda.moe(x, w, tw, ids, activation=p.activation, quant=quant)

        def chained(w, x, tw, ids):
            for i in range(n):
                x = layer(w, x, tw[i], ids[i])
            return x

        def head(a, x):  # ~1 ms of matmuls; x then depends on them
            for _ in range(4):
                a = (a @ a) * 0.01
            return a, x + (a[0, 0] * 0).astype(x.dtype)

        head_only = _median(lambda a, x: head(a, x), a, x)
        row = {
            "outputs": _median(lambda w, x, tw, ids: [layer(w, x, tw[i], ids[i]) for i in range(n)],
                               w, x, tw, ids) / n,
            "chained": _median(chained, w, x, tw, ids) / n,
            "gpu": (_median(lambda a, w, x, tw, ids: chained(w, head(a, x)[1], tw, ids),
                            a, w, x, tw, ids) - head_only) / n,
            "sort": _median(lambda tw, ids: [cuda.sort(ids[i], tw[i], num_experts=p.num_experts,
                                                       block_m=bm) for i in range(n)], tw, ids) / n,
            "zeros+cast": _median(lambda x: [(jnp.zeros(x.shape, jnp.float32) + i).astype(x.dtype)
                                             for i in range(n)], x) / n,
            # one launch of a one-CTA kernel through the FFI launcher, per call
            "ffi launch": _median(lambda x: [cuda.quantize_mx(x[:1, :32] + i, "mxfp8")
                                             for i in range(n)], x) / n,
        }
        print(f"T={T} BM={bm}: " + ", ".join(f"{k} {v * 1e6:.1f}" for k, v in row.items()),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(t) for t in sys.argv[3].split(",")],
         int(sys.argv[4]) if len(sys.argv) > 4 else 8)
