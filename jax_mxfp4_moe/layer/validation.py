"""Argument checks for ``moe``: misuse fails at trace time, naming the argument."""

from __future__ import annotations

import jax.numpy as jnp

from jax_mxfp4_moe.numerics import sorting
from jax_mxfp4_moe.layer.weights import MoEWeights

ACTIVATIONS = ("silu", "swiglu_oai")
QUANT_MODES = ("a4w4", "a8w4", "a16w4")
BACKENDS = ("auto", "jnp", "triton", "flydsl")
X_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
MAX_TOP_K = 127  # the slot field of a sorted entry is int32 bits 24..30


def check_moe_args(x, weights, topk_weights, topk_ids, *, activation, quant, expert_mask, backend):
    if not isinstance(weights, MoEWeights):
        raise TypeError(f"weights: expected MoEWeights, got {type(weights).__name__}")
    weights.validate()
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if quant not in QUANT_MODES:
        raise ValueError(f"quant: expected one of {QUANT_MODES}, got {quant!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"x: expected [T, H], got shape {getattr(x, 'shape', None)}")
    if not any(jnp.dtype(x.dtype) == jnp.dtype(d) for d in X_DTYPES):
        raise TypeError(f"x: expected dtype bfloat16, float16 or float32, got {x.dtype}")
    T, H = x.shape
    if H != weights.hidden:
        raise ValueError(f"x: hidden size {H} does not match weights.hidden = {weights.hidden}")
    if T >= sorting.MAX_TOKENS:
        raise ValueError(f"x: at most {sorting.MAX_TOKENS - 1} tokens (24-bit token field), got {T}")
    if getattr(topk_ids, "ndim", None) != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids: expected [T={T}, k], got shape {getattr(topk_ids, 'shape', None)}")
    if not jnp.issubdtype(topk_ids.dtype, jnp.integer):
        raise TypeError(f"topk_ids: expected an integer dtype, got {topk_ids.dtype}")
    k = topk_ids.shape[1]
    if not 1 <= k <= MAX_TOP_K:
        raise ValueError(f"topk_ids: k must be in 1..{MAX_TOP_K}, got {k}")
    if getattr(topk_weights, "shape", None) != topk_ids.shape:
        raise ValueError(f"topk_weights: expected shape {topk_ids.shape} like topk_ids, "
                         f"got {getattr(topk_weights, 'shape', None)}")
    if not jnp.issubdtype(topk_weights.dtype, jnp.floating):
        raise TypeError(f"topk_weights: expected a float dtype, got {topk_weights.dtype}")
    if expert_mask is not None:
        shape = jnp.shape(expert_mask)
        if len(shape) != 1 or shape[0] < weights.num_experts:
            raise ValueError(f"expert_mask: expected [E_global] with E_global >= "
                             f"weights.num_experts = {weights.num_experts}, got shape {shape}")
        dt = jnp.asarray(expert_mask).dtype
        if not (jnp.issubdtype(dt, jnp.integer) or dt == jnp.bool_):
            raise TypeError(f"expert_mask: expected a bool or integer dtype, got {dt}")
