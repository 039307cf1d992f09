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


# ---------------------------------------------------------------------------
# The grouped matmul of the derivative (autodiff.gmm_p)
# ---------------------------------------------------------------------------


def gmm_problem(shape, *, which, transpose, layout, block_m, experts, seed=0, scale_max=True):
    """(weights in ``layout``, lhs f32 [P, KC], block experts [NB]) of one
    grouped matmul through ``which`` ("w1" [2I, H] or "w2" [H, I]):
    random rows, the given expert per block (-1: none); scale_max False
    drops the weights' recorded largest scale byte (no 2**126 fold)."""
    w = make_weights(shape, gate_up="separated", bias=False, seed=seed, layout=layout)
    if not scale_max:
        w = dataclasses.replace(w, scale_max=None)
    n, k = (2 * shape.I, shape.H) if which == "w1" else (shape.H, shape.I)
    be = np.asarray(experts, np.int32)
    rng = np.random.default_rng(seed + 1)
    lhs = rng.standard_normal((len(be) * block_m, n if transpose else k)).astype(np.float32)
    return w, lhs, be


def gmm_params(w, *, which, transpose, block_m):
    """gmm_p's params for weights w."""
    dims = dict(num_experts=w.num_experts, hidden=w.hidden, intermediate=w.intermediate)
    return dict(which=which, layer_dims=tuple(sorted(dims.items())), layout=w.layout,
                block_m=block_m, transpose=transpose, scale_max=w.scale_max)


def gmm_oracle(w, which, lhs, block_expert, block_m, transpose):
    """gmm_p in float64 NumPy from the canonical weights: rows as bf16 (the
    operand type of the kernels and of gmm_jnp), each block through its
    expert (-1: zeros)."""
    import ml_dtypes

    from jax_mxfp4_moe.numerics import formats

    w = w.canonical()
    W = formats.dequantize_mxfp4_np(np.asarray(getattr(w, which)),
                                    np.asarray(getattr(w, which + "_scale")), np.float64)
    a = np.asarray(lhs).astype(ml_dtypes.bfloat16).astype(np.float64)
    out = np.zeros((a.shape[0], W.shape[2] if transpose else W.shape[1]))
    for b, e in enumerate(np.asarray(block_expert)):
        if e >= 0:
            rows = slice(b * block_m, (b + 1) * block_m)
            out[rows] = a[rows] @ (W[e] if transpose else W[e].T)
    return out
