"""Three layer calls of this package's moe (two routings) for ncu, which
profiles the kernels of the last calls (--launch-count).
usage: python3 bench/profile_decode.py PRESET T QUANT"""

import sys

import jax
import jax.numpy as jnp

from jax_mxfp4_moe.layer import api
from jax_mxfp4_moe.tools.bench import PRESETS, random_routings, random_weights

preset, T, quant = sys.argv[1], int(sys.argv[2]), sys.argv[3]
p = PRESETS[preset]
mod = api._select("auto", quant, p.activation)
w = random_weights(p, jax.random.key(0)).to_layout(getattr(mod, "LAYOUT_NAME", "canonical"))
x = jax.random.normal(jax.random.key(1), (T, p.hidden), jnp.bfloat16)
ids, tw = random_routings(p, T, 2, seed=0)
f = jax.jit(lambda w, x, tw, ids: api.moe(x, w, tw, ids, activation=p.activation, quant=quant))
for r in range(2):
    jax.block_until_ready(f(w, x, jnp.asarray(tw[r]), jnp.asarray(ids[r])))
jax.block_until_ready(f(w, x, jnp.asarray(tw[1]), jnp.asarray(ids[1])))
