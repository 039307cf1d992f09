"""One gpt-oss-style MoE layer under jax.jit, checked against the NumPy reference."""
import jax, jax.numpy as jnp, numpy as np
import jax_mxfp4_moe as mm

E, k, H, I, T = 8, 4, 256, 256, 16
rng = np.random.default_rng(0)
weights = mm.prepare_weights(rng.standard_normal((E, 2 * I, H)) / 16, rng.standard_normal((E, H, I)) / 16,
                             gate_up="interleaved")               # float -> MXFP4 + E8M0
x = jnp.asarray(rng.standard_normal((T, H)), jnp.bfloat16)
topk_weights, topk_ids = mm.topk_softmax(jnp.asarray(rng.standard_normal((T, E)), jnp.float32), k)
layer = jax.jit(lambda x, w, tw, ti: mm.moe(x, w, tw, ti, activation="swiglu_oai", quant="a8w4"))
y = layer(x, weights, topk_weights, topk_ids)
ref = mm.reference.moe(x, weights, topk_weights, topk_ids, activation="swiglu_oai", quant="a8w4")
print(f"y {y.shape} {y.dtype} on {jax.default_backend()}; "
      f"relative error vs reference {np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref):.2e}")
