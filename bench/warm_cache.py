"""Compile, ahead of a device call, every CUDA kernel variant that a bench run
of the given presets, modes and T will launch, into the code cache
($JAX_MXFP4_MOE_CACHE_DIR): the layer is traced and lowered for the CUDA
platform with weights given as shapes (no GPU, no weight arrays). Run it with
the device's triton version (the cache key names it), carry the cache.

  python bench/warm_cache.py --preset gpt-oss-120b,deepseek-v3 --tokens 512,4096,16384 \\
      --quant a16w4,a8w4,a4w4
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

import jax_mxfp4_moe as mm
from jax_mxfp4_moe.cuda import layout as sm90, probes
from jax_mxfp4_moe.layer.weights import MoEWeights
from jax_mxfp4_moe.tools.bench import PRESETS


def weight_shapes(p, layout: str, scale_max: int) -> MoEWeights:
    if layout == sm90.NAME:
        shapes = sm90.LAYOUT.shapes(num_experts=p.num_experts, hidden=p.hidden,
                                    intermediate=p.intermediate)
    else:
        from jax_mxfp4_moe.layer.weights import canonical_shapes
        shapes = canonical_shapes(p.num_experts, p.hidden, p.intermediate)
    arr = {n: jax.ShapeDtypeStruct(s, d or jnp.float32) for n, (s, d) in shapes.items()}
    if not p.has_b1:
        arr["b1"] = None
    if not p.has_b2:
        arr["b2"] = None
    return MoEWeights(**arr, num_experts=p.num_experts, hidden=p.hidden,
                      intermediate=p.intermediate, gate_up=p.gate_up, layout=layout,
                      scale_max=scale_max)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt-oss-120b,deepseek-v3")
    ap.add_argument("--tokens", default="512,4096,16384")
    ap.add_argument("--quant", default="a16w4")
    ap.add_argument("--layout", default=sm90.NAME)
    ap.add_argument("--scale-max", type=int, default=123,
                    help="the weights' largest scale byte (the bench's random weights: <= 123)")
    ap.add_argument("--grad", action="store_true", help="also the backward (bench --grad)")
    a = ap.parse_args(argv)
    t0 = time.time()
    for name in a.preset.split(","):
        p = PRESETS[name]
        w = weight_shapes(p, a.layout, a.scale_max)
        for quant in a.quant.split(","):
            for T in (int(t) for t in a.tokens.split(",")):
                x = jax.ShapeDtypeStruct((T, p.hidden), jnp.bfloat16)
                tw = jax.ShapeDtypeStruct((T, p.top_k), jnp.float32)
                ids = jax.ShapeDtypeStruct((T, p.top_k), jnp.int32)
                f = jax.jit(lambda w, x, tw, ids, quant=quant: mm.moe(
                    x, w, tw, ids, activation=p.activation, quant=quant))
                f.trace(w, x, tw, ids).lower(lowering_platforms=("cuda",))
                if a.grad:
                    def loss(x, tw, b1, b2, w, ids, quant=quant):
                        y = mm.moe(x, dataclasses.replace(w, b1=b1, b2=b2), tw, ids,
                                   activation=p.activation, quant=quant)
                        return jnp.sum(y.astype(jnp.float32) * x.astype(jnp.float32))
                    argnums = (0, 1) + ((2,) if p.has_b1 else ()) + ((3,) if p.has_b2 else ())
                    jax.jit(jax.grad(loss, argnums=argnums)).trace(
                        x, tw, w.b1, w.b2, w, ids).lower(lowering_platforms=("cuda",))
                print(f"{name} {quant} T={T}: compiled ({time.time() - t0:.0f} s)", flush=True)
    probes.stream_read(1 << 20)
    probes.matmul_bf16(8192)
    print(f"probes compiled ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
