"""Random MoE problems shared by the tests (CPU and GPU)."""

import dataclasses

import jax.numpy as jnp
import numpy as np

from jax_mxfp4_moe import LayerSpec, prepare_weights
from jax_mxfp4_moe.layer import routing


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    E: int
    k: int
    H: int
    I: int


GPT_OSS_LIKE = Shape("gpt-oss-like", E=8, k=4, H=256, I=256)
DEEPSEEK_LIKE = Shape("deepseek-like", E=16, k=8, H=256, I=128)
# H and I multiples of the MX block but not of a 128-wide K step (like gpt-oss's 2880).
ODD_K = Shape("odd-k", E=4, k=2, H=160, I=96)


def make_weights(shape, *, gate_up="separated", bias=True, seed=0, layout="canonical"):
    rng = np.random.default_rng(seed)
    E, H, I = shape.E, shape.H, shape.I
    w1 = rng.standard_normal((E, 2 * I, H)).astype(np.float32) / np.sqrt(H)
    w2 = rng.standard_normal((E, H, I)).astype(np.float32) / np.sqrt(I)
    b1 = rng.standard_normal((E, 2 * I)).astype(np.float32) * 0.1 if bias else None
    b2 = rng.standard_normal((E, H)).astype(np.float32) * 0.1 if bias else None
    return prepare_weights(w1, w2, b1, b2, gate_up=gate_up, layout=layout)


def make_tokens(shape, T, *, seed=1, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((T, shape.H)) * 2.0, dtype)
    logits = jnp.asarray(rng.standard_normal((T, shape.E)), jnp.float32)
    tw, ti = routing.topk_softmax(logits, shape.k)
    return x, tw, ti


def backend_moe(backend, x, w, tw, ids, *, activation="silu", quant="a16w4", deterministic=False,
                expert_mask=None, **kw):
    """A kernel backend module's moe (cuda.backend / rocm.backend) called the
    way moe()'s keywords describe a layer."""
    spec = LayerSpec.for_weights(w, ids.shape[1], activation=activation, quant=quant)
    return backend.moe(x, w, tw, ids, expert_mask, spec=spec, deterministic=deterministic, **kw)
