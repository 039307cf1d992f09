"""Cosine similarity of moe() (each quant mode) against the reference with unquantised
activations (MXFP4 weights, float64 everything else), and against the reference that
quantises activations like the mode does: the README's accuracy table."""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jax_mxfp4_moe as mm


def cosine(a, b):
    return float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--backend", default="auto")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    for name, (E, k, H, I, act, gate_up) in {
        "gpt-oss-like (E=32,k=4,H=I=512, swiglu_oai)": (32, 4, 512, 512, "swiglu_oai", "interleaved"),
        "deepseek-like (E=64,k=8,H=512,I=256, silu)": (64, 8, 512, 256, "silu", "separated"),
    }.items():
        w = mm.prepare_weights(rng.standard_normal((E, 2 * I, H)) / np.sqrt(H),
                               rng.standard_normal((E, H, I)) / np.sqrt(I),
                               rng.standard_normal((E, 2 * I)) * 0.1, rng.standard_normal((E, H)) * 0.1,
                               gate_up=gate_up)
        x = jnp.asarray(rng.standard_normal((args.tokens, H)), jnp.bfloat16)
        tw, ti = mm.softmax_topk(jnp.asarray(rng.standard_normal((args.tokens, E)), jnp.float32), k,
                                 renormalize=True)
        exact = mm.reference.moe(x, w, tw, ti, activation=act, quantize_activations=False)
        for quant in mm.QUANT_MODES:
            y = jax.jit(lambda *a: mm.moe(*a, activation=act, quant=quant, backend=args.backend))(x, w, tw, ti)
            y = np.asarray(y.astype(jnp.float32), np.float64)
            same = mm.reference.moe(x, w, tw, ti, activation=act, quant=quant)
            print(f"{name:48s} {quant}: cosine vs unquantised {cosine(y, exact):.5f}, "
                  f"vs same-quantisation reference {cosine(y, same):.6f}")


if __name__ == "__main__":
    main()
